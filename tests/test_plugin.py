"""The pytest plugin as a user meets it, run in a child pytest."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

USES_DUT = """
def test_uses_the_board(dut):
    assert dut.run("true").ok
"""


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HIL_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("HIL_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("HIL_RIG", raising=False)


def test_without_a_rig_tests_that_need_one_are_skipped(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(USES_DUT)
    result = pytester.runpytest_subprocess("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs a rig: run with --rig NAME*"])


def test_a_malformed_rig_file_is_a_usage_error_naming_file_line_key(
        pytester: pytest.Pytester) -> None:
    rig = pytester.makefile(".yaml", bench="device_type: generic-aarch64\ntarget:\n"
                                           "  driver: qemu\n  memory: lots\n")
    pytester.makepyfile(USES_DUT)
    result = pytester.runpytest_subprocess(f"--rig={rig}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--rig {rig}: {rig}:4: target.memory: *integer*"])
    assert "Traceback" not in result.stderr.str()


def test_a_rig_fault_is_reported_as_infra_not_as_a_test_failure(
        pytester: pytest.Pytester) -> None:
    rig = pytester.makefile(".yaml", broken="device_type: generic-aarch64\ntarget:\n"
                                            "  driver: qemu\n  firmware: /nonexistent/u-boot.bin\n")
    pytester.makepyfile(USES_DUT + "\n\ndef test_second(dut):\n    pass\n")
    result = pytester.runpytest_subprocess(f"--rig={rig}", "--no-flash", "-rA")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*rig (infrastructure) errors — not test failures*",
                                 "*test_uses_the_board*/nonexistent/u-boot.bin not found*"])
    assert result.parseoutcomes().get("infra") == 2
    assert "failed" not in result.parseoutcomes()


def test_needs_marker_skips_when_the_rig_lacks_the_feature(pytester: pytest.Pytester) -> None:
    rig = pytester.makefile(".yaml", plain="device_type: generic-aarch64\n"
                                           "target: {driver: qemu}\n")
    pytester.makepyfile("""
        import pytest

        @pytest.mark.needs("gpio_loopback")
        def test_loopback():
            raise AssertionError("must not run")

        @pytest.mark.needs("rtc")
        def test_rtc_feature_from_device_type():
            pass
    """)
    result = pytester.runpytest_subprocess(f"--rig={rig}", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*rig plain lacks gpio_loopback*"])
