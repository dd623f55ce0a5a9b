"""What the devices suite runs on the device: small POSIX shell probes that print one result
line each, and their parsers.

The probes use only a POSIX shell and tools busybox has (``stty``, ``dd``, ``hwclock``,
``timeout``), plus the kernel's interfaces (``/sys/class/gpio``, ``/sys/class/watchdog``,
``/sys/class/rtc``), or libgpiod's tools where the OS has them, so the same text runs on the
host OS and inside a privileged container (whose busybox or coreutils shell runs it the same).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

# --- /dev nodes -----------------------------------------------------------------------------------

NODE_PROBE = r"""
probe_node() {
  n=$1
  if [ ! -e "$n" ]; then echo "NODE $n missing -"; return; fi
  if [ -b "$n" ]; then kind=block; elif [ -c "$n" ]; then kind=char; else
    echo "NODE $n notadevice $(ls -ld "$n" 2>&1)"; return; fi
  case ${n##*/} in
    watchdog*)  # opening a watchdog arms it: the watchdog test does that, with a magic close
      echo "NODE $n $kind ok present (not opened: opening arms it)"; return ;;
    tty*|serial*)  # stty opens without waiting for carrier, then reads the line settings
      how="stty -F"; out=$(timeout 10 stty -F "$n" 2>&1 >/dev/null); rc=$? ;;
    rtc*)
      how="hwclock -r -f"; out=$(timeout 10 hwclock -r -f "$n" 2>&1 >/dev/null); rc=$? ;;
    *)
      if [ "$kind" = block ]; then
        how="read one sector"; out=$(timeout 10 dd if="$n" of=/dev/null bs=512 count=1 2>&1)
        rc=$?
      else
        how="open"; out=$(timeout 10 sh -c 'exec 3<"$1"' _ "$n" 2>&1); rc=$?
      fi ;;
  esac
  if [ $rc -eq 0 ]; then echo "NODE $n $kind ok $how"
  else echo "NODE $n $kind fail $how (exit $rc): $(echo "$out" | tr '\n' ' ')"; fi
}
"""


@dataclass(frozen=True)
class NodeResult:
    path: str
    state: str  # missing | notadevice | block | char
    ok: bool
    detail: str


def node_script(nodes: list[str]) -> str:
    return NODE_PROBE + "".join(f"probe_node {shlex.quote(n)}\n" for n in nodes)


def parse_nodes(text: str) -> dict[str, NodeResult]:
    out = {}
    for m in re.finditer(r"^NODE (\S+) (\S+) (.*)$", text, re.M):
        path, state, rest = m.groups()
        ok = state in ("block", "char") and rest.startswith("ok")
        detail = rest.split(" ", 1)[1] if state in ("block", "char") and " " in rest else rest
        out[path] = NodeResult(path, state, ok, detail.strip())
    return out


# --- GPIO chips and lines -------------------------------------------------------------------------
# Backends, in order: the GPIO sysfs class (kernel ABI, readback of an output's level), else
# libgpiod's tools (the character device; v1 and v2 spellings). Which one ran is reported.

GPIO_PROBE = r"""
gpio_sysbase() {  # chip name -> its sysfs base number
  for d in /sys/class/gpio/gpiochip*; do
    [ -e "$d/device/$1" ] && { cat "$d/base"; return 0; }
  done
  return 1
}
gpiod_v2() { gpiodetect --version 2>/dev/null | head -n 1 | grep -q 'libgpiod) v2'; }
probe_chip() {  # chip: existence, open, line count, every line's info
  c=$1; n=/dev/$c
  if [ ! -c "$n" ]; then echo "CHIP $c missing"; return; fi
  if ! timeout 10 sh -c 'exec 3<"$1"' _ "$n" 2>/dev/null; then echo "CHIP $c noopen"; return; fi
  if command -v gpioinfo >/dev/null; then  # the character device: reads info, requests nothing
    if gpiod_v2; then info=$(gpioinfo -c "$c" 2>&1); else info=$(gpioinfo "$c" 2>&1); fi
    echo "CHIP $c gpiod $(echo "$info" | grep -c '^[[:space:]]*line ') $(gpiodetect | \
      sed -n "s/^$c \[\(.*\)\].*/\1/p")"
    echo "$info" | sed -n "s/^[[:space:]]*line *\([0-9]*\):\(.*\)/LINE $c \1 info \2/p"
  elif base=$(gpio_sysbase "$c"); then  # sysfs: a free line can be exported, a used one not
    d=/sys/class/gpio/gpiochip$base
    echo "CHIP $c sysfs $(cat $d/ngpio) $(cat $d/label)"
    i=0
    while [ "$i" -lt "$(cat $d/ngpio)" ]; do
      g=$((base + i))
      if [ -d /sys/class/gpio/gpio$g ]; then
        echo "LINE $c $i exported $(cat /sys/class/gpio/gpio$g/direction)"
      elif err=$(echo $g 2>&1 > /sys/class/gpio/export); then
        echo "LINE $c $i free $(cat /sys/class/gpio/gpio$g/direction)"
        echo $g > /sys/class/gpio/unexport
      else
        case $err in *busy*|*Busy*) echo "LINE $c $i used kernel" ;;
                     *) echo "LINE $c $i error $err" ;; esac
      fi
      i=$((i + 1))
    done
  else
    echo "CHIP $c notools"
  fi
}
# Driving and reading lines: sysfs where the kernel has it (it can read an output back), else
# libgpiod's tools (a background gpioset holds the level; gpioget reads another line).
gpio_out() {  # chip line level
  if base=$(gpio_sysbase "$1"); then
    g=$((base + $2)); s=/sys/class/gpio/gpio$g
    [ -d $s ] || echo $g > /sys/class/gpio/export || { echo "SET $1 $2 busy"; return; }
    echo out > $s/direction && echo $3 > $s/value && echo "SET $1 $2 $3 $(cat $s/value)"
  elif command -v gpioset >/dev/null; then
    gpio_release "$1" "$2"
    if gpiod_v2; then gpioset -c "$1" "$2=$3" >/dev/null 2>&1 &
    else gpioset --mode=signal "$1" "$2=$3" >/dev/null 2>&1 & fi
    echo $! > /tmp/.hil-gpio-$1-$2
    # gpioset requests the line as it starts: wait (at most 5 s) until the chip shows it used
    i=0
    while [ $i -lt 50 ] && ! gpio_busy "$1" "$2"; do sleep 0.1; i=$((i + 1)); done
    if kill -0 $! 2>/dev/null; then echo "SET $1 $2 $3 held"; else echo "SET $1 $2 failed"; fi
  else
    echo "SET $1 $2 notools"
  fi
}
gpio_busy() {  # chip line: is the line requested by someone (libgpiod's view)?
  if gpiod_v2; then gpioinfo -c "$1" "$2" 2>/dev/null | grep -q consumer
  else gpioinfo "$1" 2>/dev/null | grep "line *$2:" | grep -q '\[used\]'; fi
}
gpio_in() {  # chip line: read it as an input
  if base=$(gpio_sysbase "$1"); then
    g=$((base + $2)); s=/sys/class/gpio/gpio$g
    [ -d $s ] || echo $g > /sys/class/gpio/export || { echo "GET $1 $2 busy"; return; }
    echo in > $s/direction && echo "GET $1 $2 $(cat $s/value)"
  elif command -v gpioget >/dev/null; then
    if gpiod_v2; then v=$(gpioget --numeric -c "$1" "$2" 2>&1)
    else v=$(gpioget "$1" "$2" 2>&1); fi
    echo "GET $1 $2 $(echo $v | tr ' ' _)"
  else
    echo "GET $1 $2 notools"
  fi
}
gpio_release() {  # chip line: back to an unrequested input
  if [ -f /tmp/.hil-gpio-$1-$2 ]; then
    p=$(cat /tmp/.hil-gpio-$1-$2); rm -f /tmp/.hil-gpio-$1-$2
    kill $p 2>/dev/null
    i=0
    while [ $i -lt 50 ] && kill -0 $p 2>/dev/null; do sleep 0.1; i=$((i + 1)); done
  fi
  if base=$(gpio_sysbase "$1"); then
    g=$((base + $2)); s=/sys/class/gpio/gpio$g
    [ -d $s ] && { echo in > $s/direction; echo $g > /sys/class/gpio/unexport; }
  fi
  return 0
}
"""


@dataclass
class ChipResult:
    name: str
    state: str  # missing | noopen | notools | sysfs | gpiod
    lines: int = 0
    label: str = ""
    line_info: dict[int, str] = field(default_factory=dict)  # line -> "free in", "used ..."


def chip_script(chips: list[str]) -> str:
    return GPIO_PROBE + "".join(f"probe_chip {shlex.quote(c)}\n" for c in chips)


def parse_chips(text: str) -> dict[str, ChipResult]:
    chips: dict[str, ChipResult] = {}
    for line in text.splitlines():
        f = line.strip().split(" ", 4)
        if f[0] == "CHIP" and len(f) >= 3:
            chip = ChipResult(f[1], f[2])
            if f[2] in ("sysfs", "gpiod") and len(f) >= 4 and f[3].isdigit():
                chip.lines = int(f[3])
                chip.label = f[4] if len(f) > 4 else ""
            chips[f[1]] = chip
        elif f[0] == "LINE" and len(f) >= 4 and f[1] in chips and f[2].isdigit():
            chips[f[1]].line_info[int(f[2])] = " ".join(f[3:]).strip()
    return chips


def split_line(spec: str) -> tuple[str, int]:
    """``gpiochip0:17`` -> ("gpiochip0", 17)."""
    chip, _, line = spec.partition(":")
    if not chip or not line.isdigit():
        raise ValueError(f"GPIO line {spec!r}: expected chip:line, e.g. gpiochip0:17")
    return chip, int(line)


def set_get_script(chip: str, line: int) -> str:
    """Drive a free line high then low, reading its level back each time; release it."""
    c = shlex.quote(chip)
    return (GPIO_PROBE + f"gpio_out {c} {line} 1; gpio_out {c} {line} 0; "
            f"gpio_release {c} {line}\n")


def loopback_script(out: tuple[str, int], inp: tuple[str, int]) -> str:
    """Drive ``out`` to each level and read ``inp`` (wired to it); release both."""
    o = f"{shlex.quote(out[0])} {out[1]}"
    i = f"{shlex.quote(inp[0])} {inp[1]}"
    steps = "".join(f"gpio_out {o} {level}; gpio_in {i}\n" for level in (1, 0, 1, 0))
    return GPIO_PROBE + steps + f"gpio_release {o}; gpio_release {i}\n"


def parse_levels(text: str, tag: str) -> list[str]:
    """The last field of each ``SET``/``GET`` line: a level, or why there is none."""
    return [line.split()[-1] for line in text.splitlines() if line.startswith(tag + " ")]


# --- RTC ------------------------------------------------------------------------------------------

RTC_SCRIPT = r"""
r=/sys/class/rtc/{rtc}
echo "HWCLOCK $(timeout 10 hwclock -r -f /dev/{rtc} >/dev/null 2>&1; echo $?) \
$(timeout 10 hwclock -r -f /dev/{rtc} 2>&1 | tr '\n' ' ')"
a=$(cat $r/since_epoch); i=0
# the RTC ticks once a second: wait (at most 3 s) for the next tick
while [ "$(cat $r/since_epoch)" = "$a" ] && [ $i -lt 30 ]; do sleep 0.1; i=$((i + 1)); done
echo "RTC $(cat $r/name | tr ' ' _) $a $(cat $r/since_epoch) $(date +%s)"
"""


def rtc_script(rtc: str = "rtc0") -> str:
    return RTC_SCRIPT.replace("{rtc}", rtc)


# --- watchdog -------------------------------------------------------------------------------------
# All in one command: the open file descriptor must live across the pets and the magic close.

WATCHDOG_SCRIPT = r"""
s=/sys/class/watchdog/{wd}
echo "WD before $(cat $s/state 2>/dev/null || echo unknown) nowayout=$(cat $s/nowayout 2>/dev/null)"
k0=$(dmesg | grep -c 'did not stop')
exec 3>/dev/{wd} || { echo "WD open failed"; exit 1; }
echo "WD opened $(cat $s/state 2>/dev/null) timeout=$(cat $s/timeout 2>/dev/null)"
pets=0
for i in 1 2 3; do printf 1 >&3 && pets=$((pets + 1)); done
echo "WD petted $pets"
printf V >&3   # the magic close: the driver stops the timer when the file is closed after it
exec 3>&-
echo "WD closed $(cat $s/state 2>/dev/null)"
echo "WD kernel $k0 $(dmesg | grep -c 'did not stop')"
"""


def watchdog_script(wd: str = "watchdog0") -> str:
    return WATCHDOG_SCRIPT.replace("{wd}", wd)


def parse_tagged(text: str, tag: str) -> dict[str, str]:
    """``WD opened active timeout=30`` -> {"opened": "active timeout=30"}."""
    out = {}
    for line in text.splitlines():
        if line.startswith(tag + " "):
            _, key, *rest = line.split(" ", 2)
            out[key] = rest[0] if rest else ""
    return out
