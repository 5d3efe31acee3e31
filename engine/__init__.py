"""Tunedeck's fine-tuning engine. Pure Python: it never imports Qt."""

import logging

from tunedeck.engine.errors import TunedeckError

__all__ = ["TunedeckError"]


class _NoKernelsHubNotice(logging.Filter):
    """bitsandbytes' CPU backend warns on import, on CPUs with AVX512-BF16, that it could not fetch an
    optional kernel from the hub (the ``kernels`` package); it then uses its own, so the line only
    alarms a user at the top of every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHubNotice())
