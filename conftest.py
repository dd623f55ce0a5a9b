"""Repository-level pytest configuration.

The pytest-hil plugin itself is loaded through its ``pytest11`` entry point (``hil.plugin``);
the suites' shared fixtures live in ``suites/conftest.py``.
"""
