"""No secret in any artifact of a real session: a QEMU board boots with keys in its config.json,
a test makes the device print them on its console (and prints, logs and asserts on them
itself), and every file the run leaves is scanned for the key values and private-key material.
One session, one boot."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hil.os.secret import private_key_stretch

pytestmark = pytest.mark.qemu
REPO = Path(__file__).resolve().parents[2]
PEM_BODY = re.compile(r"^[A-Za-z0-9+/=]{20,}$", re.M)

# The device prints config.json on its console twice (one line, and the private key as its
# multi-line block); the test also prints, logs and fails on the values.
LEAKY_TEST = '''
import json
import logging
import re

CONFIG = "/mnt/boot/config.json"


def test_the_device_prints_its_keys(dut):
    # typed, not framed as a command: the console's lines stay apart from a command's reply
    at = dut.shell.send(f"cat {CONFIG} > /dev/console; jq -r .sshPrivateKey {CONFIG} "
                        "> /dev/console; echo PRINTED > /dev/console")
    dut.rig.log.wait_for(re.compile(rb"PRINTED"), at, 30, "config.json on the console")
    cfg = json.loads(dut.run_check(f"cat {CONFIG}").stdout)
    print("config.json:", json.dumps(cfg))
    print(cfg["sshPrivateKey"])
    logging.getLogger("leaky").warning("config.json: %s", cfg)
    assert cfg["apiKey"] == "", f"apiKey={cfg['apiKey']} deviceApiKey={cfg['deviceApiKey']}"
'''


def secrets_of(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A config.json holding an API key, a device key and a private key; the secrets to look
    for in the artifacts, by name."""
    key = tmp_path / "keys" / "id_ed25519"
    key.parent.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True,
                   timeout=30)
    pem = key.read_text()
    token = os.urandom(12).hex()
    cfg = {"deviceType": "generic-aarch64", "developmentMode": True,
           # registered already (registered_at, as balena's supervisor marks it): the device
           # never dials out
           "apiEndpoint": "http://192.0.2.1", "apiKey": f"prov{token}key",
           "deviceApiKey": f"dev{token}key", "registered_at": 1700000000000, "deviceId": 1,
           "sshPrivateKey": pem}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    found = {"apiKey": cfg["apiKey"], "deviceApiKey": cfg["deviceApiKey"],
             "the private key's seed": private_key_stretch(key)}
    for i, line in enumerate(PEM_BODY.findall(pem)):
        found[f"private key body line {i + 1}"] = line
    return found, path


def test_no_secret_in_any_artifact_of_a_session(tmp_path: Path) -> None:
    secrets, config_json = secrets_of(tmp_path)
    (tmp_path / "test_leaky.py").write_text(LEAKY_TEST)
    run_dir = tmp_path / "run"
    env = dict(os.environ, HIL_LOCK_DIR=str(tmp_path / "locks"), HIL_RUNTIME_DIR=str(run_dir))
    env.pop("HIL_RIG", None)
    junit, allure, pages = tmp_path / "junit.xml", tmp_path / "allure", tmp_path / "report"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "--rig=qemu-aarch64",
         f"--config-json={config_json}", f"--junitxml={junit}", "-o", "junit_logging=all",
         f"--alluredir={allure}", f"--hil-report={pages}", f"--log-file={tmp_path / 'run.log'}",
         "--log-file-level=DEBUG", "--log-cli-level=WARNING", str(REPO / "suites" / "smoke"),
         str(tmp_path / "test_leaky.py")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    terminal = run.stdout + run.stderr
    # the session really ran: the smoke suite passed, the leaky test failed on its assertion
    assert "5 passed" in terminal and "1 failed" in terminal, terminal[-6000:]
    # the first test (whose setup started the session) has its own console slice, not the boot
    first = re.search(r"_ test_runs_the_device_types_architecture _+\n(?:(?!\n_).)*?"
                      r"-+ Captured console -+\n(.*?)\n[_=-]", terminal, re.S)
    assert first and "HIL-BOOT" not in first.group(1), terminal[-6000:]
    assert re.search(r"^E[0-9a-f]{6}\.\d+$", first.group(1), re.M), first.group(1)  # a reply
    console_log = run_dir / "rigs" / "qemu-aarch64" / "console.log"
    artifacts = {"the terminal output": terminal.encode(),
                 "the console log file": console_log.read_bytes(),
                 "the JUnit XML": junit.read_bytes(),
                 "the log file": (tmp_path / "run.log").read_bytes()}
    assert sorted(allure.iterdir()), "allure wrote no results"
    for path in sorted(allure.iterdir()):
        artifacts[f"allure's {path.name}"] = path.read_bytes()
    [page] = pages.iterdir()
    artifacts["the --hil-report page"] = page.read_bytes()
    # the rest the session left (sockets apart); not the board's disk, whose config.json holds
    # the keys by design, nor the session's own key pair
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and path.suffix != ".img" and not path.name.startswith("id_ed25519"):
            artifacts.setdefault(f"the runtime file {path.relative_to(run_dir)}",
                                 path.read_bytes())
    hits = [f"{name} in {where}" for where, data in artifacts.items()
            for name, value in secrets.items() if value.encode() in data]
    assert not hits, "secrets leaked:\n" + "\n".join(hits)
    # what the device printed was there to find, and was masked: once in one line, once in
    # the block; the test's own print, log and assertion in the terminal
    assert terminal.count("<redacted>") >= 3, terminal[-6000:]
    assert console_log.read_bytes().count(b"<redacted>") >= 3, console_log.read_text()[-3000:]
