# Shared helpers of the reference OS scripts (sourced, busybox ash).
# shellcheck shell=sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
. /etc/hil/build.env            # BOOTLOADER, DEVICE_TYPE, ARCH
BOOT_MNT=/mnt/boot
STATE_MNT=/mnt/state
DATA_MNT=/mnt/data
CONFIG_JSON=$BOOT_MNT/config.json
# what the OS keeps on resin-state (wiped by a state reset, as balenaOS's root-overlay)
STATE_OVERLAY=$STATE_MNT/root-overlay
SSH_HOST_KEY=$STATE_OVERLAY/etc/dropbear/dropbear_ed25519_host_key
UENV=$BOOT_MNT/resinOS_uEnv.txt
BOOTCOUNT_ENV=$BOOT_MNT/bootcount.env
GRUBENV=$BOOT_MNT/grub/grubenv
BOOTLIMIT=3

is_mounted() { grep -q " $1 " /proc/mounts; }
# to stderr, and to the journal: a unit's stderr is already there ($INVOCATION_ID: run by systemd)
log() {
    echo "$(basename "$0"): $*" >&2
    [ -n "$INVOCATION_ID" ] || logger -t "$(basename "$0")" "$*" 2>/dev/null
}
# Messages for whoever watches the serial console (tests do).
console() { echo "$*" > /dev/console 2>/dev/null || true; }

# --- which disk and partitions -------------------------------------------------------------
# The booted root comes from the kernel command line (root=/dev/vdaN); partition 2 is
# resin-rootA and 3 resin-rootB on every image.
booted_root() { sed -n 's/.*root=\([^ ]*\).*/\1/p' /proc/cmdline; }
booted_part() { r=$(booted_root); echo "${r##*[!0-9]}"; }
disk_dev() { r=$(booted_root); echo "${r%[0-9]*}"; }
part_dev() { echo "$(disk_dev)$1"; }
other_part() { if [ "$1" = 2 ]; then echo 3; else echo 2; fi; }
# fsck_part N: check partition N's ext4 filesystem before it is mounted (or while it is the
# read-only root), as balenaOS does at every boot: a filesystem marked as having errors
# ("clean with errors", e.g. after tune2fs -E force_fsck) is checked and repaired.
fsck_part() {
    e2fsck -p "$(part_dev "$1")" >> /run/hil/fsck.log 2>&1
    rc=$?
    [ "$rc" -lt 4 ] || console "HIL: e2fsck $(part_dev "$1") left errors (exit $rc)"
}
part_label() { if [ "$1" = 2 ]; then echo resin-rootA; else echo resin-rootB; fi; }

# --- bootloader state ----------------------------------------------------------------------
# U-Boot: resinOS_uEnv.txt (resin_root_part, upgrade_available) and bootcount.env (bootcount)
# on resin-boot. GRUB: one grubenv with all three. U-Boot's `env export -t` ends files in NUL.
_env_file() {
    if [ "$BOOTLOADER" = grub ]; then echo "$GRUBENV"
    elif [ "$1" = bootcount ]; then echo "$BOOTCOUNT_ENV"
    else echo "$UENV"; fi
}

bootenv_get() {
    f=$(_env_file "$1")
    v=
    [ -f "$f" ] && v=$(tr -d '\000' < "$f" | sed -n "s/^$1=//p" | tail -n 1)
    if [ -z "$v" ]; then
        case $1 in resin_root_part) v=2 ;; upgrade_available|bootcount) v=0 ;; esac
    fi
    echo "$v"
}

# Replace a small file on the FAT partition: write a sibling, fsync, rename, fsync. A power
# cut leaves the old or the new content, and the bootloader falls back to defaults if neither.
# FAT has no sync_fs: a plain `sync` writes the renamed entry to the disk but never flushes the
# disk's write cache, and an fsync alone leaves the entry in memory. Both, then: a power cut
# right after must not lose the change (the bootloader would boot the old root).
_fat_replace() { # file content
    printf '%s' "$2" > "$1.new" && sync "$1.new" 2>/dev/null; mv -f "$1.new" "$1" && fat_sync "$1"
}
fat_sync() { sync && sync "$(dirname "$1")"; }

# bootenv_set VAR=VALUE... (resin_root_part, upgrade_available, bootcount)
bootenv_set() {
    rp=$(bootenv_get resin_root_part)
    ua=$(bootenv_get upgrade_available)
    bc=$(bootenv_get bootcount)
    for kv in "$@"; do
        case $kv in
            resin_root_part=*) rp=${kv#*=} ;;
            upgrade_available=*) ua=${kv#*=} ;;
            bootcount=*) bc=${kv#*=} ;;
            *) log "unknown boot variable $kv"; return 1 ;;
        esac
    done
    if [ "$BOOTLOADER" = grub ]; then
        _fat_replace "$GRUBENV" "$(grub_env_block "resin_root_part=$rp
