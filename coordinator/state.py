"""The coordinator's durable bookkeeping: devices, assignments, rounds and updates, in SQLite.

A daemon that may be killed at any moment needs one place that says which devices exist, what
each was told to do, which rounds finished and which updates were already counted. SQLite in
WAL mode gives that with one file and no server; every change that touches several rows runs in
one `BEGIN IMMEDIATE` transaction, so a crash leaves either all of it or none. The MQTT callback
thread and the main loop share one connection behind a lock.

Model tensors are not stored here: they live in safetensors checkpoints (`checkpoint.py`).
A coordinator that resumes should first `rollback_to` the round of the checkpoint it loads, so
the two agree (a crash may fall between writing one and the other).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "STATE_DB_NAME",
    "AssignmentRecord",
    "DeviceRecord",
    "StateStore",
    "check_state_dir",
]

STATE_DB_NAME = "state.sqlite"
"""File name of the store inside a job's state directory."""

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices(
    id TEXT PRIMARY KEY,
    profile_json TEXT NOT NULL,
    data_json TEXT NOT NULL,
    online INTEGER NOT NULL DEFAULT 0,
    registered_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments(
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    strategy TEXT NOT NULL,
    bits INTEGER NOT NULL,
    per_layer_bits_json TEXT,
    assigned_at REAL NOT NULL,
    PRIMARY KEY(device_id)
);
CREATE TABLE IF NOT EXISTS rounds(
    round INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK(status IN ('open', 'done')),
    started_at REAL NOT NULL,
    finished_at REAL,
    selected_json TEXT NOT NULL,
    received INTEGER NOT NULL DEFAULT 0,
    stragglers INTEGER,
    acc_fp32 REAL,
    acc_deploy_json TEXT,
    host_seconds REAL,
    sim_seconds REAL NULL
);
CREATE TABLE IF NOT EXISTS updates(
    round INTEGER NOT NULL REFERENCES rounds(round) ON DELETE CASCADE,
    device_id TEXT NOT NULL REFERENCES devices(id),
    n_samples INTEGER NOT NULL,
    train_loss REAL,
    train_seconds REAL,
    received_at REAL NOT NULL,
    PRIMARY KEY(round, device_id)
);
"""


@dataclass(frozen=True)
class DeviceRecord:
    """One registered device: what it said about itself and whether it is reachable."""

    id: str
    profile: dict[str, Any]
    data: dict[str, Any]
    online: bool
    registered_at: float
    last_seen: float


@dataclass(frozen=True)
class AssignmentRecord:
    """What a device was told to train with: local method, bit budget, optional per-layer bits."""

    device_id: str
    strategy: str
    bits: int
    per_layer_bits: dict[str, int] | None
    assigned_at: float


def check_state_dir(state_dir: str | Path) -> Path:
    """`state_dir` if a job can keep its state there; else ValueError saying what is in the way.

    Run before anything connects: a path that is a file (a typo, or `state.sqlite` given as the
    directory) would otherwise surface as a bare OS error from deep inside the start-up.
    """
    path = Path(state_dir)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(
                    f"[job] state_dir {path}: {parent} is a file, not a directory; "
                    "name a directory (it is created if missing)"
                )
            break
    db = path / STATE_DB_NAME
    if db.exists() and not db.is_file():
        raise ValueError(f"[job] state_dir {path}: {db} is not a file; move it away")
    return path


class StateStore:
    """SQLite-backed state of one job; safe to share between threads of one process."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a SELECT that decides
            # an UPDATE runs inside the same transaction.
            self._conn = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=10.0
            )
        except (OSError, sqlite3.Error) as exc:
            raise self._unusable(exc) from exc
        self._conn.row_factory = sqlite3.Row
        try:
            self._open_schema()
        except (OSError, sqlite3.Error) as exc:
            self._conn.close()
            raise self._unusable(exc) from exc

    def _unusable(self, exc: BaseException) -> ValueError:
        # A file in place of the directory, a read-only disk, a file that is not SQLite: the
        # operator's to fix, so a ValueError that `bitfleet` reports in one line.
        return ValueError(f"cannot open the job's state store {self.path}: {exc}")

    def _open_schema(self) -> None:
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA busy_timeout=10000")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                self._conn.close()
                raise ValueError(
                    f"{self.path}: state schema version {version} is newer than this "
                    f"coordinator's ({SCHEMA_VERSION}); upgrade bitfleet"
                )
            with self._tx() as cur:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        cur.execute(statement)
                cur.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @classmethod
    def in_dir(cls, state_dir: str | Path, **kwargs: Any) -> StateStore:
        """The store of a job's state directory (`<state_dir>/state.sqlite`)."""
        return cls(Path(state_dir) / STATE_DB_NAME, **kwargs)

    # --- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        """One write transaction, taken before the first read so nothing changes under it."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- meta -------------------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else default

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, str(value)),
            )

    def setdefault_meta(self, key: str, value: str) -> str:
        """Store `value` unless the key exists; return what is stored (compare to detect reuse).

        E.g. `store.setdefault_meta("config_hash", h) != h` means the state directory belongs
        to another job.
        """
        with self._tx() as cur:
            cur.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, str(value)))
            return cur.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    # --- devices ----------------------------------------------------------------------------

    def upsert_device(
        self, device_id: str, profile: Mapping[str, Any], data: Mapping[str, Any]
    ) -> None:
        """Record a registration: new devices are inserted, known ones updated; both go online."""
        now = self._clock()
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO devices(id, profile_json, data_json, online, registered_at, last_seen)"
                " VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT(id) DO UPDATE SET"
                " profile_json = excluded.profile_json, data_json = excluded.data_json,"
                " online = 1, last_seen = excluded.last_seen",
                (device_id, _dumps(profile), _dumps(data), now, now),
            )

    def set_online(self, device_id: str, online: bool) -> bool:
        """Mark a device on- or offline; False when the device never registered."""
        with self._tx() as cur:
            cur.execute(
                "UPDATE devices SET online = ?, last_seen = ? WHERE id = ?",
                (int(bool(online)), self._clock(), device_id),
            )
            return cur.rowcount == 1

    def devices(self, online_only: bool = False) -> list[DeviceRecord]:
        where = " WHERE online = 1" if online_only else ""
        return [_device(r) for r in self._query(f"SELECT * FROM devices{where} ORDER BY id")]

    def count_devices(self, online_only: bool = False) -> int:
        """How many devices (online ones), without decoding every profile as `devices` does:
        the coordinator asks after each registration, so this must not grow with the fleet."""
        where = " WHERE online = 1" if online_only else ""
        return self._query(f"SELECT COUNT(*) AS n FROM devices{where}")[0]["n"]

    def device(self, device_id: str) -> DeviceRecord | None:
        rows = self._query("SELECT * FROM devices WHERE id = ?", (device_id,))
        return _device(rows[0]) if rows else None

    # --- assignments ------------------------------------------------------------------------

    def set_assignment(
        self,
        device_id: str,
        strategy: str,
        bits: int,
        per_layer_bits: Mapping[str, int] | None = None,
    ) -> None:
        """Record (or replace) what a registered device trains with."""
        layer_json = None if per_layer_bits is None else _dumps(dict(per_layer_bits))
        try:
            with self._tx() as cur:
                cur.execute(
                    "INSERT INTO assignments(device_id, strategy, bits, per_layer_bits_json,"
                    " assigned_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET"
                    " strategy = excluded.strategy, bits = excluded.bits,"
                    " per_layer_bits_json = excluded.per_layer_bits_json,"
                    " assigned_at = excluded.assigned_at",
                    (device_id, strategy, int(bits), layer_json, self._clock()),
                )
        except sqlite3.IntegrityError as e:
            raise ValueError(f"cannot assign unknown device {device_id!r}") from e

    def assignment(self, device_id: str) -> AssignmentRecord | None:
        rows = self._query("SELECT * FROM assignments WHERE device_id = ?", (device_id,))
        return _assignment(rows[0]) if rows else None

    def assignments(self) -> dict[str, AssignmentRecord]:
        rows = self._query("SELECT * FROM assignments ORDER BY device_id")
        return {r["device_id"]: _assignment(r) for r in rows}

    # --- rounds -----------------------------------------------------------------------------

    def open_round(self, round: int, selected: Sequence[str]) -> None:
        """Start a round with its selected devices.

        Reopening a round still 'open' (a coordinator restarted mid-round) starts it afresh:
        its updates are discarded, since the models they were trained from are gone. A 'done'
        round cannot be reopened.
        """
        now = self._clock()
        with self._tx() as cur:
            row = cur.execute("SELECT status FROM rounds WHERE round = ?", (round,)).fetchone()
            if row is not None and row["status"] == "done":
                raise ValueError(f"round {round} is already done; it cannot be reopened")
            cur.execute("DELETE FROM updates WHERE round = ?", (round,))
            cur.execute(
                "INSERT INTO rounds(round, status, started_at, selected_json, received)"
                " VALUES (?, 'open', ?, ?, 0) ON CONFLICT(round) DO UPDATE SET"
                " started_at = excluded.started_at, selected_json = excluded.selected_json,"
                " received = 0",
                (round, now, _dumps(list(selected))),
            )

    def record_update(
        self,
        round: int,
        device_id: str,
        n_samples: int,
        train_loss: float | None,
        train_seconds: float | None,
    ) -> bool:
        """Count one device's update for an open round, once.

        False (and nothing recorded) when the update is a duplicate, the round is not open
        (late or replayed), or the device was not selected for it.
        """
        with self._tx() as cur:
            row = cur.execute(
                "SELECT status, selected_json FROM rounds WHERE round = ?", (round,)
            ).fetchone()
            if row is None or row["status"] != "open":
                return False
            if device_id not in json.loads(row["selected_json"]):
                return False
            try:
                cur.execute(
                    "INSERT OR IGNORE INTO updates(round, device_id, n_samples, train_loss,"
                    " train_seconds, received_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (round, device_id, int(n_samples), train_loss, train_seconds, self._clock()),
                )
            except sqlite3.IntegrityError as e:  # OR IGNORE does not cover foreign keys
                raise ValueError(f"update from unregistered device {device_id!r}") from e
            if cur.rowcount != 1:
                return False
            cur.execute("UPDATE rounds SET received = received + 1 WHERE round = ?", (round,))
            return True

    def close_round(
        self,
        round: int,
        acc_fp32: float | None,
        acc_deploy: Mapping[int, float] | None,
        stragglers: int,
        host_seconds: float,
        sim_seconds: float | None = None,
    ) -> None:
        """Mark an open round done with its results (`acc_deploy`: accuracy per bit-width)."""
        with self._tx() as cur:
            cur.execute(
                "UPDATE rounds SET status = 'done', finished_at = ?, acc_fp32 = ?,"
                " acc_deploy_json = ?, stragglers = ?, host_seconds = ?, sim_seconds = ?"
                " WHERE round = ? AND status = 'open'",
                (
                    self._clock(),
                    acc_fp32,
                    _deploy_json(acc_deploy),
                    int(stragglers),
                    host_seconds,
                    sim_seconds,
                    round,
                ),
            )
            if cur.rowcount != 1:
                raise ValueError(f"round {round} is not open")

    def set_round_accuracy(
        self, round: int, acc_fp32: float | None, acc_deploy: Mapping[int | str, float] | None
    ) -> bool:
        """Fill in accuracies measured after the round closed (evaluation runs off the loop).

        False when the round does not exist (e.g. rolled back meanwhile).
        """
        with self._tx() as cur:
            cur.execute(
                "UPDATE rounds SET acc_fp32 = ?, acc_deploy_json = ? WHERE round = ?",
                (acc_fp32, _deploy_json(acc_deploy), round),
            )
            return cur.rowcount == 1

    def rollback_to(self, round: int | None) -> int:
        """Forget every round after `round` (all rounds for None); return how many went.

        Call on resume with the round of the loaded checkpoint, so that the store and the
        model agree.
        """
        with self._tx() as cur:
            cur.execute("DELETE FROM rounds WHERE round > ?", (-1 if round is None else round,))
            return cur.rowcount

    def last_completed_round(self) -> int | None:
        return self._query("SELECT MAX(round) AS r FROM rounds WHERE status = 'done'")[0]["r"]

    def round_updates(self, round: int) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM updates WHERE round = ? ORDER BY device_id", (round,))
        return [dict(r) for r in rows]

    def round_history(self) -> list[dict[str, Any]]:
        """Every round in order, JSON columns decoded (`selected`, `acc_deploy` keyed by bits)."""
        out = []
        for r in self._query("SELECT * FROM rounds ORDER BY round"):
            d = dict(r)
            d["selected"] = json.loads(d.pop("selected_json"))
            deploy = d.pop("acc_deploy_json")
            d["acc_deploy"] = (
                None
                if deploy is None
                else {int(k) if k.isdigit() else k: v for k, v in json.loads(deploy).items()}
            )
            out.append(d)
        return out


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _deploy_json(acc_deploy: Mapping[int | str, float] | None) -> str | None:
    """Accuracy per bit-width as JSON (object keys are strings; `round_history` turns the
    weight widths back into ints and keeps "W2A2" keys as they are)."""
    return None if acc_deploy is None else _dumps({str(k): v for k, v in acc_deploy.items()})


def _device(r: sqlite3.Row) -> DeviceRecord:
    return DeviceRecord(
        id=r["id"],
        profile=json.loads(r["profile_json"]),
        data=json.loads(r["data_json"]),
        online=bool(r["online"]),
        registered_at=r["registered_at"],
        last_seen=r["last_seen"],
    )


def _assignment(r: sqlite3.Row) -> AssignmentRecord:
    layers = r["per_layer_bits_json"]
    return AssignmentRecord(
        device_id=r["device_id"],
        strategy=r["strategy"],
        bits=r["bits"],
        per_layer_bits=None if layers is None else json.loads(layers),
        assigned_at=r["assigned_at"],
    )
