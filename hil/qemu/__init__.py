"""QEMU boards: the same parts as a bench (power, console, storage, network), in software."""

# TCG translation cache, MiB (QEMU's default: 1024). QEMU keeps translations across a guest
# reboot; with a cache that seldom fills, a bootloader copying a kernel over the old kernel's
# code pages crawls (GRUB's byte-wise copy took minutes). Smaller, it fills and flushes often.
TB_SIZE_MIB = 256
