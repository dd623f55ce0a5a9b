"""allure-pytest, when it is installed and the run has ``--alluredir``: each rig step and device
command as an allure step while it runs (``hil.steps``), the console slice as each test's
attachment, its commands and rig events (``hil.record``), each boot's timeline as
an SVG picture, the session's rig, image, device type and OS version as allure's
environment.properties, and every result and fixture container masked (``hil.redact``) just
before allure writes it. allure takes a failure's message from the exception itself, not from
the report the plugin has already masked."""

from __future__ import annotations

import contextlib
import re
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, cast

from hil import redact, timeline_svg
from hil import steps as report_steps
from hil.record import SessionInfo, TestRecord, clean, command_lines


def attach_console(text: str) -> None:
    """Attach ``text`` (masked already) as the running test's console."""
    _attach(text, "console", "TEXT")


def attach_record(record: TestRecord) -> None:
    """The running test's commands and rig events (one text, with durations and exit codes),
    and a picture of each boot in it."""
    lines = command_lines(record)
    if lines:
        _attach(lines, "commands", "TEXT")
    for i, boot in enumerate(record.boots, 1):
        _attach(timeline_svg.render(boot), f"boot timeline {i}", "SVG")


def _attach(body: str, name: str, kind: str) -> None:
    try:
        import allure
    except ImportError:
        return
    with contextlib.suppress(Exception):  # allure installed but not active in this run
        allure.attach(body, name=name, attachment_type=getattr(allure.attachment_type, kind))


def write_environment(folder: Path, info: SessionInfo) -> None:
    """allure's environment.properties: the session's rig, device type, image, OS version."""
    values = {"rig": info.rig, "device.type": info.device_type, "image": info.image,
              "os.version": info.os_version}
    lines = [f"{key}={_property(value)}" for key, value in values.items()]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "environment.properties").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _property(value: str) -> str:
    """A value for a properties file: one line, its ``\\``, ``=`` and ``:`` escaped."""
    return re.sub(r"([\\=:])", r"\\\1", clean(" ".join(value.split())))


def _masked(obj: Any, depth: int = 0) -> Any:
    """``obj`` (allure's model: attrs objects, lists, dicts, strings) with its strings masked,
    changed in place where it can be."""
    if isinstance(obj, str):
        return redact.text(obj)
    if depth > 24:  # allure's model is a shallow tree (steps nest a few deep); stop on a cycle
        return obj
    if isinstance(obj, list):
        obj[:] = [_masked(v, depth + 1) for v in obj]
    elif isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _masked(value, depth + 1)
    elif hasattr(obj, "__dict__"):
        for key, value in vars(obj).items():
            setattr(obj, key, _masked(value, depth + 1))
    return obj


def start(*, with_steps: bool) -> object | None:
    """Mask what allure writes, from now to ``stop``, and with ``with_steps`` (the run writes
    allure results) show rig steps and commands as allure steps; None when allure is not
    installed."""
    try:
        import allure_commons
    except ImportError:
        return None

    class MaskResults:  # runs before allure's file writer
        @allure_commons.hookimpl(tryfirst=True)
        def report_result(self, result: Any) -> None:
            _masked(result)

        @allure_commons.hookimpl(tryfirst=True)
        def report_container(self, container: Any) -> None:
            _masked(container)

    plugin = MaskResults()
    allure_commons.plugin_manager.register(plugin)
    if with_steps:
        report_steps.listen(_step)
    return plugin


def _step(title: str) -> AbstractContextManager[object]:
    """An allure step for a rig step or a device command (``hil.steps``)."""
    import allure

    return cast(AbstractContextManager[object], allure.step(title))


def stop(plugin: object | None) -> None:
    if plugin is None:
        return
    import allure_commons

    report_steps.unlisten(_step)
    if allure_commons.plugin_manager.is_registered(plugin):
        allure_commons.plugin_manager.unregister(plugin)
