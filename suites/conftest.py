"""Fixtures shared by the OS suites. Suites talk only to fixtures (``dut``, ``rig``), never to a
driver, so each runs unchanged on a bench board and on a QEMU board."""
