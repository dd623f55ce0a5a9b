"""allure-pytest, when it is installed and the run has ``--alluredir``: the console slice as
each test's attachment, and every result and fixture container masked (``hil.redact``) just
before allure writes it. allure takes a failure's message from the exception itself, not from
the report the plugin has already masked."""

from __future__ import annotations

import contextlib
from typing import Any

from hil import redact


def attach_console(text: str) -> None:
    """Attach ``text`` (masked already) as the running test's console."""
    try:
        import allure
    except ImportError:
        return
    with contextlib.suppress(Exception):  # allure installed but not active in this run
        allure.attach(text, name="console", attachment_type=allure.attachment_type.TEXT)


def _masked(obj: Any, depth: int = 0) -> Any:
    """``obj`` (allure's model: attrs objects, lists, dicts, strings) with its strings masked,
    changed in place where it can be."""
    if isinstance(obj, str):
        return redact.text(obj)
    if depth > 10:  # allure's model is a shallow tree; stop on anything cyclic
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


def start() -> object | None:
    """Mask what allure writes, from now to ``stop``; None when allure is not installed."""
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
    return plugin


def stop(plugin: object | None) -> None:
    if plugin is None:
        return
    import allure_commons

    if allure_commons.plugin_manager.is_registered(plugin):
        allure_commons.plugin_manager.unregister(plugin)
