"""Tunedeck's fine-tuning engine. Pure Python: it never imports Qt."""

from tunedeck.engine.errors import TunedeckError

__all__ = ["TunedeckError"]
