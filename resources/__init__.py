"""Tunedeck's data files: presets, the demo dataset, icons and the desktop entry.

Found with ``importlib.resources.files("tunedeck.resources")``, from a checkout and a wheel alike.
"""
