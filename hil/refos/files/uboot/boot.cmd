# Reference OS boot script (U-Boot, balenaOS semantics). State lives on resin-boot (virtio 0:1):
#   resinOS_uEnv.txt  resin_root_part=<2|3>, upgrade_available=<0|1>   (written by the OS)
#   bootcount.env     bootcount=<n>   (counted here while upgrade_available=1)
# Once bootcount exceeds bootlimit the other root boots; its rollback-altboot cleans up.
setenv resin_root_part 2
setenv upgrade_available 0
setenv bootcount 0
setenv bootlimit 3
if fatload virtio 0:1 ${scriptaddr} resinOS_uEnv.txt; then
  env import -t ${scriptaddr} ${filesize} resin_root_part upgrade_available
fi
if fatload virtio 0:1 ${scriptaddr} bootcount.env; then
  env import -t ${scriptaddr} ${filesize} bootcount
fi
# extra kernel arguments the OS asks for (its bootloader_config_modify), as balenaOS's U-Boot
# imports extra_uEnv.txt
setenv extra_os_cmdline
setenv extra_os_firmware_class_path
if fatload virtio 0:1 ${scriptaddr} extra_uEnv.txt && test ${filesize} != 0; then
  env import -t ${scriptaddr} ${filesize} extra_os_cmdline extra_os_firmware_class_path
fi
# a damaged file must not leave the board unbootable
if test "${resin_root_part}" != 2 && test "${resin_root_part}" != 3; then
  setenv resin_root_part 2
fi
if test "${upgrade_available}" = 1; then
  # no arithmetic needed (setexpr works in hex): count 0..9, then stay at 9
  if test "${bootcount}" = 0; then setenv bootcount 1
  elif test "${bootcount}" = 1; then setenv bootcount 2
  elif test "${bootcount}" = 2; then setenv bootcount 3
  elif test "${bootcount}" = 3; then setenv bootcount 4
  elif test "${bootcount}" = 4; then setenv bootcount 5
  elif test "${bootcount}" = 5; then setenv bootcount 6
  elif test "${bootcount}" = 6; then setenv bootcount 7
  elif test "${bootcount}" = 7; then setenv bootcount 8
  else setenv bootcount 9
  fi
  env export -t ${scriptaddr} bootcount
  fatwrite virtio 0:1 ${scriptaddr} bootcount.env ${filesize}
else
  setenv bootcount 0
fi
setenv boot_part ${resin_root_part}
if test "${upgrade_available}" = 1 && test ${bootcount} -gt ${bootlimit}; then
  if test "${resin_root_part}" = 2; then setenv boot_part 3; else setenv boot_part 2; fi
fi
echo "HIL-BOOT: root=${boot_part} resin_root_part=${resin_root_part} bootcount=${bootcount} upgrade_available=${upgrade_available}"
# The QEMU board's LED, declared as a board's device tree declares its own (gpio-leds): led0 on
# line 7 of the virt board's PL061 GPIO controller, whose line 3 is its power key. Added to a
# copy of the tree QEMU made (room for the nodes), only where that controller is. The copy goes
# where QEMU put its tree (fdt_addr, the start of RAM, below the script and the kernel): U-Boot
# works from its own relocated copy, and no fixed address near the top of RAM collides with
# U-Boot on a board with less memory.
setenv hil_fdt ${fdtcontroladdr}
if fdt addr ${fdtcontroladdr} && fdt get value hil_gpio /pl061@9030000 phandle && fdt move ${fdtcontroladdr} ${fdt_addr} 0x120000; then
  setenv hil_fdt ${fdt_addr}
  fdt mknode / leds
  fdt set /leds compatible "gpio-leds"
  fdt mknode /leds led0
  fdt set /leds/led0 label "led0"
  fdt set /leds/led0 gpios "<${hil_gpio} 7 0>"
  fdt set /leds/led0 default-state "off"
fi
# norandmaps (balenaOS randomises): each program maps at the same addresses at every run, so QEMU's
# emulation reuses its translated code; the engine's Go CLI then starts 3-5x faster. kpti=0: the
# kernel turns page-table isolation on with KASLR, and QEMU empties its TLB at each of the two
# page-table switches per system call: without it a system call is 7x cheaper (docs/refos.md)
setenv hil_args "console=@CONSOLE@ rootfstype=ext4 ro panic=1 quiet loglevel=3 apparmor=0 selinux=0 norandmaps kpti=0 ${extra_os_cmdline} ${extra_os_firmware_class_path}"
setenv bootargs "root=/dev/vda${boot_part} ${hil_args}"
if load virtio 0:${boot_part} ${kernel_addr_r} /boot/Image; then
  load virtio 0:${boot_part} ${ramdisk_addr_r} /boot/initrd.img
  booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${hil_fdt}
fi
# the chosen root has no kernel: try the other one rather than stop
if test "${boot_part}" = 2; then setenv boot_part 3; else setenv boot_part 2; fi
echo "HIL-BOOT: no kernel there, trying root=${boot_part}"
setenv bootargs "root=/dev/vda${boot_part} ${hil_args}"
load virtio 0:${boot_part} ${kernel_addr_r} /boot/Image
load virtio 0:${boot_part} ${ramdisk_addr_r} /boot/initrd.img
booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${hil_fdt}
echo "HIL-BOOT: nothing bootable"
