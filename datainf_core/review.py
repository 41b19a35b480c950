"""Review decisions on training samples, saved in ``reviews.sqlite`` inside the project.

Two tables, always changed together in one transaction:

- ``events``: the append-only log. Every decision is one row; an undo or a redo appends rows too
  (``kind`` = ``"undo"`` / ``"redo"``), so nothing is ever rewritten or deleted.
- ``decisions``: the current state, one row per reviewed training sample.

A third small table, ``batches``, holds the undo/redo stack: one row per call to
:meth:`ReviewStore.record` (a single sample or a bulk selection), with its state ``done`` or
``undone``. Undo reverts the newest done batch; redo re-applies the most recently undone batch, as
long as no new decision was recorded since (a new decision empties the redo stack).

The database runs in WAL mode with a busy timeout, so two browser tabs, two app servers or the app
and the CLI can write at once. Every method opens its own short connection, which makes a store safe
to share between Streamlit's script threads.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from numbers import Integral
from pathlib import Path

import pandas as pd

from datainf_core.errors import DataInfError

logger = logging.getLogger(__name__)

ACTIONS: tuple[str, ...] = ("keep", "relabel", "exclude", "needs_review")
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('decide', 'undo', 'redo')),
    train_index INTEGER NOT NULL,
    action TEXT,
    corrected_label TEXT,
    note TEXT NOT NULL DEFAULT '',
    prev_action TEXT,
    prev_corrected_label TEXT,
    prev_note TEXT,
    at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_batch ON events (batch_id);
CREATE TABLE IF NOT EXISTS decisions (
    train_index INTEGER PRIMARY KEY,
    action TEXT NOT NULL,
    corrected_label TEXT,
    note TEXT NOT NULL DEFAULT '',
    reviewed_at TEXT NOT NULL,
    event_id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_action ON decisions (action);
CREATE TABLE IF NOT EXISTS batches (
    batch_id INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL CHECK (state IN ('done', 'undone')),
    size INTEGER NOT NULL,
    action TEXT NOT NULL,
    created_at TEXT NOT NULL,
    changed_event INTEGER NOT NULL
);
"""

_CURRENT_COLUMNS = ["train_index", "action", "corrected_label", "note", "reviewed_at"]
_LOG_COLUMNS = [
    "event_id",
    "batch_id",
    "kind",
    "train_index",
    "action",
    "corrected_label",
    "note",
    "prev_action",
    "prev_corrected_label",
    "prev_note",
    "at",
]


class ReviewError(DataInfError):
    """A review decision is invalid (unknown action, relabel without a label, bad index)."""


def _now() -> str:
    """The current UTC time as ISO-8601 with microseconds (sortable as text)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _chunks(values: list[int], size: int = 900) -> Iterator[list[int]]:
    """Splits ``values`` into lists short enough for SQLite's bound-parameter limit."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


