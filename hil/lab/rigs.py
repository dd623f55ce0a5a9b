"""Rigs in the lab database: registered from their ordinary rig files, and turned back into an
ordinary ``RigConfig`` when leased, so the same drivers run whether a rig is local or pooled."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hil.cache import runtime_dir
from hil.config import RigConfig, load_rig
from hil.lab.db import Connection
from hil.lab.health import heartbeat
from hil.lab.leases import Grant
from hil.rig import Rig


def register(conn: Connection, host: str, rig_files: Sequence[str],
             labels: Sequence[str] = (), host_timeout: float = 60.0) -> list[RigConfig]:
    """Add or update rigs on ``host`` from their rig files (validated first: a broken file is a
    ConfigError naming file, line and key). A rig's labels are its features plus ``labels``.
    A new rig starts *unknown*: it takes a health check before its first job."""
    configs = [load_rig(name) for name in rig_files]
    heartbeat(conn, host, host_timeout)
    with conn.transaction():
        for cfg in configs:
            conn.execute("""
                INSERT INTO rigs (name, device_type, labels, host, config)
                VALUES (%s, %s, %s, %s, %s)
                ON CONFLICT (name) DO UPDATE SET device_type = excluded.device_type,
                    labels = excluded.labels, host = excluded.host, config = excluded.config""",
                (cfg.name, cfg.device_type.slug, sorted(set(cfg.features) | set(labels)), host,
                 cfg.source.read_text(encoding="utf-8")))
        conn.execute("NOTIFY hil_lab")
    return configs


# Where a registered rig file carries the lease's epoch: the lab agent's files put it in each
# part operation that has a name to put it in (the pdudaemon outlet), so the agent can refuse a
# stale one.
LEASE_EPOCH = "${lease_epoch}"


def rig_config(grant: Grant) -> RigConfig:
    """The ordinary rig config of a leased rig: its registered file (with the lease's epoch
    where it says ``${lease_epoch}``), written where this process keeps its runtime files and
    loaded as any rig file is."""
    path: Path = runtime_dir("lab") / f"{grant.rig}.yaml"
    path.write_text(grant.config.replace(LEASE_EPOCH, str(grant.epoch)), encoding="utf-8")
    return load_rig(str(path))


def power_down(grant: Grant) -> None:
    """The cleaning a rig gets after every lease, through its own drivers: power off and the
    SD mux released. Raises what the drivers raise (the rig then goes *unknown*)."""
    rig = Rig(rig_config(grant))
    try:
        rig.power.off()
        if rig.sd_mux is not None:
            rig.sd_mux.off()
    finally:
        rig.close()
