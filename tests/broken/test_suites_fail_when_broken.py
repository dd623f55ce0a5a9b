"""Every suite fails when the OS breaks its promise, and says which promise.

A child pytest runs a suite on a QEMU board with the reference OS while ``break_os.py`` breaks
promises on the running device (``HIL_BREAK``). The rig is a copy of ``qemu-aarch64`` under a
name of its own (no queueing behind other sessions); the NTP server still takes the host-wide
lock on :123.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.own_rig import run_on_own_rig

pytestmark = pytest.mark.qemu


def run_broken(tmp_path: Path, breaks: str, args: list[str], *, boot_timeout: int = 0,
               timeout: float = 840, target: dict[str, object] | None = None
               ) -> tuple[int, str, str]:
    """(exit code, whole output, the FAILED/ERROR summary lines) of the suite run broken.
    ``boot_timeout``: a short boot deadline, so a missing reboot is reported in a minute;
    ``target``: settings of the QEMU board that differ from the rig's."""
    code, out = run_on_own_rig(tmp_path, ["-p", "tests.broken.break_os", *args],
                               env={"HIL_BREAK": breaks}, boot_timeout=boot_timeout,
                               timeout=timeout, target=target)
    failed = "\n".join(ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR")))
    return code, out, failed


def test_provisioning_suite_fails_on_a_leaked_key_a_wrong_hostname_and_ignored_dns(
        tmp_path: Path) -> None:
    code, out, failed = run_broken(
        tmp_path, "console-leaks-key,hostname-ignored,dns-servers-ignored,"
        "no-sshd-socket-recovery,udev-rules-ignored,no-mdns,network-settings-ignored",
        ["suites/provisioning", "-k",
         "hostname_is_config or no_key_in or dns_servers or recovery_timer_is_active "
         "or udev_rules or hostname_is_announced or reaches_networkmanager"],
        boot_timeout=60)
    assert code == 1 and "8 failed" in out, out[-6000:]
    for test, want in (("connectivity_check", "os.network.connectivity set: NetworkManager's "
                        "[connectivity] to hold {'uri': 'http://www.archlinux.org/"),
                       ("random_mac_address_scan", "os.network.wifi.randomMacAddressScan=true: "
                        "NetworkManager's [device] to hold {'wifi.scan-rand-mac-address': "
                        "'yes'}")):
        assert (f"test_{test}_from_config_json_reaches_networkmanager - hil.errors.NotReached: "
                f"{want}") in failed, out[-6000:]
    assert ("test_hostname_is_announced_over_mdns - hil.errors.NotReached: the device to "
            "answer for balena.local over mDNS") in failed, out[-6000:]
    assert ("test_sshd_socket_recovery_timer_is_active - hil.errors.NotReached: "
            "recover-sshd-socket.timer active") in failed, out[-6000:]
    assert ("test_udev_rules_from_config_json_are_installed_and_act - hil.errors.NotReached: "
            "os.udevRules.99-hil-test to be installed as /etc/udev/rules.d/99-hil-test.rules"
            ) in failed, out[-6000:]
    assert ("test_dns_servers_reach_the_resolver - hil.errors.NotReached: dnsServers="
            "'1.1.1.1 9.9.9.9' to give dnsmasq the upstream servers") in failed, out[-6000:]
    assert ("test_hostname_is_config_hostname_or_uuid_prefix - AssertionError: /etc/hostname "
            "is 'balena'; the first 7 characters of uuid is") in failed, out[-6000:]
    assert ("test_no_key_in_the_console_log_or_the_report - AssertionError: provisioning key "
            "(apiKey) appeared on the console") in failed, out[-6000:]


def test_provisioning_suite_fails_when_the_wired_interface_carries_nothing(
        tmp_path: Path) -> None:
    """A run of its own: with every connection the device opens rejected, it could not pull
    the other tests' app image from the rig's registry either."""
    code, out, failed = run_broken(tmp_path, "wired-rejects-out", [
        "suites/provisioning", "-k", "wired_interface"])
    assert code == 1 and "1 failed" in out, out[-6000:]
    assert ("test_wired_interface_is_connected_and_carries_http - AssertionError: an HTTP GET "
            "over the wired interface eth0 to the rig host") in failed, out[-6000:]


def test_provisioning_suite_fails_when_a_new_hostname_is_not_announced(tmp_path: Path) -> None:
    code, out, failed = run_broken(tmp_path, "avahi-keeps-old-name", [
        "suites/provisioning", "-k", "hostname_change_at_runtime"])
    assert code == 1 and "1 failed, 1 passed" in out, out[-6000:]
    # the hostname itself is applied: only its announcement is missing
    assert re.search(r"test_hostname_change_at_runtime_is_announced_over_mdns - hil\.errors\."
                     r"NotReached: the device to answer for hil-[0-9a-f]{6}\.local over mDNS "
                     r"\(hostname written to config\.json at runtime\)", failed), out[-6000:]


def test_devices_suite_fails_naming_a_missing_node_and_an_led_that_does_not_blink(
        tmp_path: Path) -> None:
    # the tests that name a node (the container tests would pull images to show it again)
    code, out, failed = run_broken(tmp_path, "no-gpiochip0,under-voltage,supervisor-no-blink", [
        "suites/devices", "-k",
        "dev_node_exists_and_opens or gpio_chip_has_its_lines or under_voltage or "
        "identify_blinks"])
    assert code == 1, out[-6000:]
    assert ("test_identify_blinks_the_led_then_stops - hil.errors.NotReached: POST /v1/blink "
            "to blink the LED (/sys/class/leds/led0/brightness) more than 10 times"
            ) in failed, out[-6000:]
    # under-voltage is the rig's supply at fault: reported apart, as an infrastructure error
    assert re.search(r"^INFRA \S+::test_no_under_voltage_since_boot - .*power.*the kernel "
                     r"reports under-voltage since boot", out, re.M), out[-6000:]
    assert ("test_dev_node_exists_and_opens[/dev/gpiochip0] - AssertionError: /dev/gpiochip0 "
            "is missing: device type generic-aarch64 promises it") in failed, out[-6000:]
    assert ("test_gpio_chip_has_its_lines[gpiochip0] - AssertionError: GPIO chip "
            "/dev/gpiochip0 is missing") in failed, out[-6000:]
    # the other nodes still pass: the failure is about the broken promise only
    assert "test_dev_node_exists_and_opens[/dev/rtc0] PASSED" in out


def test_persistence_suite_fails_when_data_is_not_persisted(tmp_path: Path) -> None:
    code, out, failed = run_broken(tmp_path, "data-not-persisted,root-writable", [
        "suites/persistence", "--power-cuts=1", "-k",
        "data_lives or read_only or soft_reboot or random_power_cuts"], boot_timeout=60)
    assert code == 1 and "4 failed" in out, out[-6000:]
    assert ("test_root_filesystem_is_read_only - AssertionError: / (") in failed, out[-6000:]
    assert ("test_data_lives_on_the_data_partition - AssertionError: /data is on tmpfs (tmpfs), "
            "not on the resin-data partition") in failed, out[-6000:]
    assert ("test_file_survives_a_soft_reboot - AssertionError: a file and its checksum in "
            "/data did not survive a soft reboot") in failed, out[-6000:]
    assert "was acknowledged (fsync returned) before the power cut, but only records 1..0 " \
           "survived" in failed, out[-6000:]


def test_power_cuts_lose_what_an_os_never_flushed_as_a_real_disk_does(tmp_path: Path) -> None:
    """An OS that never flushes /data loses acknowledged records at a power cut on a disk with a
    volatile write cache (the QEMU boards' default); with the writes in the host's page cache
    (QEMU alone), the same OS and the same cut keep them: a power-cut test there proves less."""
    args = ["suites/persistence", "-k", "random_power_cuts"]
    # up to four cuts, the OS broken at each boot: a flush the OS happens to send for another
    # partition of the disk (a journal commit there flushes the whole disk's cache) keeps one
    # cut's records about one time in four; the test stops at the first cut that loses any
    code, out, failed = run_broken(tmp_path / "volatile", "no-disk-flush",
                                   [*args, "--power-cuts=4"])
    assert code == 1 and "1 failed" in out, out[-6000:]
    assert "was acknowledged (fsync returned) before the power cut, but only records 1.." \
           in failed, out[-6000:]
    code, out, failed = run_broken(tmp_path / "host", "no-disk-flush", [*args, "--power-cuts=1"],
                                   target={"write_cache": "host"})
    assert code == 0 and "1 passed" in out, out[-6000:]


def test_persistence_suite_fails_when_filesystems_are_not_checked_or_reset_or_watched(
        tmp_path: Path) -> None:
    code, out, failed = run_broken(tmp_path, "no-boot-fsck,no-reset,disk-watchdog-reads-cache", [
        "suites/persistence", "-k", "marked_with_errors or disk_watchdog or reset_flags"],
        boot_timeout=60)
    assert code == 1 and "3 failed" in out, out[-6000:]
    assert ("test_disk_watchdog_reboots_a_device_whose_disk_fails_and_disables_itself - "
            "AssertionError: the disk under disk-watchdogd's test file fails every read, yet the "
            "device did not reboot within 120 s") in failed, out[-6000:]
    assert ("test_filesystems_marked_with_errors_are_checked_at_the_next_boot - AssertionError: "
            "filesystems marked as having errors must be checked (e2fsck) at the next boot"
            ) in failed, out[-6000:]
    assert ("test_removing_the_reset_flags_purges_state_and_data - AssertionError: "
            "['resin-state', 'resin-data']: the reset flag was removed, yet the next boot kept "
            "what the partition held") in failed, out[-6000:]


def test_rollback_suite_fails_when_rollbacks_are_disabled(tmp_path: Path) -> None:
    code, out, failed = run_broken(tmp_path, "no-altboot-rollback,no-health-rollback", [
        "suites/rollback", "-k", "unbootable or unhealthy or vpn"], boot_timeout=60)
    assert code == 1 and "3 failed" in out, out[-6000:]
    # the framework's own checks of the contract fail as OSContractError (an AssertionError)
    assert ("test_unbootable_update_falls_back_through_the_bootloader_counter - "
            "hil.errors.OSContractError: "
            "the old OS came up after the fallback boot without running rollback-altboot"
            ) in failed, out[-6000:]
    assert re.search(r"test_unhealthy_update_falls_back_through_the_health_check - "
                     r"hil\.errors\.OSContractError: the unhealthy update rootfs rootfs\.img "
                     r"\(VERSION [0-9.]+\) was not rolled back", failed), out[-6000:]
    # the VPN was online before the update (recorded), never after: not rolled back either
    assert re.search(r"test_update_whose_vpn_does_not_come_back_falls_back_through_the_health_"
                     r"check - hil\.errors\.OSContractError: the unhealthy update rootfs "
                     r"rootfs\.img \(VERSION [0-9.]+\) was not rolled back", failed), out[-6000:]


@pytest.mark.timeout(1260)  # two tests' waits (the child's own deadline: 1200 s)
def test_containers_suite_fails_without_nat_firewall_key_check_firmware_or_watchdog(
        tmp_path: Path) -> None:
    """Five breaks of different promises in one session (one boot, one delivery of the app
    image): each test fails on its own break, naming it. The NAT and firewall tests first,
    before anything restarts the engine (which puts its NAT rule back until the break deletes
    it again); the production test next: it puts the device back in development mode when it
    fails, where the watchdog test would leave the engine hung."""
    suite = "suites/containers/test_containers.py::"
    code, out, failed = run_broken(
        tmp_path, "supervisor-ignores-key,no-engine-watchdog,no-engine-nat,firewall-not-in-input,"
        "extra-firmware-ignored",
        [f"{suite}test_a_container_reaches_the_rig_host_through_the_engines_nat",
         f"{suite}test_supervisor_firewall_guards_the_host_in_the_configured_mode",
         f"{suite}test_production_mode_at_runtime_closes_the_engine_api_and_asks_for_keys",
         f"{suite}test_firmware_from_the_extra_firmware_volume_reaches_the_kernel",
         f"{suite}test_hung_engine_is_killed_by_its_watchdog_and_comes_back"], timeout=1200)
    assert code == 1 and "5 failed" in out, out[-6000:]
    assert ("test_firmware_from_the_extra_firmware_volume_reaches_the_kernel - hil.errors."
            "NotReached: the kernel's firmware search path (/sys/module/firmware_class/"
            "parameters/path) to be the extra-firmware volume's mountpoint") in failed, (
        out[-6000:])
    assert ("test_a_container_reaches_the_rig_host_through_the_engines_nat - AssertionError: the "
            "engine must masquerade its containers' traffic out of the device") in failed, (
        out[-6000:])
    assert ("test_supervisor_firewall_guards_the_host_in_the_configured_mode - AssertionError: "
            "INPUT must send every packet through the supervisor's BALENA-FIREWALL") in failed, (
        out[-6000:])
    assert ("test_production_mode_at_runtime_closes_the_engine_api_and_asks_for_keys - "
            "hil.errors.NotReached: the supervisor to ask for a key on a production device"
            ) in failed, out[-6000:]
    assert ("test_hung_engine_is_killed_by_its_watchdog_and_comes_back - hil.errors.NotReached: "
            "the watchdog (30 s) to kill the hung engine") in failed, out[-6000:]


def test_containers_suite_fails_when_the_os_ignores_balena_root_ca(tmp_path: Path) -> None:
    code, out, failed = run_broken(tmp_path, "root-ca-ignored", [
        "suites/containers", "-k", "registry"])
    assert code == 1 and "1 error" in out, out[-6000:]
    assert re.search(r"ERROR .*test_release_image_is_pulled_from_the_rig_registry - "
                     r"hil.errors.OSContractError: balenaEngine did not pull app image "
                     r"10\.0\.2\.2:\d+/hil/busybox", failed), out[-6000:]
    assert "x509: certificate signed by unknown authority" in out, out[-6000:]


def test_ntp_suite_fails_when_chrony_drops_the_configured_server(tmp_path: Path) -> None:
    code, out, failed = run_broken(tmp_path, "chrony-no-servers",
                                   ["suites/ntp", "-k", "synchronises_to_the_rig"])
    assert code == 1 and "1 failed" in out, out[-6000:]
    assert ("chrony on the device has the NTP server that config.json's ntpServers names "
            "(10.0.2.2) among its sources: not so after") in failed, out[-6000:]


def test_ntp_suite_fails_when_chrony_does_not_step_the_clock(tmp_path: Path) -> None:
    code, out, failed = run_broken(tmp_path, "chrony-no-makestep",
                                   ["suites/ntp", "-k", "synchronises_to_the_rig or steps_back"])
    assert code == 1, out[-6000:]
    assert "1 failed, 1 passed" in out, out[-6000:]  # it still synchronises: only the step fails
    assert ("after its clock was set 300s wrong, the device steps back to the NTP server's "
            "time: not so after") in failed, out[-6000:]
