"""Flashing: open a release artifact, prepare it (config.json), write it fast and verify it.

Modules: ``source`` (decompressing reader), ``bmap`` (block maps), ``safety`` (target checks),
``writer`` (``flash()``), ``configure`` (``configure_image()``), ``redact`` (secrets), ``cli``.
"""
