"""The pytest side of ``--rig=pool:...``: lease a rig for the session, keep a record of what each
suite did on it, move once to another matching rig after an infrastructure error (and run the
test that met it again there), and give every rig back at the end. Called by ``hil.plugin``;
psycopg is imported only when a pool is used."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest

from hil.config import RigConfig
from hil.errors import InfraError, brief
from hil.lab import db, leases, pool

log = logging.getLogger(__name__)
PART = "lab lease"
# a suite's outcome on a rig: the worst of its tests'
_RANK = {"passed": 0, "failed": 1, "infra": 2}


@dataclass
class PoolSession:
    """The session's lease and what happened under it."""

    dsn: str
    spec: str  # pool:SELECTOR as given
    wait: float
    ttl: float
    priority: int
    release_name: str | None
    lease: leases.Lease | None = None
    suites: dict[str, str] = field(default_factory=dict)  # under the current lease
    infra: str | None = None  # the current rig's infrastructure error, once one is reported
    moved: bool = False  # the one move to another rig is spent
    gone: str | None = None  # why the session has no rig any more
    notes: list[str] = field(default_factory=list)  # for the terminal summary

    @classmethod
    def from_options(cls, config: pytest.Config, spec: str) -> PoolSession:
        opt = config.getoption
        return cls(db.dsn_from(opt("--lab-db")), spec, wait=opt("--rig-wait"),
                   ttl=opt("--lab-ttl"), priority=opt("--lab-priority"),
                   release_name=opt("--lab-release"))

    def lease_one(self) -> RigConfig:
        self.lease, cfg = pool.lease_rig(self.dsn, self.spec, wait=self.wait, ttl=self.ttl,
                                         priority=self.priority,
                                         on_wait=lambda m: log.warning("%s", m))
        self.suites, self.infra = {}, None
        return cfg

    # --- what the tests did ---------------------------------------------------------------------
    def reported(self, report: pytest.TestReport, suite: str, infra: str | None) -> None:
        """Record a test phase's outcome for its suite; ``infra``: its rig fault, if it was one."""
        outcome = "infra" if infra else "failed" if report.failed else \
            "passed" if report.passed and report.when == "call" else None
        if outcome is None:
            return
        before = self.suites.get(suite)
        if before is None or _RANK[outcome] > _RANK[before]:
            self.suites[suite] = outcome
        if infra and self.infra is None:
            self.infra = infra

    def outcome(self, exitstatus: int | None) -> str:
        """The job's outcome on the current rig: infra if it faulted; failed if a test failed
        on it or the run ended badly for a reason of its own (Ctrl-C, an internal error; a
        failed run after a move is the earlier rig's fault)."""
        if self.infra:
            return "infra"
        if "failed" in self.suites.values():
            return "failed"
        explained = exitstatus == pytest.ExitCode.TESTS_FAILED and self.moved
        return "failed" if exitstatus not in (None, 0, pytest.ExitCode.NO_TESTS_COLLECTED) \
            and not explained else "passed"

    def give_back(self, exitstatus: int | None, powered_down: bool) -> bool:
        lease, self.lease = self.lease, None
        if lease is None:
            return False
        record = leases.JobRecord(self.release_name, dict(self.suites))
        return pool.give_back(lease, self.outcome(exitstatus), powered_down=powered_down,
                              record=record)

    def lease_lost(self) -> str | None:
        """Why the lab ended the current lease under the session, or None."""
        return self.lease.ended() if self.lease is not None else None

    def may_move(self) -> bool:
        """Whether the session can still move to another rig: its rig faulted, the one move
        is not spent, the lab did not end the lease, and the selector does not name this rig."""
        lease = self.lease
        return bool(self.infra and not self.moved and not self.gone and lease is not None
                    and not lease.lost and not leases.Selector.parse(
                        self.spec.removeprefix(pool.PREFIX)).rig)

    # --- before each test -----------------------------------------------------------------------
    def before_test(self, item: pytest.Item, end_session: Any) -> RigConfig | None:
        """Stop a test that must not touch the board (the lab ended the lease, or no rig is
        left); after the current rig's first infrastructure error, move to another one.
        Returns the new rig's config when the session moved."""
        if self.gone:
            raise InfraError(self.gone, part=PART)
        cfg = self._move(item, end_session) if self.infra and not self.moved else None
        if self.gone:
            raise InfraError(self.gone, part=PART)
        if self.lease is not None:
            self.lease.check()  # a lease the lab ended: stop touching the board
        return cfg

    def _move(self, item: pytest.Item, end_session: Any) -> RigConfig | None:
        """End the session on the rig that faulted (its fixtures torn down: powered off
        through its drivers), give it back as *unknown* (a health check before its next job)
        and lease another matching rig. Once per session: a second fault stays a fault."""
        movable = self.may_move()
        self.moved = True
        lease, cause = self.lease, self.infra
        if not movable or lease is None:
            return None  # the lab ended it, or the selector names this one rig
        old = lease.grants[0].rig
        # finish() reads only the request's node (for its error message)
        request = getattr(item, "_request", None) or SimpleNamespace(node=item)
        for fixturedef in item.session._fixturemanager.getfixturedefs("rig_config", item) or ():
            try:  # the session fixtures on top of it go first
                fixturedef.finish(cast(Any, request))
            except Exception as exc:  # the rig is given back as unknown anyway
                log.error("ending the session on %s: %s", old, exc)
        if not self.give_back(None, end_session()):
            self.gone = (f"the lease on {old} was over before the session could give it back "
                         f"after its infrastructure error ({cause})")
            return None
        try:
            cfg = self.lease_one()
        except InfraError as exc:
            self.gone = (f"{old} gave an infrastructure error ({cause}) and no other rig "
                         f"matching {self.spec} could be leased: {brief(str(exc))}")
            return None
        note = (f"rig {old} gave an infrastructure error ({cause}): given back as unknown (a "
                f"health check before its next job); the session continued on {cfg.name}")
        log.warning("%s", note)
        self.notes.append(note)
        return cfg
