"""Deadlines and the wait tally the session report splits its time with."""

from __future__ import annotations

import threading
import time

import pytest

from hil.deadline import WaitTally, wait_until
from hil.errors import DeadlineError, InfraError


def test_nested_waits_count_once_under_the_outer_kind() -> None:
    tally = WaitTally()
    with tally.timing("boot"):
        time.sleep(0.02)
        with tally.timing("command"):  # a line awaited during a boot is boot time
            time.sleep(0.02)
    with tally.timing("command"):
        time.sleep(0.01)
    assert set(tally.seconds) == {"boot", "command"}
    assert 0.04 <= tally.seconds["boot"] < 1.0
    assert 0.01 <= tally.seconds["command"] < tally.seconds["boot"]


def test_a_failed_wait_is_counted_and_the_nesting_unwinds() -> None:
    tally = WaitTally()
    with pytest.raises(RuntimeError), tally.timing("boot"):
        raise RuntimeError("board panicked")
    with tally.timing("ssh"):
        pass
    assert set(tally.seconds) == {"boot", "ssh"}


def test_other_threads_keep_their_own_nesting() -> None:
    tally = WaitTally()
    inside = threading.Event()
    release = threading.Event()

    def other() -> None:
        with tally.timing("ssh"):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(5)
    with tally.timing("command"):  # not nested in the other thread's SSH wait
        pass
    release.set()
    t.join()
    assert set(tally.seconds) == {"ssh", "command"}


def test_wait_until_says_what_was_expected_and_seen() -> None:
    with pytest.raises(DeadlineError) as err:
        wait_until(lambda: None, 0.05, "the socket to listen", seen=lambda: "no socket yet")
    assert "the socket to listen" in str(err.value) and "no socket yet" in str(err.value)


def test_a_wait_on_a_rig_part_is_a_rig_fault() -> None:
    with pytest.raises(InfraError) as err:
        wait_until(lambda: False, 0.05, "ser2net to listen", seen=lambda: "port closed",
                   part="ser2net", rig="bench1")
    assert not isinstance(err.value, DeadlineError)
    assert (err.value.part, err.value.rig) == ("ser2net", "bench1")
    assert "[rig bench1 ser2net] timed out" in str(err.value) and "port closed" in str(err.value)
