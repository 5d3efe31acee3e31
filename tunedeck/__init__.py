"""Tunedeck: fine-tune language models on your own GPU and steer the run while it goes.

The installed package is assembled from the repository's folders (see ``[tool.setuptools]`` in
pyproject.toml): ``engine/`` is ``tunedeck.engine`` (pure Python, never Qt), ``gui/`` is
``tunedeck.gui`` (the window) and ``resources/`` is ``tunedeck.resources`` (presets, the demo
dataset, icons). This folder holds only the package's own root.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tunedeck")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
