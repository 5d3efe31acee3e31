"""The window's parts, one small module each; main_window.py only docks and wires them."""
