"""pytest-hil: hardware-in-the-loop testing for embedded OS images."""

__version__ = "0.1.0"