class ReviewStore:
    """Review decisions of one project (``project.reviews_path``).

    Args:
        path: The SQLite file; created with its tables on first use.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise ReviewError(
                f"review database path {str(self.path)!r} is a folder; pass a file path such as "
                "<project>/reviews.sqlite"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ReviewError(
                    f"{self.path} was written by a newer DataInf Studio (schema {version}, this "
                    f"one reads {SCHEMA_VERSION}); upgrade datainf-studio"
                )
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # -- connections --------------------------------------------------------------------------

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection in autocommit mode (transactions are explicit)."""
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:
            raise ReviewError(
                f"cannot open review database {str(self.path)!r} ({exc}); check the folder exists "
                "and is writable"
            ) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous=NORMAL")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken with ``BEGIN IMMEDIATE`` so writers queue, never deadlock."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- writing ------------------------------------------------------------------------------

    def record(
        self,
        train_index: int | Iterable[int],
        action: str,
        *,
        corrected_label: str | None = None,
        note: str = "",
    ) -> int:
        """Records one decision for one sample or a whole selection, in one transaction.

        Args:
            train_index: A training-sample index (row of the train split) or several.
            action: ``"keep"``, ``"relabel"``, ``"exclude"`` or ``"needs_review"``.
            corrected_label: The new label; required for ``"relabel"``, refused otherwise.
            note: Free text kept with the decision.

        Returns:
            The batch id (what :meth:`undo` reverts as one step).
        """
        if action not in ACTIONS:
            raise ReviewError(f"unknown review action {action!r}; use one of {', '.join(ACTIONS)}")
        if action == "relabel":
            if corrected_label is None or str(corrected_label).strip() == "":
                raise ReviewError(
                    "action 'relabel' needs a corrected_label; pass the new label, e.g. "
                    "corrected_label='positive'"
                )
            corrected_label = str(corrected_label)
        elif corrected_label is not None:
            raise ReviewError(
                f"corrected_label={corrected_label!r} only goes with action 'relabel', got "
                f"action {action!r}; drop corrected_label or use 'relabel'"
            )
        indices = self._check_indices(train_index)
        start = time.perf_counter()
        with self._write() as conn:
            previous = self._current_rows(conn, indices)
            at = _now()
            cursor = conn.execute(
                "INSERT INTO batches (state, size, action, created_at, changed_event) "
                "VALUES ('done', ?, ?, ?, 0)",
                (len(indices), action, at),
            )
            batch_id = int(cursor.lastrowid)  # type: ignore[arg-type]
            rows = []
            for index in indices:
                prev = previous.get(index, (None, None, None))
                rows.append((batch_id, "decide", index, action, corrected_label, note, *prev, at))
            last_event = self._append_events(conn, rows)
            conn.executemany(
                "INSERT INTO decisions (train_index, action, corrected_label, note, reviewed_at, "
                "event_id) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (train_index) DO UPDATE SET "
                "action=excluded.action, corrected_label=excluded.corrected_label, "
                "note=excluded.note, reviewed_at=excluded.reviewed_at, event_id=excluded.event_id",
                [(index, action, corrected_label, note, at, last_event) for index in indices],
            )
            conn.execute(
                "UPDATE batches SET changed_event=? WHERE batch_id=?", (last_event, batch_id)
            )
            # A new decision empties the redo stack: undone batches can no longer come back.
            conn.execute("UPDATE batches SET changed_event=-1 WHERE state='undone'")
        logger.debug(
            "recorded %s on %d samples in %.3f seconds",
            action,
            len(indices),
            time.perf_counter() - start,
        )
        return batch_id

    def undo(self) -> int | None:
        """Reverts the newest batch still in effect; returns its id, or None if nothing to undo."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT batch_id FROM batches WHERE state='done' ORDER BY batch_id DESC LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            batch_id = int(row[0])
            originals = conn.execute(
                "SELECT train_index, action, corrected_label, note, prev_action, "
                "prev_corrected_label, prev_note FROM events WHERE batch_id=? AND kind='decide' "
                "ORDER BY event_id",
                (batch_id,),
            ).fetchall()
            at = _now()
            events = [
                (batch_id, "undo", index, p_action, p_label, p_note or "", action, label, note, at)
                for index, action, label, note, p_action, p_label, p_note in originals
            ]
            last_event = self._append_events(conn, events)
            restore = [(i, a, lab, n) for i, _, _, _, a, lab, n in originals if a is not None]
            forget = [(i,) for i, _, _, _, a, _, _ in originals if a is None]
            conn.executemany(
                "INSERT OR REPLACE INTO decisions (train_index, action, corrected_label, note, "
                "reviewed_at, event_id) VALUES (?, ?, ?, ?, ?, ?)",
                [(i, a, lab, n or "", at, last_event) for i, a, lab, n in restore],
            )
            conn.executemany("DELETE FROM decisions WHERE train_index=?", forget)
            conn.execute(
                "UPDATE batches SET state='undone', changed_event=? WHERE batch_id=?",
                (last_event, batch_id),
            )
        return batch_id

    def redo(self) -> int | None:
        """Re-applies the most recently undone batch; returns its id, or None if nothing to redo."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT batch_id FROM batches WHERE state='undone' AND changed_event > 0 "
                "ORDER BY changed_event DESC LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            batch_id = int(row[0])
            originals = conn.execute(
                "SELECT train_index, action, corrected_label, note FROM events "
                "WHERE batch_id=? AND kind='decide' ORDER BY event_id",
                (batch_id,),
            ).fetchall()
            indices = [int(r[0]) for r in originals]
            previous = self._current_rows(conn, indices)
            at = _now()
            events = [
                (
                    batch_id,
                    "redo",
                    index,
                    action,
                    label,
                    note,
                    *previous.get(index, (None,) * 3),
                    at,
                )
                for index, action, label, note in originals
            ]
            last_event = self._append_events(conn, events)
            conn.executemany(
                "INSERT OR REPLACE INTO decisions (train_index, action, corrected_label, note, "
                "reviewed_at, event_id) VALUES (?, ?, ?, ?, ?, ?)",
                [(i, a, lab, n, at, last_event) for i, a, lab, n in originals],
            )
            conn.execute(
                "UPDATE batches SET state='done', changed_event=? WHERE batch_id=?",
                (last_event, batch_id),
            )
        return batch_id

    # -- reading ------------------------------------------------------------------------------

    def current(self) -> pd.DataFrame:
        """The current decisions: ``train_index, action, corrected_label, note, reviewed_at``."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT train_index, action, corrected_label, note, reviewed_at FROM decisions "
                "ORDER BY train_index"
            ).fetchall()
        frame = pd.DataFrame(rows, columns=_CURRENT_COLUMNS, dtype=object)
        return frame.astype({"train_index": "int64"})

    def actions(self) -> pd.DataFrame:
        """:meth:`current` without notes and times: ``train_index, action, corrected_label``.

        The review queue needs only these; reading fewer columns keeps a rerun fast at 100k rows.
        """
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT train_index, action, corrected_label FROM decisions ORDER BY train_index"
            ).fetchall()
        frame = pd.DataFrame(rows, columns=_CURRENT_COLUMNS[:3], dtype=object)
        return frame.astype({"train_index": "int64"})

    def decision(self, train_index: int) -> dict[str, object] | None:
        """The current decision of one sample, or None if it has not been reviewed."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT train_index, action, corrected_label, note, reviewed_at FROM decisions "
                "WHERE train_index=?",
                (int(train_index),),
            ).fetchone()
        return None if row is None else dict(zip(_CURRENT_COLUMNS, row, strict=True))

    def log(self) -> pd.DataFrame:
        """Every event in order: decisions, undos and redos, with the state each one replaced."""
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT {', '.join(_LOG_COLUMNS)} FROM events ORDER BY event_id"
            ).fetchall()
        frame = pd.DataFrame(rows, columns=_LOG_COLUMNS, dtype=object)
        return frame.astype({"event_id": "int64", "batch_id": "int64", "train_index": "int64"})

    def counts(self) -> dict[str, int]:
        """Reviewed samples per action, plus ``"reviewed"`` (their total)."""
        with self._connect() as conn:
            rows = conn.execute("SELECT action, COUNT(*) FROM decisions GROUP BY action").fetchall()
        counts = dict.fromkeys(ACTIONS, 0)
        counts.update({str(action): int(n) for action, n in rows})
        counts["reviewed"] = sum(counts[a] for a in ACTIONS)
        return counts

    def can_undo(self) -> bool:
        """Whether :meth:`undo` would revert something."""
        with self._connect() as conn:
            row = conn.execute("SELECT 1 FROM batches WHERE state='done' LIMIT 1").fetchone()
        return row is not None

    def can_redo(self) -> bool:
        """Whether :meth:`redo` would re-apply something."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT 1 FROM batches WHERE state='undone' AND changed_event > 0 LIMIT 1"
            ).fetchone()
        return row is not None

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _check_indices(train_index: int | Iterable[int]) -> list[int]:
        """Validates indices: non-negative integers, at least one; duplicates dropped in order."""
        if isinstance(train_index, str | bytes):
            raise ReviewError(
                f"train_index {train_index!r} is text; pass an integer row number or a list of them"
            )
        raw = [train_index] if isinstance(train_index, Integral) else list(train_index)
        if not raw:
            raise ReviewError("no training samples selected; select at least one sample first")
        indices: list[int] = []
        for value in raw:
            try:
                index = int(value)
            except (TypeError, ValueError) as exc:
                raise ReviewError(
                    f"train_index {value!r} is not an integer; pass row numbers of the train split"
                ) from exc
            if index != value or index < 0:
                raise ReviewError(f"train_index {value!r} is not a row number; pass integers >= 0")
            indices.append(index)
        return list(dict.fromkeys(indices))

    @staticmethod
    def _current_rows(
        conn: sqlite3.Connection, indices: list[int]
    ) -> dict[int, tuple[str | None, str | None, str | None]]:
        """Current ``(action, corrected_label, note)`` of the given samples that have one."""
        found: dict[int, tuple[str | None, str | None, str | None]] = {}
        for chunk in _chunks(indices):
            marks = ",".join("?" * len(chunk))
            for index, action, label, note in conn.execute(
                "SELECT train_index, action, corrected_label, note FROM decisions "
                f"WHERE train_index IN ({marks})",
                chunk,
            ):
                found[int(index)] = (action, label, note)
        return found

    @staticmethod
    def _append_events(conn: sqlite3.Connection, rows: list[tuple]) -> int:
        """Appends event rows and returns the id of the last one."""
        conn.executemany(
            "INSERT INTO events (batch_id, kind, train_index, action, corrected_label, note, "
            "prev_action, prev_corrected_label, prev_note, at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        return int(conn.execute("SELECT MAX(event_id) FROM events").fetchone()[0])


def open_reviews(project: object) -> ReviewStore:
    """The review store of a project (its ``reviews_path``)."""
    return ReviewStore(project.reviews_path)  # type: ignore[attr-defined]
