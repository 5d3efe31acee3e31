"""What a model or dataset name points at: a builtin, a local path or a hub id.

Torch-free, so the window checks its form by the same rule the engine loads by, without waiting
for torch to import. A name the engine would read as a local path that does not exist gets one
refusal, worded the same in the form and in a failed run.
"""

from __future__ import annotations

import re
from pathlib import Path

from tunedeck.engine.builtin import DEMO
from tunedeck.engine.errors import DataError, ModelError

FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_hub_dataset(path: str) -> bool:
    """A folder (``datasets.load_dataset`` reads it) or ``owner/name`` that is not a data file name."""
    p = Path(path).expanduser()
    if p.is_file():
        return False
    return p.is_dir() or (HUB_NAME.match(path) is not None and p.suffix.lower() not in FILE_TYPES)


def missing_dataset(path: str) -> DataError | None:
    """The refusal of a dataset path read as a local file that does not exist, or None."""
    if not path or path == DEMO or Path(path).expanduser().is_file() or is_hub_dataset(path):
        return None
    return DataError(
        f"dataset file {Path(path).expanduser().absolute()} does not exist",
        "choose an existing file, a hub dataset owner/name, or builtin:demo",
    )


def model_is_local(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; a path starting with . / ~ or deeper than that is local."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def missing_model(name: str) -> ModelError | None:
    """The refusal of a model name read as a local folder that does not exist, or None."""
    if (
        not name
        or name.startswith("builtin:")
        or not model_is_local(name)
        or Path(name).expanduser().exists()
    ):
        return None
    return ModelError(
        f"model folder {Path(name).expanduser().absolute()} does not exist",
        "choose an existing folder, a hub id like owner/name, or builtin:tiny",
    )
