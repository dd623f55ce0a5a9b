"""What people read of a console (control codes gone) and what its capture file keeps (every
byte, secrets masked as the bytes arrive)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hil import redact
from hil.console.log import ConsoleLog, readable

SYSTEMD = (b"[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mJournal Service\x1b[0m.\r\n"
           b"\x1b]0;root@board: ~\x07root@board:~# \x1b[6n")
PEM = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
       "QyNTUxOQAAACBxAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n"
       "-----END OPENSSH PRIVATE KEY-----\n")


def test_readable_drops_control_sequences_and_keeps_the_text() -> None:
    assert readable(SYSTEMD.decode()) == "[  OK  ] Started Journal Service.\nroot@board:~# "


def test_the_capture_file_masks_secrets_split_across_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redact, "_known", set())
    redact.register("s3cr3t-device-key")
    log = ConsoleLog(tmp_path / "console.log")
    data = (SYSTEMD + b"\r\nkey: s3cr3t-dev" + b"ice-key\r\n" + PEM.replace("\n", "\r\n").encode()
            + b'{"apiKey": "prov-key-1"}\r\n# ')
    for i in range(0, len(data), 7):  # as a serial line delivers it: in small pieces
        log.append(data[i:i + 7])
    log.close()
    written = (tmp_path / "console.log").read_bytes()
    assert log.read(0) == data  # the shell still reads what the device sent
    assert b"s3cr3t" not in written and b"prov-key-1" not in written
    assert b"b3BlbnNzaC1rZXkt" not in written and b"QyNTUxOQ" not in written
    assert written.startswith(SYSTEMD + b"\r\nkey: <redacted>\r\n<redacted>\r\n<redacted>\r\n")
    assert written.endswith(b'{"apiKey": "<redacted>"}\r\n# ')  # the prompt, at close


def test_a_private_key_s_lines_are_masked_alone_once_registered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redact, "_known", set())
    redact.register(PEM)
    # a console interleaving other output can show one line of the key without its BEGIN line
    line = PEM.splitlines()[2]
    assert line not in redact.text(f"garbled: {line}")
    # a block cut short (a slice of a log) is masked to its end
    assert redact.text("x " + PEM[:90]) == "x <redacted>"


def test_a_line_redrawn_with_carriage_returns_is_written_as_it_goes() -> None:
    stream = redact.Stream()
    assert stream.feed(b" 10%\r 20%\r 3") == b" 10%\r 20%\r"
    assert stream.flush() == b" 3"


def test_log_records_are_masked_as_they_are_made(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    # the plugin masks them for the whole run (this one included), live logs and files too
    monkeypatch.setattr(redact, "_known", set())
    redact.register("s3cr3t-device-key")
    logging.getLogger("test").warning("config %s", {"deviceApiKey": "s3cr3t-device-key"})
    logging.getLogger("test").warning("read s3cr3t-device-key")
    assert caplog.messages == ["config {'deviceApiKey': '<redacted>'}", "read <redacted>"]
