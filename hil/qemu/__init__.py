"""QEMU boards: the same parts as a bench (power, console, storage, network), in software."""