upgrade_available=$ua
bootcount=$bc")"
    else
        # bootcount first: a cut between the two writes leaves an older, consistent state
        _fat_replace "$BOOTCOUNT_ENV" "bootcount=$bc
"
        _fat_replace "$UENV" "resin_root_part=$rp
upgrade_available=$ua
"
    fi
}

# grub_env_block LINES: a GRUB environment block holding the "key=value" LINES: exactly 1024
# bytes, padded with '#', as grub-editenv writes it
grub_env_block() {
    body="# GRUB Environment Block"
    [ -n "$1" ] && body="$body
$1"
    printf '%s\n%s' "$body" "$(head -c $((1024 - ${#body} - 1)) /dev/zero | tr '\000' '#')"
}

bootenv_show() {
    echo "resin_root_part=$(bootenv_get resin_root_part)"
    echo "upgrade_available=$(bootenv_get upgrade_available)"
    echo "bootcount=$(bootenv_get bootcount)"
}

# --- config.json ---------------------------------------------------------------------------
cfg() { jq -r "$1 // empty" "$CONFIG_JSON" 2>/dev/null; }
# config.json flattened ("PATH<TAB>VALUE" lines): jq costs about a second per start under
# emulation. flat_get PATH: one value from $flat, which the caller sets to $(config_flat).
config_flat() { awk -f /usr/lib/hil/json-flat.awk "$CONFIG_JSON" 2>/dev/null; }
flat_get() { printf '%s\n' "$flat" | awk -F '\t' -v k="$1" '$1 == k { print $2; exit }'; }

# Rewrite config.json through jq (filter and args as given), atomically.
cfg_update() {
    tmp=$CONFIG_JSON.new
    jq "$@" "$CONFIG_JSON" > "$tmp" && [ -s "$tmp" ] && sync "$tmp" && mv -f "$tmp" "$CONFIG_JSON" &&
        fat_sync "$CONFIG_JSON"  # on resin-boot
}

# --- the API (config.json's apiEndpoint) -------------------------------------------------------
# api_target: API_HOST, API_PORT, API_HOSTPORT and API_PREFIX from apiEndpoint; returns 2 when
# there is none or it is not http:// (the only scheme this OS speaks).
api_target() {
    endpoint=$(cfg .apiEndpoint)
    case $endpoint in
        http://*) ;;
        "") return 2 ;;
        *) log "only http:// endpoints are supported (got a ${endpoint%%:*} URL)"; return 2 ;;
    esac
    rest=${endpoint#http://}
    API_HOSTPORT=${rest%%/*}
    API_PREFIX=
    [ "$API_HOSTPORT" != "$rest" ] && API_PREFIX=/${rest#*/}
    API_PREFIX=${API_PREFIX%/}
    API_HOST=${API_HOSTPORT%%:*}
    API_PORT=80
    [ "$API_HOSTPORT" != "$API_HOST" ] && API_PORT=${API_HOSTPORT#*:}
    return 0
}

# api_request METHOD PATH KEY [BODY]: the HTTP/1.0 exchange with the API (after api_target) on
# stdout, authorised by config.json's KEY (apiKey, deviceApiKey); 2 when config.json has no
# KEY. The key is never printed or put on a command line: the request is built by the shell's
# printf builtin into a private file and sent with nc.
api_request() {
    key=$(cfg ".$3")
    [ -n "$key" ] || return 2
    request=$(umask 077; mktemp /run/hil/request.XXXXXX) || return 1
    printf '%s %s%s HTTP/1.0\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' \
        "$1" "$API_PREFIX" "$2" "$API_HOSTPORT" "$key" "${#4}" "$4" > "$request"
    timeout 15 nc "$API_HOST" "$API_PORT" < "$request" 2>/dev/null
    rc=$?
    rm -f "$request"
    return $rc
}
http_status() { head -n 1 "$1" | cut -d' ' -f2; }
# the body: after the first empty line
http_body() { sed '1,/^\r\{0,1\}$/d' "$1"; }

os_version() { sed -n 's/^VERSION="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "${1:-}/etc/os-release"; }

# --- balenaEngine ---------------------------------------------------------------------------
# engine_started SECONDS: wait until balena.service is active (balenad sent READY=1: its API
# listens), or give up after SECONDS or when the unit failed (its start limit).
engine_started() {
    i=0
    while [ "$i" -lt "$1" ]; do
        case $(systemctl is-active balena.service) in
            active) return 0 ;;
            failed) return 1 ;;
        esac
        sleep 1
        i=$((i + 1))
    done
    return 1
}
