"""Serial consoles: transport (pyserial URLs), capture log, the shell and an expect on top."""

from __future__ import annotations

import serial

if "hil.console" not in serial.protocol_handler_packages:
    serial.protocol_handler_packages.append("hil.console")
