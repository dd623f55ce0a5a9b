"""Bench commands for a person at a rig: power, console, SD mux, SSH, boot, lock
(``hil power|console|mux|ssh|boot|lock|unlock RIG``), through the same session, rig and
drivers a pytest session uses."""
