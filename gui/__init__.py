"""Tunedeck's window (PySide6 + pyqtgraph). It talks to the engine only through engine's public API."""
