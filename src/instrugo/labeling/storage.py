"""The labeling store: one SQLite file holds labelers, tasks, assignments and labels.

Durability: WAL journal with `synchronous=FULL`, so a label is on disk before the API acknowledges it and
a killed server loses nothing it acknowledged. Concurrency: every write is one `BEGIN IMMEDIATE`
transaction (writers queue on SQLite's lock, readers never block), so the server can run many request
threads on one file. Idempotency: a label's primary key is its assignment, so a second submit of the
same task finds the first label and returns it instead of storing another.

Assignment is pull-based: `next_task` hands a labeler their oldest open assignment, or else assigns the
first task that still wants labelers (`copies`, 1 or 2 with overlap) and that they have not seen. Each
assignment shows the responses in its own random order; labels arrive in shown positions and are stored
in the file's original response indices.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import sqlite3
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from instrugo.comparisons import FLAGS, ComparisonTask, normalize_ranking
from instrugo.labeling import agreement
from instrugo.runio import InputError

ROLES = ("labeler", "admin")

# Migrations in order; the database's schema_version says how many have run. Append, never edit.
MIGRATIONS = (
    """
    CREATE TABLE labelers (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        token_hash TEXT NOT NULL UNIQUE,          -- sha256 of the token; the token itself is never stored
        role TEXT NOT NULL CHECK (role IN ('labeler', 'admin')),
        created REAL NOT NULL,
        revoked REAL                              -- time of revocation; NULL while active
    );
    CREATE TABLE tasks (
        id INTEGER PRIMARY KEY,                   -- import order = the order tasks are handed out
        task_id TEXT NOT NULL UNIQUE,             -- the id in the imported JSONL
        body TEXT NOT NULL,                       -- the task as imported (JSON), without any ranking
        k INTEGER NOT NULL,
        copies INTEGER NOT NULL CHECK (copies >= 1),  -- how many labelers should rank it
        imported REAL NOT NULL
    );
    CREATE TABLE assignments (
        id INTEGER PRIMARY KEY,
        task INTEGER NOT NULL REFERENCES tasks(id),
        labeler INTEGER NOT NULL REFERENCES labelers(id),
        display_order TEXT NOT NULL,              -- JSON: the original response index shown at each position
        created REAL NOT NULL,
        UNIQUE (task, labeler)
    );
    CREATE INDEX assignments_by_labeler ON assignments(labeler);
    CREATE TABLE labels (
        assignment INTEGER PRIMARY KEY REFERENCES assignments(id),  -- one label per assignment
        ranking TEXT,                             -- JSON tie groups of original indices; NULL when skipped
        scores TEXT,
        flags TEXT,
        skip_reason TEXT,
        seconds REAL,                             -- time the labeler spent, as the page measured it
        time REAL NOT NULL,
        CHECK ((ranking IS NULL) <> (skip_reason IS NULL))
    );
    """,
)


class NotFound(Exception):
    """No such assignment for this labeler (another labeler's tasks look exactly like missing ones)."""


class Conflict(Exception):
    """The request contradicts what is stored (e.g. labeling a task that was skipped)."""


class LabelError(ValueError):
    """A submitted label that is not a valid ranking/scoring of the shown responses."""


@dataclass(frozen=True)
class Labeler:
    id: int
    name: str
    role: str


@dataclass
class Label:
    """A ranking with optional 1..7 scores and flags, all indexed the same way (shown or original)."""

    ranking: list[list[int]]
    scores: list[int] | None = None
    flags: list[list[str]] | None = None
    seconds: float | None = None

    def reindexed(self, mapping: list[int]) -> Label:
        """The same label with index i renamed mapping[i] (shown position ↔ original index)."""
        def place(values: list | None) -> list | None:
            if values is None:
                return None
            out: list = [None] * len(values)
            for i, value in enumerate(values):
                out[mapping[i]] = value
            return out

        return Label([sorted(mapping[i] for i in group) for group in self.ranking], place(self.scores),
                     place(self.flags), self.seconds)


def hash_token(token: str) -> str:
    # Tokens are 192 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "ig_" + secrets.token_urlsafe(24)


def validate_label(label: Label, k: int) -> Label:
    """Check a label of k responses; returns it with tie groups and flags in canonical form."""
    try:
        ranking = normalize_ranking(label.ranking, k, ("label", None))
    except InputError as error:
        raise LabelError(f"ranking {error.message}") from None
    if label.scores is not None and (len(label.scores) != k or not all(
            isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 7 for s in label.scores)):
        raise LabelError(f"scores must be {k} integers 1..7, one per response")
    flags = None
    if label.flags is not None:
        if len(label.flags) != k:
            raise LabelError(f"flags must be {k} lists, one per response")
        unknown = {f for fs in label.flags for f in fs} - set(FLAGS)
        if unknown:
            raise LabelError(f"unknown flags {sorted(unknown)} (known: {', '.join(FLAGS)})")
        flags = [[f for f in FLAGS if f in fs] for fs in label.flags]
    if label.seconds is not None and not label.seconds >= 0:
        raise LabelError("seconds must be a non-negative number")
    return Label([sorted(g) for g in ranking], label.scores, flags, label.seconds)


def inverse(order: list[int]) -> list[int]:
    out = [0] * len(order)
    for position, index in enumerate(order):
        out[index] = position
    return out


def task_body(task: ComparisonTask) -> dict[str, Any]:
    """What the store keeps of an imported task: everything but its (old) label."""
    row = task.to_json()
    for key in ("ranking", "labeler", "scores", "flags", "time"):
        row.pop(key, None)
    return row


class LabelStore:
    """All reads and writes of one labeling database; safe to share between threads.

    Each thread keeps its own connection open: reopening per call would cost a WAL checkpoint (and its
    fsyncs) every time the last connection closed.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()
        self.migrate()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit: acknowledged = on disk
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _connection(self) -> sqlite3.Connection:
        if getattr(self._local, "conn", None) is None:
            self._local.conn = self._connect()
        return self._local.conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        conn.execute("BEGIN")  # one consistent snapshot for all queries of the call
        try:
            yield conn
        finally:
            conn.execute("ROLLBACK")  # read only: nothing to keep

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")  # take the write lock now, so read-then-write cannot race
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- schema ---------------------------------------------------------------------------------------

    def migrate(self) -> int:
        """Create or upgrade the schema; returns the schema version."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = self._connect()
        except sqlite3.DatabaseError as error:
            raise InputError(self.path, f"not a labeling database ({error})") from None
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the database file
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > len(MIGRATIONS):
                raise InputError(self.path, f"schema version {version} is newer than this instrugo knows "
                                            f"({len(MIGRATIONS)}); upgrade instrugo")
            for number in range(version + 1, len(MIGRATIONS) + 1):
                try:
                    conn.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[number - 1]}; "
                                       f"DELETE FROM schema_version; INSERT INTO schema_version VALUES ({number}); "
                                       "COMMIT;")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            return len(MIGRATIONS)
        except sqlite3.DatabaseError as error:
            raise InputError(self.path, f"not a labeling database ({error})") from None
        finally:
            conn.close()

    def schema_version(self) -> int:
        with self._read() as conn:
            return conn.execute("SELECT version FROM schema_version").fetchone()[0]

    # -- labelers -------------------------------------------------------------------------------------

    def add_labeler(self, name: str, role: str = "labeler") -> str:
        """Create a labeler (or admin) and return their token; only its hash is stored."""
        if not name.strip():
            raise InputError("labeler", "must not be empty", field="name")
        if role not in ROLES:
            raise InputError("labeler", f"must be one of {', '.join(ROLES)}", field="role")
        token = new_token()
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM labelers WHERE name = ?", (name,)).fetchone():
                raise InputError(self.path, f"labeler '{name}' already exists", field="name")
            conn.execute("INSERT INTO labelers (name, token_hash, role, created) VALUES (?, ?, ?, ?)",
                         (name, hash_token(token), role, time.time()))
        return token

    def revoke(self, name: str) -> int:
        """Revoke a token; the labeler's unfinished assignments go back to the pool. Returns how many."""
        with self._write() as conn:
            row = conn.execute("SELECT id FROM labelers WHERE name = ? AND revoked IS NULL", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no active labeler named '{name}'")
            conn.execute("UPDATE labelers SET revoked = ? WHERE id = ?", (time.time(), row["id"]))
            released = conn.execute("DELETE FROM assignments WHERE labeler = ? AND id NOT IN "
                                    "(SELECT assignment FROM labels)", (row["id"],)).rowcount
        return released

    def authenticate(self, token: str) -> Labeler | None:
        with self._read() as conn:
            row = conn.execute("SELECT id, name, role FROM labelers WHERE token_hash = ? AND revoked IS NULL",
                               (hash_token(token),)).fetchone()
        return Labeler(row["id"], row["name"], row["role"]) if row else None

    # -- tasks ----------------------------------------------------------------------------------------

    def import_tasks(self, tasks: list[ComparisonTask], source: str, overlap: float = 0.0, copies: int = 2,
                     seed: int = 0) -> dict[str, int]:
        """Add tasks; a share `overlap` of the new ones is wanted from `copies` labelers (for agreement).

        Re-importing a task with the same id and content is a no-op; the same id with other content is an
        InputError. Returns {"added", "already_present", "overlapping"}.
        """
        if not 0 <= overlap <= 1:
            raise InputError(source, "must be in [0, 1]", field="overlap")
        if copies < 2:
            raise InputError(source, "must be at least 2 (labelers per overlapping task)", field="copies")
        with self._write() as conn:
            new, seen = [], set()
            for task in tasks:
                if task.id in seen:
                    raise InputError(source, f"duplicate task id '{task.id}'", field="id")
                seen.add(task.id)
                body = json.dumps(task_body(task), ensure_ascii=False, sort_keys=True)
                row = conn.execute("SELECT body FROM tasks WHERE task_id = ?", (task.id,)).fetchone()
                if row is None:
                    new.append((task, body))
                elif row["body"] != body:
                    raise InputError(source, f"task '{task.id}' is already imported with different content",
                                     field="id")
            overlapping = set(random.Random(seed).sample(range(len(new)), round(len(new) * overlap)))
            now = time.time()
            conn.executemany("INSERT INTO tasks (task_id, body, k, copies, imported) VALUES (?, ?, ?, ?, ?)",
                             [(task.id, body, len(task.responses), copies if i in overlapping else 1, now)
                              for i, (task, body) in enumerate(new)])
        return {"added": len(new), "already_present": len(tasks) - len(new), "overlapping": len(overlapping)}

    def _assignment(self, conn: sqlite3.Connection, labeler: Labeler, assignment_id: int) -> sqlite3.Row:
        row = conn.execute("SELECT a.id, a.display_order, t.task_id, t.body, t.k FROM assignments a "
                           "JOIN tasks t ON t.id = a.task WHERE a.id = ? AND a.labeler = ?",
                           (assignment_id, labeler.id)).fetchone()
        if row is None:
            raise NotFound(f"task {assignment_id} is not assigned to you")
        return row

    @staticmethod
    def _shown(row: sqlite3.Row, label: Label | None = None, skip_reason: str | None = None) -> dict[str, Any]:
        """An assignment as its labeler sees it: responses in their display order."""
        order = json.loads(row["display_order"])
        body = json.loads(row["body"])
        return {"id": row["id"], "task_id": row["task_id"], "prompt": body["prompt"],
                "responses": [body["responses"][i] for i in order],
                "label": asdict(label.reindexed(inverse(order))) if label else None,
                "skip_reason": skip_reason}

    def next_task(self, labeler: Labeler) -> dict[str, Any] | None:
        """The labeler's oldest unfinished assignment, else a newly assigned task; None when none are left."""
        with self._write() as conn:
            row = conn.execute("SELECT a.id FROM assignments a WHERE a.labeler = ? AND a.id NOT IN "
                               "(SELECT assignment FROM labels) ORDER BY a.id LIMIT 1", (labeler.id,)).fetchone()
            if row is None:
                # A task wants more labelers while its assignments that were not skipped are fewer than `copies`.
                task = conn.execute(
                    "SELECT t.id, t.k FROM tasks t WHERE t.copies > "
                    "(SELECT COUNT(*) FROM assignments a LEFT JOIN labels l ON l.assignment = a.id "
                    " WHERE a.task = t.id AND l.skip_reason IS NULL) "
                    "AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.task = t.id AND a.labeler = ?) "
                    "ORDER BY t.id LIMIT 1", (labeler.id,)).fetchone()
                if task is None:
                    return None
                order = random.SystemRandom().sample(range(task["k"]), task["k"])
                conn.execute("INSERT INTO assignments (task, labeler, display_order, created) VALUES (?, ?, ?, ?)",
                             (task["id"], labeler.id, json.dumps(order), time.time()))
                row = conn.execute("SELECT last_insert_rowid() AS id").fetchone()
            return self._shown(self._assignment(conn, labeler, row["id"]))

    def get_task(self, labeler: Labeler, assignment_id: int) -> dict[str, Any]:
        """One of the labeler's assignments with its label (in shown positions) if it has one."""
        with self._read() as conn:
            row = self._assignment(conn, labeler, assignment_id)
            stored = conn.execute("SELECT * FROM labels WHERE assignment = ?", (assignment_id,)).fetchone()
        if stored is None or stored["ranking"] is None:
            return self._shown(row, skip_reason=stored["skip_reason"] if stored else None)
        return self._shown(row, self._stored_label(stored))

    @staticmethod
    def _stored_label(row: sqlite3.Row) -> Label:
        loads = lambda text: None if text is None else json.loads(text)  # noqa: E731
        return Label(loads(row["ranking"]), loads(row["scores"]), loads(row["flags"]), row["seconds"])

    def submit_label(self, labeler: Labeler, assignment_id: int, label: Label) -> tuple[dict[str, Any], bool]:
        """Store a label given in shown positions, once. Returns (the task with its stored label, created)."""
        with self._write() as conn:
            row = self._assignment(conn, labeler, assignment_id)
            stored = conn.execute("SELECT * FROM labels WHERE assignment = ?", (assignment_id,)).fetchone()
            if stored is not None:
                if stored["ranking"] is None:
                    raise Conflict(f"task {assignment_id} was skipped")
                return self._shown(row, self._stored_label(stored)), False
            label = validate_label(label, row["k"])
            original = label.reindexed(json.loads(row["display_order"]))
            dumps = lambda value: None if value is None else json.dumps(value)  # noqa: E731
            conn.execute("INSERT INTO labels (assignment, ranking, scores, flags, seconds, time) "
                         "VALUES (?, ?, ?, ?, ?, ?)",
                         (assignment_id, dumps(original.ranking), dumps(original.scores), dumps(original.flags),
                          label.seconds, time.time()))
            return self._shown(row, original), True

    def skip(self, labeler: Labeler, assignment_id: int, reason: str) -> None:
        """Skip an assignment with a reason; the task goes to another labeler. Repeating it is a no-op."""
        if not reason.strip():
            raise LabelError("a skip needs a reason")
        with self._write() as conn:
            self._assignment(conn, labeler, assignment_id)
            stored = conn.execute("SELECT ranking FROM labels WHERE assignment = ?", (assignment_id,)).fetchone()
            if stored is not None and stored["ranking"] is not None:
                raise Conflict(f"task {assignment_id} is already labeled")
            if stored is None:
                conn.execute("INSERT INTO labels (assignment, skip_reason, time) VALUES (?, ?, ?)",
                             (assignment_id, reason.strip(), time.time()))

    def progress(self, labeler: Labeler) -> dict[str, Any]:
        """The labeler's own counts, and how many tasks are still waiting for them."""
        with self._read() as conn:
            mine = conn.execute(
                "SELECT COUNT(l.ranking) AS labeled, COUNT(l.skip_reason) AS skipped, "
                "COUNT(*) - COUNT(l.assignment) AS open FROM assignments a "
                "LEFT JOIN labels l ON l.assignment = a.id WHERE a.labeler = ?", (labeler.id,)).fetchone()
            waiting = conn.execute(
                "SELECT COUNT(*) FROM tasks t WHERE t.copies > "
                "(SELECT COUNT(*) FROM assignments a LEFT JOIN labels l ON l.assignment = a.id "
                " WHERE a.task = t.id AND l.skip_reason IS NULL) "
                "AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.task = t.id AND a.labeler = ?)",
                (labeler.id,)).fetchone()[0]
        return {"name": labeler.name, "labeled": mine["labeled"], "skipped": mine["skipped"],
                "open": mine["open"], "waiting": waiting}

    # -- admin: export and dashboard -------------------------------------------------------------------

    def _labels(self, conn: sqlite3.Connection) -> list[sqlite3.Row]:
        return conn.execute(
            "SELECT t.id AS task, t.task_id, t.body, lb.name AS labeler, l.* FROM labels l "
            "JOIN assignments a ON a.id = l.assignment JOIN tasks t ON t.id = a.task "
            "JOIN labelers lb ON lb.id = a.labeler WHERE l.ranking IS NOT NULL ORDER BY t.id, l.time").fetchall()

    def export_rows(self) -> list[dict[str, Any]]:
        """Every label as a comparison-task row (original response order) with its labeler and time.

        A task ranked by several labelers gives one row per label, with ids 'TASK:LABELER' so that ids stay
        unique in the file; the reward model splits held-out data by prompt, so the copies stay together.
        """
        with self._read() as conn:
            rows = self._labels(conn)
        per_task = defaultdict(int)
        for row in rows:
            per_task[row["task"]] += 1
        out = []
        for row in rows:
            body = json.loads(row["body"])
            label = self._stored_label(row)
            task_id = row["task_id"] if per_task[row["task"]] == 1 else f"{row['task_id']}:{row['labeler']}"
            out.append({**body, "id": task_id, "ranking": label.ranking, "labeler": row["labeler"],
                        **({"scores": label.scores} if label.scores is not None else {}),
                        **({"flags": label.flags} if label.flags is not None else {}),
                        "time": row["time"]})
        return out

    def dashboard(self, now: float | None = None) -> dict[str, Any]:
        """Progress, throughput, agreement and per-labeler numbers for the admin page and `label status`."""
        now = time.time() if now is None else now
        with self._read() as conn:
            totals = conn.execute(
                "SELECT COUNT(*) AS tasks, COALESCE(SUM(copies), 0) AS labels_wanted, "
                "COALESCE(SUM(copies > 1), 0) AS overlapping FROM tasks").fetchone()
            done = conn.execute(
                "SELECT COUNT(*) FROM tasks t WHERE t.copies <= (SELECT COUNT(l.ranking) FROM assignments a "
                "JOIN labels l ON l.assignment = a.id WHERE a.task = t.id)").fetchone()[0]
            people = conn.execute(
                "SELECT lb.name, lb.role, lb.revoked IS NOT NULL AS revoked, COUNT(l.ranking) AS labeled, "
                "COUNT(l.skip_reason) AS skipped, COUNT(a.id) - COUNT(l.assignment) AS open, "
                "SUM(l.ranking IS NOT NULL AND l.time > ?) AS last_hour FROM labelers lb "
                "LEFT JOIN assignments a ON a.labeler = lb.id LEFT JOIN labels l ON l.assignment = a.id "
                "GROUP BY lb.id ORDER BY lb.name", (now - 3600,)).fetchall()
            labels = self._labels(conn)
        by_task: dict[int, dict[str, list]] = defaultdict(dict)
        seconds: dict[str, list[float]] = defaultdict(list)
        hourly = [0] * 24
        for row in labels:
            by_task[row["task"]][row["labeler"]] = json.loads(row["ranking"])
            if row["seconds"] is not None:
                seconds[row["labeler"]].append(row["seconds"])
            age_hours = int((now - row["time"]) // 3600)
            if 0 <= age_hours < 24:
                hourly[23 - age_hours] += 1
        with_majority = agreement.majority_agreement(by_task.values())
        labelers = []
        for p in people:
            times = sorted(seconds[p["name"]])
            labelers.append({"name": p["name"], "role": p["role"], "revoked": bool(p["revoked"]),
                             "labeled": p["labeled"], "skipped": p["skipped"], "open": p["open"],
                             "last_hour": p["last_hour"] or 0,
                             "median_seconds": times[len(times) // 2] if times else None,
                             "agreement_with_majority": with_majority.get(p["name"], {}).get("agreement"),
                             "majority_pairs": with_majority.get(p["name"], {}).get("pairs", 0)})
        return {"tasks": totals["tasks"], "tasks_done": done, "overlapping_tasks": totals["overlapping"],
                "labels": len(labels), "labels_wanted": totals["labels_wanted"],
                "skipped": sum(p["skipped"] for p in labelers), "open": sum(p["open"] for p in labelers),
                "labels_per_hour": hourly, "inter_labeler": agreement.inter_labeler_agreement(by_task.values()),
                "labelers": labelers}
