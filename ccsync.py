#!/usr/bin/env python3
"""ccsync: keep cc's SQLite data the same on every machine.

cc (an Odoo developer workflow CLI) keeps its versions, projects, environments,
databases, settings, switch history, backups and code-index data in
``~/.cc-cli/cc_cli.db``.  ccsync makes that data converge on every device
through one central sync server that the user runs.

How it works, in one paragraph: SQLite triggers that ccsync installs record
which row and which column changed, with a hybrid logical clock taken at the
moment of the edit.  A sync captures those changes as records (one per row,
one clock per column), pushes them to the server's change store, then pulls
what other devices sent since its cursor and merges it column by column:
the later edit wins, deletes travel as tombstones, rows with a natural key
(a version's name, a project's name, ...) are the same row everywhere, and
references travel as the referenced row's ``sync_id``, never as integer ids.

The wire: requests are signed (HMAC-SHA256, keys derived from the device's
API key by HKDF, which itself never travels) and bodies are compressed and
AES-256-GCM encrypted; answers are signed too.

Usage sketch::

    python ccsync.pyz server --port 9100          # on the server machine
    python ccsync.pyz register --name laptop      # on the server: prints a key
    python ccsync.pyz setup                       # on each device
    python ccsync.pyz sync                        # or: daemon, or AutoSync in cc
    python ccsync.pyz status --json

Public API (for embedding and tests): :class:`AutoSync` (the background loop
for cc's daemon), :func:`sync_once` / :func:`run_sync`, :class:`Store` via
:func:`open_store`, :class:`Client`, :class:`ServerStore`, :class:`SyncServer`
and its pure :func:`dispatch`, :class:`LocalTransport`, :func:`main`.

Requires Python >= 3.10 and the standard library; the encrypted transport
needs ``pycryptodomex`` (``ccsync enable`` installs it), imported lazily.
"""

from __future__ import annotations

__version__ = "0.2.0"
__all__ = [
    "CcsyncError", "UsageError", "ConfigError", "StoreError", "RemoteError",
    "CryptoUnavailable", "SyncBusy", "SyncCancelled",
    "SPEC", "TableSpec", "setting_policy", "natural_id", "next_delay", "version_digits",
    "connect", "transaction", "open_store", "Store", "Batch", "ApplyResult",
    "ServerStore", "SyncServer", "dispatch", "Client", "DeviceKeys", "new_api_key",
    "LocalTransport", "SyncResult", "sync_once", "run_sync", "AutoSync", "SyncLock",
    "Resolver", "link_project", "load_config", "main",
]

# What every command needs; the rest (threading, base64, crypto, http, ssl,
# hashing...) is imported in the function that uses it: start-up is most of a
# small command's time.
import argparse
import contextlib
import functools
import itertools
import json
import os
import re
import sqlite3
import sys
import time
from collections import Counter, defaultdict, namedtuple
TYPE_CHECKING = False                   # typing is for the checkers: not imported to run
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable, Iterator
    Progress = Callable[[str, int, "int | None"], None]    # (leg, records done, of about)


##### Constants and the sync spec ############################################
# Facts about cc's data: which tables sync, in what order, how rows are
# identified and referenced.  No I/O here.

class TableSpec:
    """How one cc table syncs.

    ``key``: natural-key columns (the row's identity across devices).
    ``refs``: column -> parent table, an integer id that travels as the
    parent's sync_id.  ``list_refs``: column -> table, a text list of ids.
    ``name_refs``: column -> (unsynced table, its name column), matched by name.
    ``local``: device-local columns (paths on this machine).
    ``required``: nullable references that must still point at a live row, as
    NOT NULL ones do (a switch_log with no environment is a punch-out in cc,
    so a merge must never empty one).
    """

    __slots__ = ("name", "key", "refs", "list_refs", "name_refs", "local", "required")

    def __init__(self, name: str, key: tuple[str, ...], *,
                 refs: dict[str, str] | None = None, list_refs: dict[str, str] | None = None,
                 name_refs: dict[str, tuple[str, str]] | None = None,
                 local: tuple[str, ...] = (), required: tuple[str, ...] = ()):
        self.name, self.key, self.local, self.required = name, key, local, required
        self.refs, self.list_refs = refs or {}, list_refs or {}
        self.name_refs = name_refs or {}

    def __repr__(self) -> str:
        return f"TableSpec({self.name!r})"


# Dependency order: a table only references tables above it (list_refs and
# project -> environment excepted; those are resolved after each page).
SPEC: tuple[TableSpec, ...] = (
    TableSpec("version", ("name",), local=("path",)),
    TableSpec("setting", ("name",)),
    TableSpec("database", ("name",), refs={"clone_db_id": "database"}),
    TableSpec("project", ("name",), name_refs={"workspace_id": ("workspace", "name")},
              list_refs={"environment_ids": "environment"}),
    TableSpec("environment", ("project_id", "name"),
              refs={"project_id": "project", "version_id": "version",
                    "database_id": "database"},
              local=("project_path",)),
    TableSpec("switch_log", ("environment_id", "switched_at"),
              refs={"environment_id": "environment"}, required=("environment_id",)),
    TableSpec("backup", ("db_name", "name", "created_at"),
              refs={"database_id": "database"}, local=("file_path",)),
    TableSpec("repository", ("origin_url",), local=("path",),
              list_refs={"skill_tag_ids": "skill_tag",
                         "knowledge_index_ids": "knowledge_index"}),
    TableSpec("skill_tag", ("repository_id", "commit_sha", "tag"),
              refs={"repository_id": "repository"}),
    TableSpec("knowledge_index", ("repository_id", "symbol", "symbol_kind"),
              refs={"repository_id": "repository"}),
)
SPEC_BY_NAME = {spec.name: spec for spec in SPEC}
# Tables no single-id reference names: a deleted row of these can go from
# the server for good.  A row such a reference may name stays (a live row
# may still need it as its parent, and a device joining later must learn it
# was deleted, or it would wait for it).  An id list (list_refs) reads the
# same either way: an id of a row not here is left out of the list.
COLLECTABLE = tuple(spec.name for spec in SPEC if not any(
    spec.name in other.refs.values() for other in SPEC))
# The other tables' deleted rows go too, once every device says nothing it
# holds names them any more (see ServerCollection.note_reader); a device is
# asked about ASK_ROWS of them at a time.
REFERENCED = tuple(spec.name for spec in SPEC if spec.name not in COLLECTABLE)
ASK_ROWS = 200


def _naming_tables(table: str) -> tuple[str, ...]:
    """The tables whose rows may keep a ``table`` row alive, directly or
    through others (a time entry keeps its environment, and so its project;
    a project's list of environments names them too)."""
    found, todo = set(), [table]
    while todo:
        name = todo.pop()
        for spec in SPEC:
            names = (*spec.refs.values(), *spec.list_refs.values())
            if name in names and spec.name not in found:
                found.add(spec.name)
                todo.append(spec.name)
    return tuple(sorted(found))


NAMED_BY = {name: _naming_tables(name) for name in REFERENCED}
TABLE_ORDER = {spec.name: i for i, spec in enumerate(SPEC)}

SYNC_COLUMNS = ("sync_id", "synced_at")   # cc's own columns; never synced as data
TOMBSTONE = "~"                           # pseudo-column carrying a delete's clock
INSERTED = "*"                            # dirty marker: whole row inserted
DELETED = "-"                             # dirty marker: row deleted (bookkeeping v1)
MOVED = "@"                               # dirty marker: the row's rowid changed

# Natural-key ids are uuid5 in this namespace, so two devices that created
# the same project independently give it the same sync_id.
ID_NAMESPACE = bytes.fromhex("6f0c5d1e8a534c439a552f7c1c0ccc51")   # a UUID's 16 bytes
# What ids are made of, as sets (a regex compiled at start-up cost every
# command a few tenths of a millisecond, and "$" also matched before a newline).
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
SYNC_ID_CHARS = frozenset(_ALNUM + "._:-")

# Settings that never leave a device and are refused on arrival.
SECRET_SETTINGS = frozenset({"sync.api_key", "sync.server_url", "pg.connection", "github_pat"})
SECRET_WORDS = ("secret", "token", "passw", "session", "cookie", "credential")
SECRET_SUFFIXES = ("key", "pat")
# Settings that describe this machine: never synced in either direction.
LOCAL_SETTINGS = frozenset({"ide", "ssh_key_path", "odoo.internal_addons_dir",
                            "multi_version_mode", "sync.clone_dir"})
LOCAL_SETTING_SUFFIXES = ("_path", "_dir", ".path", ".dir")
LOCAL_SETTING_PREFIX = "ccsync."          # ccsync's own settings stay local
LOCAL_SETTINGS_SETTING = "ccsync.local_settings"

ENV_DB = "CC_DB"
ENV_LOCAL_SETTINGS = "CCSYNC_LOCAL_SETTINGS"
DEFAULT_DB = os.path.join("~", ".cc-cli", "cc_cli.db")

# Hybrid logical clock values are wall-clock milliseconds x HLC_PER_MS plus a
# counter, so a burst of a million edits a second runs ~1 s ahead, not minutes.
HLC_PER_MS = 1000
MAX_CLOCK_AHEAD_MS = 24 * 3600 * 1000     # incoming clocks further ahead are refused
PUSH_BATCH = 2000                         # rows per push request
PULL_PAGE = 2000                          # records per pull page
PULL_PAGE_BYTES = 8 * 1024 * 1024         # stored text per pull page (at least one record)
STAMP_CHUNK = 200                         # rows stamped per write transaction

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _log() -> Any:
    """ccsync's logger, "ccsync" (no handlers here: the host decides); logging
    is imported on first use, not by every command."""
    import logging
    return logging.getLogger("ccsync")


##### Errors ##################################################################
# One base class; main() maps it to an exit code and a one-line message.

class CcsyncError(Exception):
    """A failure the user should see as one line (plus an optional hint)."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UsageError(CcsyncError):
    """The command line was wrong."""

    exit_code = EXIT_USAGE


class ConfigError(CcsyncError):
    """Sync is not configured, or configured wrongly."""


class StoreError(CcsyncError):
    """A local or server database could not be used."""


class RemoteError(CcsyncError):
    """The server could not be reached or answered with an error.

    ``kind`` says which: unreachable, key_rejected, revoked, clock_skew,
    too_large, busy, cut, bad_response, protocol, http.
    """

    kind = "http"
    retry_after = 0                     # seconds a busy server asked to wait

    def with_kind(self, kind: str) -> "RemoteError":
        """Set ``kind`` and return self (for ``raise ...with_kind(...)``)."""
        self.kind = kind
        return self


##### Pure helpers ############################################################
# Clocks, ids, value encoding, setting rules, clock comparison.  No I/O.

# json.dumps builds a new encoder whenever it is given an option; these run
# for every row synced, so they are made once (the same text as json.dumps).
compact_json = json.JSONEncoder(separators=(",", ":")).encode
_key_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_sorted_json = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


def now_ms(clock: Callable[[], float]) -> int:
    """Milliseconds since the epoch from ``clock`` (a ``time.time``-like callable)."""
    return int(clock() * 1000)


def hlc_at(ms: int) -> int:
    """The hybrid logical clock value of a wall-clock time in milliseconds."""
    return ms * HLC_PER_MS


def iso_utc(clock: Callable[[], float], timespec: str = "seconds") -> str:
    """An ISO 8601 UTC timestamp from ``clock``, e.g. 2026-11-24T21:46:00Z."""
    import datetime as _dt
    moment = _dt.datetime.fromtimestamp(clock(), _dt.timezone.utc)
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")


_ISO = (r"(\d{4})-?(\d{2})-?(\d{2})(?:[T ](\d{2}):?(\d{2})(?::?(\d{2})(?:[.,](\d{1,9}))?)?)?"
        r"\s*(Z|[+-]\d{2}(?::?\d{2})?)?")   # compiled when first used (re keeps it)


def parse_iso(text: str) -> _dt.datetime:
    """Parse any ISO 8601 date or date-time (basic or extended, with or without
    offset; no offset means local time) to an aware UTC datetime."""
    import datetime as _dt
    match = re.fullmatch(_ISO, (text or "").strip(), re.IGNORECASE)
    if not match:
        raise ValueError(f"not an ISO 8601 timestamp: {text!r}")
    year, month, day, hour, minute, second, frac, offset = match.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    moment = _dt.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                          int(second or 0), micro)
    if offset is None:
        moment = moment.astimezone()              # local time
    elif offset.upper() == "Z":
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    else:
        sign_ = -1 if offset[0] == "-" else 1
        digits = offset[1:].replace(":", "")
        delta = _dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:] or 0))
        moment = moment.replace(tzinfo=_dt.timezone(sign_ * delta))
    return moment.astimezone(_dt.timezone.utc)


def since_key(text: str) -> str:
    """The server-side comparison key for ``--since`` (UTC, microseconds)."""
    return parse_iso(text).isoformat(timespec="microseconds").replace("+00:00", "Z")


def uniform() -> float:
    """A random float in [0, 1) (random is imported here, on first use)."""
    import random
    return random.random()


def new_uuid() -> Any:
    """A random (version 4) uuid.UUID (uuid is imported here, on first use)."""
    import uuid
    return uuid.uuid4()


def natural_id(table: str, values: Iterable[Any]) -> str | None:
    """The deterministic sync_id for a natural key, or None if the key is empty."""
    import hashlib
    values = list(values)
    if all(v is None or v == "" for v in values):
        return None
    text = _key_json([table, *values])
    # uuid.uuid5(ID_NAMESPACE, text), spelled out: this runs for every row synced
    digest = bytearray(hashlib.sha1(ID_NAMESPACE + text.encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50           # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80           # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def setting_policy(name: Any, extra_local: Iterable[str] = ()) -> str | None:
    """'secret', 'local' or None (syncs) for a setting name.

    Secrets never leave a device; local settings name commands or paths on
    this machine, so a device can never make another run something.
    """
    if not isinstance(name, str):
        return None
    low = name.lower()
    if low in SECRET_SETTINGS or any(w in low for w in SECRET_WORDS) \
            or low.endswith(SECRET_SUFFIXES):
        return "secret"
    if low in LOCAL_SETTINGS or low.endswith(LOCAL_SETTING_SUFFIXES) \
            or low.startswith(LOCAL_SETTING_PREFIX):
        return "local"
    import fnmatch
    if any(fnmatch.fnmatchcase(low, pat.strip().lower()) for pat in extra_local if pat.strip()):
        return "local"
    return None


def split_names(text: str | None) -> tuple[str, ...]:
    """Names from a comma- or whitespace-separated list."""
    return tuple(n for n in re.split(r"[,\s]+", text or "") if n)


def encode_value(value: Any) -> Any:
    """A SQLite value as JSON: blobs become ``{"$b64": ...}``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        import base64
        return {"$b64": base64.b64encode(bytes(value)).decode("ascii")}
    return value


def decode_value(value: Any) -> Any:
    """Inverse of :func:`encode_value`; raises ValueError for non-scalars."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise ValueError("boolean is not a SQLite value")
    if isinstance(value, int):
        if not -(2 ** 63) <= value < 2 ** 63:
            raise ValueError("integer out of range")
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, dict) and set(value) == {"$b64"} and isinstance(value["$b64"], str):
        import base64
        return base64.b64decode(value["$b64"], validate=True)
    raise ValueError("not a SQLite scalar")


def parse_id_list(text: Any) -> tuple[list[int], str] | None:
    """Parse a text list of integer ids ('[1, 2]' or '1,2'); None if it is not one."""
    if not isinstance(text, str):
        return None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except ValueError:
            return None
        if isinstance(items, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                           for i in items):
            return items, "json"
        return None
    if stripped == "" or re.fullmatch(r"\d+(\s*,\s*\d+)*", stripped):
        return [int(p) for p in stripped.split(",") if p.strip()], "csv"
    return None


def format_id_list(ids: list[int], fmt: str) -> str:
    """Inverse of :func:`parse_id_list`."""
    return json.dumps(ids) if fmt == "json" else ",".join(str(i) for i in ids)


def _q(name: str) -> str:
    """Quote an SQL identifier (names come from the local schema or SPEC only)."""
    return '"' + name.replace('"', '""') + '"'


def _insert_sql(table: str, columns: Iterable[str]) -> str:
    """``INSERT INTO table (columns) VALUES (?, ...)``."""
    cols = list(columns)
    return (f"INSERT INTO {_q(table)} ({', '.join(_q(c) for c in cols)}) "
            f"VALUES ({', '.join('?' * len(cols))})")


def _lit(text: str) -> str:
    """Quote an SQL string literal for generated trigger code."""
    return "'" + text.replace("'", "''") + "'"


def _printable(value: Any, limit: int) -> str:
    """``str(value)`` cut to ``limit`` characters, safe to store (no lone surrogates)."""
    text = value if isinstance(value, str) else repr(value)
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def _table_rank(record: Any) -> int:
    """Where a wire record goes in a page: parents before children, junk last."""
    table = record.get("t") if isinstance(record, dict) else None
    return TABLE_ORDER.get(table, len(SPEC)) if isinstance(table, str) else len(SPEC)


def page_bytes(limit: int) -> int:
    """The byte bound a device asks for with a page of ``limit`` records."""
    return max(64 * 1024, PULL_PAGE_BYTES * min(limit, PULL_PAGE) // PULL_PAGE)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def select_in(conn: sqlite3.Connection, sql: str, values: Iterable[Any],
              *args: Any) -> Iterator[sqlite3.Row]:
    """Rows of ``sql`` for each of ``values`` (distinct, sorted), 500 at a
    time: ``sql`` has ``{marks}`` where the IN list goes, after the
    placeholders ``args`` fill."""
    for chunk in _chunks(sorted(set(values)), 500):
        yield from conn.execute(sql.format(marks=",".join("?" * len(chunk))), (*args, *chunk))


def made_of(value: Any, chars: frozenset, longest: int = 64) -> bool:
    """True for a str of 1 to ``longest`` characters, each one of ``chars``."""
    return isinstance(value, str) and 0 < len(value) <= longest and chars.issuperset(value)


class Leg:
    """One leg of a sync told to a Progress (None: to nobody): records done,
    of about ``total`` (a count that grows past it raises it)."""

    __slots__ = ("progress", "name", "total", "done")

    def __init__(self, progress: Progress | None, name: str, total: int | None = None):
        self.progress, self.name, self.total, self.done = progress, name, total, 0
        if progress is not None:
            progress(name, 0, total)        # the leg's clock starts

    def at(self, done: int) -> None:
        """``done`` records so far."""
        self.done = done
        if self.progress is not None:
            self.progress(self.name, done, max(self.total or 0, done))

    def add(self, count: int) -> None:
        """``count`` records more."""
        self.at(self.done + count)


##### Records #################################################################
# The one parser of a wire record, shared by device and server: what a record
# may hold depends only on the record and SPEC, so every device refuses the
# same records.  Pure: no I/O here.

class RecordRefused(Exception):
    """A record that cannot be stored or applied; the message is the reason.

    ``keep`` False: the device does not keep it for a later try (it may carry
    a secret).
    """

    keep = True


class BatchRefused(RecordRefused):
    """A record the server refused for the batch it came in (too large as a
    whole): in a smaller batch it may go."""


MAX_VALUE_BYTES = 4 * 1024 * 1024          # one value, as the server measures it
MAX_RECORD_BYTES = 16 * 1024 * 1024        # one record's payload
MAX_RECORD_COLUMNS = 256
MAX_HLC = 2 ** 62
DEVICE_ID_CHARS = frozenset(_ALNUM + "._:@-")
AUTHOR_PREFIX_LEN = 10                     # hex digits of the key id that start a device id
ROW_ID_COLUMN = "id"                       # cc's integer primary key: never synced


class Record(namedtuple("Record", "table sid dev clocks values local key")):
    """One row's edits as they travel: per-column clocks plus the values.

    ``table``, ``sid`` (its sync_id) and ``dev`` (the device that made the
    latest edit) name it; ``clocks`` maps a column (or TOMBSTONE) to its
    hybrid logical clock; ``values`` holds a wire value for every clocked
    column; ``local`` the device-local columns (a starting point for a row
    new to a device); ``key`` the natural key, so a device can find the row by it.
    """

    __slots__ = ()

    def payload(self) -> dict:
        """The ``p`` part of the wire form."""
        return {"v": self.values, "l": self.local, "k": self.key}


def wire_size(value: Any) -> int:
    """The size of a wire value in bytes (UTF-8 text, blob text, 8 for numbers)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(wire_size(k) + wire_size(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(wire_size(v) for v in value)
    return 8


def _refuse_unless(ok: bool, reason: str) -> None:
    if not ok:
        raise RecordRefused(reason)


def _is_wire_scalar(value: Any) -> bool:
    """None, text, a 64-bit integer, a finite float, or {"$b64": base64}."""
    if value is None or isinstance(value, str):
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2 ** 63) <= value < 2 ** 63
    if isinstance(value, float):
        return value == value and value not in (float("inf"), float("-inf"))
    if isinstance(value, dict) and set(value) == {"$b64"} and isinstance(value["$b64"], str):
        import base64
        try:
            base64.b64decode(value["$b64"], validate=True)
        except (ValueError, TypeError):
            return False
        return True
    return False


def _is_sid(value: Any) -> bool:
    return made_of(value, SYNC_ID_CHARS)


def _check_value(spec: TableSpec, col: str, value: Any) -> None:
    """Refuse a value of the wrong shape for its column (per SPEC)."""
    if (value is None or type(value) is str) and col not in spec.refs:
        return                          # right for every column but a single-id reference
    if col in spec.refs:
        _refuse_unless(value is None or _is_sid(value), f"malformed reference in {col}")
    elif col in spec.list_refs and isinstance(value, dict) and set(value) != {"$b64"}:
        ids, fmt = value.get("ids"), value.get("fmt")
        _refuse_unless(set(value) == {"ids", "fmt"} and fmt in ("json", "csv")
                       and isinstance(ids, list) and all(_is_sid(s) for s in ids),
                       f"malformed id list in {col}")
    elif col in spec.name_refs:
        _refuse_unless(value is None or isinstance(value, str), f"malformed name in {col}")
    else:
        _refuse_unless(_is_wire_scalar(value), f"value of {col} is not a SQLite scalar")


def _check_column(spec: TableSpec, col: Any) -> None:
    _refuse_unless(isinstance(col, str) and 0 < len(col) <= 128 and col != TOMBSTONE,
                   "malformed column name")
    _refuse_unless(col not in SYNC_COLUMNS and col != ROW_ID_COLUMN and col not in spec.local,
                   f"column {col} is not synced")


_CHECKED_COLUMNS: dict[str, set[str]] = defaultdict(set)   # names _check_column passed
_MAX_CHECKED = 4096                 # per table: a hostile peer cannot grow it without end


def _parse_clocks(spec: TableSpec, clocks: Any) -> dict[str, int]:
    _refuse_unless(isinstance(clocks, dict) and 0 < len(clocks) <= MAX_RECORD_COLUMNS,
                   "malformed record: clocks")
    checked = _CHECKED_COLUMNS[spec.name]
    for col, hlc in clocks.items():
        if col not in checked and col != TOMBSTONE:
            _check_column(spec, col)
            if len(checked) < _MAX_CHECKED:
                checked.add(col)
        # JSON gives exact ints (never bool): the type test is the isinstance one
        if type(hlc) is not int or not 0 <= hlc < MAX_HLC:
            raise RecordRefused("bad clock")
    return dict(clocks)


def _parse_part(payload: dict, name: str) -> dict:
    part = payload.get(name, {})
    _refuse_unless(isinstance(part, dict), f"malformed record: payload {name}")
    return dict(part)


class Unreadable(RecordRefused):
    """A record of an encrypted batch that did not open: never kept."""

    keep = False


UNREADABLE = "unreadable"       # the key of a stand-in for a record that did not open


def parse_record(obj: Any) -> Record:
    """Parse a wire record into a :class:`Record`, or raise RecordRefused(reason).

    The rules depend only on the record and SPEC (shape, types, column names,
    reference forms), never on a device's state, so every device and the
    server refuse the same records for the same reasons.
    """
    _refuse_unless(isinstance(obj, dict), "malformed record")
    if UNREADABLE in obj:
        raise Unreadable(str(obj[UNREADABLE])[:200])
    table = obj.get("t")
    _refuse_unless(isinstance(table, str) and table in SPEC_BY_NAME, "unknown table")
    spec = SPEC_BY_NAME[table]
    _refuse_unless(_is_sid(obj.get("id")), "malformed record: id")
    dev = obj.get("dev")
    _refuse_unless(made_of(dev, DEVICE_ID_CHARS),
                   "malformed record: dev")
    clocks = _parse_clocks(spec, obj.get("c"))
    payload = obj.get("p")
    _refuse_unless(isinstance(payload, dict), "malformed record: payload")
    values, local, key = (_parse_part(payload, n) for n in ("v", "l", "k"))
    _refuse_unless(set(values) == set(clocks) - {TOMBSTONE},
                   "malformed record: values and clocks differ")
    for col, value in values.items():
        _check_value(spec, col, value)
    for col, value in local.items():
        _refuse_unless(col in spec.local and _is_wire_scalar(value),
                       "malformed record: device-local part")
    for col, value in key.items():
        _refuse_unless(col in spec.key, "malformed record: key part")
        _check_value(spec, col, value)
    return Record(table, obj["id"], dev, clocks, values, local, key)


def parse_sealed(obj: Any) -> Record:
    """Parse an end-to-end record's metadata ``[table, keyed id, device id,
    clocks]`` (all the server sees of it) into a :class:`Record` with no
    values, or raise RecordRefused(reason)."""
    _refuse_unless(isinstance(obj, list) and len(obj) == 4, "malformed record")
    table, sid, dev, clocks = obj
    _refuse_unless(isinstance(table, str) and table in SPEC_BY_NAME, "unknown table")
    _refuse_unless(_is_sid(sid), "malformed record: id")
    _refuse_unless(made_of(dev, DEVICE_ID_CHARS),
                   "malformed record: dev")
    return Record(table, sid, dev, _parse_clocks(SPEC_BY_NAME[table], clocks), {}, {}, {})


def author_prefix(key_id: str) -> str:
    """The start of every device id made under the key with ``key_id``.

    A device's id is this prefix, a dot and a random part (one key may serve
    copies of a database), so the server can tell which key an edit's
    author holds: it takes new edits under an id only from that key.
    """
    return key_id[:AUTHOR_PREFIX_LEN]


def author_of(dev: str) -> str | None:
    """The key prefix a device id was made under; None for an id without one
    (made before sync protocol 4, or for an in-process test transport)."""
    prefix, dot, _rest = dev.partition(".")
    return prefix if dot and len(prefix) == AUTHOR_PREFIX_LEN else None


def check_record_size(record: Record, max_value: int, max_record: int) -> None:
    """Refuse a record with a value over ``max_value`` bytes or over ``max_record`` in all."""
    total = 0
    for part in (record.values, record.local, record.key):
        for col, value in part.items():
            size = wire_size(value)
            _refuse_unless(size <= max_value, f"value of {col} is larger than {max_value} bytes")
            total += size
    _refuse_unless(total <= max_record, f"record is larger than {max_record} bytes")


##### Merge rules #############################################################
# Every decision about which edit wins is made here, over cell clocks: a
# column's clock is (hybrid logical clock, device id), TOMBSTONE's is the
# delete's.  Device and server call these; nothing else compares clocks.
# Pure: no I/O here.

def newer(a: Any, b: Any) -> bool:
    """The one rule: True when cell clock ``a`` beats ``b`` (later HLC, ties by device id)."""
    if a is None:
        return False
    return b is None or tuple(a) > tuple(b)


def latest(*clocks: Any) -> Any:
    """The winning clock among ``clocks`` (None when all are None)."""
    best = None
    for clock in clocks:
        if newer(clock, best):
            best = clock
    return best


def winning_cells(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The columns (TOMBSTONE included) where ``theirs`` beats ``mine``, in their order."""
    return [col for col, clock in theirs.items() if newer(clock, mine.get(col))]


def cell_clocks(clocks: dict[str, int], dev: str) -> dict[str, list]:
    """A record's clocks as cell clocks: [hybrid logical clock, device id] by column."""
    return {col: [hlc, dev] for col, hlc in clocks.items()}


def merge_cells(vals: dict, clocks: dict, values: dict, stamps: dict) -> list[str]:
    """Merge incoming cells (``values`` by column, ``stamps`` their clocks) into
    ``vals``/``clocks`` in place; returns the columns that changed."""
    won = winning_cells(clocks, stamps)
    for col in won:
        clocks[col] = list(stamps[col])
        if col != TOMBSTONE:
            vals[col] = values[col]
    return won


def expand_inserted(cells: dict[str, Any], columns: Iterable[str]) -> dict[str, Any]:
    """A row's pending cells with a whole-row insert (INSERTED) turned into a
    cell of every column, unless that column's own cell is later."""
    cells = dict(cells)
    if INSERTED in cells:
        inserted = cells.pop(INSERTED)
        for col in columns:
            if col not in cells or newer(inserted, cells[col]):
                cells[col] = inserted
    return cells


def with_starting_points(vals: dict, record: Record, local: Iterable[str]) -> dict:
    """``vals`` (in place) with what ``record`` carries besides its cells,
    where ``vals`` has nothing: its device-local columns of those in ``local``
    (a starting point for a row new here) and its natural key (for a row
    that arrives by an edit of other columns)."""
    for col, value in record.local.items():
        if col in local:
            vals.setdefault(col, value)
    for col, value in record.key.items():
        if col in SPEC_BY_NAME[record.table].key:
            vals.setdefault(col, value)
    return vals


def is_deleted(clocks: dict) -> bool:
    """True when a row's delete is later than every edit of it (an edit after a
    delete brings the row back)."""
    tomb = clocks.get(TOMBSTONE)
    return tomb is not None and all(newer(tomb, v) for k, v in clocks.items()
                                    if k != TOMBSTONE)


def missing_parent(required: bool, parent_deleted: bool) -> str:
    """What a reference to a row that is not here becomes.

    'wait': the parent has not arrived (the row waits, or keeps its value);
    'empty': a nullable reference to a deleted row reads NULL on every device;
    'revive': a required one (NOT NULL, a time entry's environment) brings the
    deleted row back, so no live row loses its parent (and no time entry
    becomes a punch-out).
    """
    if not parent_deleted:
        return "wait"
    return "revive" if required else "empty"


def stays(deleted: bool, needed: bool) -> bool:
    """A row stays unless its delete is the latest edit and no live row needs it."""
    return not deleted or needed


def surviving_versions(versions: list[tuple[Any, str, dict]]) -> set:
    """Of (id, device, {column: hlc}) versions of one row, the ids that still
    hold the winning clock of some column (the others are superseded)."""
    best: dict[str, tuple[Any, Any]] = {}
    for ident, dev, cells in versions:
        for col, hlc in cells.items():
            if col not in best or newer((hlc, dev), best[col][0]):
                best[col] = ((hlc, dev), ident)
    return {ident for _clock, ident in best.values()}


def versions_deleted(versions: list[tuple[str, dict[str, int]]]) -> bool:
    """Whether a row whose stored versions are (device id, {column: hlc})
    reads as deleted (see :func:`is_deleted`)."""
    best: dict[str, Any] = {}
    for dev, clocks in versions:
        for col, hlc in clocks.items():
            best[col] = latest(best.get(col), [hlc, dev])
    return is_deleted(best)


def row_identity(table: str, key: dict[str, Any], columns: Iterable[str]) -> str | None:
    """A keyed row's sync_id: derived from its natural key (``key``: wire values by
    column), or None when the key is unknown or empty.  Every device derives the
    same id for the same key, so rows created apart are one row, and a row whose
    key changes (a rename) takes the id of its new key."""
    columns = list(columns)
    if not columns or any(c not in key for c in columns):
        return None
    return natural_id(table, [key[c] for c in columns])


##### Crypto and wire format ##################################################
# Key derivation (stdlib HKDF), request signing, sealed bodies.  The AES
# implementation (pycryptodomex) is imported lazily so that --help, stamp
# and local status work without it.  No network here.

API_KEY_PREFIX = "ccs1_"
# The sync protocol: how records and pages read on the wire.  A device and a
# server of different protocols refuse each other's requests and answers (and
# say which one to upgrade) rather than exchange records they would read
# differently.  Requests and answers that carry none are protocol 1.
PROTOCOL = 6                            # 6: a batch names its columns once (pack_records)
WIRE_TYPE = "application/x-ccsync"
H_KEY, H_TIME, H_NONCE, H_SIG = ("X-Ccsync-Key", "X-Ccsync-Time", "X-Ccsync-Nonce",
                                 "X-Ccsync-Signature")
H_HEAD = "X-Ccsync-Head"                # signs the headers and the body's length (protocol 3)
MAX_SKEW_S = 300                        # signed requests older or newer are refused
DEFAULT_MAX_BODY = 64 * 1024 * 1024


class CryptoUnavailable(CcsyncError):
    """pycryptodomex is missing (or cannot load from here)."""

    def __init__(self, detail: str = ""):
        super().__init__("encryption needs pycryptodomex, which is not installed"
                         + (f" ({detail})" if detail else ""),
                         hint="run `ccsync enable` (it pip-installs pycryptodomex)")


class WireError(CcsyncError):
    """A body that is not a valid sealed ccsync message."""


class BodyTooLarge(WireError):
    """A body (or its decompressed form) past the size cap."""


@functools.lru_cache(maxsize=None)
def _aes() -> Any:
    # OSError too: a C extension inside a zip fails to load with OSError.
    try:
        from Cryptodome.Cipher import AES
    except (ImportError, OSError) as exc:
        raise CryptoUnavailable(type(exc).__name__) from None
    return AES


def crypto_available() -> bool:
    """True when pycryptodomex can be imported."""
    try:
        _aes()
    except CryptoUnavailable:
        return False
    return True


def hkdf(ikm: bytes, info: bytes, length: int = 32, salt: bytes = b"ccsync/1") -> bytes:
    """HKDF-SHA256 (RFC 5869)."""
    import hashlib
    import hmac
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


class DeviceKeys(namedtuple("DeviceKeys", "key_id mac enc")):
    """What a device's API key yields: a public key id, a MAC key, an AES key.

    The API key itself never crosses the wire and the server stores only these.
    """

    __slots__ = ()

    @classmethod
    def from_api_key(cls, api_key: str) -> "DeviceKeys":
        raw = api_key.strip().encode("utf-8")
        return cls(hkdf(raw, b"key-id", 16).hex(), hkdf(raw, b"mac"), hkdf(raw, b"enc"))


def new_api_key() -> str:
    """A fresh 256-bit API key."""
    import base64
    import secrets
    return API_KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def request_context(method: str, path: str, stamp: str, nonce: str, key_id: str) -> bytes:
    """What a request's signature and its body's associated data bind to."""
    return "\n".join(("ccsync-request", method, path, stamp, nonce, key_id)).encode()


def head_context(context: bytes, length: int) -> bytes:
    """What a request's head signature binds: its context and its body's length.

    The server checks it before it reads the body, so nobody without a key
    makes it read one; the body's own signature is checked once it is read.
    """
    return context + f"\nlength {int(length)}".encode()


def signed_headers(keys: "DeviceKeys", method: str, path: str, body: bytes,
                   stamp: str, nonce: str) -> dict[str, str]:
    """The authentication headers of a request with ``body``."""
    context = request_context(method, path, stamp, nonce, keys.key_id)
    return {H_KEY: keys.key_id, H_TIME: stamp, H_NONCE: nonce,
            H_HEAD: sign(keys.mac, head_context(context, len(body)), b""),
            H_SIG: sign(keys.mac, context, body)}


def same_signature(expected: str, given: str) -> bool:
    """Constant-time comparison that takes any header text (non-ASCII too)."""
    import hmac
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogateescape"))


def response_context(nonce: str, status: int) -> bytes:
    """A response is bound to the request nonce it answers."""
    return f"ccsync-response\n{nonce}\n{status}".encode()


def sign(mac_key: bytes, context: bytes, body: bytes) -> str:
    """HMAC-SHA256 over a context and the body's digest."""
    import hashlib
    import hmac
    text = context + b"\n" + hashlib.sha256(body).hexdigest().encode()
    return hmac.new(mac_key, text, hashlib.sha256).hexdigest()


class RawJSON(str):
    """JSON text already serialised (records as the server stores them),
    spliced into a message as it is rather than parsed and written again."""


def wire_json(data: dict) -> str:
    """Compact JSON text of a message; its top-level :class:`RawJSON` values go in as is."""
    if not any(isinstance(v, RawJSON) for v in data.values()):
        return compact_json(data)
    return "{" + ",".join(f"{json.dumps(k)}:" + (v if isinstance(v, RawJSON) else compact_json(
        v)) for k, v in data.items()) + "}"


def seal(enc_key: bytes, data: dict, context: bytes, blobs: Iterable[bytes] = ()) -> bytes:
    """Compress then AES-256-GCM encrypt ``data`` with a fresh nonce.

    ``blobs`` (bytes already encrypted end to end, which compress no
    further) travel after the compressed JSON as they are; the JSON's
    ``blobs`` lists their lengths.
    """
    import secrets
    import zlib
    aes = _aes()
    blobs = list(blobs)
    if blobs:
        data = {**data, "blobs": [len(b) for b in blobs]}
    packed = zlib.compress(wire_json(data).encode("utf-8"), 6)
    nonce = secrets.token_bytes(12)
    cipher = aes.new(enc_key, aes.MODE_GCM, nonce=nonce)
    cipher.update(context)
    sealed, tag = cipher.encrypt_and_digest(b"".join((len(packed).to_bytes(4, "big"), packed,
                                                      *blobs)))
    return nonce + sealed + tag


def unseal(enc_key: bytes, blob: bytes, context: bytes, max_size: int) -> dict:
    """Inverse of :func:`seal` (attached blobs as a list of bytes in
    ``blobs``); raises WireError (BodyTooLarge past ``max_size``)."""
    aes = _aes()
    if len(blob) < 12 + 16:
        raise WireError("body too short")
    cipher = aes.new(enc_key, aes.MODE_GCM, nonce=blob[:12])
    cipher.update(context)
    try:
        plain = cipher.decrypt_and_verify(blob[12:-16], blob[-16:])
    except ValueError:
        raise WireError("body failed authentication") from None
    packed = int.from_bytes(plain[:4], "big")
    if len(plain) < 4 + packed:
        raise WireError("body is cut short")
    data = _inflate_json(plain[4:4 + packed], max_size, "body")
    if not isinstance(data, dict):
        raise WireError("body is not a JSON object")
    rest, lengths = memoryview(plain)[4 + packed:], data.get("blobs", [])
    if not (isinstance(lengths, list) and all(type(n) is int and n >= 0 for n in lengths)
            and sum(lengths) == len(rest)):
        raise WireError("body's attachments do not add up")
    if lengths:
        offsets = list(itertools.accumulate(lengths, initial=0))
        data["blobs"] = [bytes(rest[a:b]) for a, b in zip(offsets, offsets[1:])]
    return data


def _inflate_json(packed: bytes, max_size: int, what: str) -> Any:
    """zlib-compressed JSON text, at most ``max_size`` once decompressed."""
    import zlib
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(packed, max_size)
    except zlib.error:
        raise WireError(f"{what} is not compressed JSON") from None
    if inflater.unconsumed_tail:
        raise BodyTooLarge(f"{what} too large once decompressed")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise WireError(f"{what} is not JSON (or nested too deeply)") from None


# End-to-end encryption: every device of a user derives one key from the
# sync passphrase (scrypt, with a salt and cost the server keeps for it) and
# encrypts the records of each push as one batch.  The server sees a batch
# as opaque bytes plus, per record, what merging needs: the table, a row id
# keyed with the shared secret, the device id and the per-column clocks.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 17, 8, 1   # 128 MiB and ~0.4 s a guess
KDF_BOUNDS = {"n": (2 ** 10, 2 ** 20), "r": (1, 32), "p": (1, 16)}   # what a store may ask
KDF_MAX_MEMORY = 2 ** 22                # n * r: scrypt's memory is 128 bytes times it (512 MiB)
MIN_PASSPHRASE = 8
E2E_AAD = b"ccsync-e2e-batch/1"
VAULT_PREFIX = "e2e1:"
E2E_MAX_BATCH = DEFAULT_MAX_BODY        # a batch's JSON (devices open up to 4x that)


# A batch's records (protocol 6) in columnar form: a run of records of one
# table names its columns once, and each record is a row of positions:
#   {"format": 2, "groups": [{"t": table, "cols": [...], "key": [...],
#     "local": [...], "rows": [[id, dev, clocks, values, key values,
#     local values], ...]}, ...]}
# A clock of null: the record carries no edit of that column.  Rows keep the
# records' order (the server points at a record by its place in the batch).
# A batch sealed before protocol 6 is the plain list of records.
BATCH_FORMAT = 2


def pack_records(records: list[dict]) -> dict:
    """The columnar form of a batch's wire records (see BATCH_FORMAT)."""
    groups: list[dict] = []
    shape, where = None, {}
    for record in records:
        payload = record["p"]
        key, local = payload.get("k", {}), payload.get("l", {})
        given = payload.get("v", {})        # a delete may come without (as parse_record takes it)
        if (record["t"], tuple(key), tuple(local)) != shape:
            shape, where = (record["t"], tuple(key), tuple(local)), {}
            groups.append({"t": record["t"], "cols": [], "key": list(key), "local": list(local),
                           "rows": []})
        group, clocks, values = groups[-1], [], []
        for col, hlc in record["c"].items():
            if col not in where:
                where[col] = len(group["cols"])
                group["cols"].append(col)
            at = where[col]
            if at >= len(clocks):
                clocks += [None] * (at + 1 - len(clocks))
                values += [None] * (at + 1 - len(values))
            clocks[at], values[at] = hlc, given.get(col)
        group["rows"].append([record["id"], record["dev"], clocks, values, list(key.values()),
                              list(local.values())])
    return {"format": BATCH_FORMAT, "groups": groups}


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value) \
        and len(set(value)) == len(value)


def _packed_groups(packed: Any, *names: str) -> list[dict] | None:
    """The groups of a columnar batch (or of its metadata), each with a table,
    rows and the lists of column ``names``; None when out of shape."""
    groups = packed.get("groups") if isinstance(packed, dict) else None
    if isinstance(groups, list) and packed.get("format") == BATCH_FORMAT and all(
            isinstance(g, dict) and isinstance(g.get("t"), str) and isinstance(g.get("rows"), list)
            and all(_names(g.get(n)) for n in names) for g in groups):
        return groups
    return None


def unpack_records(batch: Any) -> list:
    """The wire records of a batch, columnar or (before protocol 6) a list;
    WireError for a batch of neither shape.  A row out of shape stands in
    as an unreadable record, so the batch's other records still count."""
    if isinstance(batch, list):
        return batch
    groups = _packed_groups(batch, "cols", "key", "local")
    if groups is None:
        raise WireError("record batch is malformed")
    records = []
    for group in groups:
        table, cols, key, local = group["t"], group["cols"], group["key"], group["local"]
        for row in group["rows"]:
            records.append(_unpacked(table, cols, key, local, row))
    return records


def _unpacked(table: str, cols: list, key: list, local: list, row: Any) -> dict:
    if not (isinstance(row, list) and len(row) == 6 and all(isinstance(p, list) for p in row[2:])
            and len(row[2]) == len(row[3]) <= len(cols) and len(row[4]) == len(key)
            and len(row[5]) == len(local)):
        return {UNREADABLE: "a record out of shape in its batch"}
    sid, dev, clocks, values, keys, locals_ = row
    return {"t": table, "id": sid, "dev": dev,
            "c": {c: h for c, h in zip(cols, clocks) if h is not None},
            "p": {"v": {c: v for c, v, h in zip(cols, values, clocks)
                        if h is not None and c != TOMBSTONE},
                  "l": dict(zip(local, locals_)), "k": dict(zip(key, keys))}}


def sealed_meta(packed: dict, row_id: Callable[[str, str], str]) -> dict:
    """What the server sees of a packed batch: each table's columns once and,
    per record, its keyed id (``row_id(table, sync_id)``), device and clocks."""
    return {"format": BATCH_FORMAT, "groups": [
        {"t": g["t"], "cols": g["cols"], "rows": [[row_id(g["t"], r[0]), r[1], r[2]]
                                                  for r in g["rows"]]}
        for g in packed["groups"]]}


def unpack_sealed(meta: Any) -> list | None:
    """The records of :func:`sealed_meta` as ``[table, keyed id, device,
    clocks]`` each (:func:`parse_sealed` judges them; a row out of shape is
    None, which it refuses); None for metadata out of shape."""
    groups = _packed_groups(meta, "cols")
    if groups is None:
        return None
    return [[g["t"], row[0], row[1], {c: h for c, h in zip(g["cols"], row[2]) if h is not None}]
            if isinstance(row, list) and len(row) == 3 and isinstance(row[2], list)
            and len(row[2]) <= len(g["cols"]) else None
            for g in groups for row in g["rows"]]


def _valid_cost(cost: dict) -> bool:
    """An scrypt cost (n, r, p) within KDF_BOUNDS, n a power of two, n * r bounded."""
    return (all(type(v) is int and KDF_BOUNDS[k][0] <= v <= KDF_BOUNDS[k][1]
                for k, v in cost.items()) and not cost["n"] & (cost["n"] - 1)
            and cost["n"] * cost["r"] <= KDF_MAX_MEMORY)


class WrongPassphrase(CcsyncError):
    """A passphrase (or a stored key) that does not open this server's data."""

    def __init__(self, server: str):
        super().__init__(f"the sync passphrase does not match the one {server} holds data under",
                         hint="enter the passphrase you chose when you set up your first "
                              "device (lost it? the README's 'Lost passphrase' says what to do)")


class Vault(namedtuple("Vault", "key salt n r p", defaults=(SCRYPT_N, SCRYPT_R, SCRYPT_P))):
    """The user's end-to-end key: derived from the sync passphrase on every
    device alike, kept on each device (mode 600), never sent anywhere.

    From it come the batch key, the row-id key, the digest key of
    ``status --verify``, a check value (a device tells a wrong passphrase
    from a right one at setup; testing a guess against it costs a whole
    scrypt) and a proof key the server holds to tell a device that has the
    passphrase from one that does not.  ``key`` and ``salt`` with scrypt's
    cost ``n``, ``r``, ``p`` are all it holds (and the subkeys, made once).
    """

    @classmethod
    def derive(cls, passphrase: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R,
               p: int = SCRYPT_P) -> "Vault":
        """The vault a passphrase gives under ``salt`` and the scrypt cost (n, r, p)."""
        import hashlib
        import unicodedata
        raw = unicodedata.normalize("NFC", passphrase).encode("utf-8", "surrogatepass")
        try:
            key = hashlib.scrypt(raw, salt=salt, n=n, r=r, p=p, dklen=32,
                                 maxmem=min(2 ** 31 - 1, 256 * r * n + (1 << 20)))
        except (ValueError, MemoryError) as exc:
            raise WireError(f"scrypt cannot run with this cost here ({exc})") from None
        return cls(key, salt, n, r, p)

    @classmethod
    def new(cls, passphrase: str, n: int = SCRYPT_N) -> "Vault":
        """A vault for a new passphrase, with a fresh salt."""
        import secrets
        if len(passphrase) < MIN_PASSPHRASE:
            raise UsageError(f"a sync passphrase needs at least {MIN_PASSPHRASE} characters")
        return cls.derive(passphrase, secrets.token_bytes(16), n)

    @classmethod
    def opening(cls, passphrase: str, params: Any, server: str) -> "Vault":
        """The vault a passphrase gives under a store's published ``params``;
        WrongPassphrase when its check value differs."""
        import base64
        import hmac
        if not isinstance(params, dict):
            raise WireError("the server's end-to-end parameters are malformed")
        cost = {k: params.get(k) for k in KDF_BOUNDS}
        if not _valid_cost(cost):
            raise WireError("the server asks for an scrypt cost out of bounds")
        try:
            salt = base64.b64decode(str(params.get("salt")), validate=True)
        except ValueError:
            raise WireError("the server's end-to-end salt is malformed") from None
        vault = cls.derive(passphrase, salt, **cost)
        if not hmac.compare_digest(vault.check, str(params.get("check", ""))):
            raise WrongPassphrase(server)
        return vault

    @classmethod
    def parse(cls, text: str) -> "Vault":
        """The vault of a :meth:`text` line (as the device's .env holds it)."""
        import base64
        try:
            n, r, p, salt, key = text.removeprefix(VAULT_PREFIX).split(":")
            vault = cls(base64.b64decode(key, validate=True), base64.b64decode(salt, validate=True),
                        int(n), int(r), int(p))
        except ValueError:
            raise ConfigError("the stored end-to-end key (CCSYNC_E2E_KEY) is malformed",
                              hint="run `ccsync setup` and enter the sync passphrase") from None
        if len(vault.key) != 32 or not text.startswith(VAULT_PREFIX):
            raise ConfigError("the stored end-to-end key (CCSYNC_E2E_KEY) is malformed",
                              hint="run `ccsync setup` and enter the sync passphrase")
        return vault

    def text(self) -> str:
        """One line that :meth:`parse` reads back (a secret: mode 600 only)."""
        import base64
        b64 = lambda raw: base64.b64encode(raw).decode()   # noqa: E731
        return f"{VAULT_PREFIX}{self.n}:{self.r}:{self.p}:{b64(self.salt)}:{b64(self.key)}"

    @functools.cached_property
    def check(self) -> str:
        """Tells a right passphrase from a wrong one; public."""
        return hkdf(self.key, b"e2e-check", 16).hex()

    @functools.cached_property
    def proof(self) -> bytes:
        """The key the server checks pushed batches with (it cannot decrypt with it)."""
        return hkdf(self.key, b"e2e-proof")

    @functools.cached_property
    def digest_key(self) -> bytes:
        """Keys the content digests devices compare (``status --verify``)."""
        return hkdf(self.key, b"e2e-digest")

    def params(self, *, private: bool = False) -> dict:
        """What a server store keeps so that other devices derive the same key
        (with ``private``, the proof key too, for the server alone)."""
        import base64
        out = {"kdf": "scrypt", "salt": base64.b64encode(self.salt).decode(), "n": self.n,
               "r": self.r, "p": self.p, "check": self.check}
        return {**out, "proof": self.proof.hex()} if private else out

    def row_id(self, table: str, sid: str) -> str:
        """The id the server knows a row by: keyed, so nobody without the key
        can tell which names (``setting:theme``) exist."""
        import hashlib
        import hmac
        return "e" + hmac.new(self._id_key, f"{table}\n{sid}".encode("utf-8", "surrogatepass"),
                              hashlib.sha256).hexdigest()[:40]

    def seal_records(self, records: list[dict]) -> tuple[dict, bytes, str]:
        """One push's records as (their metadata for the server, see
        :func:`sealed_meta`; the encrypted batch; the batch's proof)."""
        import secrets
        import zlib
        aes = _aes()
        packed = pack_records(records)
        meta = sealed_meta(packed, self.row_id)
        text = compact_json(packed).encode("utf-8")
        if len(text) > E2E_MAX_BATCH and len(records) > 1:    # every device must open it
            raise BodyTooLarge(f"a batch of {len(records)} records is {len(text):,} bytes")
        plain = zlib.compress(text, 6)
        nonce = secrets.token_bytes(12)
        cipher = aes.new(self._batch_key, aes.MODE_GCM, nonce=nonce)
        cipher.update(E2E_AAD)
        sealed, tag = cipher.encrypt_and_digest(plain)
        blob = nonce + sealed + tag
        return meta, blob, batch_proof(self.proof, blob)

    def open_batch(self, blob: bytes, max_size: int) -> list:
        """The records of an encrypted batch; WireError when it does not open
        with this key (forged, or sealed under another passphrase)."""
        aes = _aes()
        if len(blob) < 12 + 16:
            raise WireError("record batch too short")
        cipher = aes.new(self._batch_key, aes.MODE_GCM, nonce=blob[:12])
        cipher.update(E2E_AAD)
        try:
            plain = cipher.decrypt_and_verify(blob[12:-16], blob[-16:])
        except ValueError:
            raise WireError("record batch failed authentication") from None
        return unpack_records(_inflate_json(plain, max_size, "record batch"))

    @functools.cached_property
    def _batch_key(self) -> bytes:
        return hkdf(self.key, b"e2e-batch")

    @functools.cached_property
    def _id_key(self) -> bytes:
        return hkdf(self.key, b"e2e-row-id")


def batch_proof(proof_key: bytes, blob: bytes) -> str:
    """What shows the server that a batch comes from a device with the passphrase."""
    import hashlib
    import hmac
    return hmac.new(proof_key, blob, hashlib.sha256).hexdigest()


def rekey_proof(proof_key: bytes, params: dict) -> str:
    """What shows the server that a device asking for new end-to-end
    parameters holds the current key."""
    return batch_proof(proof_key, json.dumps(params, sort_keys=True).encode())


def public_params(params: dict) -> dict:
    """End-to-end parameters as devices see them: without the server's proof key."""
    return {k: v for k, v in params.items() if k != "proof"}


def valid_params(params: Any) -> bool:
    """True for end-to-end parameters as :meth:`Vault.params` makes them (private)."""
    return (isinstance(params, dict) and set(params) == {"kdf", "salt", "n", "r", "p", "check",
                                                         "proof"}
            and params["kdf"] == "scrypt" and all(isinstance(params[k], str) and
                                                  re.fullmatch(r"[A-Za-z0-9+/=]{1,128}",
                                                               params[k])
                                                  for k in ("salt", "check", "proof"))
            and re.fullmatch(r"[0-9a-f]{64}", params["proof"]) is not None
            and _valid_cost({k: params[k] for k in KDF_BOUNDS}))


##### Local store #############################################################
# The device side, in layers that each use only those above: sync state
# (connection, lock slices, cursor), local rows in wire form, identity,
# capture (triggers, stamping, diffs), writing rows from the synced state,
# merging incoming records, and sending outgoing ones.  Which edit wins is
# decided only by the merge rules above.  No network here; every write goes
# through transaction().

MIN_SQLITE = (3, 31, 0)


@functools.lru_cache(maxsize=None)
def check_sqlite(version: tuple[int, ...] = sqlite3.sqlite_version_info) -> None:
    """Refuse an SQLite library older than MIN_SQLITE, or one without JSON functions."""
    need = ".".join(map(str, MIN_SQLITE))
    hint = "use a Python whose sqlite3 module links a newer SQLite (python3 -c " \
           "'import sqlite3; print(sqlite3.sqlite_version)' shows the one in use)"
    if tuple(version) < MIN_SQLITE:
        raise StoreError(f"SQLite {'.'.join(map(str, version))} is too old: ccsync needs "
                         f"{need} or newer", hint=hint)
    probe = sqlite3.connect(":memory:")
    try:
        probe.execute("SELECT json_array(1)")
    except sqlite3.Error:
        raise StoreError("this SQLite library has no JSON functions, which ccsync needs",
                         hint=hint) from None
    finally:
        probe.close()


def connect(path: str, *, timeout: float = 5.0, must_exist: bool = True) -> sqlite3.Connection:
    """Open a SQLite connection the way ccsync uses every connection.

    ``isolation_level=None`` because ccsync owns its transactions; a busy
    timeout like cc's own so concurrent writers wait instead of failing.
    """
    check_sqlite()
    if must_exist and not os.path.isfile(path):
        raise StoreError(f"no database at {path}",
                         hint=f"pass --db PATH or set ${ENV_DB}")
    try:
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = %d" % int(timeout * 1000))
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}", hint=_open_hint(str(exc))) from None
    return conn


def _open_hint(error: str) -> str | None:
    """What to do about SQLite's reason for not opening a database."""
    if "not a database" in error:
        return "that file is not a SQLite database: is --db (or $CC_DB) cc's database, " \
               "~/.cc-cli/cc_cli.db?"
    if "locked" in error or "busy" in error:
        return "another program holds the database's lock: run it again once that is done"
    return None


_SAVEPOINTS = itertools.count()           # names unique in this process


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; a savepoint when already inside one.

    Any exception rolls the whole block back, so nothing is half-written.
    """
    if conn.in_transaction:
        name = f"sp_{next(_SAVEPOINTS)}"
        conn.execute(f"SAVEPOINT {name}")
        try:
            yield conn
        except BaseException:
            conn.execute(f"ROLLBACK TO {name}")
            conn.execute(f"RELEASE {name}")
            raise
        conn.execute(f"RELEASE {name}")
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextlib.contextmanager
def snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A read transaction: every query inside sees the database as of one moment."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


# The lock policy, in one place.  ccsync is a guest in cc's database, and
# SQLite's busy handler is not fair: a writer that waits sleeps between tries
# (1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50 ms, then 100 ms each), so write
# transactions that follow each other closely starve it, however short each
# one is.  So ccsync writes in bursts of at most WRITE_SLICE_S (one or more
# transactions; a long job commits when the burst is over) and then leaves the
# lock free for longer than any waiter can be asleep: a writer that has waited
# w ms sleeps at most _busy_sleep_ms(w), and has waited no longer than the
# burst.  Time spent on the network or decoding counts as free time, so the
# gap only sleeps what is left of it; a burst ends by itself once the lock
# was free for that long.
WRITE_SLICE_S = 0.1
LOCK_GAP_MARGIN = 1.2               # x the waiter's longest sleep, for timer jitter
LOCK_GAP_EXTRA_S = 0.005
_BUSY_STEPS_MS = ((1, 1), (3, 2), (8, 5), (18, 10), (33, 15), (53, 20), (128, 25), (228, 50))


def _busy_sleep_ms(waited_ms: float) -> int:
    """The longest sleep of SQLite's busy handler for a writer that waited ``waited_ms``."""
    return next((sleep for limit, sleep in _BUSY_STEPS_MS if waited_ms < limit), 100)


def lock_gap(burst_s: float) -> float:
    """Seconds ccsync leaves the write lock free after a burst of ``burst_s``."""
    return _busy_sleep_ms(burst_s * 1000) / 1000 * LOCK_GAP_MARGIN + LOCK_GAP_EXTRA_S


class WriteGate:
    """When ccsync may take the write lock again, and when a burst is over.

    ``clock`` and ``sleep`` are injectable for tests.
    """

    def __init__(self, slice_s: float = WRITE_SLICE_S,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.slice_s = slice_s
        self._clock, self._sleep = clock, sleep
        self._free_until = 0.0
        self._burst: float | None = None          # when the current burst began
        self._left = 0.0                          # when the lock was last released

    def enter(self) -> None:
        """Before a write transaction: wait out a due gap, start or go on with a burst."""
        now = self._clock()
        if self._free_until > now:
            self._sleep(self._free_until - now)
            self._burst = None
        elif self._burst is not None and now - self._left >= lock_gap(self._left - self._burst):
            self._burst = None                    # the lock was free long enough already
        if self._burst is None:
            self._burst = self._clock()

    def over(self) -> bool:
        """True once the current burst has used its share: commit now."""
        return self._burst is not None and self._clock() - self._burst >= self.slice_s

    def leave(self) -> None:
        """After a write transaction committed (or rolled back)."""
        self._left = now = self._clock()
        if self._burst is not None and now - self._burst >= self.slice_s:
            self._free_until = now + lock_gap(now - self._burst)
            self._burst = None


# SQLite result codes that say something about the machine, not the record:
# BUSY, LOCKED, NOMEM, READONLY, INTERRUPT, IOERR, CORRUPT, FULL, CANTOPEN,
# PROTOCOL, NOLFS, AUTH, NOTADB.
_ENVIRONMENT_CODES = frozenset({5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 22, 23, 26})
_ENVIRONMENT_WORDS = ("locked", "busy", "disk", "i/o", "readonly", "read-only",
                      "unable to open", "interrupted", "out of memory", "not a database")


def environment_error(exc: BaseException) -> bool:
    """True for a failure of the machine (busy, disk full, I/O), not of one record.

    Such a failure rolls back and is retried later; anything else a record
    causes refuses just that record.
    """
    if isinstance(exc, (MemoryError, OSError, CcsyncError)):
        return True
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)     # Python 3.11+
    if code is not None:
        return code & 0xFF in _ENVIRONMENT_CODES
    return isinstance(exc, sqlite3.OperationalError) and any(
        word in str(exc).lower() for word in _ENVIRONMENT_WORDS)


def _new_private_file(base: str) -> str:
    """Create a new empty file (mode 600) named ``base``, or ``base-2``, ...; its name."""
    for n in range(1, 1000):
        name = base if n == 1 else f"{base}-{n}"
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            continue
        return name
    raise FileExistsError(f"{base}: too many files of that name")


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run ';'-separated DDL inside the caller's transaction (executescript commits)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


_BOOKKEEPING_SQL = """
CREATE TABLE IF NOT EXISTS _ccsync_meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS _ccsync_clock (
    id INTEGER PRIMARY KEY CHECK (id = 1), hlc INTEGER NOT NULL, suppress INTEGER NOT NULL);
INSERT OR IGNORE INTO _ccsync_clock (id, hlc, suppress) VALUES (1, 0, 0);
CREATE TABLE IF NOT EXISTS _ccsync_dirty (
    tbl TEXT NOT NULL, rid INTEGER NOT NULL, col TEXT NOT NULL, hlc INTEGER NOT NULL,
    sid TEXT, PRIMARY KEY (tbl, rid, col)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _ccsync_shadow (
    tbl TEXT NOT NULL, sid TEXT NOT NULL, rid INTEGER, vals TEXT NOT NULL,
    clocks TEXT NOT NULL, UNIQUE (tbl, sid));
CREATE TABLE IF NOT EXISTS _ccsync_pending (
    tbl TEXT NOT NULL, sid TEXT NOT NULL, kind TEXT NOT NULL DEFAULT 'ref',
    PRIMARY KEY (tbl, sid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _ccsync_link (
    project TEXT PRIMARY KEY, path TEXT NOT NULL, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS _ccsync_refused (
    tbl TEXT NOT NULL, sid TEXT NOT NULL, reason TEXT NOT NULL, at TEXT NOT NULL,
    PRIMARY KEY (tbl, sid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _ccsync_gone (
    tbl TEXT NOT NULL, rid INTEGER, sid TEXT, key TEXT, hlc INTEGER NOT NULL, unsent TEXT);
CREATE INDEX IF NOT EXISTS _ccsync_gone_row ON _ccsync_gone (tbl, sid);
CREATE TABLE IF NOT EXISTS _ccsync_outbox (
    tbl TEXT NOT NULL, sid TEXT NOT NULL, UNIQUE (tbl, sid));
CREATE TABLE IF NOT EXISTS _ccsync_named (
    tbl TEXT NOT NULL, rid INTEGER NOT NULL, col TEXT NOT NULL, sid TEXT NOT NULL,
    hlc INTEGER NOT NULL, PRIMARY KEY (tbl, rid, col)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _ccsync_base (
    tbl TEXT NOT NULL, rid INTEGER NOT NULL, vals TEXT NOT NULL,
    PRIMARY KEY (tbl, rid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _ccsync_held (
    digest TEXT PRIMARY KEY, tbl TEXT, sid TEXT, kind TEXT NOT NULL, reason TEXT NOT NULL,
    record TEXT NOT NULL, version TEXT NOT NULL, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS _ccsync_seen (
    tbl TEXT NOT NULL, sid TEXT NOT NULL, PRIMARY KEY (tbl, sid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _ccsync_kept (
    tbl TEXT NOT NULL, sid TEXT NOT NULL, PRIMARY KEY (tbl, sid)) WITHOUT ROWID;
"""
BOOKKEEPING_VERSION = "7"            # _ccsync_meta 'bookkeeping': the layout below
BOOKKEEPING_TABLES = ("_ccsync_meta", "_ccsync_clock", "_ccsync_dirty", "_ccsync_shadow",
                      "_ccsync_pending", "_ccsync_refused", "_ccsync_link",
                      "_ccsync_gone", "_ccsync_held", "_ccsync_base", "_ccsync_outbox",
                      "_ccsync_named", "_ccsync_seen", "_ccsync_kept")
RETIRED_TABLES = ("_ccsync_alias",)     # bookkeeping of older versions

_SQL_NOW_HLC = f"(CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) * {HLC_PER_MS})"
_SQL_TICK = f"UPDATE _ccsync_clock SET hlc = max(hlc + 1, {_SQL_NOW_HLC});"
_SQL_HLC = "(SELECT hlc FROM _ccsync_clock)"
_SQL_LIVE = "(SELECT suppress FROM _ccsync_clock) = 0"


def _sql_key_json(key: Iterable[str]) -> str:
    # A blob cannot go into JSON (it would make cc's DELETE fail): it becomes NULL.
    parts = [f"CASE WHEN typeof(OLD.{_q(c)}) = 'blob' THEN NULL ELSE OLD.{_q(c)} END"
             for c in key]
    return f"json_array({', '.join(parts)})" if parts else "NULL"


def _sql_unsent_json(table: str, columns: Iterable[str]) -> str:
    # The row's pending cells (clocks) and its values, or NULL when none are
    # pending; a blob goes in as hex, named in "b" (a blob in JSON would fail).
    cols = list(columns)
    vals = ", ".join(f"{_lit(c)}, CASE WHEN typeof(OLD.{_q(c)}) = 'blob' THEN hex(OLD.{_q(c)}) "
                     f"ELSE OLD.{_q(c)} END" for c in cols)
    blobs = ", ".join(f"CASE WHEN typeof(OLD.{_q(c)}) = 'blob' THEN {_lit(c)} END" for c in cols)
    return (f"(SELECT json_object('c', json_group_object(col, hlc), 'v', json_object({vals}), "
            f"'b', json_array({blobs})) FROM _ccsync_dirty WHERE tbl = {_lit(table)} "
            f"AND rid = OLD.rowid AND col != '{MOVED}' HAVING count(*) > 0)")


def trigger_sql(table: str, tracked: Iterable[str], key: Iterable[str] = (),
                local: Iterable[str] = ()) -> dict[str, str]:
    """The three capture triggers for ``table``, by trigger name.

    Each edit ticks the hybrid logical clock (max(last + 1, wall-clock ms x
    HLC_PER_MS)) and records the edited cells with it, so an offline edit
    keeps the time it was made.  ccsync's own writes set ``suppress`` and are
    not recorded.  No statement here can hit a constraint: SQLite applies the
    outer statement's conflict policy (OR IGNORE, OR ROLLBACK, an UPSERT's) to
    a trigger's statements, so each cell is deleted, then inserted afresh, and
    always carries the time of its latest edit.  A delete goes to
    ``_ccsync_gone`` with the row's sync_id and natural key, so a row deleted
    before it was ever stamped still sends its delete, and with the cells it
    had pending and their values (``unsent``: see ``_keep_deleted_edits``).
    """
    t, lit = _q(table), _lit(table)
    cols = list(tracked)
    cell = f"_ccsync_dirty WHERE tbl = {lit} AND rid = NEW.rowid"
    moved = "OLD.rowid IS NOT NEW.rowid"
    lost_sid = "OLD.sync_id IS NOT NULL AND NEW.sync_id IS NOT OLD.sync_id"
    changed = " OR ".join([moved, lost_sid, *(f"OLD.{_q(c)} IS NOT NEW.{_q(c)}" for c in cols)])
    # The edited cells as a table (column1: name, column2: edited), so one
    # statement deletes and one inserts them all, however many columns.
    edited = ("(SELECT column1 FROM (VALUES " + ", ".join(
        f"({_lit(c)}, OLD.{_q(c)} IS NOT NEW.{_q(c)})" for c in cols) + ") WHERE column2)")
    per_col = (f"DELETE FROM {cell} AND col IN {edited}; "
               f"INSERT INTO _ccsync_dirty (tbl, rid, col, hlc) SELECT {lit}, NEW.rowid, "
               f"column1, {_SQL_HLC} FROM {edited};") if cols else ""
    return {
        f"_ccsync_ins_{table}":
            f"CREATE TRIGGER {_q('_ccsync_ins_' + table)} AFTER INSERT ON {t} "
            f"WHEN {_SQL_LIVE} BEGIN {_SQL_TICK} DELETE FROM {cell}; "
            f"INSERT INTO _ccsync_dirty (tbl, rid, col, hlc) "
            f"VALUES ({lit}, NEW.rowid, '{INSERTED}', {_SQL_HLC}); END",
        # A rowid change moves the pending cells with the row (dropping those of
        # a row that REPLACE removed there) and leaves a MOVED mark, so the sync
        # looks for a row that REPLACE removed; an ORM write of a stale sync_id
        # (read before ccsync stamped or merged the row) puts its identity back,
        # with capture off so recursive triggers do not fire on it.
        f"_ccsync_upd_{table}":
            f"CREATE TRIGGER {_q('_ccsync_upd_' + table)} AFTER UPDATE ON {t} "
            f"WHEN {_SQL_LIVE} AND ({changed}) BEGIN {_SQL_TICK} "
            f"DELETE FROM {cell} AND {moved}; "
            f"UPDATE _ccsync_dirty SET rid = NEW.rowid WHERE tbl = {lit} AND rid = OLD.rowid "
            f"AND {moved}; "
            f"DELETE FROM {cell} AND col = '{MOVED}'; "
            f"INSERT INTO _ccsync_dirty (tbl, rid, col, hlc) SELECT {lit}, NEW.rowid, "
            f"'{MOVED}', {_SQL_HLC} WHERE {moved}; "
            f"UPDATE _ccsync_clock SET suppress = 1 WHERE {lost_sid}; "
            f"UPDATE {t} SET sync_id = OLD.sync_id WHERE rowid = NEW.rowid AND {lost_sid}; "
            f"UPDATE _ccsync_clock SET suppress = 0 WHERE {lost_sid}; "
            f"{per_col} END",
        f"_ccsync_del_{table}":
            f"CREATE TRIGGER {_q('_ccsync_del_' + table)} AFTER DELETE ON {t} "
            f"WHEN {_SQL_LIVE} BEGIN {_SQL_TICK} "
            f"INSERT INTO _ccsync_gone (tbl, rid, sid, key, hlc, unsent) VALUES ({lit}, "
            f"OLD.rowid, OLD.sync_id, {_sql_key_json(key)}, {_SQL_HLC}, "
            f"{_sql_unsent_json(table, [*cols, *local])}); "
            f"DELETE FROM _ccsync_dirty WHERE tbl = {lit} AND rid = OLD.rowid; END",
    }


@functools.lru_cache(maxsize=64)
def _trigger_sql_of(table: str, tracked: tuple[str, ...], key: tuple[str, ...],
                    local: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    # Every sync checks the triggers against these texts: made once a layout.
    return tuple(trigger_sql(table, tracked, key, local).items())


class TableInfo:
    """A synced table as it exists in this device's database (a snapshot:
    :meth:`SyncState.tables` builds new ones when the schema changes)."""

    def __init__(self, spec: TableSpec, columns: tuple[str, ...], notnull: frozenset[str],
                 types: dict[str, str], pk: str | None,
                 layout: tuple[tuple[int, str], ...] = ()):
        self.spec = spec
        self.columns = columns          # every column, schema order
        self.notnull, self.types = notnull, types
        self.pk = pk                    # the INTEGER PRIMARY KEY column (rowid alias)
        self.layout = layout            # (position, name) of every column

    @property
    def name(self) -> str:
        return self.spec.name

    @functools.cached_property
    def tracked(self) -> tuple[str, ...]:
        """Columns whose edits sync (not the id, sync columns or device-local ones)."""
        skip = set(SYNC_COLUMNS) | set(self.spec.local) | {self.pk}
        return tuple(c for c in self.columns if c not in skip)

    @functools.cached_property
    def local(self) -> tuple[str, ...]:
        return tuple(c for c in self.spec.local if c in self.columns)

    @functools.cached_property
    def required(self) -> frozenset[str]:
        """Reference columns that must point at a live row (NOT NULL, or per SPEC)."""
        return self.notnull | {c for c in self.spec.required if c in self.columns}

    @functools.cached_property
    def key_columns(self) -> tuple[str, ...]:
        """The natural-key columns this table has here, in SPEC order."""
        return tuple(c for c in self.spec.key if c in self.columns)


class Outgoing(namedtuple("Outgoing", "table rid cells gone deleted_rid outbox",
                          defaults=((), None, ()))):
    """What ack() needs to settle one captured row or delete: its ``table``,
    ``rid`` (the local row; None for a delete), ``cells`` (the pending cells
    sent, with their clocks), ``gone`` (the _ccsync_gone entries a delete
    settles), ``deleted_rid`` (the rowid the deleted row had here) and
    ``outbox`` (the _ccsync_outbox entries it settles)."""

    __slots__ = ()


class Batch:
    """Outgoing records (None: nothing to send) plus what ack() needs to settle them."""

    def __init__(self, records: list[dict | None], tokens: list[Outgoing],
                 next_pos: tuple[int, int, int] | None):
        self.records, self.tokens = records, tokens
        self.next_pos = next_pos        # keyset position; None when done


class ApplyResult:
    """What merging one or more pages of incoming records did."""

    def __init__(self, received: int = 0, applied: int = 0, unchanged: int = 0,
                 refused: Counter | None = None, aside: int = 0):
        self.received, self.applied, self.unchanged = received, applied, unchanged
        self.refused = Counter() if refused is None else refused
        self.aside = aside              # kept for a table this database lacks

    def add(self, other: "ApplyResult") -> None:
        """Add another result's counts to this one."""
        self.received += other.received
        self.applied += other.applied
        self.unchanged += other.unchanged
        self.refused.update(other.refused)
        self.aside += other.aside


class Arrival:
    """An incoming wire record as read before the write lock is taken."""

    __slots__ = ("raw", "record", "refusal", "fresh")

    def __init__(self, raw: Any, record: Record | None, refusal: Exception | None = None,
                 fresh: dict | None = None):
        self.raw = raw
        self.record = record            # None: ``refusal`` says why it cannot apply
        self.refusal = refusal
        self.fresh = fresh              # see fresh_values(); None: the per-record path


def fresh_values(info: TableInfo, record: Record) -> dict | None:
    """What a row simply new here would be written with, from its record
    alone: ``vals`` (its synced values and starting points), ``values``
    (table values, references still as sync_ids) and ``state`` (its synced
    state's values and clocks as stored).  None when it needs the
    per-record path: its natural key does not derive its id, or is empty."""
    vals = with_starting_points(dict(record.values), record, info.local)
    if info.spec.key and row_identity(info.name, vals, info.spec.key) != record.sid:
        return None
    values = {col: vals[col] if col in info.spec.refs else decode_value(vals[col])
              for col in info.tracked if col in vals}
    if info.spec.key and any(values.get(c) is None for c in info.spec.key):
        return None
    clocks: dict = {}
    merge_cells({}, clocks, record.values, cell_clocks(record.clocks, record.dev))
    return {"vals": vals, "values": values,     # and its synced state, as stored
            "state": (compact_json(vals),
                      compact_json(clocks))}


def with_parents(values: dict, parents: dict[str, dict[str, int]]) -> dict | None:
    """``values`` with each reference's sync_id turned into the parent's rowid
    here (``parents``: column -> sync_id -> rowid); None if a parent is missing."""
    out = dict(values)
    for col, rids in parents.items():
        if out.get(col) is not None:
            out[col] = rids.get(out[col])
            if out[col] is None:
                return None
    return out


class SyncState:
    """Where this device stands: its connection, write slices under the lock
    policy, bookkeeping values, its device id and clock, and the cursor (one
    writer: :meth:`_set_cursor`)."""

    def __init__(self, conn: sqlite3.Connection, *, clock: Callable[[], float] = time.time,
                 local_settings: Iterable[str] = (), gate: WriteGate | None = None):
        self.conn = conn
        self.clock = clock
        self.extra_local = tuple(local_settings)
        self.gate = gate or WriteGate()
        self.backup_path: str | None = None     # set when this run made the first backup
        self._tables: dict[str, TableInfo] | None = None
        self._device_id: str | None = None      # read once; set_meta() forgets it
        self._schema_seen: int | None = None    # schema_version capture was checked at
        # This pull's deletes to send again, and the rows it brought a delete of
        # (see Incoming.queue_resends); ``resends_queued``: how many it queued.
        self._resends: dict[tuple[str, str], int] = {}
        self._tombstoned: set[tuple[str, str]] = set()
        self.resends_queued = 0

    @contextlib.contextmanager
    def _write(self, *, quiet: bool = False) -> Iterator[sqlite3.Connection]:
        """One top-level write transaction under the lock policy (see WriteGate).

        ``quiet`` marks ccsync's own writes, which the capture triggers skip.
        """
        nested = self.conn.in_transaction
        if not nested:
            self.gate.enter()
        try:
            with transaction(self.conn):
                if quiet:
                    self._suppress(True)
                yield self.conn
                if quiet:
                    self._suppress(False)
        finally:
            if not nested:
                self.gate.leave()

    def _select_in(self, sql: str, values: Iterable[Any], *args: Any) -> Iterator[sqlite3.Row]:
        """:func:`select_in` on this database."""
        return select_in(self.conn, sql, values, *args)

    DIFF_PAGE = 2000           # rows a scan of a whole table (a diff) reads at a time

    def _pages(self, sql: str, after: tuple, key: Callable[[sqlite3.Row], tuple],
               *args: Any) -> Iterator[list[sqlite3.Row]]:
        """A keyset scan in pages of DIFF_PAGE: ``sql`` takes ``args``, then
        the last page's ``key`` (``after`` at first), then the LIMIT."""
        while True:
            rows = self.conn.execute(sql, (*args, *after, self.DIFF_PAGE)).fetchall()
            if not rows:
                return
            yield rows
            after = key(rows[-1])

    def _sliced(self, items: Iterable[Any], apply: Callable[[Any], Any], *, quiet: bool = False,
                last: Callable[[], Any] | None = None) -> None:
        """``apply`` each item in write transactions of one lock slice each.

        ``last`` runs inside the final transaction (e.g. to move the cursor).
        Every slice commits on its own: ``apply`` must be safe to run again
        after a crash (merges and settling are idempotent).
        """
        items = iter(items)
        while True:
            with self._write(quiet=quiet):
                for item in items:
                    apply(item)
                    if self.gate.over():
                        break
                else:
                    if last is not None:
                        last()
                    return

    def meta(self, key: str, default: str | None = None) -> str | None:
        """A value from ccsync's bookkeeping (``_ccsync_meta``)."""
        row = self.conn.execute("SELECT value FROM _ccsync_meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str | None) -> None:
        """Set (or, with None, remove) a bookkeeping value."""
        if key == "device_id":
            self._device_id = None
        if value is None:
            self.conn.execute("DELETE FROM _ccsync_meta WHERE key = ?", (key,))
        else:
            self.conn.execute("INSERT OR REPLACE INTO _ccsync_meta (key, value) VALUES (?, ?)",
                              (key, str(value)))

    @property
    def path(self) -> str:
        """The database file's path."""
        return self.conn.execute("PRAGMA database_list").fetchone()["file"] or ""

    @property
    def device_id(self) -> str:
        """This database's device id (a copy on another machine gets its own)."""
        if self._device_id is None:
            self._device_id = self.meta("device_id") or ""
        return self._device_id

    @property
    def cursor(self) -> int:
        """The server sequence number this device has merged up to."""
        return int(self.meta("cursor", "0") or 0)

    def _set_cursor(self, seq: int) -> None:
        """The one writer of the cursor: merged (or sent, or started over) up to ``seq``."""
        self.set_meta("cursor", str(int(seq)))

    ECHO_RANGES = 64            # ranges of own records a pull asks the server to leave out

    def own_ranges(self) -> list[list[int]]:
        """[first, last] sequence numbers of records this device pushed (and the
        server acknowledged) past its cursor: a pull need not bring them back."""
        cursor = self.cursor
        return [r for r in json.loads(self.meta("own_seqs") or "[]") if r[1] > cursor]

    def _note_own_seqs(self, seqs: Iterable[int]) -> None:
        ranges = self.own_ranges()
        for seq in sorted(seqs):
            if ranges and ranges[-1][1] == seq - 1:
                ranges[-1][1] = seq
            else:
                ranges.append([seq, seq])
        self.set_meta("own_seqs", json.dumps(ranges[-self.ECHO_RANGES:]) if ranges else None)

    def _hlc_observe(self, hlc: int) -> None:
        self.conn.execute("UPDATE _ccsync_clock SET hlc = max(hlc, ?)", (hlc,))

    def _hlc_tick(self) -> int:
        self.conn.execute("UPDATE _ccsync_clock SET hlc = max(hlc + 1, ?)",
                          (hlc_at(now_ms(self.clock)),))
        return self.conn.execute("SELECT hlc FROM _ccsync_clock").fetchone()[0]

    def _suppress(self, on: bool) -> None:
        self.conn.execute("UPDATE _ccsync_clock SET suppress = ?", (1 if on else 0,))

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """ccsync's own writes inside: not captured (and capture as before after)."""
        before = self.conn.execute("SELECT suppress FROM _ccsync_clock").fetchone()[0]
        self._suppress(True)
        try:
            yield
        finally:
            self._suppress(bool(before))

    def _fingerprint(self) -> str:
        import socket
        path = self.path
        return f"{socket.gethostname()}:{os.path.realpath(path) if path else ''}"

    def _check_device(self) -> None:
        # A cc_cli.db copied onto another machine must not keep the source's
        # device id; re-pulling from 0 is always safe (merges are idempotent).
        fingerprint = self._fingerprint()
        if self.meta("device_id") and self.meta("fingerprint") == fingerprint:
            return
        if self.meta("device_id"):
            self._set_cursor(0)
            if self.conn.execute("SELECT 1 FROM _ccsync_shadow LIMIT 1").fetchone():
                self.start_rejoin()
        self._new_device_id(self.meta("author") or "")
        self.set_meta("fingerprint", fingerprint)

    def _new_device_id(self, prefix: str) -> None:
        # The old id stays this database's (its kept edits still go out, as
        # copies); the random part tells copies of one database apart.
        import secrets
        if self.meta("device_id"):
            self.set_meta("own_ids", json.dumps(self.own_ids()[:16]))
        self.set_meta("device_id", f"{prefix}.{secrets.token_hex(4)}" if prefix
                      else new_uuid().hex[:16])       # 64 bits: short clocks

    def own_ids(self) -> list[str]:
        """Every device id this database has sent edits under, newest first."""
        earlier = json.loads(self.meta("own_ids") or "[]")
        return [self.device_id] + [d for d in earlier if d != self.device_id]

    def take_author(self, prefix: str) -> None:
        """Make edits from now on under a device id of the key with this
        :func:`author_prefix` (the server takes them only so), keeping the
        old id as one of :meth:`own_ids`."""
        if author_of(self.device_id) == prefix:
            return
        with self._write():
            self.set_meta("author", prefix)
            self._new_device_id(prefix)

    def server_changed(self, store_id: Any) -> bool:
        """True when the server's store differs from the one this device synced with.

        The first store seen is remembered; later ones count as a change.
        """
        if not isinstance(store_id, str) or not store_id:
            return False
        known = self.meta("server_store")
        if known is None:
            with self._write():
                self.set_meta("server_store", store_id)
            return False
        return known != store_id

    def rejoining(self) -> bool:
        """True while this device catches up from the start (see :meth:`start_rejoin`)."""
        return self.meta("rejoin") is not None

    def start_rejoin(self) -> None:
        """Catch up from the start: pull everything again, then let the rows of
        the synced state that the server no longer has go here too (deleted
        and collected there while this device was away, or before this copy
        of the database was made).  Survives a crash: the pull resumes."""
        with self._write():
            self._rejoin_from_start()

    def _rejoin_from_start(self) -> None:
        # The rows only this device holds count as seen: the store never had them.
        self.conn.execute("DELETE FROM _ccsync_seen")
        self.conn.execute("INSERT INTO _ccsync_seen (tbl, sid) SELECT tbl, sid FROM _ccsync_kept")
        self.set_meta("rejoin", iso_utc(self.clock))
        self._set_cursor(0)

    def note_push_refused(self, reason: str | None) -> None:
        """Remember why the server refused a push, with the time (None: it took one)."""
        if reason is None and self.meta("push_refused") is None:
            return
        with self._write(quiet=True):
            self.set_meta("push_refused", None if reason is None
                          else f"{iso_utc(self.clock)} {reason}")

    def digest_due(self, every: float) -> bool:
        """True when this device's content digest is worth reporting (see
        sync_once): nothing waits to go out, and the cursor moved since the
        last report, which was ``every`` seconds ago or more (or never)."""
        last = json.loads(self.meta("digest_reported") or "[null, 0]")
        if last[0] == self.cursor or self.clock() - last[1] < every:
            return False
        return not self.unsent()

    def unsent_rows(self) -> int:
        """How many rows have edits waiting to go out (for a progress line)."""
        if not self.installed():
            return 0
        return self.conn.execute("SELECT count(*) FROM (SELECT DISTINCT tbl, rid FROM "
                                 "_ccsync_dirty)").fetchone()[0]

    def unsent(self) -> bool:
        """True when an edit made here has not reached the server yet (a cell,
        a delete, a kept edit)."""
        return not self.installed() or any(self.conn.execute(
            f"SELECT 1 FROM {name} LIMIT 1").fetchone() is not None
            for name in ("_ccsync_dirty", "_ccsync_gone", "_ccsync_outbox"))

    def note_e2e_seen(self) -> None:
        """Remember that this device synced end to end: a plaintext store with
        records in it is refused from now on (see encrypt_server)."""
        with self._write(quiet=True):
            self.set_meta("e2e_seen", "1")

    def note_digest_reported(self, cursor: int) -> None:
        """Remember that a digest at ``cursor`` went to the server now."""
        with self._write(quiet=True):
            self.set_meta("digest_reported", json.dumps([cursor, self.clock()]))

    def adopt_server(self, store_id: str, refused: Iterable[tuple[str, str]] = ()) -> None:
        """Start over with a new server store this device has re-seeded:
        remember its id and rejoin it (see :meth:`start_rejoin`).  The new
        store may have collected a delete of a row held here before the
        re-seed reached it; the rejoin lets such a row go here too.

        What the re-seed did not give the store stays, in this rejoin and
        every later one, until the store has it (:meth:`kept_here`): the
        rows and records it ``refused``, (table, sync_id), and the records
        kept here as refused.  What this device noted of the old store (its
        own records' sequence numbers, the last ask, the last digest) goes:
        another server numbers its records afresh."""
        with self._write():
            self.set_meta("server_store", store_id)
            for key in ("own_seqs", "pin_ask", "digest_reported"):
                self.set_meta(key, None)
            self.conn.execute("DELETE FROM _ccsync_kept")
            self.conn.executemany("INSERT OR IGNORE INTO _ccsync_kept (tbl, sid) VALUES (?, ?)",
                                  refused)
            self.conn.execute("INSERT OR IGNORE INTO _ccsync_kept (tbl, sid) SELECT tbl, sid "
                              "FROM _ccsync_held WHERE kind = 'refused' AND tbl IS NOT NULL "
                              "AND sid IS NOT NULL")
            if self.conn.execute("SELECT 1 FROM _ccsync_shadow LIMIT 1").fetchone():
                self._rejoin_from_start()
            else:
                self._set_cursor(0)

    def kept_here(self) -> int:
        """How many rows (and records) this device alone holds, as far as it
        knows: the server's new store refused them at the re-seed."""
        if not self.has_table("_ccsync_kept"):     # not set up, or by an older ccsync
            return 0
        return self.conn.execute("SELECT count(*) FROM _ccsync_kept").fetchone()[0]


class LocalRows(SyncState):
    """cc's tables as ccsync reads them: schema, rows in wire form (references
    as sync_ids) and back, the synced state (shadow), pending cells, and the
    reference bookkeeping every part shares."""

    def _columns(self, table: str) -> list[sqlite3.Row]:
        return self.conn.execute(f"PRAGMA table_info({_q(table)})").fetchall()

    def has_table(self, name: str) -> bool:
        """True when a table of that name exists here."""
        row = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
        return row is not None

    def tables(self) -> dict[str, TableInfo]:
        """The synced tables present here, in dependency order."""
        if self._tables is None:
            found = {}
            for spec in SPEC:
                cols = self._columns(spec.name)
                if not cols:
                    continue
                pk = [c["name"] for c in cols if c["pk"] == 1 and c["type"].upper() == "INTEGER"]
                found[spec.name] = TableInfo(
                    spec, tuple(c["name"] for c in cols),
                    frozenset(c["name"] for c in cols if c["notnull"]),
                    {c["name"]: c["type"].upper() for c in cols},
                    pk[0] if len(pk) == 1 and sum(c["pk"] > 0 for c in cols) == 1 else None,
                    tuple((c["cid"], c["name"]) for c in cols))
            self._tables = found
        return self._tables

    def installed(self) -> bool:
        """True once ccsync's bookkeeping tables exist in this database."""
        return self.has_table("_ccsync_meta")

    def _by_rowid(self, table: str, columns: str, rids: Iterable[Any]) -> Iterator[sqlite3.Row]:
        """``SELECT rowid AS _rid, <columns>`` for the given rowids, in chunks."""
        yield from self._select_in(f"SELECT rowid AS _rid, {columns} FROM {_q(table)} "
                                   f"WHERE rowid IN ({{marks}})",
                                   (r for r in rids if isinstance(r, int)))

    def _parent_sids(self, table: str, rids: Iterable[Any]) -> dict[int, str | None]:
        """The sync_id of each row id; of a row deleted here, the id it had
        (cc's version.delete leaves references to it: they name that row)."""
        if table not in self.tables():
            return {}
        rids = [r for r in rids if isinstance(r, int)]
        out = {row[0]: row[1] for row in self._by_rowid(table, "sync_id", rids)}
        out.update(tuple(row) for row in self._select_in(
            "SELECT rid, sid FROM _ccsync_gone WHERE tbl = ? AND sid IS NOT NULL "
            "AND rid IN ({marks}) ORDER BY hlc", (r for r in rids if r not in out), table))
        return out

    def _wire_rows(self, info: TableInfo, rows: list[sqlite3.Row]) -> list[dict[str, Any]]:
        """Each row's tracked and local columns in wire form (refs as sync_ids)."""
        spec = info.spec
        parents = {col: self._parent_sids(parent, (r[col] for r in rows))
                   for col, parent in spec.refs.items() if col in info.columns}
        lists = {col: self._list_sids(info, col, rows) for col in spec.list_refs
                 if col in info.columns}
        names = {col: self._names_for(target, name_col, (r[col] for r in rows))
                 for col, (target, name_col) in spec.name_refs.items() if col in info.columns}
        out = []
        for row in rows:
            values = {}
            for col in info.tracked + info.local:
                value = row[col]
                if col in parents:
                    value = parents[col].get(value) if value is not None else None
                elif col in lists:
                    value = lists[col].get(row["_rid"], encode_value(value))
                elif col in names:
                    value = names[col].get(value) if value is not None else None
                else:
                    value = encode_value(value)
                values[col] = value
            out.append(values)
        return out

    DIGEST_CHUNK = 2000

    def content_digest(self, key: bytes) -> str | None:
        """A digest, keyed with ``key``, of the data this device syncs: every
        row's synced columns in wire form (references as sync_ids; device-local
        columns and settings left out).  Devices that hold the same data give
        the same digest whatever their rowids.  Read in chunks, never holding
        cc back; None when cc kept writing while it was read."""
        import hashlib
        import hmac
        for _attempt in range(3):
            before = self.conn.execute("PRAGMA data_version").fetchone()[0]
            total, count = 0, 0
            for info in self.tables().values():
                for line in self._digest_lines(info):
                    total += int.from_bytes(hashlib.sha256(line).digest(), "big")
                    count += 1
            if self.conn.execute("PRAGMA data_version").fetchone()[0] == before:
                text = f"ccsync-content\n{count}\n{total % 2 ** 256:064x}".encode()
                # Devices on another cc schema are not compared (their rows differ by form).
                schema = hashlib.sha256(json.dumps([[i.name, sorted(i.tracked)] for i in
                                                    self.tables().values()]).encode())
                return f"{hmac.new(key, text, hashlib.sha256).hexdigest()}." \
                       f"{schema.hexdigest()[:16]}"
        return None

    def _digest_lines(self, info: TableInfo) -> Iterator[bytes]:
        """One canonical line per row of ``info`` that syncs."""
        after = -(2 ** 63)
        skip = self._row_skipper()
        while True:
            rows = self.conn.execute(f"SELECT rowid AS _rid, * FROM {_q(info.name)} WHERE "
                                     f"rowid > ? ORDER BY rowid LIMIT ?",
                                     (after, self.DIGEST_CHUNK)).fetchall()
            for row, values in zip(rows, self._wire_rows(info, rows)):
                if not skip(info, row):
                    yield _sorted_json([info.name, row["sync_id"], {c: values[c] for c in
                                                                   info.tracked}]).encode()
            if len(rows) < self.DIGEST_CHUNK:
                return
            after = rows[-1]["_rid"]

    def _list_sids(self, info: TableInfo, col: str, rows: list[sqlite3.Row]) -> dict[int, Any]:
        parsed = {r["_rid"]: parse_id_list(r[col]) for r in rows}
        all_ids = [i for p in parsed.values() if p for i in p[0]]
        sids = self._parent_sids(info.spec.list_refs[col], all_ids)
        return {rid: {"ids": [sids.get(i) for i in p[0] if sids.get(i)], "fmt": p[1]}
                for rid, p in parsed.items() if p is not None}

    def _names_for(self, table: str, name_col: str, ids: Iterable[Any]) -> dict[int, str]:
        if not self.has_table(table):
            return {}
        return {row[0]: row[1] for row in self._by_rowid(table, _q(name_col), ids)}

    def _rid_for_sid(self, table: str, sid: str | None) -> int | None:
        if sid is None or table not in self.tables():
            return None
        row = self.conn.execute(f"SELECT rowid FROM {_q(table)} WHERE sync_id = ?",
                                (sid,)).fetchone()
        return None if row is None else row[0]

    def _rids_for_sids(self, table: str, sids: Iterable[Any]) -> dict[str, int]:
        """The rowid of each sync_id held by a row here (in chunks)."""
        if table not in self.tables():
            return {}
        return {sid: rid for sid, rid in self._select_in(
            f"SELECT sync_id, rowid FROM {_q(table)} WHERE sync_id IN ({{marks}})",
            (s for s in sids if isinstance(s, str)))}

    _UNRESOLVED = object()   # a reference whose parent has not arrived yet

    _KEEP = object()         # a name reference with no local match: keep local value

    def _local_value(self, info: TableInfo, col: str, value: Any) -> Any:
        """The value to write locally for a wire value.

        A nullable reference to a row known as deleted reads as NULL; a
        required one (NOT NULL, or a time entry's environment) is unresolved.
        """
        spec = info.spec
        if col in spec.refs:
            if value is None:
                return None
            parent = spec.refs[col]
            rid = self._rid_for_sid(parent, value)
            if rid is not None:
                return rid
            outcome = missing_parent(col in info.required, self._is_dead(parent, value))
            return None if outcome == "empty" else self._UNRESOLVED
        if col in spec.list_refs and isinstance(value, dict) and "ids" in value:
            # Each id is a nullable reference: one to a deleted row leaves the list.
            parent = spec.list_refs[col]
            rids = [(self._rid_for_sid(parent, s), s) for s in value["ids"]]
            text = format_id_list([r for r, _s in rids if r is not None], value["fmt"])
            waits = any(r is None and missing_parent(False, self._is_dead(parent, s)) == "wait"
                        for r, s in rids)
            return (self._UNRESOLVED, text) if waits else text
        if col in spec.name_refs:
            target, name_col = spec.name_refs[col]
            if value is None or not self.has_table(target):
                return self._KEEP
            row = self.conn.execute(f"SELECT rowid FROM {_q(target)} WHERE {_q(name_col)} = ?",
                                    (value,)).fetchone()
            return self._KEEP if row is None else row[0]
        return decode_value(value)

    def _shadow(self, table: str, sid: str) -> tuple[int | None, dict, dict] | None:
        """The synced state of one row: (rowid here or None, values, cell clocks)."""
        return self._shadows(table, [sid]).get(sid)

    def _shadows(self, table: str, sids: Iterable[str]) -> dict[str, tuple[int | None, dict, dict]]:
        """:meth:`_shadow` of each of ``sids`` that has one (in chunks)."""
        return {sid: (rid, json.loads(vals), json.loads(clocks))
                for sid, rid, vals, clocks in self._select_in(
                    "SELECT sid, rid, vals, clocks FROM _ccsync_shadow WHERE tbl = ? "
                    "AND sid IN ({marks})", (s for s in sids if isinstance(s, str)), table)}

    def _put_shadow(self, table: str, sid: str, rid: int | None, vals: dict, clocks: dict) -> None:
        self._put_shadows([(table, sid, rid, vals, clocks)])

    def _put_shadows(self, rows: Iterable[tuple[str, str, int | None, Any, Any]], *,
                     encoded: bool = False) -> None:
        """Write synced states, each (table, sync_id, rowid here or None, values,
        clocks); ``encoded``: values and clocks are JSON text already."""
        if not encoded:
            rows = [(table, sid, rid, compact_json(vals),
                     compact_json(clocks))
                    for table, sid, rid, vals, clocks in rows]
        self.conn.executemany(
            "INSERT OR REPLACE INTO _ccsync_shadow (tbl, sid, rid, vals, clocks) "
            "VALUES (?, ?, ?, ?, ?)", rows)

    def _keep_unsent(self, info: TableInfo, sid: str, rid: int | None, row: Any, vals: dict,
                     clocks: dict, cells: dict[str, list]) -> None:
        """This device's ``cells`` of a row a delete removed before they were
        sent (``row``: its values then): into the synced state and out
        (``_ccsync_outbox``), as if they had been sent before the delete."""
        if merge_cells(vals, clocks, self._wire_rows(info, [row])[0], cells):
            self._put_shadow(info.name, sid, rid, vals, clocks)
            self.conn.execute("INSERT OR IGNORE INTO _ccsync_outbox (tbl, sid) VALUES (?, ?)",
                              (info.name, sid))

    def _row_at(self, info: TableInfo, rid: int | None) -> sqlite3.Row | None:
        """The whole row at ``rid`` (with ``_rid``), or None."""
        return next(iter(self._by_rowid(info.name, "*", [rid])), None)

    def _is_dead(self, table: str, sid: str) -> bool:
        """True when ``sid`` is known here as a deleted row."""
        shadow = self._shadow(table, sid)
        return shadow is not None and is_deleted(shadow[2])

    def _row_skipper(self) -> Callable[[TableInfo, Any], bool]:
        """The test for rows that never leave this device (secret or local
        settings), with this database's list of local settings read once: make
        it before a loop over rows, not inside."""
        local_names = self._local_setting_names()
        # A synced state may lack the name (a row that arrived as an edit of
        # other columns): it came from the server, so it is no secret.
        return lambda info, row: info.name == "setting" and setting_policy(
            row.get("name") if isinstance(row, dict) else row["name"], local_names) is not None

    def _local_setting_names(self) -> tuple[str, ...]:
        names = self.extra_local
        if {"name", "value"} <= set(getattr(self.tables().get("setting"), "columns", ())):
            row = self.conn.execute("SELECT value FROM setting WHERE name = ?",
                                    (LOCAL_SETTINGS_SETTING,)).fetchone()
            if row is not None:
                names += split_names(row[0])
        return names

    def _setting_syncs(self, name: Any) -> bool:
        return setting_policy(name, self._local_setting_names()) is None

    def _dirty_cells(self, table: str, rid: int | None, sid: str | None = None) -> dict[str, list]:
        """This device's pending cells for a row, as cell clocks.

        A row deleted here is found by its sync_id (its rowid is gone).
        """
        cells = {}
        if rid is not None:
            cells = {r[0]: [r[1], self.device_id] for r in self.conn.execute(
                "SELECT col, hlc FROM _ccsync_dirty WHERE tbl = ? AND rid = ?", (table, rid))}
        elif sid is not None:
            row = self.conn.execute("SELECT max(hlc) FROM _ccsync_gone WHERE tbl = ? AND sid = ?",
                                    (table, sid)).fetchone()
            if row[0] is not None:
                cells[TOMBSTONE] = [row[0], self.device_id]
        return expand_inserted(cells, self.tables()[table].tracked)

    def _expand_inserted(self, table: str, columns: Iterable[str],
                         rid: int | None = None) -> None:
        """Turn pending inserts (of one row, or all) into cells of ``columns``."""
        where = "tbl = ? AND col = ?" + ("" if rid is None else " AND rid = ?")
        args = (table, INSERTED) + (() if rid is None else (rid,))
        self.conn.execute(f"INSERT OR IGNORE INTO _ccsync_dirty (tbl, rid, col, hlc) "
                          f"SELECT tbl, rid, c.value, hlc FROM _ccsync_dirty, json_each(?) c "
                          f"WHERE {where}", (json.dumps(list(columns)), *args))
        self.conn.execute(f"DELETE FROM _ccsync_dirty WHERE {where}", args)

    def _gone_rids(self, table: str, sid: str) -> list[int]:
        """The rowids a row deleted here had (cc may have left references at them)."""
        return [r for (r,) in self.conn.execute(
            "SELECT DISTINCT rid FROM _ccsync_gone WHERE tbl = ? AND sid = ? AND rid IS NOT NULL",
            (table, sid))]

    def _record_gone(self, info: TableInfo, gone: list[tuple], hlc: int) -> None:
        """Record deletes made here: (sync_id, rowid or None) pairs, at ``hlc``."""
        self.conn.executemany("INSERT INTO _ccsync_gone (tbl, rid, sid, key, hlc) "
                              "VALUES (?, ?, ?, NULL, ?)",
                              [(info.name, rid, sid, hlc) for sid, rid in gone])

    def _mark_dirty(self, table: str, rid: int, cells: dict[str, int]) -> None:
        """Record cells of a local row as edited here at the given clocks."""
        self.conn.executemany(
            "INSERT OR REPLACE INTO _ccsync_dirty (tbl, rid, col, hlc, sid) "
            "VALUES (?, ?, ?, ?, NULL)", [(table, rid, c, hlc) for c, hlc in cells.items()])

    @staticmethod
    def _child_refs(table: str, lists: bool = False) -> Iterator[tuple[TableSpec, str]]:
        """(child spec, column) for every single-id reference to ``table``
        (``lists``: for every id list of its rows instead)."""
        for spec in SPEC:
            for col, parent in (spec.list_refs if lists else spec.refs).items():
                if parent == table:
                    yield spec, col

    def _key_sid(self, info: TableInfo, row: Any, values: dict) -> str | None:
        """The id a row's current natural key derives (None: no usable key here)."""
        cols = info.spec.key
        if not cols or any(c not in info.columns for c in cols):
            return None
        return row_identity(info.name, {c: values[c] if c in values else encode_value(row[c])
                                        for c in cols}, cols)

    def _mark_pending(self, table: str, sid: str, kind: str = "ref") -> None:
        """Retry this row after the pull: 'ref' waits for a parent, 'keep' is a
        deleted row kept because a live row needs it."""
        self.conn.execute("INSERT OR REPLACE INTO _ccsync_pending (tbl, sid, kind) "
                          "VALUES (?, ?, ?)", (table, sid, kind))

    def _relink_children(self, table: str, sid: str) -> None:
        # A row back from the dead: children whose reference read as NULL, or
        # whose id list left it out, retry.
        for spec, col in self._child_refs(table):
            if spec.name in self.tables():
                self.conn.execute(
                    "INSERT OR IGNORE INTO _ccsync_pending (tbl, sid) SELECT tbl, sid "
                    "FROM _ccsync_shadow WHERE tbl = ? AND json_extract(vals, ?) = ?",
                    (spec.name, f'$."{col}"', sid))
        for spec, col in self._child_refs(table, lists=True):
            if spec.name in self.tables():
                self.conn.execute(
                    "INSERT OR IGNORE INTO _ccsync_pending (tbl, sid) SELECT tbl, sid "
                    "FROM _ccsync_shadow WHERE tbl = ? AND EXISTS (SELECT 1 FROM "
                    "json_each(vals, ?) WHERE value = ?)", (spec.name, f'$."{col}".ids', sid))

    def _relink_if_back(self, table: str, sid: str, rid: int, was: int | None = None) -> None:
        """A row deleted here is back at ``rid`` (cc created it again: same key,
        same id; or a later edit from elsewhere won): children that lost their
        reference to it get it back, also those that still hold its old rowid
        (``was``, or the shadow's: cc's version.delete leaves them) and never
        synced.  Call before the shadow learns the new rowid."""
        row = self.conn.execute("SELECT rid FROM _ccsync_shadow WHERE tbl = ? AND sid = ?",
                                (table, sid)).fetchone()
        if row is not None and row[0] != rid:
            self._relink_children(table, sid)
        olds = set(self._gone_rids(table, sid))
        olds |= {old for old in (was, row[0] if row else None) if old is not None}
        olds = [old for old in olds - {rid} if self.conn.execute(
            f"SELECT 1 FROM {_q(table)} WHERE rowid = ?", (old,)).fetchone() is None]
        named = self.conn.execute("SELECT tbl, rid, col, hlc FROM _ccsync_named WHERE sid = ?",
                                  (sid,)).fetchall()
        with self._quiet():           # same reference on the wire: not an edit
            for old in olds:          # and children that never synced (no shadow) too
                for spec, col in self._child_refs(table):
                    child = self.tables().get(spec.name)
                    if child is not None and col in child.columns:
                        self.conn.execute(f"UPDATE {_q(spec.name)} SET {_q(col)} = ? "
                                          f"WHERE {_q(col)} = ?", (rid, old))
            refs = {(spec.name, col) for spec, col in self._child_refs(table)}
            for child, child_rid, col, hlc in named:   # edits not yet sent that name it
                if (child, col) in refs and child in self.tables():
                    self.conn.execute(
                        f"UPDATE {_q(child)} SET {_q(col)} = ? WHERE rowid = ? AND "
                        f"{_q(col)} IS NULL AND EXISTS (SELECT 1 FROM _ccsync_dirty WHERE "
                        f"tbl = ? AND rid = ? AND col = ? AND hlc = ?)",
                        (rid, child_rid, child, child_rid, col, hlc))
        self.conn.execute("DELETE FROM _ccsync_named WHERE sid = ?", (sid,))


class Identity(LocalRows):
    """A keyed row's id is its key's (:func:`row_identity`): rows created apart
    are one row, and a row whose key changes takes its new key's id.  Ids
    stamped otherwise (an older ccsync, another tool) move to their key's."""

    def _settle_identity(self) -> int:
        """Move rows whose natural key changed (a rename, a re-keyed parent) to
        their new key's id; returns how many moved.  Parents first: a child's
        key names its parent's id."""
        moved = 0
        every = self.meta("identity") == "all"
        for info in self.tables().values():
            if not info.spec.key or any(c not in info.columns for c in info.spec.key):
                continue
            if every:
                query, args = (f"SELECT rowid FROM {_q(info.name)} WHERE sync_id IS NOT NULL",
                               ())
            else:
                marks = ",".join("?" * len(info.spec.key))
                query, args = (f"SELECT DISTINCT rid FROM _ccsync_dirty WHERE tbl = ? "
                               f"AND col IN ({marks})", (info.name, *info.spec.key))
            rids = [r[0] for r in self.conn.execute(query, args).fetchall()]
            moves = self._stale_ids(info, rids)
            for chunk in _chunks(moves, STAMP_CHUNK):
                with self._write():
                    moved += self._move_ids(info, chunk, {rid for rid, _old, _new in moves})
        if every:
            with self._write():
                self.set_meta("identity", None)
        return moved

    def _stale_ids(self, info: TableInfo, rids: list[int]) -> list[tuple[int, str, str]]:
        """(rowid, id, its key's id) of the rows whose id is not their key's."""
        stale, skip = [], self._row_skipper()
        for chunk in _chunks(rids, STAMP_CHUNK):
            rows = list(self._by_rowid(info.name, "*", chunk))
            for row, values in zip(rows, self._wire_rows(info, rows)):
                if row["sync_id"] is None or skip(info, row):
                    continue
                want = self._key_sid(info, row, values)
                if want is not None and want != row["sync_id"]:
                    stale.append((row["_rid"], row["sync_id"], want))
        return stale

    def _move_ids(self, info: TableInfo, moves: list[tuple[int, str, str]],
                  moving: set[int]) -> int:
        # Rows that swapped keys (a -> tmp, b -> a, tmp -> b) each want the
        # other's id: the holder steps aside to a fresh id first.  A key that
        # two live rows share (where cc allows it) keeps the second apart.
        moved = 0
        for rid, _old, want in moves:
            current = self.conn.execute(f"SELECT sync_id FROM {_q(info.name)} WHERE rowid = ?",
                                        (rid,)).fetchone()
            if current is None or current[0] == want:
                continue
            holder = self._rid_for_sid(info.name, want)
            if holder is not None and holder in moving:
                self._rekey(info, holder, want, str(new_uuid()))
                holder = None
            if holder is None:
                self._rekey(info, rid, current[0], want)
                moved += 1
        return moved

    def _rekey(self, info: TableInfo, rid: int, old: str, new: str) -> None:
        """Move the row at ``rid`` from id ``old`` to ``new``, its key's.

        ``old`` is deleted as of now.  Under ``new`` the row sends every cell
        with the time it was edited and its key as of now.  Where ``new`` is
        known here already (a row deleted, or one that swapped keys with
        this one), a value that differs from its synced one is an edit made
        now: the row stays as cc shows it, on every device.  Rows that refer
        to it send their new reference.
        """
        hlc = self._hlc_tick()
        shadow = self._shadow(info.name, old)
        mine = self._dirty_cells(info.name, rid)
        synced = shadow[2] if shadow else {}
        cells = {c: latest(mine.get(c), synced.get(c)) or [0, self.device_id]
                 for c in info.tracked}
        cells.update({c: [hlc, self.device_id] for c in info.spec.key})
        target = self._shadow(info.name, new)
        if target is not None:
            values = self._wire_rows(info, [self._row_at(info, rid)])[0]
            for col in info.tracked:
                same = col in target[1] and target[1][col] == values.get(col)
                cells[col] = latest(cells[col], target[2].get(col)) if same \
                    else [hlc, self.device_id]
        with self._quiet():
            self.conn.execute(f"UPDATE {_q(info.name)} SET sync_id = ? WHERE rowid = ?",
                              (new, rid))
        self.conn.execute("DELETE FROM _ccsync_dirty WHERE tbl = ? AND rid = ?", (info.name, rid))
        self.conn.execute("UPDATE _ccsync_shadow SET rid = NULL WHERE tbl = ? AND sid = ?",
                          (info.name, old))
        self._record_gone(info, [(old, None)], hlc)
        if target is not None:
            self._relink_if_back(info.name, new, rid)
            self.conn.execute("UPDATE _ccsync_shadow SET rid = ? WHERE tbl = ? AND sid = ?",
                              (rid, info.name, new))
        self._mark_dirty(info.name, rid, {c: clock[0] for c, clock in cells.items()})
        self._mark_referrers(info, rid, hlc)

    def _key_twin(self, info: TableInfo, rid: int | None,
                  values: dict) -> tuple[int, str | None] | None:
        """Another local row that has the natural key this row is about to get."""
        cols = [c for c in info.spec.key if c in info.columns]
        if not cols or not any(c in values for c in cols):
            return None
        current = self.conn.execute(f"SELECT * FROM {_q(info.name)} WHERE rowid = ?",
                                    (rid,)).fetchone() if rid is not None else None
        key = [values[c] if c in values else (current[c] if current else None) for c in cols]
        if all(v is None for v in key):
            return None
        where = " AND ".join(f"{_q(c)} IS ?" for c in cols)
        row = self.conn.execute(f"SELECT rowid, sync_id FROM {_q(info.name)} WHERE {where} "
                                f"AND rowid IS NOT ?", (*key, rid)).fetchone()
        return None if row is None else (row[0], row[1])

    def _meet(self, info: TableInfo, sid: str, rid: int | None, twin_rid: int,
              twin_sid: str | None) -> str:
        """Two ids on one natural key here: which one the key's row has.

        The local row is this row if it has no id yet, or if its id is not its
        key's (it moves to it).  Otherwise the incoming id is the one not
        derived from the key: its later cells go to the local row and it is
        deleted (on every device that meets it, so all agree).
        """
        if twin_sid is None:                       # not stamped yet: it simply is this row
            self.conn.execute(f"UPDATE {_q(info.name)} SET sync_id = ? WHERE rowid = ?",
                              (sid, twin_rid))
            return sid
        row = self._row_at(info, twin_rid)
        want = self._key_sid(info, row, self._wire_rows(info, [row])[0])
        if want is not None and want != twin_sid and self._rid_for_sid(info.name, want) is None:
            self._rekey(info, twin_rid, twin_sid, want)
            if want == sid:
                return sid
            twin_sid = want
        if rid is not None:
            raise RecordRefused("conflicts with a local row of the same natural key")
        self._fold(info, sid, twin_rid, twin_sid)
        return twin_sid

    def _fold(self, info: TableInfo, sid: str, rid: int, into: str) -> None:
        """The row ``sid`` is the local row ``rid`` (id ``into``): move its later
        cells there, to be sent under ``into``, and delete ``sid``."""
        _old_rid, vals, clocks = self._shadow(info.name, sid)
        target = self._shadow(info.name, into)
        synced = target[2] if target else {}
        mine = self._dirty_cells(info.name, rid)
        current = {c: latest(mine.get(c), synced.get(c)) for c in info.tracked}
        theirs = {c: clocks[c] for c in info.tracked if c in clocks and c in vals}
        taken = self._write_cells(info, rid, vals, winning_cells(current, theirs))
        self._mark_dirty(info.name, rid, {c: theirs[c][0] for c in taken})
        self._record_gone(info, [(sid, None)], self._hlc_tick())
        self.conn.execute("DELETE FROM _ccsync_pending WHERE tbl = ? AND sid = ?",
                          (info.name, sid))

    def _write_cells(self, info: TableInfo, rid: int, vals: dict, cols: list[str]) -> list[str]:
        """Write synced values of ``cols`` onto the local row (not captured); the
        columns written (a reference that cannot resolve here keeps the local value)."""
        values = {}
        for col in cols:
            value = self._local_value(info, col, vals[col])
            if value is not self._UNRESOLVED and value is not self._KEEP \
                    and not isinstance(value, tuple):
                values[col] = value
        if values:
            sets = ", ".join(f"{_q(c)} = ?" for c in values)
            with self._quiet():
                self.conn.execute(f"UPDATE {_q(info.name)} SET {sets} WHERE rowid = ?",
                                  [*values.values(), rid])
        return list(values)

    def _mark_referrers(self, info: TableInfo, rid: int, hlc: int) -> None:
        """Rows referring to ``rid`` send their reference again (its id changed)."""
        for spec, col in self._child_refs(info.name):
            child = self.tables().get(spec.name)
            if child is not None and col in child.columns:
                self.conn.execute(
                    f"INSERT OR REPLACE INTO _ccsync_dirty (tbl, rid, col, hlc, sid) "
                    f"SELECT ?, rowid, ?, ?, NULL FROM {_q(spec.name)} WHERE {_q(col)} = ?",
                    (spec.name, col, hlc, rid))
        for spec, col in self._child_refs(info.name, lists=True):
            child = self.tables().get(spec.name)
            if child is None or col not in child.columns:
                continue
            for r, text in self.conn.execute(f"SELECT rowid, {_q(col)} FROM {_q(spec.name)} "
                                             f"WHERE {_q(col)} IS NOT NULL").fetchall():
                if rid in (parse_id_list(text) or ([], ""))[0]:
                    self._mark_dirty(spec.name, r, {col: hlc})


class Resume(Identity):
    """What ``stamp --remove`` keeps beside the database (``<db>.ccsync-state``)
    and the next install takes back, so that edits made meanwhile are found."""

    # What a removed install leaves beside the database to resume from: all
    # of its bookkeeping, pending cells and their values as of the removal
    # included (edits made before keep their times; later ones are found).
    STATE_TABLES = BOOKKEEPING_TABLES

    def _state_path(self) -> str | None:
        return f"{self.path}.ccsync-state" if self.path else None

    @staticmethod
    def _copy_rows(source: sqlite3.Connection, dest: sqlite3.Connection, table: str) -> None:
        if not source.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                              (table,)).fetchone():
            return                      # kept by a version whose bookkeeping had no such table
        cursor = source.execute(f"SELECT * FROM {table}")
        names = ", ".join(_q(d[0]) for d in cursor.description)
        marks = ",".join("?" * len(cursor.description))
        dest.executemany(f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})", cursor)

    def _save_state(self) -> str | None:
        target = self._state_path()
        if target is None:
            return None
        temp = _new_private_file(target + ".new")
        try:
            dest = sqlite3.connect(temp)
            try:
                with dest:
                    _run_script(dest, _BOOKKEEPING_SQL)
                    dest.execute("DELETE FROM _ccsync_clock")
                    for table in self.STATE_TABLES:
                        self._copy_rows(self.conn, dest, table)
            finally:
                dest.close()
            os.replace(temp, target)
        except (OSError, sqlite3.Error) as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise StoreError(f"cannot keep the synced state beside {self.path} ({exc}); "
                             f"nothing was removed") from None
        return target

    def _restore_state(self) -> bool:
        """On a first install, take back the state a ``stamp --remove`` kept.

        Every table then counts as having had capture off: the full diff
        finds edits and deletes made meanwhile.  Runs inside the install.
        """
        source = self._state_path()
        if source is None or not os.path.exists(source):
            return False
        kept = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        self.conn.execute("SAVEPOINT ccsync_resume")
        try:
            self.conn.execute("DELETE FROM _ccsync_clock")
            for table in self.STATE_TABLES:
                self._copy_rows(kept, self.conn, table)
        except sqlite3.Error as exc:          # not a state file of ours: start afresh
            self.conn.execute("ROLLBACK TO ccsync_resume")
            _log().warning("ignoring %s: %s", source, exc)
            return False
        finally:
            self.conn.execute("RELEASE ccsync_resume")
            kept.close()
        self.conn.execute("UPDATE _ccsync_clock SET suppress = 0")
        # cc may have reused a deleted row's rowid meanwhile: deletes keep their ids only.
        self.conn.execute("UPDATE _ccsync_gone SET rid = NULL")
        self.conn.execute("DELETE FROM _ccsync_meta WHERE key LIKE 'diff:%'")
        return True


class Install(Resume):
    """Put capture in place: bookkeeping tables and their migrations, sync
    columns, capture triggers (following cc's renames), and a sync_id for
    every row."""

    def _up_to_date(self) -> bool:
        """True when bookkeeping, columns, index and triggers are all in place.

        Read-only, so a sync with nothing to do takes no write lock for it.
        """
        version = self._schema_version()    # read first: a change after it is seen next time
        if version != self._schema_seen:
            self._tables = None             # cc may have migrated: layouts read after it too
        if not self.installed() or not self.meta("device_id") \
                or self.meta("fingerprint") != self._fingerprint() \
                or self.meta("bookkeeping") != BOOKKEEPING_VERSION:
            return False
        if version == self._schema_seen:
            return True                 # no schema change by anyone since the last check
        have = {row[0]: (row[1], row[2] or "") for row in self.conn.execute(
            "SELECT name, tbl_name, sql FROM sqlite_master "
            "WHERE name LIKE '\\_ccsync\\_%' ESCAPE '\\'")}
        if any(name not in have for name in BOOKKEEPING_TABLES):
            return False
        for info in self.tables().values():
            if any(c not in info.columns for c in SYNC_COLUMNS) \
                    or f"_ccsync_sid_{info.name}" not in have:
                return False
            if any(have.get(name) != (info.name, sql) for name, sql in
                   self._triggers_for(info).items()):
                return False
        self._schema_seen = version
        return True

    def _schema_version(self) -> int:
        # SQLite counts every change to the schema (any CREATE, DROP, ALTER).
        return self.conn.execute("PRAGMA schema_version").fetchone()[0]

    def _install(self) -> None:
        """Create bookkeeping, add missing columns, (re)install triggers.

        A table whose triggers were missing gets a ``diff:`` marker: edits made
        meanwhile are found by a full diff against the shadow.  The first
        install backs the database up before changing anything.
        """
        first = not self.installed()
        if first:
            self.backup_path = self._backup()
        with self._write():
            _run_script(self.conn, _BOOKKEEPING_SQL)
            resumed = first and self._restore_state()
            self._check_device()
            self._add_sync_columns()
            self._migrate_bookkeeping()
            self._drop_stray_triggers()
            for info in self.tables().values():
                self._install_triggers(info)
        if resumed:
            with contextlib.suppress(OSError):
                os.unlink(self._state_path())

    def _backup(self) -> str | None:
        """An online backup of this database beside it (mode 600); its path."""
        path = self.path
        if not path:
            return None
        stamp = iso_utc(self.clock).replace("-", "").replace(":", "")
        target = None
        try:
            target = _new_private_file(f"{path}.ccsync-backup-{stamp}")
            dest = sqlite3.connect(target)
            try:
                self.conn.backup(dest)      # one step: a stepped copy restarts on every cc write
            finally:
                dest.close()
            os.chmod(target, 0o600)
        except (OSError, sqlite3.Error) as exc:
            if target is not None:
                with contextlib.suppress(OSError):
                    os.unlink(target)
            raise StoreError(f"cannot back up {path} before ccsync's first change "
                             f"({exc}); nothing was changed",
                             hint=f"check the free space and permissions of "
                                  f"{os.path.dirname(path) or '.'}") from None
        return target

    def _migrate_bookkeeping(self) -> None:
        # Version 2 keeps deletes in _ccsync_gone (a rowid can come back) and
        # a shadow row's rid only while the row is here.  Version 3 derives
        # every keyed row's id from its key: rows stamped otherwise (by an older
        # ccsync, or another tool) move to their key's id at the next sync.
        # Version 4 keeps the shadow in a rowid table (_rebuild_shadow).
        # Version 5 keeps a deleted row's unsent cells (_ccsync_gone.unsent).
        # Version 6 notes the rows a rejoin has pulled (_ccsync_seen).
        # Version 7 notes the rows only this device holds (_ccsync_kept).
        version = self.meta("bookkeeping")
        if version == BOOKKEEPING_VERSION:
            return
        if version in (None, "1", "2"):
            self._migrate_to_3()
        self._rebuild_shadow()
        if "unsent" not in {r[1] for r in self.conn.execute("PRAGMA table_info(_ccsync_gone)")}:
            self.conn.execute("ALTER TABLE _ccsync_gone ADD COLUMN unsent TEXT")
        self.set_meta("bookkeeping", BOOKKEEPING_VERSION)

    def _rebuild_shadow(self) -> None:
        """Move a shadow kept ``WITHOUT ROWID`` (bookkeeping 3) to a rowid table.

        Its rows then append, and a batch of rows with random ids touches only
        the small pages of the (tbl, sid) index, not a page of the synced
        state each: a first sync writes about 2.5 times fewer bytes.
        """
        row = self.conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' "
                                "AND name = '_ccsync_shadow'").fetchone()
        if row is None or "WITHOUT ROWID" not in row[0].upper():
            return
        self.conn.execute("ALTER TABLE _ccsync_shadow RENAME TO _ccsync_shadow_old")
        _run_script(self.conn, _BOOKKEEPING_SQL)
        self.conn.execute("INSERT INTO _ccsync_shadow (tbl, sid, rid, vals, clocks) "
                          "SELECT tbl, sid, rid, vals, clocks FROM _ccsync_shadow_old")
        self.conn.execute("DROP TABLE _ccsync_shadow_old")

    def _migrate_to_3(self) -> None:
        for name in RETIRED_TABLES:
            self.conn.execute(f"DROP TABLE IF EXISTS {_q(name)}")
        if any(self.conn.execute(f"SELECT 1 FROM {_q(info.name)} WHERE sync_id IS NOT NULL "
                                 f"LIMIT 1").fetchone()
               for info in self.tables().values() if "sync_id" in info.columns):
            self.set_meta("identity", "all")
        self.conn.execute("INSERT INTO _ccsync_gone (tbl, rid, sid, key, hlc) SELECT tbl, rid, "
                          "sid, NULL, hlc FROM _ccsync_dirty WHERE col = ?", (DELETED,))
        self.conn.execute("DELETE FROM _ccsync_dirty WHERE col = ?", (DELETED,))
        for info in self.tables().values():
            self.conn.executemany("UPDATE _ccsync_shadow SET rid = NULL WHERE tbl = ? AND sid = ?",
                                  [(info.name, sid) for sid, _rid in self._vanished(info)])

    def _add_sync_columns(self) -> None:
        self._tables = None
        for info in self.tables().values():
            for col in SYNC_COLUMNS:
                if col not in info.columns:
                    self.conn.execute(f"ALTER TABLE {_q(info.name)} ADD COLUMN {_q(col)} TEXT")
            self.conn.execute(f"CREATE INDEX IF NOT EXISTS {_q('_ccsync_sid_' + info.name)} "
                              f"ON {_q(info.name)} (sync_id)")
        self._tables = None

    def _capture_triggers(self) -> dict[str, str]:
        """ccsync's triggers in this database: name -> the table it sits on."""
        return dict(self.conn.execute(
            "SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger' "
            "AND name LIKE '\\_ccsync\\_%' ESCAPE '\\'").fetchall())

    def _triggers_for(self, info: TableInfo) -> dict[str, str]:
        return dict(_trigger_sql_of(info.name, info.tracked, info.key_columns, info.local))

    def _drop_stray_triggers(self) -> None:
        # A renamed table takes its triggers along (ALTER TABLE t RENAME TO
        # t_old): trigger names are global, so drop every capture trigger that
        # no longer sits on the synced table it was made for.
        for name, table in self._capture_triggers().items():
            if name[len("_ccsync_ins_"):] != table or table not in self.tables():
                self.conn.execute(f"DROP TRIGGER IF EXISTS {_q(name)}")

    def _install_triggers(self, info: TableInfo) -> None:
        table = info.name
        wanted = self._triggers_for(info)
        have = dict(self.conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ? "
            "AND name LIKE '\\_ccsync\\_%' ESCAPE '\\'", (table,)).fetchall())
        if have == wanted:
            return
        missing = any(name not in have for name in wanted)
        layout = json.loads(self.meta(f"layout:{table}") or "[]")
        if not missing:                # triggers survive RENAME COLUMN, not a rebuild
            self._follow_renames(info, layout)
        for name in have:
            self.conn.execute(f"DROP TRIGGER IF EXISTS {_q(name)}")
        for sql in wanted.values():
            self.conn.execute(sql)
        known = {name for _cid, name in layout}
        added = [c for c in info.tracked if c not in known] if layout else []
        if self.meta(f"installed:{table}") is None:
            mode = "first"     # existing rows predate any edit we could time (clock 0)
        elif missing or not layout:
            # Capture was off: every difference is an edit, except in columns
            # cc added meanwhile (filled from the synced state first).
            mode = json.dumps({"all": True, "added": added})
        else:                  # columns cc added since: their edits were not captured
            mode = json.dumps(added) if added else None
        self.set_meta(f"installed:{table}", "1")
        self.set_meta(f"layout:{table}", json.dumps(info.layout))
        if mode is not None and self.meta(f"diff:{table}") != "first":
            self.set_meta(f"diff:{table}", mode)

    def _follow_renames(self, info: TableInfo, layout: list) -> None:
        """Carry pending cells and synced state over ``RENAME COLUMN``.

        SQLite rewrites a trigger's column references on a rename, but not the
        column name it records as a string, so cells edited since the rename
        sit under the old name.  A column at the same position with a new name,
        whose old name is gone, is a rename.
        """
        before, now = dict(layout), dict(info.layout)
        renames = {before[cid]: name for cid, name in now.items()
                   if cid in before and before[cid] != name and before[cid] not in now.values()
                   and name not in before.values()}
        for old, new in renames.items():
            self.conn.execute("UPDATE _ccsync_dirty SET col = ? WHERE tbl = ? AND col = ?",
                              (new, info.name, old))
            path = '$."' + old + '"'
            rows = self.conn.execute(
                "SELECT sid, rid, vals, clocks FROM _ccsync_shadow WHERE tbl = ? AND "
                "(json_type(vals, ?) IS NOT NULL OR json_type(clocks, ?) IS NOT NULL)",
                (info.name, path, path)).fetchall()
            for sid, rid, vals, clocks in rows:
                vals, clocks = json.loads(vals), json.loads(clocks)
                for part in (vals, clocks):
                    if old in part:
                        part[new] = part.pop(old)
                self._put_shadow(info.name, sid, rid, vals, clocks)

    def stamp_rows(self, progress: Progress | None = None) -> int:
        """Give every row without a sync_id one: a uuid5 of its natural key.

        A row whose natural key is empty gets a uuid5 of its content, so a
        database copied onto another machine stamps the same ids there; an id
        already taken falls back to a random one.  Parents are stamped before
        children, whose natural keys name them.  ``progress`` hears the rows
        stamped so far (counted only once there is one to stamp).
        """
        leg = None
        for info in self.tables().values():
            while self.conn.execute(f"SELECT 1 FROM {_q(info.name)} WHERE sync_id IS NULL "
                                    f"LIMIT 1").fetchone():
                if leg is None:
                    leg = Leg(progress, "stamp", sum(self.conn.execute(
                        f"SELECT count(*) FROM {_q(t)} WHERE sync_id IS NULL").fetchone()[0]
                        for t in self.tables()) if progress else None)
                with self._write():
                    rows = self.conn.execute(
                        f"SELECT rowid AS _rid, * FROM {_q(info.name)} WHERE sync_id IS NULL "
                        f"LIMIT {STAMP_CHUNK}").fetchall()
                    stamped = self._stamp(info, rows, self._wire_rows(info, rows))
                    known = self._known_sids(info.name, [sid for sid, _rid in stamped])
                    for sid, rid in stamped:
                        if sid in known:
                            self._relink_if_back(info.name, sid, rid)
                leg.add(len(rows))
        return leg.done if leg is not None else 0

    def _stamp(self, info: TableInfo, rows: list, values: list[dict]) -> list[tuple[str, int]]:
        """Give rows their sync_ids (see stamp_rows); returns (sync_id, rowid) pairs."""
        key_sids = [self._key_sid(info, row, vals) for row, vals in zip(rows, values)]
        wanted = [key_sid or natural_id(info.name + "#content",
                                        [[c, vals[c]] for c in info.tracked])
                  for key_sid, vals in zip(key_sids, values)]
        # A natural id that no row here holds is used, even if a deleted row had
        # it: re-creating 17.0 brings that row back.  One held by a live row
        # (two rows with one key, where cc allows it) cannot be: a random id.
        taken = set(self._rids_for_sids(info.name, wanted))
        stamped = []
        for row, want in zip(rows, wanted):
            sid = want if want is not None and want not in taken else str(new_uuid())
            taken.add(sid)
            stamped.append((sid, row["_rid"]))
        self.conn.executemany(f"UPDATE {_q(info.name)} SET sync_id = ? WHERE rowid = ?",
                              stamped)
        # A key whose id is taken, maybe by a row renamed away meanwhile:
        # identity looks at that row again after the diff.
        self.conn.executemany(
            "INSERT OR IGNORE INTO _ccsync_dirty (tbl, rid, col, hlc) VALUES (?, ?, ?, 0)",
            [(info.name, rid, info.spec.key[0]) for (sid, rid), key_sid in zip(stamped, key_sids)
             if key_sid is not None and sid != key_sid])
        return stamped

    def _known_sids(self, table: str, sids: list[str]) -> set[str]:
        """Of ``sids``, those synced or deleted here before (a row may be back)."""
        known: set[str] = set()
        for chunk in _chunks(sids, 400):
            marks = ",".join("?" * len(chunk))
            known.update(sid for (sid,) in self.conn.execute(
                f"SELECT sid FROM _ccsync_shadow WHERE tbl = ? AND sid IN ({marks}) UNION "
                f"SELECT sid FROM _ccsync_gone WHERE tbl = ? AND sid IN ({marks})",
                (table, *chunk, table, *chunk)))
        return known

    def _vanished(self, info: TableInfo) -> list[tuple]:
        """Synced rows that left the table with no delete recorded: (sid, rid)."""
        query = (f"SELECT s.sid, s.rid FROM _ccsync_shadow s WHERE s.tbl = ? AND s.rid IS NOT "
                 f"NULL AND NOT EXISTS (SELECT 1 FROM {_q(info.name)} t WHERE t.sync_id = s.sid) "
                 f"AND NOT EXISTS (SELECT 1 FROM _ccsync_gone g WHERE g.tbl = s.tbl "
                 f"AND g.sid = s.sid)")
        return [tuple(r) for r in self.conn.execute(query, (info.name,)).fetchall()]


class Capture(Install):
    """A sync's capture (:meth:`prepare`): find what changed while capture was
    off, and take capture out again (:meth:`remove`)."""

    def prepare(self, progress: Progress | None = None) -> int:
        """Install capture (idempotent), diff what happened without it, stamp rows.

        Returns how many rows were given a sync_id.  Safe to run at every sync.
        The first time it changes this database it keeps a backup of it first
        (``backup_path``).  ``progress`` hears the rows stamped and scanned
        (legs "stamp" and "scan": a first sync spends seconds on each).
        """
        self._device_id = None
        self.backup_path = None
        if not self._up_to_date():
            self._install()
            self._up_to_date()          # notes the schema it left
        self._settle_identity()
        stamped = self.stamp_rows(progress)
        # A diff marker survives a crash, so an interrupted diff runs again.
        due = [key[5:] for (key,) in self.conn.execute(
            "SELECT key FROM _ccsync_meta WHERE key LIKE 'diff:%'").fetchall()
            if key[5:] in self.tables()]
        scan = Leg(progress if due else None, "scan", sum(self.conn.execute(
            f"SELECT count(*) FROM {_q(t)}").fetchone()[0] for t in due) if progress else None)
        for table in due:
            self._full_diff(table, scan)
        self._find_vanished()
        self._name_gone_rows()
        self._keep_deleted_edits()
        self._settle_identity()       # keys changed while capture was off
        return stamped

    def _full_diff(self, table: str, scan: Leg) -> None:
        """Record as dirty what changed while capture triggers were missing
        (``scan`` counts the rows read).

        Edits found here are timed when they are found (clock 0 on the first
        install: rows that predate ccsync).
        """
        mode = self.meta(f"diff:{table}")
        if mode is None:
            return
        info = self.tables()[table]
        parsed = None if mode in ("first", "all", "again") else json.loads(mode)  # again: v1
        only = parsed if isinstance(parsed, list) else None
        added = parsed.get("added", []) if isinstance(parsed, dict) else (only or [])
        with self._write():
            hlc = 0 if mode == "first" else self._hlc_tick()
            if added:     # rows inserted before cc added these columns never wrote them
                self._expand_inserted(table, [c for c in info.tracked if c not in added])
        if added:             # also rows cc created again here: their cells outlive a delete
            self._back_fill(info, added)
        # A page of rows at a time, so memory stays flat in the table's size.
        for rows in self._row_pages(table):
            dirty, later = self._diff_page(info, rows, hlc, only, added)
            self._sliced(dirty, lambda cell: self.conn.execute(
                "INSERT OR IGNORE INTO _ccsync_dirty (tbl, rid, col, hlc) VALUES (?, ?, ?, ?)",
                cell))
            self._sliced(later, lambda cell: self.conn.execute(
                "INSERT INTO _ccsync_dirty (tbl, rid, col, hlc) VALUES (?, ?, ?, ?) ON CONFLICT "
                "(tbl, rid, col) DO UPDATE SET hlc = max(hlc, excluded.hlc)", cell))
            scan.add(len(rows))
        gone = [] if only is not None else self._vanished(info)
        with self._write():
            self._record_gone(info, gone, hlc)
            self.conn.execute("DELETE FROM _ccsync_base WHERE tbl = ?", (table,))
            self.set_meta(f"diff:{table}", None)

    def _row_pages(self, table: str) -> Iterator[list[sqlite3.Row]]:
        """Every row of ``table`` (with ``_rid``), in pages.

        In sync_id order, which cc never changes: cc may write between two
        pages, and a row it moved to another rowid (``UPDATE ... SET id``)
        is then neither missed nor read twice.  Rows with no sync_id yet
        come last (cc inserted them since the stamp: capture saw them).
        """
        yield from self._pages(
            f"SELECT rowid AS _rid, * FROM {_q(table)} WHERE (sync_id, rowid) > (?, ?) "
            f"ORDER BY sync_id, rowid LIMIT ?", ("", -(2 ** 63)),
            lambda row: (row["sync_id"], row["_rid"]))
        yield from self._pages(
            f"SELECT rowid AS _rid, * FROM {_q(table)} WHERE sync_id IS NULL AND rowid > ? "
            f"ORDER BY rowid LIMIT ?", (-(2 ** 63),), lambda row: (row["_rid"],))

    def _diff_page(self, info: TableInfo, rows: list[sqlite3.Row], hlc: int,
                   only: list | None, added: list) -> tuple[list[tuple], list[tuple]]:
        """The cells a diff finds in one page of rows: (new or edited since
        synced, edited again since capture went off and timed now)."""
        table = info.name
        sids = [r["sync_id"] for r in rows]
        shadow = {sid: vals for sid, (rid, vals, _c) in self._shadows(table, sids).items()
                  if rid is not None}
        deleted = {sid for (sid,) in self._select_in(
            "SELECT DISTINCT sid FROM _ccsync_gone WHERE tbl = ? AND sid IN ({marks})",
            (s for s in sids if s is not None), table)}
        base = {rid: json.loads(vals) for rid, vals in self._select_in(
            "SELECT rid, vals FROM _ccsync_base WHERE tbl = ? AND rid IN ({marks})",
            (r["_rid"] for r in rows), table)}
        dirty: list[tuple] = []
        later: list[tuple] = []
        for row, values in zip(rows, self._wire_rows(info, rows)):
            if row["_rid"] in base:
                kept = base[row["_rid"]]
                ids = kept.get("~ids", {})
                # A reference cc left at the same row is no edit, though it may
                # read otherwise now (a parent not stamped yet when it was kept).
                later += [(table, row["_rid"], c, hlc)
                          for c in self._found_cells(info, row, values, kept, only, added)
                          if not (c in ids and encode_value(row[c]) == ids[c])]
                # Its edits up to then were captured and keep their times (an
                # insert too, though no shadow holds the row yet): the kept
                # values, not the synced ones, are what this diff starts from.
                continue
            # Deleted here, then created again: a new row.
            old = None if row["sync_id"] in deleted else shadow.get(row["sync_id"])
            dirty += [(table, row["_rid"], c, hlc)
                      for c in self._found_cells(info, row, values, old, only, added)]
        return dirty, later

    def _found_cells(self, info: TableInfo, row: Any, values: dict, old: dict | None,
                     only: list | None, added: list) -> list[str]:
        """The cells a diff finds edited in one row (``old``: its synced values,
        None for a new row; ``only``: just these columns, cc added them)."""
        if old is None:           # a new row: what is in columns cc added was written
            if only is not None:  # after them (its insert was captured already)
                return [c for c in only if values.get(c) is not None]
            if added:
                return [c for c in info.tracked if c not in added or values.get(c) is not None]
            return [INSERTED]
        return [c for c in info.tracked if (only is None or c in only)
                and values.get(c) != old.get(c)
                and not (values.get(c) is None and self._lost_parent(info, c, row, old))
                and not self._lost_list_ids(info, c, values.get(c), old.get(c))]

    def _lost_list_ids(self, info: TableInfo, col: str, value: Any, synced: Any) -> bool:
        """True when an id list differs from its synced value only by ids of
        rows not here that were not deleted here (a delete merged from
        elsewhere leaves cc's list without them, or naming a rowid that is
        gone): not an edit.  A row deleted here may come back (its delete
        can lose), and the list cc wrote without it is an edit like any."""
        parent = info.spec.list_refs.get(col)
        if parent is None or not (isinstance(value, dict) and isinstance(synced, dict)
                                  and isinstance(synced.get("ids"), list)):
            return False
        here = self._rids_for_sids(parent, synced["ids"])
        went = self._deleted_here(parent, [s for s in synced["ids"] if s not in here])
        return value.get("fmt") == synced.get("fmt") and \
            value.get("ids") == [s for s in synced["ids"] if s in here or s in went]

    def _deleted_here(self, table: str, sids: list[Any]) -> set[str]:
        """Those of ``sids`` (rows not here) deleted on this device: the synced
        state still has them here (a delete merged from elsewhere clears
        that), whether their delete was captured or a diff finds it."""
        sids = [s for s in sids if isinstance(s, str)]
        if not sids:
            return set()
        return {sid for (sid,) in self._select_in(
            "SELECT sid FROM _ccsync_shadow WHERE tbl = ? AND rid IS NOT NULL AND sid IN "
            "({marks})", sids, table)}

    def _lost_parent(self, info: TableInfo, col: str, row: Any, synced: dict) -> bool:
        """True when a reference that reads NULL does so only because its parent is not here
        (cc's version.delete leaves the old id; a delete from elsewhere read as
        NULL): not an edit of this row."""
        parent = info.spec.refs.get(col)
        if parent is None or synced.get(col) is None:
            return False
        if row[col] is not None or self._rid_for_sid(parent, synced[col]) is None:
            return True
        # Emptied by ccsync when the parent went, and waiting to be re-linked
        # now that it is back (the re-link runs after the next pull).
        return self.conn.execute("SELECT 1 FROM _ccsync_pending WHERE tbl = ? AND sid = ?",
                                 (info.name, row["sync_id"])).fetchone() is not None

    def _back_fill(self, info: TableInfo, columns: list[str]) -> None:
        """Fill columns cc just added from the synced state kept for them.

        Values other devices sent for a column this database lacked were kept
        in the shadow (also of rows not here now).  Only cells still empty are
        filled: a value cc wrote there already is an edit (found by the diff
        that follows).
        """
        for page in self._pages("SELECT sid, vals FROM _ccsync_shadow WHERE tbl = ? AND sid > ? "
                                "ORDER BY sid LIMIT ?", ("",), lambda row: (row[0],), info.name):
            cells = []
            for sid, vals in page:
                vals = json.loads(vals)
                for col in columns:
                    if vals.get(col) is None:
                        continue
                    value = self._local_value(info, col, vals[col])
                    if value is not self._UNRESOLVED and value is not self._KEEP \
                            and not isinstance(value, tuple):
                        cells.append((col, value, sid))
            self._sliced(cells, lambda cell: self.conn.execute(
                f"UPDATE {_q(info.name)} SET {_q(cell[0])} = ? WHERE sync_id = ? "
                f"AND {_q(cell[0])} IS NULL", (cell[1], cell[2])), quiet=True)

    def _find_vanished(self) -> None:
        """Record as deleted the synced rows that REPLACE removed unseen.

        ``INSERT OR REPLACE``, ``UPDATE OR REPLACE`` and ``REPLACE INTO`` delete
        the rows they conflict with without firing delete triggers (unless the
        writer turned on recursive_triggers).  Such a statement always fires an
        insert or update trigger, so only tables with pending cells are
        scanned; the delete is timed when it is found.
        """
        for info in self.tables().values():
            if self.conn.execute("SELECT 1 FROM _ccsync_dirty WHERE tbl = ? LIMIT 1",
                                 (info.name,)).fetchone() is None:
                continue
            gone = self._vanished(info)
            if gone:
                with self._write():
                    self._record_gone(info, gone, self._hlc_tick())

    @staticmethod
    def _gone_key(info: TableInfo, key: str | None) -> dict[str, Any]:
        """The natural key a delete trigger kept, by column (empty if unusable)."""
        try:
            values = json.loads(key) if key else None
        except ValueError:
            values = None
        cols = info.key_columns
        return dict(zip(cols, values)) if isinstance(values, list) and \
            len(values) == len(cols) else {}

    def _name_gone_rows(self) -> None:
        """Give deletes of rows that were never stamped their natural sync_id.

        A row inserted and deleted between two syncs still deletes the same row
        on other devices (one natural key is one row).  Parents come first, so a
        child's key can name a parent deleted in the same cascade.
        """
        for info in self.tables().values():
            rows = self.conn.execute("SELECT rowid, key FROM _ccsync_gone WHERE tbl = ? "
                                     "AND sid IS NULL", (info.name,)).fetchall()
            if not rows:
                continue
            named = [(self._natural_gone_sid(info, key), gid) for gid, key in rows]
            with self._write():
                self.conn.executemany("UPDATE _ccsync_gone SET sid = ? WHERE rowid = ?",
                                      [(sid, gid) for sid, gid in named if sid is not None])
                self.conn.executemany("DELETE FROM _ccsync_gone WHERE rowid = ?",
                                      [(gid,) for sid, gid in named if sid is None])

    def _keep_deleted_edits(self) -> None:
        """Edits made here to a synced row that a later delete made here removed
        before they were sent (the delete trigger kept them, ``unsent``).

        They still are the latest edits of their columns, and the row comes
        back if a live row needs it: as with a delete from elsewhere
        (``_keep_lost_edits``), they go into the synced state and out (outbox).
        """
        tables = self.tables()
        rows = [row for row in self.conn.execute(
            "SELECT tbl, rowid, rid, sid, unsent FROM _ccsync_gone WHERE unsent IS NOT NULL")
            if row[0] in tables]
        if rows:
            skip = self._row_skipper()
            self._sliced(rows, lambda gone: self._keep_deleted_edit(tables[gone[0]], *gone[1:],
                                                                    skip=skip))

    def _keep_deleted_edit(self, info: TableInfo, gid: int, rid: int | None, sid: str | None,
                           unsent: str, *, skip: Callable[[TableInfo, Any], bool]) -> None:
        self.conn.execute("UPDATE _ccsync_gone SET unsent = NULL WHERE rowid = ?", (gid,))
        shadow = self._shadow(info.name, sid) if sid is not None else None
        if shadow is None or self._rid_for_sid(info.name, sid) is not None:
            return                    # never synced, or back here (it sends itself)
        kept = json.loads(unsent)
        row = defaultdict(lambda: None, kept["v"], _rid=rid)
        for col in filter(None, kept["b"]):
            row[col] = bytes.fromhex(row[col])
        if skip(info, row):
            return
        # Not its key: a rename the delete overtook never moved the row (the
        # row that had the id is gone), so the key it was given names nothing.
        cells = {c: clock for c, clock in expand_inserted(
            {c: [hlc, self.device_id] for c, hlc in kept["c"].items()
             if c in info.tracked or c == INSERTED}, info.tracked).items()
            if c not in info.spec.key}
        was, vals, clocks = shadow
        self._keep_unsent(info, sid, was, row, vals, clocks, cells)

    def _natural_gone_sid(self, info: TableInfo, key: str | None) -> str | None:
        values = self._gone_key(info, key)
        if not values or (info.name == "setting" and not self._setting_syncs(values.get("name"))):
            return None
        wire = []
        for col in info.key_columns:
            value = values[col]
            if col in info.spec.refs and value is not None:
                value = self._sid_at(info.spec.refs[col], value)
                if value is None:
                    return None
            wire.append(encode_value(value))
        return natural_id(info.name, wire)

    def _sid_at(self, table: str, rid: Any) -> str | None:
        """The sync_id of the row at ``rid`` here, or of the one deleted there last."""
        if table not in self.tables():
            return None
        row = self.conn.execute(f"SELECT sync_id FROM {_q(table)} WHERE rowid = ?",
                                (rid,)).fetchone()
        if row is not None and row[0]:
            return row[0]
        row = self.conn.execute("SELECT sid FROM _ccsync_gone WHERE tbl = ? AND rid = ? "
                                "AND sid IS NOT NULL ORDER BY rowid DESC LIMIT 1",
                                (table, rid)).fetchone()
        return row[0] if row else None

    def remove(self) -> str | None:
        """Take out everything ccsync added except cc's sync_id/synced_at columns.

        The synced state is kept beside the database (``<db>.ccsync-state``,
        mode 600; returns its path), so that a later ``stamp`` finds what cc
        changed meanwhile (timed when found) instead of starting over.
        """
        kept = None
        if self.installed():
            with self._write():
                self._keep_base()
            try:
                kept = self._save_state()
            except CcsyncError:
                with self._write():
                    self.conn.execute("DELETE FROM _ccsync_base")
                raise
        with self._write():
            for name, kind in self.conn.execute(
                    "SELECT name, type FROM sqlite_master WHERE type IN ('trigger', 'index') "
                    "AND name LIKE '\\_ccsync\\_%' ESCAPE '\\'").fetchall():
                self.conn.execute(f"DROP {kind.upper()} IF EXISTS {_q(name)}")
            for name in BOOKKEEPING_TABLES + RETIRED_TABLES:
                self.conn.execute(f"DROP TABLE IF EXISTS {_q(name)}")
        self._tables = None
        return kept

    def _keep_base(self) -> None:
        """Keep the values of rows with edits not yet sent, as capture goes off.

        References are kept by sync_id, and also as cc's ids here (``~ids``): a
        parent cc added since the last sync has no sync_id yet, so its
        reference reads empty now and names it only once it is stamped.

        Only tables whose capture is on: one whose triggers are gone already
        kept its values when they went, and may hold edits no trigger saw
        since (a second ``remove_triggers``, or ``remove`` after one)."""
        capturing = set(self._capture_triggers().values())
        for info in self.tables().values():
            if info.name not in capturing:
                continue
            refs = [c for c in (*info.spec.refs, *info.spec.list_refs) if c in info.columns]
            rids = [r for (r,) in self.conn.execute(
                "SELECT DISTINCT rid FROM _ccsync_dirty WHERE tbl = ?", (info.name,))]
            rows = list(self._by_rowid(info.name, "*", rids))
            self.conn.executemany(
                "INSERT OR REPLACE INTO _ccsync_base (tbl, rid, vals) VALUES (?, ?, ?)",
                [(info.name, row["_rid"], compact_json(
                    {**values, "~ids": {c: encode_value(row[c]) for c in refs}}))
                 for row, values in zip(rows, self._wire_rows(info, rows))])

    def remove_triggers(self) -> int:
        """Drop only the capture triggers (before ``ALTER TABLE ... DROP COLUMN``).

        The next :meth:`prepare` (``stamp`` or a sync) puts them back and
        records what changed meanwhile, timed when it is found.  Rows with
        edits not yet sent keep their values as of now (``_ccsync_base``), so
        those edits keep their times and only later ones are timed when found.
        Returns how many triggers were dropped.
        """
        with self._write():
            if self.installed():
                self._keep_base()
            names = list(self._capture_triggers())
            for name in names:
                self.conn.execute(f"DROP TRIGGER IF EXISTS {_q(name)}")
        return len(names)


class RowWriter(Capture):
    """Make a table row match its synced state: insert, update or delete it,
    keep a deleted row that a live row needs, resolve and re-link references,
    and retry rows that wait for a parent."""

    def _materialize(self, info: TableInfo, sid: str, cols: list[str] | None,
                     keep: bool = False, rowid: int | None = None,
                     was: int | None = None) -> int | None:
        """Make the table row match the shadow for ``cols`` (all, if None); its rowid.

        Deletes it if a tombstone is the latest edit -- unless a live row needs
        it as its parent (or ``keep``): then it stays, so every device keeps
        the same rows.  Inserts it if new here, and parks unresolved references
        in ``_ccsync_pending`` for later.
        """
        old_rid, vals, clocks = self._shadow(info.name, sid)
        rid = self._rid_for_sid(info.name, sid)
        local_cells = self._dirty_cells(info.name, rid, sid)
        deleted = is_deleted({c: latest(clocks.get(c), local_cells.get(c))
                              for c in {*clocks, *local_cells}})
        if not stays(deleted, keep or self._needed_by_children(info.name, rid)):
            if rid is not None:
                self._keep_lost_edits(info, sid, rid, vals, clocks, local_cells)
                self._remove_here(info, rid, sid)
                self.conn.execute("UPDATE _ccsync_shadow SET rid = NULL WHERE tbl = ? "
                                  "AND sid = ?", (info.name, sid))
            self.conn.execute("DELETE FROM _ccsync_pending WHERE tbl = ? AND sid = ?",
                              (info.name, sid))
            return None
        # Only a write of every reference settles a row waiting for a parent
        # (a later edit of one column must not drop a queued re-link).
        refs = {c for c in (*info.spec.refs, *info.spec.list_refs) if c in info.columns}
        settles = rid is None or cols is None or refs - set(local_cells) <= set(cols)
        if rid is None:
            cols = [c for c in info.tracked if c in vals]
        elif cols is None:
            cols = [c for c in info.tracked if c in vals and c not in local_cells]
        else:
            cols = [c for c in cols if c in vals and c in info.tracked]
        values, unresolved = {}, False
        for col in cols:
            value = self._incoming_value(info, col, vals[col])
            if isinstance(value, tuple) and value and value[0] is self._UNRESOLVED:
                unresolved, value = True, value[1]
            if value is self._UNRESOLVED:
                unresolved = True
                if col in info.required and rid is None:
                    self._mark_pending(info.name, sid)
                    return None       # a row needing its parent waits for it
                value = None
            if value is not self._KEEP:
                values[col] = value
        twin = self._key_twin(info, rid, values)
        if twin is not None:          # this write would give the row another's key
            if self._meet(info, sid, rid, *twin) == sid:
                return self._materialize(info, sid, None)
            return twin[0]
        if rid is None:
            rid = self._insert_row(info, sid, vals, values, rowid)
            if old_rid is not None or was is not None or TOMBSTONE in clocks:
                self._relink_if_back(info.name, sid, rid, was)
            self._put_shadow(info.name, sid, rid, vals, clocks)
        elif values:
            sets = ", ".join(f"{_q(c)} = ?" for c in values)
            self.conn.execute(f"UPDATE {_q(info.name)} SET {sets}, synced_at = ? WHERE rowid = ?",
                              [*values.values(), iso_utc(self.clock), rid])
        if unresolved:
            self._mark_pending(info.name, sid)
        elif deleted:                 # kept for its children: re-checked after each pull
            self._mark_pending(info.name, sid, "keep")
        elif settles:
            self.conn.execute("DELETE FROM _ccsync_pending WHERE tbl = ? AND sid = ?",
                              (info.name, sid))
        return rid

    def _keep_lost_edits(self, info: TableInfo, sid: str, rid: int, vals: dict, clocks: dict,
                         local_cells: dict) -> None:
        """Edits made here to a row a later delete removes before they were sent.

        They still are the latest edits of their columns, and the row comes
        back if a live row needs it: they go into the synced state and out
        (``_ccsync_outbox``), as if they had been sent before the delete came.
        """
        cells = {c: stamp for c, stamp in local_cells.items() if c in info.tracked}
        if cells:
            self._keep_unsent(info, sid, rid, self._row_at(info, rid), vals, clocks, cells)

    def _remove_here(self, info: TableInfo, rid: int, sid: str) -> None:
        """Delete a table row that the synced state says is gone, with its
        pending cells; references to it read NULL (see _null_references_to)."""
        self._null_references_to(info.name, rid, sid)
        self.conn.execute(f"DELETE FROM {_q(info.name)} WHERE rowid = ?", (rid,))
        self.conn.execute("DELETE FROM _ccsync_dirty WHERE tbl = ? AND rid = ?", (info.name, rid))

    def _needed_by_children(self, table: str, rid: int | None) -> bool:
        """True when a live row holds ``rid`` in a required (e.g. NOT NULL) reference."""
        if rid is None:
            return False
        for spec, col in self._child_refs(table):
            child = self.tables().get(spec.name)
            if child is not None and col in child.required and self.conn.execute(
                    f"SELECT 1 FROM {_q(spec.name)} WHERE {_q(col)} = ? LIMIT 1",
                    (rid,)).fetchone():
                return True
        return False

    def _null_references_to(self, table: str, rid: int, sid: str) -> None:
        # A nullable reference to a deleted row reads as NULL on every device.
        # An edit of it here not yet sent still names that row (``sid``): it
        # goes out so (_named_refs), and re-links if the row comes back.
        for spec, col in self._child_refs(table):
            child = self.tables().get(spec.name)
            if child is None or col not in child.columns or col in child.required:
                continue
            for (child_rid,) in self.conn.execute(f"SELECT rowid FROM {_q(spec.name)} "
                                                  f"WHERE {_q(col)} = ?", (rid,)).fetchall():
                self._expand_inserted(spec.name, child.tracked, child_rid)
            self.conn.execute(
                f"INSERT OR REPLACE INTO _ccsync_named (tbl, rid, col, sid, hlc) "
                f"SELECT d.tbl, d.rid, d.col, ?, d.hlc FROM _ccsync_dirty d "
                f"JOIN {_q(spec.name)} t ON t.rowid = d.rid "
                f"WHERE d.tbl = ? AND d.col = ? AND t.{_q(col)} = ?",
                (sid, spec.name, col, rid))
            self.conn.execute(f"UPDATE {_q(spec.name)} SET {_q(col)} = NULL "
                              f"WHERE {_q(col)} = ?", (rid,))

    def _after_local_delete(self, table: str, sid: str, rid: int | None) -> None:
        """A delete made here has settled (sent, or beaten by a later one from
        elsewhere): the rules other devices apply to it apply here too.  A row
        live rows still need comes back (same rowid); nullable references to
        it read NULL."""
        if rid is None or self._rid_for_sid(table, sid) is not None:
            return
        if self._needed_by_children(table, rid):
            self._materialize(self.tables()[table], sid, None, keep=True, rowid=rid)
        else:
            self._null_references_to(table, rid, sid)

    def _incoming_value(self, info: TableInfo, col: str, value: Any) -> Any:
        """:meth:`_local_value`, bringing back a deleted row that a required
        reference names (so no live row loses its parent)."""
        local = self._local_value(info, col, value)
        parent = info.spec.refs.get(col)
        if local is self._UNRESOLVED and parent and missing_parent(
                col in info.required, self._is_dead(parent, value)) == "revive":
            return self._revive(parent, value) or self._UNRESOLVED
        return local

    def _revive(self, table: str, sid: str) -> int | None:
        """Bring back a deleted row that a live row needs as its parent."""
        info = self.tables().get(table)
        if info is None or self._shadow(table, sid) is None:
            return None
        return self._materialize(info, sid, None, keep=True)

    def _new_row(self, info: TableInfo, sid: str, vals: dict, values: dict,
                 rowid: int | None = None) -> dict:
        """The columns an insert of a row new here writes: its synced values,
        its local columns' starting points, and a filler for NOT NULL gaps."""
        row = dict(values)
        if rowid is not None and info.pk:
            row[info.pk] = rowid
        for col in info.local:
            if vals.get(col) is not None:
                row[col] = decode_value(vals[col])
        for col in info.notnull:
            if col != info.pk and row.get(col) is None:
                numeric = any(t in info.types.get(col, "") for t in ("INT", "REAL", "BOOL", "NUM"))
                row[col] = 0 if numeric else ""
        row["sync_id"], row["synced_at"] = sid, iso_utc(self.clock)
        return row

    def _insert_row(self, info: TableInfo, sid: str, vals: dict, values: dict,
                    rowid: int | None = None) -> int:
        row = self._new_row(info, sid, vals, values, rowid)
        try:
            with transaction(self.conn):
                return self._insert(info.name, row)
        except sqlite3.IntegrityError:
            hinted = [c for c in info.local if vals.get(c) is not None]
            if not hinted:
                raise
        # Another device's path collides with a UNIQUE path here: the hint was
        # only a starting point, so mark it for `resolve` instead.
        for col in hinted:
            row[col] = f"{row[col]} (from another device, {sid[:8]})" \
                if col in info.notnull else None
        return self._insert(info.name, row)

    def _insert(self, table: str, row: dict) -> int:
        return self.conn.execute(_insert_sql(table, row), list(row.values())).lastrowid

    def resolve_pending(self) -> int:
        """Retry rows whose references waited for a parent; returns how many remain.

        Run once after the last page of a pull (retrying after every page
        would cost pages x pending rows), in lock slices.
        """
        if not self.installed():
            return 0
        pending = self.conn.execute("SELECT tbl, sid, kind FROM _ccsync_pending").fetchall()
        # Waiting rows parents first (a child needs its parent written); deleted
        # rows kept for their children children first (a parent can go once
        # the kept child that needed it went).
        pending.sort(key=lambda r: (r[2] == "keep", (-1 if r[2] == "keep" else 1)
                                    * TABLE_ORDER.get(r[0], len(SPEC))))
        self._sliced(pending, lambda row: self._retry_pending(row[0], row[1]), quiet=True)
        return self.pending_references()

    def _retry_pending(self, table: str, sid: str) -> None:
        info = self.tables().get(table)
        if info is None or self._shadow(table, sid) is None:
            self.conn.execute("DELETE FROM _ccsync_pending WHERE tbl = ? AND sid = ?",
                              (table, sid))
            return
        refs = [c for c in (*info.spec.refs, *info.spec.list_refs) if c in info.columns]
        try:
            with transaction(self.conn):
                rid = self._rid_for_sid(table, sid)
                self._materialize(info, sid, None if rid is None else
                                  [c for c in refs if c not in self._dirty_cells(table, rid)])
        except Exception as exc:               # noqa: BLE001 -- stays pending, retried later
            if environment_error(exc):
                raise
            _log().info("row %s/%s still cannot be written here: %s", table, sid, exc)

    def pending_references(self) -> int:
        """How many rows still wait for a parent that has not arrived."""
        if not self.installed():
            return 0
        return self.conn.execute("SELECT count(*) FROM _ccsync_pending WHERE kind = 'ref'"
                                 ).fetchone()[0]


class Incoming(RowWriter):
    """Merge pulled records: per column the later edit wins (merge rules), a
    record that cannot apply is refused on its own and kept for later."""

    def apply_page(self, records: list, cursor: int | None) -> ApplyResult:
        """Merge one page of incoming records, then advance the cursor.

        The page is written in lock slices (see WriteGate) and the cursor
        moves in the last one, so a crash re-pulls the page and merges it
        again (merging is idempotent).  A record that cannot apply is refused
        on its own, counted by reason and kept in ``_ccsync_held`` for a later
        version; records for a table this device lacks are kept aside there.
        Neither stops the page.  Errors of the environment (busy, disk full,
        I/O) roll back the slice and raise: the page is retried later.
        """
        result = ApplyResult(received=len(records))
        if not records and (cursor is None or cursor == self.cursor):
            return result             # nothing new: no write lock for nothing
        # Reading the records is pure work: it happens before the write lock
        # is taken, so it costs cc nothing and fills the lock policy's gaps.
        ranked = sorted(((_table_rank(raw), self._arrive(raw)) for raw in records),
                        key=lambda pair: pair[0])
        chunks = [chunk for _rank, group in itertools.groupby(ranked, key=lambda pair: pair[0])
                  for chunk in _chunks([arrival for _r, arrival in group], self.FRESH_CHUNK)]
        rejoining = self.rejoining()
        kept = self.conn.execute("SELECT 1 FROM _ccsync_kept LIMIT 1").fetchone() is not None
        seen = [(raw["t"], raw["id"]) for raw in records if isinstance(raw, dict)
                and isinstance(raw.get("t"), str) and isinstance(raw.get("id"), str)] \
            if rejoining or kept else []

        def last() -> None:
            if rejoining:
                self.conn.executemany("INSERT OR IGNORE INTO _ccsync_seen (tbl, sid) "
                                      "VALUES (?, ?)", seen)
            if kept:                    # the store has them now: the usual rules again
                self.conn.executemany("DELETE FROM _ccsync_kept WHERE tbl = ? AND sid = ?", seen)
            if cursor is not None:
                self._set_cursor(cursor)

        self._sliced(chunks, lambda chunk: self._apply_chunk(chunk, result), quiet=True,
                     last=last)
        return result

    def finish_rejoin(self) -> int:
        """End a rejoin whose pull is done: rows of the synced state the server
        did not hand out go here too, unless edited here since or needed by a
        live row (those go out again as new rows), and settings that stay on
        this device (named local since they synced: no pull touches them, so
        neither does this).  Returns how many went."""
        gone, skip = [], self._row_skipper()
        for info in reversed(list(self.tables().values())):     # children first
            rows = self.conn.execute(
                "SELECT s.sid, s.rid, s.vals FROM _ccsync_shadow s WHERE s.tbl = ? AND NOT "
                "EXISTS (SELECT 1 FROM _ccsync_seen n WHERE n.tbl = s.tbl AND n.sid = s.sid)",
                (info.name,)).fetchall()
            if info.name == "setting":
                rows = [row for row in rows if not skip(info, json.loads(row[2]))]
            self._sliced(rows, lambda row, info=info: gone.append(self._vanish(info, *row[:2])),
                         quiet=True)
        with self._write():
            # Records kept for later (a table cc lacks here) the server no longer has go too.
            self.conn.execute("DELETE FROM _ccsync_held WHERE tbl IS NOT NULL AND NOT EXISTS "
                              "(SELECT 1 FROM _ccsync_seen n WHERE n.tbl = _ccsync_held.tbl "
                              "AND n.sid = _ccsync_held.sid)")
            self.conn.execute("DELETE FROM _ccsync_seen")
            self.set_meta("rejoin", None)
        return sum(gone)

    def _vanish(self, info: TableInfo, sid: str, rid: int | None) -> bool:
        """A synced row the server no longer has: it goes (True), or (edited
        here, or a live row's parent) it becomes a row new to the server."""
        self.conn.execute("DELETE FROM _ccsync_shadow WHERE tbl = ? AND sid = ?",
                          (info.name, sid))
        rid = self._rid_for_sid(info.name, sid) if rid is None else rid
        if rid is None:
            return False
        if self._dirty_cells(info.name, rid, sid) or self._needed_by_children(info.name, rid):
            self._mark_dirty(info.name, rid, {INSERTED: self._hlc_tick()})
            return False
        self._remove_here(info, rid, sid)
        return True

    FRESH_CHUNK = 100          # records of one table merged together (one lock slice at most)

    def _arrive(self, raw: Any) -> "Arrival":
        """Read one wire record (no database access): parsed and checked, and
        for a row that may be simply new here, the values it would write."""
        try:
            record = parse_record(raw)
            self._check_clock(record)
        except Exception as exc:               # noqa: BLE001 -- refused, with its reason,
            return Arrival(raw, None, exc)      # by _apply_one
        info = self.tables().get(record.table)
        fresh = None
        if info is not None and self._batchable(info) and TOMBSTONE not in record.clocks:
            with contextlib.suppress(Exception):    # refused on the careful path
                fresh = fresh_values(info, record)
        return Arrival(raw, record, None, fresh)

    @staticmethod
    def _batchable(info: "TableInfo") -> bool:
        """Whether rows of this table may take the batch path at all."""
        return not (info.name == "setting" or info.spec.list_refs or info.spec.name_refs
                    or any(c not in info.columns for c in info.spec.key))

    def _apply_chunk(self, arrivals: list["Arrival"], result: ApplyResult) -> None:
        """Merge records of one table: rows new here in one batch, the rest one by one."""
        try:
            info, fresh, rest = self._fresh_rows(arrivals)
            if fresh:
                with transaction(self.conn):    # a savepoint: a failure leaves nothing
                    self._insert_fresh(info, fresh)
                result.applied += len(fresh)
        except Exception as exc:                # noqa: BLE001 -- a UNIQUE column here, a
            if environment_error(exc):          # value SQLite refuses: the careful path
                raise                           # finds which record, and refuses just it
            rest = arrivals
        for arrival in rest:
            self._apply_one(arrival, result)

    def _fresh_rows(self, arrivals: list["Arrival"]) -> tuple["TableInfo | None", list, list]:
        """Split arrivals of one table into rows that are simply new here, as
        (record, values to write), and the rest (the per-record path).

        Simply new: an edit (not a delete) of a row with no synced state, no
        local row, no delete recorded here and no local row on its natural
        key; its id is its key's, and every parent it names is here.
        Merging such a row into nothing gives the record itself, so the batch
        writes what :meth:`_apply_record` would, without asking row by row.
        """
        table = next((a.record.table for a in arrivals if a.fresh is not None), None)
        ids = Counter(a.record.sid for a in arrivals if a.record is not None)
        candidates = [a for a in arrivals if a.fresh is not None and ids[a.record.sid] == 1
                      and a.record.table == table]
        if not candidates:
            return None, [], arrivals
        info = self.tables()[table]
        sids = [a.record.sid for a in candidates]
        taken = self._known_sids(info.name, sids) | set(self._rids_for_sids(info.name, sids))
        parents = {col: self._rids_for_sids(parent, (a.fresh["values"].get(col)
                                                     for a in candidates))
                   for col, parent in info.spec.refs.items() if col in info.columns}
        fresh = []
        for arrival in candidates:
            values = None if arrival.record.sid in taken else \
                with_parents(arrival.fresh["values"], parents)
            if values is not None:
                fresh.append((arrival, {**arrival.fresh, "values": values},
                              tuple(values[c] for c in info.spec.key)))
        here = self._keys_here(info, [key for *_rest, key in fresh])
        clash = Counter(key for *_rest, key in fresh)
        kept = [(arrival, prep) for arrival, prep, key in fresh
                if key not in here and clash[key] == 1]
        simple = {id(arrival) for arrival, _prep in kept}
        return info, [(a.record, prep) for a, prep in kept], \
            [a for a in arrivals if id(a) not in simple]

    def _keys_here(self, info: TableInfo, keys: list[tuple]) -> set[tuple]:
        """Of natural keys (local values), those a row here already has."""
        cols = info.spec.key
        if not cols or not keys:
            return set()
        found: set[tuple] = set()
        # A join on the key columns, not a row-value IN (VALUES ...): SQLite
        # plans that one as a scan of the whole table for every chunk.
        names = [f"k{i}" for i in range(len(cols))]
        on = " AND ".join(f"t.{_q(c)} = k.{n}" for c, n in zip(cols, names))
        row_marks = "(" + ",".join("?" * len(cols)) + ")"
        for chunk in _chunks(sorted(set(keys), key=repr), max(1, 900 // len(cols))):
            found.update(tuple(r) for r in self.conn.execute(
                f"WITH k({', '.join(names)}) AS (VALUES {','.join([row_marks] * len(chunk))}) "
                f"SELECT DISTINCT {', '.join('k.' + n for n in names)} "
                f"FROM k JOIN {_q(info.name)} AS t ON {on}",
                [v for key in chunk for v in key]))
        return found

    def _insert_fresh(self, info: TableInfo, fresh: list) -> None:
        """Write rows simply new here (:meth:`_fresh_rows`): table rows by
        executemany, then their synced state with the rowids they got."""
        self._hlc_observe(max(max(r.clocks.values()) for r, _v in fresh))
        by_shape: dict[tuple, list] = defaultdict(list)
        for record, prep in fresh:
            row = self._new_row(info, record.sid, prep["vals"], prep["values"])
            by_shape[tuple(row)].append(tuple(row.values()))
        for cols, rows in by_shape.items():
            self.conn.executemany(_insert_sql(info.name, cols), rows)
        rids = self._rids_for_sids(info.name, [r.sid for r, _v in fresh])
        self._put_shadows([(info.name, record.sid, rids[record.sid], *prep["state"])
                           for record, prep in fresh], encoded=True)

    def _apply_one(self, arrival: "Arrival", result: ApplyResult) -> None:
        """Merge one arrived record, or refuse (or keep aside) just that record."""
        keep, raw, record = True, arrival.raw, arrival.record
        try:
            if record is None:
                raise arrival.refusal
            info = self.tables().get(record.table)
            if info is None:
                self._hold(raw, "aside", "table not in this database")
                result.aside += 1
                return
            with transaction(self.conn):        # a savepoint: a failing record leaves nothing
                changed = self._apply_record(info, record)
        except RecordRefused as exc:
            reason, keep = str(exc), getattr(exc, "keep", True)
        except Exception as exc:                # noqa: BLE001 -- any record may be hostile
            if environment_error(exc):
                raise
            reason = f"cannot apply here: {type(exc).__name__}: {exc}"[:200]
        else:
            result.applied += changed
            result.unchanged += not changed
            return
        reason = _printable(reason, 200)
        result.refused[reason] += 1
        if keep:
            self._hold(raw, "refused", reason)

    def _check_clock(self, record: Record) -> None:
        # A clock far in the future would win every later edit for good.
        if max(record.clocks.values()) > hlc_at(now_ms(self.clock) + MAX_CLOCK_AHEAD_MS):
            raise RecordRefused("clock too far ahead")

    def _hold(self, raw: Any, kind: str, reason: str) -> None:
        """Keep an incoming record this device could not apply, for a later try."""
        import hashlib
        text = json.dumps(raw, separators=(",", ":"), sort_keys=True, default=str)  # ASCII
        table, sid = (raw.get("t"), raw.get("id")) if isinstance(raw, dict) else (None, None)
        self.conn.execute(
            "INSERT OR REPLACE INTO _ccsync_held (digest, tbl, sid, kind, reason, record, "
            "version, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (hashlib.sha256(text.encode()).hexdigest(),
             None if table is None else _printable(table, 64),
             None if sid is None else _printable(sid, 64), kind, _printable(reason, 200), text,
             self._held_version(), iso_utc(self.clock)))

    def _held_version(self) -> str:
        """What decides whether a kept record could apply now: ccsync and the schema."""
        import hashlib
        shape = json.dumps({t: info.columns for t, info in self.tables().items()})
        return f"{__version__}:{hashlib.sha256(shape.encode()).hexdigest()[:12]}"

    def retry_held(self) -> ApplyResult:
        """Try again the kept records, once ccsync or cc's schema has changed."""
        result = ApplyResult()
        if not self.installed():
            return result
        rows = self.conn.execute("SELECT digest, record FROM _ccsync_held WHERE version != ?",
                                 (self._held_version(),)).fetchall()

        def retry(row: tuple) -> None:
            self.conn.execute("DELETE FROM _ccsync_held WHERE digest = ?", (row[0],))
            self._apply_one(self._arrive(json.loads(row[1])), result)

        if rows:
            self._sliced(rows, retry, quiet=True)
        return result

    def held(self) -> dict[str, dict[str, int]]:
        """Kept incoming records by kind ('refused', 'aside') and reason."""
        out: dict[str, dict[str, int]] = {"refused": {}, "aside": {}}
        if self.installed():
            for kind, reason, n in self.conn.execute(
                    "SELECT kind, reason, count(*) FROM _ccsync_held GROUP BY kind, reason"):
                out.setdefault(kind, {})[reason] = n
        return out

    def _apply_record(self, info: TableInfo, record: Record) -> bool:
        """Merge one record into shadow and table; True if the table changed.

        The synced state (shadow) takes every cell later than its own; the
        table only those also later than this device's pending edit.  Columns
        this device's table lacks are merged into the shadow all the same
        (kept aside for when cc adds them); only the others are written.
        """
        if info.name == "setting":
            self._check_setting(record)
        sid = record.sid
        rid = self._rid_for_sid(info.name, sid)
        old = self._shadow(info.name, sid)
        vals, clocks = (old[1], old[2]) if old else ({}, {})
        local_cells = self._dirty_cells(info.name, rid, sid)
        self._hlc_observe(max(record.clocks.values()))
        stamps = cell_clocks(record.clocks, record.dev)
        # A row that predates ccsync (clocks 0) arriving for one deleted here (see queue_resends).
        predates = rid is None and old is not None and not any(record.clocks.values()) \
            and is_deleted(clocks)
        synced = merge_cells(vals, clocks, record.values, stamps)
        if TOMBSTONE in record.clocks:
            self._tombstoned.add((info.name, sid))
        elif predates and is_deleted(clocks):
            self._resends[(info.name, sid)] = clocks[TOMBSTONE][0]
        won = [c for c in synced if newer(stamps[c], local_cells.get(c))]
        with_starting_points(vals, record, info.local)
        if not won and old is not None:
            if synced:
                self._put_shadow(info.name, sid, rid, vals, clocks)
            return False
        settled: list[int] = []
        if won and rid is None:
            settled = self._settle_local_delete(info.name, sid, local_cells.get(TOMBSTONE),
                                                [clocks[c] for c in won])
        elif won:
            self._drop_dirty_cells(info.name, rid, won, info)
        self._put_shadow(info.name, sid, rid, vals, clocks)
        # A row deleted here may come back: children cc left at its old rowid
        # are re-linked then.
        self._materialize(info, sid, [c for c in won if c in info.columns],
                          was=old[0] if old and rid is None else None)
        for gone_rid in settled:      # as if that delete had gone out (see ack)
            self._after_local_delete(info.name, sid, gone_rid)
        return True

    def _check_setting(self, record: Record) -> None:
        """Refuse a record that names, or lands on, a secret or device-local setting.

        Every name it could touch counts: the incoming one, and the local
        row's (found by id, alias or name), since setting ids are predictable.
        Such a record is not kept: it may carry a secret.
        """
        sid = record.sid
        names = {record.values.get("name"), record.key.get("name")}
        shadow = self._shadow("setting", sid)
        if shadow:
            names.add(shadow[1].get("name"))
        rids = {self._rid_for_sid("setting", sid)}
        rids |= {self._rid_for_sid("setting", natural_id("setting", [n]))
                 for n in names if isinstance(n, str)}
        for rid in rids - {None}:
            row = self.conn.execute("SELECT name FROM setting WHERE rowid = ?", (rid,)).fetchone()
            names.add(row[0] if row else None)
        extra = self._local_setting_names()
        for name in names - {None}:
            policy = setting_policy(name, extra)
            if policy:
                refusal = RecordRefused(f"{policy} setting")
                refusal.keep = False
                raise refusal

    def watch_resends(self) -> None:
        """Start a pull: note afresh the deletes it may have to send again."""
        self._resends, self._tombstoned, self.resends_queued = {}, set(), 0

    def queue_resends(self) -> None:
        """End a pull: queue again the deletes of rows that predate ccsync
        (their clocks are 0) which came in while this device holds them
        deleted, unless the pull also brought their delete.  A copy of the
        database made before ccsync ran has joined, and the server, having
        collected the delete, took the row from it and hands it out alive to
        every device but this one.  The delete goes out again, at its own
        time, under this device's id (``resends_queued`` counts them)."""
        todo = [(table, sid, hlc, table, sid) for (table, sid), hlc in self._resends.items()
                if (table, sid) not in self._tombstoned]
        self._resends, self._tombstoned = {}, set()
        if todo:
            with self._write():
                self.conn.executemany(
                    "INSERT INTO _ccsync_gone (tbl, rid, sid, key, hlc) SELECT ?, NULL, ?, "
                    "NULL, ? WHERE NOT EXISTS (SELECT 1 FROM _ccsync_gone WHERE tbl = ? "
                    "AND sid = ?)", todo)
        self.resends_queued += len(todo)

    def _settle_local_delete(self, table: str, sid: str, tomb: list | None,
                             stamps: list[list]) -> list[int]:
        """A pending delete made here loses to any later remote edit or delete.

        Returns the rowids it had here: references cc left at them
        (version.delete) still name this row, and _parent_sids no longer
        finds it once the delete is settled."""
        if tomb is None or not any(newer(stamp, tomb) for stamp in stamps):
            return []
        rids = self._gone_rids(table, sid)
        self.conn.execute("DELETE FROM _ccsync_gone WHERE tbl = ? AND sid = ?", (table, sid))
        return rids

    def _drop_dirty_cells(self, table: str, rid: int, won: list[str], info: TableInfo) -> None:
        # Expand a pending insert into per-column cells first, so only the
        # columns the remote won stop being pending.
        self._expand_inserted(table, info.tracked, rid)
        self.conn.executemany("DELETE FROM _ccsync_dirty WHERE tbl = ? AND rid = ? AND col = ?",
                              [(table, rid, c) for c in won if c != TOMBSTONE])


class Sending(Incoming):
    """Pending changes as records to push, settling what the server said, and
    answering what it asks about the deleted rows it may collect."""

    def pending(self) -> dict[str, dict[str, int]]:
        """Pending local changes per table: {"insert": n, "update": n, "delete": n}.

        Read-only; before the first ``stamp`` every row counts as an insert.
        """
        counts = {}
        installed = self.installed()
        skip = self._row_skipper()
        for info in self.tables().values():
            counts[info.name] = c = {"insert": 0, "update": 0, "delete": 0}
            setting = info.name == "setting"    # each row's name says whether it leaves
            if not installed:
                c["insert"] = sum(not skip(info, row) for row in self.conn.execute(
                    f"SELECT * FROM {_q(info.name)}")) if setting else self.conn.execute(
                    f"SELECT count(*) FROM {_q(info.name)}").fetchone()[0]
                continue
            # A row here with a cell edited (not only moved): an update once synced.
            rows = (f"SELECT CASE WHEN s.sid IS NOT NULL AND max(d.col = ?) = 0 THEN 'update' "
                    f"ELSE 'insert' END AS kind{', t.*' if setting else ''} FROM _ccsync_dirty d "
                    f"JOIN {_q(info.name)} t ON t.rowid = d.rid LEFT JOIN _ccsync_shadow s "
                    f"ON s.tbl = d.tbl AND s.sid = t.sync_id WHERE d.tbl = ? "
                    f"GROUP BY d.rid HAVING max(d.col != ?) = 1")
            marks = (INSERTED, info.name, MOVED)
            if setting:
                for row in self.conn.execute(rows, marks):
                    c[row["kind"]] += not skip(info, row)
            else:
                c.update(self.conn.execute(f"SELECT kind, count(*) FROM ({rows}) "
                                           f"GROUP BY kind", marks).fetchall())
            c["update"] += self.conn.execute("SELECT count(*) FROM _ccsync_outbox WHERE tbl = ?",
                                             (info.name,)).fetchone()[0]
            c["delete"] = sum(1 for sid, key in self.conn.execute(
                "SELECT sid, max(key) FROM _ccsync_gone WHERE tbl = ? AND sid IS NOT NULL "
                "GROUP BY sid", (info.name,)).fetchall() if self._tombstone_wanted(info, sid, key))
        return counts

    def refused(self) -> list[dict[str, str]]:
        """Rows the server refused, with the reason (they stay pending)."""
        if not self.installed():
            return []
        return [dict(r) for r in self.conn.execute(
            'SELECT tbl AS "table", sid AS sync_id, reason, at FROM _ccsync_refused '
            "ORDER BY tbl, sid")]

    def _tombstone_wanted(self, info: TableInfo, sid: str, key: str | None = None) -> bool:
        # A setting never synced may be a secret: send its id only when its
        # name (kept by the delete trigger) is known to sync.
        if info.name != "setting" or self._shadow(info.name, sid) is not None:
            return True
        name = self._gone_key(info, key).get("name")
        return isinstance(name, str) and self._setting_syncs(name)

    def capture(self, after: tuple[int, int, int] | None = None,
                limit: int = PUSH_BATCH) -> Batch:
        """Up to ``limit`` pending deletes or rows as outgoing records, after ``after``.

        Per table, deletes come first, then edited rows, then edits of rows a
        delete from elsewhere removed before they were sent; the position is a
        keyset (table, part, last id).  Reads only; ack() settles what the
        server said about them.
        """
        tables = list(self.tables().values())
        start = tuple(after) if after else (0, 0, -(2 ** 63))
        for index in range(start[0], len(tables)):
            info = tables[index]
            for part in (0, 1, 2):
                if (index, part) < start[:2]:
                    continue
                lower = start[2] if (index, part) == start[:2] else -(2 ** 63)
                if part == 0:
                    rows = self.conn.execute(
                        "SELECT rowid, sid, key, hlc, rid FROM _ccsync_gone WHERE tbl = ? AND "
                        "rowid > ? ORDER BY rowid LIMIT ?", (info.name, lower, limit)).fetchall()
                    if rows:
                        return Batch(*self._gone_records(info, rows), (index, 0, rows[-1][0]))
                    continue
                if part == 1:
                    rids = [r[0] for r in self.conn.execute(
                        "SELECT DISTINCT rid FROM _ccsync_dirty WHERE tbl = ? AND rid > ? "
                        "ORDER BY rid LIMIT ?", (info.name, lower, limit))]
                    if rids:
                        return Batch(*self._records_for(info, rids), (index, 1, rids[-1]))
                    continue
                kept = self.conn.execute(
                    "SELECT rowid, sid FROM _ccsync_outbox WHERE tbl = ? AND rowid > ? "
                    "ORDER BY rowid LIMIT ?", (info.name, lower, limit)).fetchall()
                if kept:
                    return Batch(*self._outbox_records(info, kept), (index, 2, kept[-1][0]))
        return Batch([], [], None)

    def _gone_records(self, info: TableInfo, rows: list) -> tuple[list, list]:
        """One tombstone per deleted sync_id (the latest delete), settling the rest."""
        latest: dict[str, list] = {}
        unsent = []
        for gid, sid, key, hlc, rid in rows:
            # A row live here under that sync_id came back (re-created, which
            # sends the row itself) or was never gone: a table renamed aside
            # takes its triggers along, and a natural id may name a renamed row.
            if sid is None or self._rid_for_sid(info.name, sid) is not None \
                    or not self._tombstone_wanted(info, sid, key):
                unsent.append(gid)
                continue
            entry = latest.setdefault(sid, [0, [], None])
            if hlc >= entry[0]:
                entry[0], entry[2] = hlc, rid
            entry[1].append(gid)
        records: list = [None] if unsent else []
        tokens = [Outgoing(info.name, None, {}, tuple(unsent))] if unsent else []
        for sid, (hlc, gids, rid) in latest.items():
            records.append(self._tombstone_record(info, sid, hlc))
            tokens.append(Outgoing(info.name, None, {}, tuple(gids), rid))
        return records, tokens

    def _outbox_records(self, info: TableInfo, rows: list) -> tuple[list, list]:
        """This device's cells of rows deleted before it sent them (see _keep_lost_edits)."""
        records, tokens, own = [], [], set(self.own_ids())
        for oid, sid in rows:
            shadow = self._shadow(info.name, sid)
            mine = [r for r in self._shadow_records(info, sid, shadow[1], shadow[2])
                    if r["dev"] in own] if shadow else []
            for record in mine[:-1]:           # under an earlier id of this database too
                records.append(record)
                tokens.append(Outgoing(info.name, None, {}))
            records.append(mine[-1] if mine else None)
            tokens.append(Outgoing(info.name, None, {}, outbox=(oid,)))
        return records, tokens

    def _records_for(self, info: TableInfo, rids: list[int]) -> tuple[list, list]:
        dirty: dict[int, dict[str, int]] = defaultdict(dict)
        for row in self.conn.execute(
                "SELECT rid, col, hlc FROM _ccsync_dirty WHERE tbl = ? AND rid BETWEEN ? AND ?",
                (info.name, rids[0], rids[-1])).fetchall():
            dirty[row["rid"]][row["col"]] = row["hlc"]
        rows = {row["_rid"]: row for row in self._by_rowid(info.name, "*", rids)}
        present = [rows[r] for r in rids if r in rows]
        synced = {sid for (sid,) in self._select_in(   # which have a synced state (no parse)
            "SELECT sid FROM _ccsync_shadow WHERE tbl = ? AND sid IN ({marks})",
            (r["sync_id"] for r in present if isinstance(r["sync_id"], str)), info.name)}
        wire = dict(zip((r["_rid"] for r in present), self._wire_rows(info, present)))
        skip = self._row_skipper()
        for (rid, col), (sid, hlc) in self._named_refs(info.name, rids).items():
            if rid in wire and dirty[rid].get(col) == hlc and rows[rid][col] is None:
                wire[rid][col] = sid
        records, tokens = [], []
        for rid in rids:
            cells = dirty.get(rid, {})
            if rid in rows and rows[rid]["sync_id"] is None:
                continue                       # inserted after stamping: next sync
            record = None                      # a row gone (its delete went on its own)
            if rid in rows and not skip(info, rows[rid]):
                record = self._row_record(info, rows[rid], wire[rid], cells,
                                          rows[rid]["sync_id"] in synced)
            tokens.append(Outgoing(info.name, rid, cells))
            records.append(record)
        return records, tokens

    def _named_refs(self, table: str, rids: list[int]) -> dict[tuple[int, str], tuple[str, int]]:
        """Edits of a reference not yet sent whose row a delete removed here:
        (rowid, column) -> (the sync_id they name, the edit's clock)."""
        return {(rid, col): (sid, hlc) for rid, col, sid, hlc in self.conn.execute(
            "SELECT rid, col, sid, hlc FROM _ccsync_named WHERE tbl = ? AND rid BETWEEN ? AND ?",
            (table, rids[0], rids[-1]))}

    def _row_record(self, info: TableInfo, row: sqlite3.Row, values: dict,
                    cells: dict, synced: bool) -> dict | None:
        sid = row["sync_id"]
        new_row = INSERTED in cells or not synced
        base = cells.get(INSERTED, 0)
        if new_row:
            clocks = {c: max(base, cells.get(c, 0)) for c in info.tracked}
        else:
            clocks = {c: cells[c] for c in info.tracked if c in cells}
        if not clocks:
            return None                    # only its rowid changed: nothing to send
        return {
            "t": info.name, "id": sid, "dev": self.device_id, "c": clocks,
            "p": {"v": {c: values[c] for c in clocks},
                  "l": {c: values[c] for c in info.local},
                  "k": self._key_wire(info, values, row)},
        }

    def _key_wire(self, info: TableInfo, values: dict, row: sqlite3.Row) -> dict:
        return {c: values[c] if c in values else encode_value(row[c])
                for c in info.spec.key if c in info.columns}

    def _tombstone_record(self, info: TableInfo, sid: str, hlc: int) -> dict:
        shadow = self._shadow(info.name, sid)
        key = {c: shadow[1].get(c) for c in info.spec.key} if shadow else {}
        return {"t": info.name, "id": sid, "dev": self.device_id, "c": {TOMBSTONE: hlc},
                "p": {"v": {}, "l": {}, "k": key}}

    def reseed_records(self, after: tuple[str, str] | None = None,
                       limit: int = PUSH_BATCH) -> tuple[list[dict], tuple[str, str] | None]:
        """The synced state (shadow) as records with their original clocks.

        Used when the server's store is new (rebuilt, or another server): every
        device hands back what it knows, and per-column clocks merge it as before.
        Returns (records, next position or None when done).
        """
        lower = after or ("", "")
        rows = self.conn.execute(
            "SELECT tbl, sid, vals, clocks FROM _ccsync_shadow WHERE (tbl, sid) > (?, ?) "
            "ORDER BY tbl, sid LIMIT ?", (*lower, limit)).fetchall()
        records, skip = [], self._row_skipper()
        for table, sid, vals, clocks in rows:
            info, vals = self.tables().get(table), json.loads(vals)
            if info is not None and not skip(info, vals):
                records += self._shadow_records(info, sid, vals, json.loads(clocks))
        return records, ((rows[-1][0], rows[-1][1]) if len(rows) == limit else None)

    def aside_records(self, after: str = "", limit: int = PUSH_BATCH) -> tuple[list, str | None]:
        """Records kept aside for a table this database lacks, as they came
        (a re-seed hands them back too: the store may have only them); returns
        (records, next position or None)."""
        rows = self.conn.execute("SELECT digest, record FROM _ccsync_held WHERE kind = 'aside' "
                                 "AND digest > ? ORDER BY digest LIMIT ?",
                                 (after, limit)).fetchall()
        return ([json.loads(r[1]) for r in rows],
                rows[-1][0] if len(rows) == limit else None)

    def _shadow_records(self, info: TableInfo, sid: str, vals: dict, clocks: dict) -> list[dict]:
        by_device: dict[str, dict[str, int]] = defaultdict(dict)
        for col, (hlc, dev) in clocks.items():
            if col == TOMBSTONE or col in vals:
                by_device[dev][col] = hlc
        payload_l = {c: vals[c] for c in info.local if c in vals}
        payload_k = {c: vals[c] for c in info.spec.key if c in vals}
        return [{"t": info.name, "id": sid, "dev": dev, "c": cells,
                 "p": {"v": {c: vals[c] for c in cells if c != TOMBSTONE},
                       "l": payload_l, "k": payload_k}}
                for dev, cells in by_device.items()]

    def ack(self, batch: Batch, results: list[dict],
            cursor: int | None = None) -> tuple[Counter, Counter]:
        """Settle a pushed batch: clear what the server took, keep refusals pending.

        ``results`` has one entry per non-None record, in order.  A row edited
        again while the push was in flight stays dirty (its clock is newer).
        Returns (counts by status, counts of refusal reasons).
        """
        sent = [(r, t) for r, t in zip(batch.records, batch.tokens) if r is not None]
        if len(results) != len(sent):
            raise RemoteError("server answered a push with the wrong number of results")
        counts: Counter = Counter()
        reasons: Counter = Counter()
        stamp = iso_utc(self.clock)
        settled = [(None, t, None) for r, t in zip(batch.records, batch.tokens) if r is None]
        items = settled + [(r, t, res) for (r, t), res in zip(sent, results)]
        accepted = [res["seq"] for res in results if isinstance(res, dict)
                    and res.get("status") == "accepted" and type(res.get("seq")) is int]

        def last() -> None:
            if cursor is not None:
                self._set_cursor(cursor)
            self._note_own_seqs(accepted)

        self._sliced(list(_chunks(items, self.ACK_CHUNK)),
                     lambda chunk: self._settle_chunk(chunk, stamp, counts, reasons), quiet=True,
                     last=last)
        return counts, reasons

    ACK_CHUNK = 250            # results settled together (one lock slice at most)

    def _settle_chunk(self, chunk: list, stamp: str, counts: Counter, reasons: Counter) -> None:
        """Settle (record, token, result) triples a batch at a time; a delete
        the server took then applies here as it does on other devices."""
        sent, cleared, refused = [], [], []
        for record, token, result in chunk:
            if record is None:                 # nothing to send (a local-only row)
                cleared.append(token)
                continue
            status = result.get("status") if isinstance(result, dict) else None
            counts[status] += 1
            if status in ("accepted", "superseded"):
                rid = token.rid if token.rid is not None else \
                    self._rid_for_sid(token.table, record["id"])
                sent.append((record, token, status, rid))
            else:
                reason = str(result.get("reason") if isinstance(result, dict) else "")[:200]
                reasons[reason or "refused"] += 1
                refused.append((token.table, record["id"], reason or "refused", stamp))
        self._clear_outgoing(cleared + [token for _record, token, _status, _rid in sent])
        self._settle_shadows([(record, rid) for record, _token, _status, rid in sent])
        for name in ("_ccsync_refused", "_ccsync_kept"):        # the store has them now
            self.conn.executemany(f"DELETE FROM {name} WHERE tbl = ? AND sid = ?",
                                  [(token.table, record["id"]) for record, token, *_ in sent])
        edits = [token for record, token, *_ in sent
                 if TOMBSTONE not in record["c"] and token.rid is not None]
        for table, group in itertools.groupby(edits, key=lambda token: token.table):
            self.conn.executemany(f"UPDATE {_q(table)} SET synced_at = ? WHERE rowid = ?",
                                  [(stamp, token.rid) for token in group])
        self.conn.executemany("INSERT OR REPLACE INTO _ccsync_refused (tbl, sid, reason, at) "
                              "VALUES (?, ?, ?, ?)", refused)
        for record, token, status, rid in sent:
            if TOMBSTONE in record["c"] and status == "accepted" and rid is None:
                self._after_local_delete(token.table, record["id"], token.deleted_rid)

    def _clear_outgoing(self, tokens: list[Outgoing]) -> None:
        """Settle what the server took: pending cells no newer than those sent,
        and the deletes and kept edits they carried."""
        cells = [(t.table, t.rid, col, hlc) for t in tokens if t.rid is not None
                 for col, hlc in t.cells.items()]
        for name in ("_ccsync_dirty", "_ccsync_named"):
            self.conn.executemany(
                f"DELETE FROM {name} WHERE tbl = ? AND rid = ? AND col = ? AND hlc <= ?", cells)
        self.conn.executemany("DELETE FROM _ccsync_gone WHERE rowid = ?",
                              [(gid,) for t in tokens for gid in t.gone])
        self.conn.executemany("DELETE FROM _ccsync_outbox WHERE rowid = ?",
                              [(oid,) for t in tokens for oid in t.outbox])

    def _settle_shadows(self, sent: list[tuple[dict, int | None]]) -> None:
        """Merge sent records (with their rowids here) into the synced state:
        what the server holds now, read and written a batch at a time."""
        known: dict[tuple[str, str], tuple[dict, dict]] = {}
        for table, group in itertools.groupby(sent, key=lambda pair: pair[0]["t"]):
            known.update(((table, sid), (vals, clocks)) for sid, (_rid, vals, clocks) in
                         self._shadows(table, (record["id"] for record, _rid in group)).items())
        rows = {}
        for record, rid in sent:
            vals, clocks = known.setdefault((record["t"], record["id"]), ({}, {}))
            merge_cells(vals, clocks, record["p"]["v"], cell_clocks(record["c"], record["dev"]))
            vals.update(record["p"]["l"])
            rows[(record["t"], record["id"])] = rid
        self._put_shadows((table, sid, rid, *known[(table, sid)])
                          for (table, sid), rid in rows.items())

    # -- what this device still holds of the deleted rows the server may collect --

    def keep_ask(self, ask: Any) -> None:
        """Keep the server's ask (see ServerCollection.note_reader): the next
        report answers it (:meth:`pins`)."""
        rows = ask.get("rows") if isinstance(ask, dict) else None
        keep = compact_json({"n": ask["n"], "rows": rows[:ASK_ROWS]}) \
            if isinstance(rows, list) and rows and type(ask.get("n")) is int else None
        if keep != self.meta("pin_ask"):
            with self._write():
                self.set_meta("pin_ask", keep)

    def pins(self, row_id: Callable[[str, str], str] | None = None) -> dict | None:
        """The answer to the server's last ask (None: it asked nothing): which
        of the deleted rows it named this device still holds, as a row, or as
        a name in a live row, an edit not sent or a record kept here.
        ``row_id`` gives the id the server knows a row by (a vault's)."""
        ask = json.loads(self.meta("pin_ask") or "null") if self.installed() else None
        if not ask:
            return None
        asked: dict[str, set[str]] = defaultdict(set)
        for row in ask["rows"]:
            if isinstance(row, list) and len(row) == 2 and row[0] in REFERENCED \
                    and isinstance(row[1], str):
                asked[row[0]].add(row[1])
        held = []
        for table, ids in sorted(asked.items()):
            # Keyed ids map back through every id this device knows of the table.
            plain = {row_id(table, sid): sid for sid in self._names_of(table)} if row_id \
                else {sid: sid for sid in ids}
            mine = self._held_of(table, {plain[i] for i in ids if i in plain})
            held += [[table, i] for i in sorted(ids) if plain.get(i) in mine]
        return {"n": ask["n"], "held": held}

    def _naming(self, table: str) -> Iterator[tuple[str, tuple]]:
        """Queries of (ref, clocks): the ids of ``table`` rows that the synced
        state (clocks: the naming row's) or a record kept for later (clocks
        NULL) names, with their arguments.  The synced state alone shows a
        nullable reference (it reads NULL here once its row is deleted) and
        an id list; a required one only in rows waiting for a parent (the
        parent of a live row is here: it came back for it)."""
        for spec, col in self._child_refs(table):
            child = self.tables().get(spec.name)
            shadows = "_ccsync_pending p CROSS JOIN _ccsync_shadow s ON s.tbl = p.tbl " \
                "AND s.sid = p.sid" if child is not None and col in child.required \
                else "_ccsync_shadow s"
            yield (f"SELECT json_extract(s.vals, ?) AS ref, s.clocks AS clocks FROM {shadows} "
                   "WHERE s.tbl = ?", (f'$."{col}"', spec.name))
            for part in ("v", "k"):
                yield ("SELECT json_extract(record, ?) AS ref, NULL AS clocks FROM _ccsync_held "
                       "WHERE tbl = ?", (f'$.p.{part}."{col}"', spec.name))
        for spec, col in self._child_refs(table, lists=True):
            yield ("SELECT j.value AS ref, s.clocks AS clocks FROM _ccsync_shadow s, "
                   "json_each(s.vals, ?) j WHERE s.tbl = ?", (f'$."{col}".ids', spec.name))
            yield ("SELECT j.value AS ref, NULL AS clocks FROM _ccsync_held h, "
                   "json_each(h.record, ?) j WHERE h.tbl = ?", (f'$.p.v."{col}".ids', spec.name))

    def _names_of(self, table: str) -> set[str]:
        """Every id of a ``table`` row this device has or names anywhere."""
        names = {sid for (sid,) in self.conn.execute(
            "SELECT sid FROM _ccsync_shadow WHERE tbl = ? UNION SELECT sid FROM _ccsync_held "
            "WHERE tbl = ? UNION SELECT sid FROM _ccsync_named", (table, table))}
        info = self.tables().get(table)
        if info is not None and "sync_id" in info.columns:
            names.update(sid for (sid,) in self.conn.execute(
                f"SELECT sync_id FROM {_q(table)} WHERE sync_id IS NOT NULL"))
        for query, args in self._naming(table):
            names.update(ref for (ref,) in self.conn.execute(
                f"SELECT DISTINCT ref FROM ({query})", args))
        return {n for n in names if isinstance(n, str)}

    def _held_of(self, table: str, sids: set[str]) -> set[str]:
        """Those of ``sids`` (rows of ``table``) this device holds: the row is
        here or live in the synced state, or a live row, an edit not sent or
        a record kept for later names it."""
        held = set()
        info = self.tables().get(table)
        if info is not None and "sync_id" in info.columns:
            held.update(sid for (sid,) in self._select_in(
                f"SELECT sync_id FROM {_q(table)} WHERE sync_id IN ({{marks}})", sids))
        held.update(sid for sid, (_rid, _vals, clocks) in self._shadows(table, sids).items()
                    if not is_deleted(clocks))
        held.update(sid for (sid,) in self._select_in(
            "SELECT sid FROM _ccsync_named WHERE sid IN ({marks})", sids))
        held.update(sid for (sid,) in self._select_in(
            "SELECT sid FROM _ccsync_held WHERE tbl = ? AND sid IN ({marks})", sids, table))
        for query, args in self._naming(table):
            held.update(ref for ref, clocks in self._select_in(
                f"SELECT ref, clocks FROM ({query}) WHERE ref IN ({{marks}})", sids - held, *args)
                if clocks is None or not is_deleted(json.loads(clocks)))
        # A kept record too malformed to name its table may name anything.
        for (record,) in self.conn.execute("SELECT record FROM _ccsync_held WHERE tbl IS NULL "
                                           f"OR tbl NOT IN ({','.join('?' * len(SPEC))})",
                                           [spec.name for spec in SPEC]):
            held.update(sid for sid in sids if sid in record)
        return held


class Store(Sending):
    """A device's cc database, seen by ccsync.

    Build one with :func:`open_store`.  ``clock`` returns epoch seconds;
    ``local_settings`` adds setting names (or globs) that stay on this device.

    The store is built in layers, in the order data flows: :class:`SyncState`,
    :class:`LocalRows`, :class:`Identity`, :class:`Resume`, :class:`Install`,
    :class:`Capture`, :class:`RowWriter`, :class:`Incoming`, :class:`Sending`.
    """


def open_store(path: str, *, clock: Callable[[], float] = time.time,
               local_settings: Iterable[str] = (), timeout: float = 5.0) -> Store:
    """Open the cc database at ``path`` as a :class:`Store` (nothing is written yet)."""
    return Store(connect(path, timeout=timeout), clock=clock, local_settings=local_settings)


##### Server store ############################################################
# The central change store: accepts records, keeps per row only the records
# that still win some column, hands them out by sequence number.  It works
# from metadata (table, sync_id, device, per-column clocks) only; the row
# payload is opaque to it.  In layers that each use only those above: the
# registry (devices, keys, nonces), collection (reports, stale devices) and
# the change store itself (authors, quotas, pushes, pages).

_SERVER_SQL = """
CREATE TABLE IF NOT EXISTS change (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, sid TEXT NOT NULL,
    dev TEXT NOT NULL, clocks TEXT NOT NULL, payload TEXT NOT NULL,
    received_at TEXT NOT NULL, device TEXT);
CREATE INDEX IF NOT EXISTS change_row ON change (tbl, sid);
CREATE INDEX IF NOT EXISTS change_received ON change (received_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS device (
    name TEXT PRIMARY KEY, key_id TEXT UNIQUE NOT NULL, mac_key BLOB NOT NULL,
    enc_key BLOB NOT NULL, created_at TEXT NOT NULL, last_seen_at TEXT, revoked_at TEXT);
CREATE TABLE IF NOT EXISTS nonce (value TEXT PRIMARY KEY, at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS nonce_at ON nonce (at);
CREATE TABLE IF NOT EXISTS issued (prefix TEXT PRIMARY KEY, device TEXT NOT NULL);
INSERT OR IGNORE INTO issued (prefix, device) SELECT substr(key_id, 1, 10), name FROM device;
CREATE TABLE IF NOT EXISTS usage (
    device TEXT PRIMARY KEY, records INTEGER NOT NULL, bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS recent (
    device TEXT NOT NULL, minute INTEGER NOT NULL, records INTEGER NOT NULL,
    bytes INTEGER NOT NULL, PRIMARY KEY (device, minute));
INSERT INTO usage (device, records, bytes)
    SELECT coalesce(device, ''), count(*), sum(length(payload) + length(clocks)) FROM change
    WHERE NOT EXISTS (SELECT 1 FROM meta WHERE key = 'usage') GROUP BY 1;
INSERT OR IGNORE INTO meta (key, value) VALUES ('usage', 'counted');
CREATE TABLE IF NOT EXISTS reader (
    dev TEXT PRIMARY KEY, device TEXT NOT NULL, merged INTEGER NOT NULL, at INTEGER NOT NULL,
    floor INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batch (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS report (
    dev TEXT PRIMARY KEY, device TEXT NOT NULL, cursor INTEGER NOT NULL, digest TEXT NOT NULL,
    at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS candidate (
    tbl TEXT NOT NULL, sid TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (tbl, sid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS asked (dev TEXT PRIMARY KEY, n INTEGER NOT NULL, rows TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pin (
    tbl TEXT NOT NULL, sid TEXT NOT NULL, dev TEXT NOT NULL, seq INTEGER NOT NULL,
    held INTEGER NOT NULL, merged INTEGER NOT NULL, at INTEGER NOT NULL,
    PRIMARY KEY (tbl, sid, dev)) WITHOUT ROWID;
"""
# Columns later versions added to tables an earlier one made: (table, column, type).
_SERVER_COLUMNS = (("change", "batch", "INTEGER"), ("change", "slot", "INTEGER"),
                   ("change", "share", "INTEGER"))
DEVICE_NAME_CHARS = frozenset(_ALNUM + "._@-")      # and it starts with a letter or digit
# What a stored record counts against its pushing device: its text, and its
# share of the encrypted batch it came in (fixed when it is stored).
_STORED_SIZE = "length(c.payload) + length(c.clocks) + coalesce(c.share, 0)"

SERVER_MAX_SKEW_MS = MAX_SKEW_S * 1000
# A device not seen for this long no longer holds collection back; when it
# comes back it is told to rejoin (see ServerStore.collect).
FORGET_AFTER_S = 30 * 86400
COLLECT_EVERY_S = 60.0                  # how often the server collects
COLLECT_CHUNK = 500                     # rows looked at per collecting transaction
PIN_RECHECK_S = 3600                    # a row a device still holds is asked about again after


class Quota(namedtuple("Quota", "records bytes hour_records hour_bytes push_records",
                       defaults=(5_000_000, 4 * 1024 ** 3, 2_000_000, 2 * 1024 ** 3, 5000))):
    """What one device may store on the server, and push in an hour (0: no limit).

    The defaults hold a cc database many times larger than any seen, and
    its first sync, so they never stop a normal user; an operator lowers
    them with the server's --quota-* options.  Stored records are those a
    device pushed that the server still holds (superseded and collected
    ones no longer count); an hour's records are all it pushed, its bytes
    those stored.  ``records`` and ``bytes`` bound what it stores,
    ``hour_records`` and ``hour_bytes`` an hour's pushes, ``push_records``
    one push (its bytes: the server's --max-body).
    """

    __slots__ = ()


class QuotaExceeded(Exception):
    """A push that would take a device past its :class:`Quota` (nothing of it
    is stored); the message is the reason, ``retry_after`` the seconds until
    the hourly window allows it (None: only the operator can)."""

    def __init__(self, reason: str, retry_after: int | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


def quota_refusal(device: str, quota: Quota, stored: tuple[int, int],
                  hour: tuple[int, int]) -> str | None:
    """Why a device with ``stored`` and ``hour`` (records, bytes) after a push
    that grows them is over ``quota``; None when it is not."""
    checks = ((stored[0], quota.records, "store {} records", "--quota-records"),
              (stored[1], quota.bytes, "store {} bytes", "--quota-bytes"),
              (hour[0], quota.hour_records, "have pushed {} records in the last hour",
               "--quota-hour-records"),
              (hour[1], quota.hour_bytes, "have stored {} bytes in the last hour",
               "--quota-hour-bytes"))
    for used, limit, what, option in checks:
        if limit and used > limit:
            return (f"quota: with this push device {device!r} would {what.format(f'{used:,}')} "
                    f"(the server's limit is {limit:,}, {option})")
    return None


class ServerRegistry:
    """The server's data file (SQLite, WAL): its identity, the registered
    devices and their keys, and the nonces of requests taken.  The layers
    below add collection and the change store; build a :class:`ServerStore`
    with :meth:`open`."""

    def __init__(self, conn: sqlite3.Connection, *, clock: Callable[[], float] = time.time,
                 max_value: int = MAX_VALUE_BYTES, max_record: int = MAX_RECORD_BYTES,
                 quota: Quota = Quota(), forget_after: float = FORGET_AFTER_S):
        self.conn = conn
        self.clock = clock
        self.max_value, self.max_record, self.quota = max_value, max_record, quota
        self.forget_after = forget_after

    @classmethod
    def open(cls, path: str, *, clock: Callable[[], float] = time.time,
             create: bool = True, max_value: int = MAX_VALUE_BYTES,
             max_record: int = MAX_RECORD_BYTES, quota: Quota = Quota(),
             forget_after: float = FORGET_AFTER_S) -> "ServerStore":
        """Open the store at ``path``, creating it (mode 600) unless ``create`` is False.

        ``max_value`` and ``max_record`` bound what a push may store (bytes),
        ``quota`` what each device may store and push in an hour;
        ``forget_after`` is how long an unseen device holds collection back.
        """
        if not os.path.exists(path):
            if not create:
                raise StoreError(f"no server data at {path}",
                                 hint="start `ccsync server` once, or pass --data PATH")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)
        conn = connect(path, must_exist=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA secure_delete = ON")     # what goes from the file goes for good
        if create:
            with transaction(conn):
                _run_script(conn, _SERVER_SQL)
                for table, column, kind in _SERVER_COLUMNS:
                    if column not in {c[1] for c in conn.execute(f"PRAGMA table_info({table})")}:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                conn.execute("CREATE INDEX IF NOT EXISTS change_batch ON change (batch)")
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)",
                             (new_uuid().hex,))
        return cls(conn, clock=clock, max_value=max_value, max_record=max_record, quota=quota,
                   forget_after=forget_after)

    @property
    def store_id(self) -> str:
        """This change store's identity: a device that sees it change re-seeds it."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        return row[0] if row else ""

    # -- device registry (server-side CLI only; never reachable over HTTP) --

    def register(self, name: str, *, rotate: bool = False) -> str:
        """Add a device (or, with ``rotate``, replace its key); returns the new API key."""
        if not (made_of(name, DEVICE_NAME_CHARS) and name[0] in _ALNUM):
            raise UsageError(f"invalid device name {name!r} (letters, digits, . _ @ -)")
        with transaction(self.conn):
            exists = self.conn.execute("SELECT 1 FROM device WHERE name = ?", (name,)).fetchone()
            if exists and not rotate:
                raise CcsyncError(f"device {name!r} is already registered",
                                  hint="give each machine its own name, or pass --rotate "
                                       "to issue a new key (the old one stops working)")
            while True:                 # a key whose ids no earlier key's edits carry
                api_key = new_api_key()
                keys = DeviceKeys.from_api_key(api_key)
                with contextlib.suppress(sqlite3.IntegrityError):
                    self.conn.execute("INSERT INTO issued (prefix, device) VALUES (?, ?)",
                                      (author_prefix(keys.key_id), name))
                    break
            # The old key's ids cannot report again: they hold collection back no more.
            self.conn.execute("DELETE FROM reader WHERE device = ?", (name,))
            self.conn.execute(
                "INSERT INTO device (name, key_id, mac_key, enc_key, created_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET key_id = excluded.key_id, "
                "mac_key = excluded.mac_key, enc_key = excluded.enc_key, revoked_at = NULL",
                (name, keys.key_id, keys.mac, keys.enc, iso_utc(self.clock)))
        return api_key

    def devices(self) -> list[dict]:
        """Registered devices with created, last-seen and revoked times, the
        records and bytes each stores, and how far it has merged."""
        return [dict(r) for r in self.conn.execute(
            "SELECT d.name, d.created_at, d.last_seen_at, d.revoked_at, "
            "coalesce(u.records, 0) AS records, coalesce(u.bytes, 0) AS bytes, "
            "(SELECT max(merged) FROM reader r WHERE r.device = d.name) AS merged "
            "FROM device d LEFT JOIN usage u ON u.device = d.name ORDER BY d.name")]

    def revoke(self, name: str) -> None:
        """Disable a device's key."""
        with transaction(self.conn):
            cur = self.conn.execute("UPDATE device SET revoked_at = ? WHERE name = ?",
                                    (iso_utc(self.clock), name))
        if cur.rowcount == 0:
            raise CcsyncError(f"no device named {name!r}", hint="`ccsync devices` lists them")

    def device_by_key_id(self, key_id: str) -> sqlite3.Row | None:
        """The device row for a request's key id, if any."""
        return self.conn.execute("SELECT * FROM device WHERE key_id = ?", (key_id,)).fetchone()

    def nonce_seen(self, nonce: str) -> bool:
        """True when a request with this nonce was taken already (a replay)."""
        return self.conn.execute("SELECT 1 FROM nonce WHERE value = ?", (nonce,)).fetchone() \
            is not None

    def admit(self, name: str, nonce: str) -> bool:
        """Record a request nonce (False if seen: a replay) and the device's last-seen time."""
        cutoff = int(self.clock()) - 2 * MAX_SKEW_S
        with transaction(self.conn):
            try:
                self.conn.execute("INSERT INTO nonce (value, at) VALUES (?, ?)",
                                  (nonce, int(self.clock())))
            except sqlite3.IntegrityError:
                return False
            self.conn.execute("DELETE FROM nonce WHERE at < ?", (cutoff,))
            self.conn.execute("UPDATE device SET last_seen_at = ? WHERE name = ?",
                              (iso_utc(self.clock), name))
        return True


class ServerCollection(ServerRegistry):
    """Collection: deleted rows go once every device has merged their delete.
    Devices report how far they have merged (:meth:`note_reader`); a device
    that may hold what was collected is stale and rejoins.

    A deleted row of a table others reference (:data:`REFERENCED`) is a
    *candidate*: it goes only once every device also says that it holds
    nothing naming it (the server, seeing no values, cannot tell).  Each
    report is answered with candidates to ask about (``ask``); the device's
    next report says which of them it still holds (``pins``).  An answer
    holds while no record of a table that may name the row
    (:data:`NAMED_BY`) is newer than what the device had merged when it
    gave it: such a record (a time entry made elsewhere) can bring the row
    back on a device that had let it go.
    """

    MAX_READERS = 16                    # device ids one device name reports under

    def note_reader(self, device: str, author: str, dev: Any, merged: Any,
                    pins: Any = None) -> dict | None:
        """Remember that device id ``dev`` (of the key with prefix ``author``)
        has merged everything up to ``merged``, with every edit it made
        before that sent: it holds collection back no further.  A report of
        0 (a device starting afresh) also says it holds nothing collected
        so far.  ``pins`` answers the last ask (see :meth:`_take_pins`).

        Returns what to ask the device about next, ``{"n": number, "rows":
        [[table, id], ...]}`` (no rows: nothing), or None for a report not taken.
        """
        if not (made_of(dev, DEVICE_ID_CHARS) and author_of(dev) == author
                and type(merged) is int and 0 <= merged <= self._seq_high()):
            return None                 # only a key's own ids, and only cursors it was given
        with transaction(self.conn):
            through = self.collected_through()
            self.conn.execute(
                "INSERT INTO reader (dev, device, merged, at, floor) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (dev) DO UPDATE SET merged = excluded.merged, at = excluded.at, "
                "floor = CASE WHEN excluded.merged = 0 THEN excluded.floor ELSE floor END",
                (dev, device, merged, int(self.clock()), through if merged == 0 else 0))
            self.conn.execute(
                "DELETE FROM reader WHERE device = ? AND dev NOT IN (SELECT dev FROM reader "
                "WHERE device = ? ORDER BY at DESC LIMIT ?)", (device, device, self.MAX_READERS))
            if merged:
                self._take_pins(dev, merged, pins)
            return self._ask(dev, device, merged)

    def _take_pins(self, dev: str, merged: int, pins: Any) -> None:
        """Note a device's answer to the last ask: ``{"n": the ask's number,
        "held": [[table, id], ...]}``, the rows asked of which it still holds
        one or something naming it.  An answer to another ask is ignored."""
        asked = self.conn.execute("SELECT n, rows FROM asked WHERE dev = ?", (dev,)).fetchone()
        if not (asked and isinstance(pins, dict) and pins.get("n") == asked[0]
                and type(pins.get("n")) is int and isinstance(pins.get("held"), list)):
            return
        held = {(h[0], h[1]) for h in pins["held"][:ASK_ROWS] if isinstance(h, list)
                and len(h) == 2 and all(isinstance(x, str) for x in h)}
        now = int(self.clock())
        self.conn.executemany(
            "INSERT OR REPLACE INTO pin (tbl, sid, dev, seq, held, merged, at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(tbl, sid, dev, seq, int((tbl, sid) in held), merged, now)
             for tbl, sid, seq in json.loads(asked[1])])

    def _newest_naming(self, tables: Iterable[str]) -> Callable[[str, str, str], int]:
        """newest(table, dev, device): the newest record (0: none) of a table
        whose rows may name a row of ``table`` (one of ``tables``), leaving
        out those device id ``dev`` made and device ``device`` pushed: its own
        edits cannot bring back a row it no longer has."""
        tables = set(tables)
        versions = {name: self.conn.execute(
            "SELECT dev, coalesce(device, ''), max(seq) FROM change WHERE tbl = ? "
            "GROUP BY dev, device", (name,)).fetchall()
            for name in {n for t in tables for n in NAMED_BY.get(t, ())}}

        def newest(table: str, dev: str, device: str) -> int:
            return max((seq for name in NAMED_BY.get(table, ()) for by, pusher, seq
                        in versions[name] if (by, pusher) != (dev, device)), default=0)
        return newest

    def _ask(self, dev: str, device: str, merged: int) -> dict:
        """The candidates to ask ``dev`` about: those it merged the records of
        and has no answer for that holds (one it holds: again after PIN_RECHECK_S)."""
        candidates = self.conn.execute("SELECT tbl, sid, seq FROM candidate WHERE seq <= ? "
                                       "ORDER BY seq", (merged,)).fetchall()
        rows = []
        if candidates:
            newest = self._newest_naming(t for t, _sid, _seq in candidates)
            answers = {(t, sid): (seq, held, at, upto) for t, sid, seq, held, at, upto in
                       self.conn.execute("SELECT tbl, sid, seq, held, at, merged FROM pin "
                                         "WHERE dev = ?", (dev,))}
            recheck = self.clock() - PIN_RECHECK_S

            def answered(table: str, sid: str, seq: int) -> bool:
                got = answers.get((table, sid))
                return got is not None and got[0] == seq and (
                    got[2] > recheck if got[1] else got[3] >= newest(table, dev, device))

            rows = [c for c in candidates if not answered(*c)][:ASK_ROWS]
        if not rows:
            self.conn.execute("DELETE FROM asked WHERE dev = ?", (dev,))
            return {"n": 0, "rows": []}
        # A number no earlier ask had (a count would start again after an empty
        # ask): an answer to another ask, arriving late, matches it by a 1 in 2**31 chance.
        n = int.from_bytes(os.urandom(4), "big") // 2 + 1
        self.conn.execute("INSERT OR REPLACE INTO asked (dev, n, rows) VALUES (?, ?, ?)",
                          (dev, n, json.dumps([list(r) for r in rows])))
        return {"n": n, "rows": [[tbl, sid] for tbl, sid, _seq in rows]}

    def _seq_high(self) -> int:
        """The highest sequence number ever given (collected records included)."""
        row = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'change'"
                                ).fetchone()
        return row[0] if row else 0

    def collected_through(self) -> int:
        """Deleted rows whose records all lie at or before this sequence number
        may be gone: a device that merged less must rejoin (see :meth:`stale`)."""
        return self._meta_int("collected")

    def stale(self, cursor: Any, through: int | None = None, began: Any = None) -> bool:
        """True when a device that merged up to ``cursor`` may have missed a
        delete (collected since, up to ``through``): it must rejoin.  Cursor 0
        starts afresh, and so does a pull that started there when the store
        had been swept ``began`` times (:meth:`sweeps`), while none has
        removed rows since: what it lacks below the mark went before it
        began, so it never held it (a rejoin drops what it still holds)."""
        through = self.collected_through() if through is None else through
        return isinstance(cursor, int) and 0 < cursor < through \
            and not (type(began) is int and began == self.sweeps())

    def sweeps(self) -> int:
        """How many times collection has removed rows (each chunk's
        transaction counts once)."""
        return self._meta_int("sweeps")

    def _uncounted(self, device: str, devs: set[str], cursor: Any, through: int) -> bool:
        """True when a push from ``devs`` (ids of ``device``'s key; none: any of
        its ids) may carry an edit of a row collected (up to ``through``)
        without this device being counted: it has to rejoin first (it may
        hold such a row alive)."""
        if not through or not isinstance(cursor, int) or cursor == 0:
            return False
        if devs:
            counted = select_in(self.conn, "SELECT dev FROM reader WHERE floor >= ? AND dev "
                                "IN ({marks})", devs, through)
            return len(list(counted)) < len(devs)
        return self.conn.execute("SELECT 1 FROM reader WHERE device = ? AND floor >= ?",
                                 (device, through)).fetchone() is None

    def _counted(self) -> tuple[int, list[str]]:
        """The horizon (the lowest cursor every device seen lately has merged,
        0: none) and the ids of those devices."""
        rows = self.conn.execute(
            "SELECT r.dev, r.merged FROM reader r JOIN device d ON d.name = r.device "
            "WHERE d.revoked_at IS NULL AND r.at >= ?",
            (int(self.clock() - self.forget_after),)).fetchall()
        return (min(m for _d, m in rows) if rows else 0), [d for d, _m in rows]

    def horizon(self) -> int:
        """The sequence number every device seen lately has merged up to (0: none)."""
        return self._counted()[0]

    def collect(self, stop: threading.Event | None = None) -> int:
        """Drop the deleted rows that every device seen lately has merged the
        delete of (of a :data:`REFERENCED` table, only those every such
        device also holds nothing naming), a chunk per transaction (pushes
        go between); returns how many rows went.  The tombstone goes with
        the row's other records."""
        with transaction(self.conn):    # first: whoever merged less is stale from now
            through = self.collected_through()
            horizon, counted = self._counted()
            if horizon > through:
                self._mark_collected(horizon, counted)
        done = 0
        if horizon > through:
            done += self._scan(COLLECTABLE, through, horizon, stop,
                               lambda rows: self._collect_rows(rows, horizon))
        scanned = self._meta_int("candidates")
        if horizon > scanned:
            self._scan(REFERENCED, scanned, horizon, stop,
                       lambda rows: self._note_candidates(rows, horizon))
            if stop is not None and stop.is_set():
                return done             # the scan goes on from where it was next time
            with transaction(self.conn):
                self.conn.execute("INSERT OR REPLACE INTO meta (key, value) "
                                  "VALUES ('candidates', ?)", (str(horizon),))
        return done + self._collect_unheld(horizon, max(horizon, through), counted)

    def _mark_collected(self, mark: int, counted: list[str]) -> None:
        """Records up to ``mark`` may be collected from now: a device that
        merged less, or one not ``counted`` (it may hold what goes), rejoins
        before it sends anything (see :meth:`stale` and :meth:`_uncounted`)."""
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('collected', ?)",
                          (str(mark),))
        self.conn.execute("UPDATE reader SET floor = min(floor, ?)", (mark - 1,))
        self.conn.executemany("UPDATE reader SET floor = ? WHERE dev = ?",
                              [(mark, dev) for dev in counted])

    def _meta_int(self, key: str) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _scan(self, tables: tuple[str, ...], after: int, upto: int,
              stop: threading.Event | None, each: Callable[[set], int]) -> int:
        """``each`` (in a transaction) over the rows of ``tables`` with records
        in (``after``, ``upto``], COLLECT_CHUNK records at a time; the sum."""
        done, marks = 0, ",".join("?" * len(tables))
        while stop is None or not stop.is_set():
            chunk = self.conn.execute(
                f"SELECT seq, tbl, sid FROM change WHERE seq > ? AND seq <= ? AND tbl IN "
                f"({marks}) ORDER BY seq LIMIT ?", (after, upto, *tables, COLLECT_CHUNK)).fetchall()
            with transaction(self.conn):
                done += each({(t, sid) for _seq, t, sid in chunk})
            if len(chunk) < COLLECT_CHUNK:
                break
            after = chunk[-1][0]
        return done

    def _note_candidates(self, rows: set[tuple[str, str]], horizon: int) -> int:
        """Of ``rows``, make those that read as deleted, with every record
        merged by every device, candidates (at their last record); the rest
        are not (a row edited since is looked at again once merged)."""
        for (table, sid), versions in self._versions(rows).items():
            last = max((v[0] for v in versions), default=None)
            if last is not None and last <= horizon and versions_deleted(
                    [(v[1], v[2]) for v in versions]):
                self.conn.execute("INSERT OR REPLACE INTO candidate (tbl, sid, seq) "
                                  "VALUES (?, ?, ?)", (table, sid, last))
            else:
                self.conn.execute("DELETE FROM candidate WHERE tbl = ? AND sid = ?",
                                  (table, sid))
        return 0

    def _collect_unheld(self, horizon: int, mark: int, counted: list[str]) -> int:
        """Collect the candidates every device counted has said it holds
        nothing of, in answers that still hold (see the class), marking the
        collection up to ``mark``; forget answers no longer needed."""
        with transaction(self.conn):
            candidates = self.conn.execute("SELECT tbl, sid, seq FROM candidate WHERE seq <= ?",
                                           (horizon,)).fetchall()
            ready: set[tuple[str, str]] = set()
            if candidates and counted:
                newest = self._newest_naming(t for t, _sid, _seq in candidates)
                answers: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
                for tbl, sid, dev, upto in self.conn.execute(
                        "SELECT c.tbl, c.sid, p.dev, p.merged FROM candidate c JOIN pin p "
                        "ON p.tbl = c.tbl AND p.sid = c.sid AND p.seq = c.seq AND p.held = 0 "
                        "WHERE c.seq <= ?", (horizon,)):
                    answers[(tbl, sid)][dev] = upto
                names = dict(self.conn.execute("SELECT dev, device FROM reader").fetchall())
                ready = {(t, sid) for t, sid, _seq in candidates if all(
                    answers[(t, sid)].get(dev, -1) >= newest(t, dev, names.get(dev, ""))
                    for dev in counted)}
            done = 0
            if ready:
                self._mark_collected(mark, counted)
                done = self._collect_rows(ready, horizon)
            self.conn.execute("DELETE FROM candidate WHERE NOT EXISTS (SELECT 1 FROM change "
                              "WHERE change.tbl = candidate.tbl AND change.sid = candidate.sid)")
            self.conn.execute("DELETE FROM pin WHERE dev NOT IN (SELECT dev FROM reader) OR "
                              "NOT EXISTS (SELECT 1 FROM candidate c WHERE c.tbl = pin.tbl "
                              "AND c.sid = pin.sid AND c.seq = pin.seq)")
            self.conn.execute("DELETE FROM asked WHERE dev NOT IN (SELECT dev FROM reader)")
        return done

    def _versions(self, rows: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list]:
        """The stored versions of each (table, id): [(seq, dev, clocks, pushing
        device, size, batch)], oldest first."""
        out: dict[tuple[str, str], list] = {row: [] for row in rows}
        by_table: dict[str, set] = defaultdict(set)
        for table, sid in out:
            by_table[table].add(sid)
        for table, sids in by_table.items():
            for seq, sid, dev, clocks, device, size, batch in select_in(
                    self.conn, "SELECT c.seq, c.sid, c.dev, c.clocks, coalesce(c.device, ''), "
                    f"{_STORED_SIZE}, c.batch FROM change c WHERE c.tbl = ? "
                    "AND c.sid IN ({marks}) ORDER BY c.seq", sids, table):
                out[(table, sid)].append((seq, dev, json.loads(clocks), device, size, batch))
        return out

    def _drop_versions(self, versions: list, usage: dict[str, list[int]]) -> None:
        """Delete stored versions (from :meth:`_versions`), counting what each
        pushing device no longer stores into ``usage``."""
        self.conn.executemany("DELETE FROM change WHERE seq = ?", [(v[0],) for v in versions])
        for _seq, _dev, _clocks, owner, size, _batch in versions:
            usage[owner][0] -= 1
            usage[owner][1] -= size
        # A batch goes with the last record of it the store keeps.
        self.conn.executemany("DELETE FROM batch WHERE id = ? AND NOT EXISTS (SELECT 1 FROM "
                              "change WHERE change.batch = batch.id)",
                              [(b,) for b in {v[5] for v in versions if v[5] is not None}])

    def _add_usage(self, usage: dict[str, list[int]]) -> None:
        """Add (records, bytes) changes to each device's stored usage."""
        self.conn.executemany(
            "INSERT INTO usage (device, records, bytes) VALUES (?, ?, ?) ON CONFLICT (device) "
            "DO UPDATE SET records = records + excluded.records, bytes = bytes + excluded.bytes",
            [(owner, n, size) for owner, (n, size) in usage.items()])

    def _collect_rows(self, rows: set[tuple[str, str]], horizon: int) -> int:
        """Delete those of ``rows`` that read as deleted and whose records every
        device has merged; returns how many went."""
        gone, freed = 0, defaultdict(lambda: [0, 0])
        for versions in self._versions(rows).values():
            if versions and max(v[0] for v in versions) <= horizon and versions_deleted(
                    [(v[1], v[2]) for v in versions]):
                self._drop_versions(versions, freed)
                gone += 1
        self._add_usage(freed)
        if gone:                    # a pull from the start that began before now is stale
            self.conn.execute("INSERT INTO meta (key, value) VALUES ('sweeps', 1) ON CONFLICT "
                              "(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1")
        return gone


class _StoredBatch:
    """The encrypted batch a push brought: stored with the first of its
    records the store keeps, each of which counts an equal share of it."""

    def __init__(self, conn: sqlite3.Connection, data: bytes, records: int):
        self.conn, self.data, self.share = conn, data, len(data) // max(1, records)
        self.id: int | None = None

    def settle(self, usage: dict[str, list[int]], device: str) -> None:
        """Share the batch out over the records of it the store kept (it is
        stored and sent whole, whatever of it was refused or superseded)."""
        if self.id is None:
            return
        kept = self.conn.execute("SELECT count(*) FROM change WHERE batch = ?",
                                 (self.id,)).fetchone()[0]
        share = len(self.data) // max(1, kept)
        if kept and share != self.share:
            self.conn.execute("UPDATE change SET share = ? WHERE batch = ?", (share, self.id))
            usage[device][1] += (share - self.share) * kept

    def place(self, slot: int) -> tuple[int, int, int]:
        """(batch id, slot, share) of its ``slot``-th record."""
        if self.id is None:
            self.id = self.conn.execute("INSERT INTO batch (data) VALUES (?)",
                                        (self.data,)).lastrowid
        return self.id, slot, self.share


class ServerStore(ServerCollection):
    """The change store: accepts pushes (authors, quotas), hands out pages.

    A store is plaintext (records as devices sent them) or end to end
    (:meth:`begin_e2e`): then it holds per record only what merging needs
    and the encrypted batches the records came in, and takes nothing else.
    """

    def _parse(self, raw: Any, sealed: bool = False) -> Record:
        """The pushed record (or, ``sealed``, its metadata), checked for shape,
        sizes and clock; or RecordRefused."""
        record = parse_sealed(raw) if sealed else parse_record(raw)
        check_record_size(record, self.max_value, self.max_record)
        if max(record.clocks.values()) > hlc_at(now_ms(self.clock) + SERVER_MAX_SKEW_MS):
            raise RecordRefused("clock ahead of the server (check this device's time)")
        return record

    def e2e_params(self, *, private: bool = False, key: str = "e2e") -> dict | None:
        """The end-to-end parameters devices derive the key with (None: a
        plaintext store); ``private`` adds the proof key; ``key``
        'e2e_pending': those kept for a store not encrypted yet."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        params = json.loads(row[0])
        return params if private else public_params(params)

    def begin_e2e(self, params: dict, cursor: Any, *, replace: bool = False,
                  proof: Any = None, pending: bool = False) -> dict:
        """Make this store end to end under ``params`` (a vault's private
        parameters).  A store holding records is emptied for it (its devices
        re-seed it, encrypted), but only by a device that has merged all of
        them (``cursor``) unless ``replace`` (a new passphrase: devices keep
        their data and re-seed under it), which an end-to-end store takes
        only with ``proof`` that the device holds its current key
        (:func:`rekey_proof`).  What was deleted is erased from the file.
        Answers ``{"e2e": parameters, "store": id}``, or ``"behind": n``
        (merge up to n first), or ``"conflict": true`` (the store is end to
        end under another passphrase already, or the proof does not hold).

        ``pending`` only keeps ``params`` for a plaintext store with records,
        until a device encrypts it, so that every device set up before then
        derives the same key (answered ``{"pending": parameters}``)."""
        with transaction(self.conn):
            current = self.e2e_params(private=True)
            public = public_params(params)
            waiting = self.e2e_params(private=True, key="e2e_pending")
            if current is None and not replace and (pending or waiting is not None):
                if waiting is None:
                    self.conn.execute("INSERT INTO meta (key, value) VALUES ('e2e_pending', ?)",
                                      (json.dumps(params),))
                    waiting = params
                if waiting["check"] != params["check"]:
                    return {"conflict": True, "pending": self.e2e_params(key="e2e_pending"),
                            "store": self.store_id}
                if pending:
                    return {"pending": public, "store": self.store_id}
            if current is None or (replace and not (isinstance(proof, str) and same_signature(
                    rekey_proof(bytes.fromhex(current["proof"]), params), proof))):
                replace = False         # without the current key: as a plain request
            if current is not None and not replace:
                same = current["check"] == params["check"]
                return {"e2e": public if same else self.e2e_params(), "conflict": not same,
                        "store": self.store_id}
            high = self._max_seq()
            if high and not replace and not (type(cursor) is int and cursor == high):
                return {"behind": high, "store": self.store_id}
            wiped = bool(high) or current is not None
            if wiped:
                self._empty()
            self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('e2e', ?)",
                              (json.dumps(params),))
        if wiped:
            self.erase_freed()
        return {"e2e": public, "store": self.store_id, "emptied": wiped}

    def _empty(self) -> None:
        """Drop every record, batch, report and count; a new store identity
        (devices re-seed it)."""
        for table in ("change", "batch", "reader", "usage", "recent", "report", "candidate",
                      "asked", "pin"):
            self.conn.execute(f"DELETE FROM {table}")
        self.conn.execute("DELETE FROM meta WHERE key IN ('collected', 'candidates', 'e2e', "
                          "'e2e_pending')")
        self.conn.execute("UPDATE meta SET value = ? WHERE key = 'store_id'",
                          (new_uuid().hex,))

    def reset(self) -> None:
        """Start the store afresh, plaintext, keeping its devices (the server's
        ``reset-store``, when no device holds the sync passphrase any more:
        every device re-seeds what it holds once one sets a new one)."""
        with transaction(self.conn):
            self._empty()
        self.erase_freed()

    def erase_freed(self) -> None:
        """Rebuild the file without its free pages and empty the WAL, so what
        was deleted is gone from both (secure_delete alone leaves old WAL
        frames and pages freed before it was on)."""
        self.conn.execute("VACUUM")
        for _ in range(100):            # a reader of another connection holds it a moment
            busy = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            if not busy:
                return
            time.sleep(0.05)
        raise StoreError("could not empty the server's WAL (another process holds it)",
                         hint="stop other processes using the server's data, then sync again")

    def note_digest(self, device: str, author: str | None, report: Any) -> None:
        """Keep a device id's report ``{"dev", "cursor", "digest"}`` of what it
        holds (see :meth:`Store.content_digest`); only a key's own ids report
        (``author`` None: an in-process caller, who may report any)."""
        if not isinstance(report, dict):
            return
        dev, cursor, digest = report.get("dev"), report.get("cursor"), report.get("digest")
        if not (made_of(dev, DEVICE_ID_CHARS)
                and (author is None or author_of(dev) == author)
                and type(cursor) is int and 0 <= cursor < 2 ** 63 and isinstance(digest, str)
                and re.fullmatch(r"[0-9a-f]{64}(\.[0-9a-f]{16})?", digest)):
            return
        with transaction(self.conn):
            self.conn.execute("INSERT OR REPLACE INTO report (dev, device, cursor, digest, at) "
                              "VALUES (?, ?, ?, ?, ?)", (dev, device, cursor, digest,
                                                         int(self.clock())))
            self.conn.execute(
                "DELETE FROM report WHERE device = ? AND dev NOT IN (SELECT dev FROM report "
                "WHERE device = ? ORDER BY at DESC LIMIT ?)", (device, device, self.MAX_READERS))

    def digests(self) -> dict:
        """Every device's latest content reports, and the devices registered."""
        reports = [dict(r) for r in self.conn.execute(
            "SELECT device, dev, cursor, digest, at FROM report ORDER BY device, at DESC")]
        names = [r[0] for r in self.conn.execute(
            "SELECT name FROM device WHERE revoked_at IS NULL ORDER BY name")]
        return {"reports": reports, "devices": names}

    def _mode_refusal(self, sealed: tuple[bytes, str] | None, check: str | None) -> dict | None:
        """The answer to a request that does not suit this store's mode (None: it does)."""
        params = self.e2e_params(private=True)
        if params is None:
            return {"plaintext": True} if sealed is not None or check else None
        public = public_params(params)
        if sealed is not None:
            right = same_signature(batch_proof(bytes.fromhex(params["proof"]), sealed[0]),
                                   sealed[1])
        else:
            right = check is not None and same_signature(params["check"], check)
        return None if right else {"e2e": public}

    def push(self, records: list, *, device: str = "", cursor: int | None = None,
             author: str | None = None, sealed: tuple[bytes, str] | None = None) -> dict:
        """Store a batch in one transaction; one result per record.

        Results are ``{"status": "accepted", "seq": n}``, ``{"status":
        "superseded"}`` (the server already has newer values for every
        column) or ``{"status": "refused", "reason": ...}`` (with ``"held":
        true`` when the store holds the row all the same, ``"batch": true``
        when the batch, not the record, was too large).  When the
        device had seen everything before this batch, the answer carries a
        ``cursor`` past the batch so it is not pulled back.

        ``author`` is the pushing key's :func:`author_prefix`: a record under
        the id of another registered device's key is refused (that device
        sends its own edits).  Records under ids of no current key are
        copies a device hands back (a re-seed) and are taken.  None (an
        in-process caller) checks no authorship.

        ``sealed`` (an end-to-end store's only kind of push) is the encrypted
        batch and its proof; ``records`` are then the records' metadata
        (see :meth:`Vault.seal_records`).  A push that does not suit the
        store's mode stores nothing and is answered ``{"e2e": parameters}``
        (the store is end to end, or the batch's proof is not its key's) or
        ``{"plaintext": true}``.
        """
        results = []
        received = iso_utc(self.clock, "microseconds")
        try:
            with transaction(self.conn):
                refusal = self._mode_refusal(sealed, None)
                if refusal is not None:
                    return {**refusal, "results": [], "store": self.store_id}
                others = self._other_authors(device) if author is not None else {}
                parsed: list[Record | RecordRefused] = []
                rows: list[tuple[str, str] | None] = []     # each slot's row, once parsed
                oversized = sealed is not None and len(sealed[0]) > self.max_record * max(
                    1, len(records))
                for raw in records:
                    record = None
                    try:
                        if oversized:
                            raise BatchRefused(f"its batch is larger than {self.max_record} "
                                               f"bytes a record")
                        record = self._parse(raw, sealed is not None)
                        if sealed is None or not self._fills_gap(record, others):
                            self._check_author(record, others)
                        parsed.append(record)
                    except RecordRefused as exc:
                        parsed.append(exc)
                    rows.append(None if record is None else (record.table, record.sid))
                own = {r.dev for r in parsed if isinstance(r, Record) and author is not None
                       and author_of(r.dev) == author}
                through = self.collected_through()
                if self.stale(cursor, through) or (author is not None and self._uncounted(
                        device, own, cursor, through)):
                    return {"stale": True, "results": [], "store": self.store_id}
                before = self._max_seq()
                stored = self._versions(row for row in rows if row is not None)
                usage: dict[str, list[int]] = defaultdict(lambda: [0, 0])
                batch = _StoredBatch(self.conn, sealed[0], len(records)) if sealed else None
                empty = {row for row, versions in stored.items() if not versions}
                for slot, item in enumerate(parsed):
                    if isinstance(item, Record) and self._fills_gap(item, others) \
                            and (item.table, item.sid) not in empty:
                        item = RecordRefused(self._authored_by(item, others))
                    if isinstance(item, RecordRefused):     # held: a re-seed keeps it no more
                        held = rows[slot] is not None and bool(stored[rows[slot]])
                        results.append({"status": "refused", "reason": str(item),
                                        **({"held": True} if held else {}),
                                        **({"batch": True} if isinstance(item, BatchRefused)
                                           else {})})
                    else:
                        results.append(self._store_record(item, device, received, stored,
                                                          usage, batch, slot))
                if batch is not None:
                    batch.settle(usage, device)
                self._charge(device, len(records), usage, only_deletes=all(
                    isinstance(r, Record) and set(r.clocks) == {TOMBSTONE} for r in parsed))
                after = self._max_seq()
        except QuotaExceeded as exc:            # rolled back: nothing of the push is kept
            return {"results": [], "quota": str(exc), "retry_after": exc.retry_after,
                    "store": self.store_id}
        answer = {"results": results, "store": self.store_id}
        if cursor is not None and cursor == before:
            answer["cursor"] = after
        return answer

    def _other_authors(self, device: str) -> dict[str, str]:
        """Key prefix -> name of every other device whose key works now."""
        return {author_prefix(key_id): name for key_id, name in self.conn.execute(
            "SELECT key_id, name FROM device WHERE revoked_at IS NULL AND name != ?", (device,))}

    @classmethod
    def _check_author(cls, record: Record, others: dict[str, str]) -> Record:
        if others.get(author_of(record.dev) or "") is not None:
            raise RecordRefused(cls._authored_by(record, others))
        return record

    @staticmethod
    def _authored_by(record: Record, others: dict[str, str]) -> str:
        owner = others.get(author_of(record.dev) or "")
        return f"edits under device id {record.dev} are device {owner!r}'s: only it sends them"

    @staticmethod
    def _fills_gap(record: Record, others: dict[str, str]) -> bool:
        """True for a sealed record under another current device's id: a copy
        (a re-seed) taken only for a row the store holds nothing of, so it
        can fill what a store started afresh lost, never outdo an edit."""
        return others.get(author_of(record.dev) or "") is not None

    def _max_seq(self) -> int:
        return self.conn.execute("SELECT coalesce(max(seq), 0) FROM change").fetchone()[0]

    def _store_record(self, record: Record, device: str, received: str,
                      stored: dict[tuple[str, str], list], usage: dict[str, list[int]],
                      batch: "_StoredBatch | None" = None, slot: int = 0) -> dict:
        """Store one record unless every column of it is superseded; drop the
        versions it supersedes.  ``stored`` (from :meth:`_versions`) follows;
        ``usage`` gets the (records, bytes) each pushing device gains or loses.
        A sealed record is the ``slot``-th of ``batch``."""
        existing = stored[(record.table, record.sid)]
        new = (None, record.dev, record.clocks)
        winners = surviving_versions([v[:3] for v in existing] + [new])
        if None not in winners:
            return {"status": "superseded"}
        clocks = json.dumps(record.clocks)
        payload = "" if batch else compact_json(record.payload())
        batch_id, slot, share = batch.place(slot) if batch else (None, None, None)
        cur = self.conn.execute(
            "INSERT INTO change (tbl, sid, dev, clocks, payload, received_at, device, batch, "
            "slot, share) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.table, record.sid, record.dev, clocks, payload, received, device, batch_id,
             slot, share))
        self._drop_versions([v for v in existing if v[0] not in winners], usage)
        size = len(payload) + len(clocks) + (share or 0)
        usage[device][0] += 1
        usage[device][1] += size
        existing[:] = [v for v in existing if v[0] in winners] + \
            [(cur.lastrowid, record.dev, record.clocks, device, size, batch_id)]
        return {"status": "accepted", "seq": cur.lastrowid}

    def _charge(self, device: str, pushed: int, usage: dict[str, list[int]],
                only_deletes: bool = False) -> None:
        """Count a push against the devices' usage; QuotaExceeded when it takes
        the pushing device past its quota (the caller rolls back)."""
        self._add_usage(usage)
        minute = int(self.clock()) // 60
        gained = max(0, usage[device][1])
        self.conn.execute(
            "INSERT INTO recent (device, minute, records, bytes) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (device, minute) DO UPDATE SET records = records + excluded.records, "
            "bytes = bytes + excluded.bytes", (device, minute, pushed, gained))
        self.conn.execute("DELETE FROM recent WHERE minute <= ?", (minute - 60,))
        if not pushed:
            return
        state = self.usage(device)
        # A push that frees space, or holds only deletes (which collection
        # frees later), may go however much the device stores.
        grows = not only_deletes and (usage[device][0] > 0 or usage[device][1] > 0)
        reason = quota_refusal(device, self.quota, state["stored"] if grows else (0, 0),
                               state["hour"])
        if reason is not None:
            hourly = quota_refusal(device, self.quota, (0, 0), state["hour"]) == reason
            retry = (state["oldest_minute"] + 61) * 60 - int(self.clock()) if hourly else None
            raise QuotaExceeded(reason, retry)

    def usage(self, device: str) -> dict:
        """A device's use of its quota: stored (records, bytes), the last
        hour's (records, bytes), and the limits."""
        stored = self.conn.execute("SELECT records, bytes FROM usage WHERE device = ?",
                                   (device,)).fetchone() or (0, 0)
        minute = int(self.clock()) // 60
        hour = self.conn.execute(
            "SELECT coalesce(sum(records), 0), coalesce(sum(bytes), 0), min(minute) "
            "FROM recent WHERE device = ? AND minute > ?", (device, minute - 60)).fetchone()
        return {"stored": tuple(stored), "hour": tuple(hour[:2]),
                "oldest_minute": hour[2] if hour[2] is not None else minute,
                "limits": self.quota._asdict()}

    def pull(self, cursor: int = 0, limit: int = PULL_PAGE, since: str | None = None,
             max_bytes: int = PULL_PAGE_BYTES, check: str | None = None,
             skip: Iterable[tuple[int, int]] = (), began: int | None = None) -> dict:
        """Records after ``cursor`` (and received after ``since``), oldest first.

        A page holds at most ``limit`` records and about ``max_bytes`` of
        stored text, but always at least one record, so large rows still
        travel.  Returns ``{"records": [...], "cursor": last seq, "more": bool}``.
        """
        page = self.pull_raw(cursor, limit, since, max_bytes, check, skip, began)
        return {**page, "records": json.loads(page["records"])} if "records" in page else page

    def pull_raw(self, cursor: int = 0, limit: int = PULL_PAGE, since: str | None = None,
                 max_bytes: int = PULL_PAGE_BYTES, check: str | None = None,
                 skip: Iterable[tuple[int, int]] = (), began: int | None = None) -> dict:
        """:meth:`pull` with the records as :class:`RawJSON`: the stored text
        as it is, never parsed and written again.  A device that merged too
        little to catch up (see :meth:`stale`) gets ``"stale": true`` instead.

        ``check`` is a vault's check value: an end-to-end store answers with
        ``refs`` ([batch number, slot] per record) and the batches in
        ``blobs``, and a request whose check is not the store's (or a
        plaintext one) with ``{"e2e": parameters}``; a plaintext store asked
        with a check answers ``{"plaintext": true}``.  Records in the ``skip``
        ranges of sequence numbers (the asking device's own) are left out;
        the cursor still passes them.  A page says how often the store has
        been swept (``sweeps``); a pull that started at cursor 0 gives the
        count its first page said as ``began`` (see :meth:`stale`).
        """
        with snapshot(self.conn):          # the collected mark and the rows of one moment
            refusal = self._mode_refusal(None, check)
            if refusal is not None:
                return {**refusal, "records": RawJSON("[]"), "cursor": int(cursor),
                        "more": False, "store": self.store_id}
            skip = [(int(a), int(b)) for a, b in skip]
            if check is not None:
                return self._sealed_page(cursor, limit, since, max_bytes, skip, began)
            return self._page(cursor, limit, since, max_bytes, skip, began)

    def _page_start(self, cursor: int, since: str | None, columns: str, limit: int,
                    skip: list[tuple[int, int]], began: int | None
                    ) -> tuple[dict | None, int, sqlite3.Cursor]:
        """(a stale answer or None, the collected mark, the rows after ``cursor``)."""
        through = self.collected_through()
        if self.stale(cursor, through, began):
            return ({"stale": True, "records": RawJSON("[]"), "cursor": int(cursor),
                     "more": False, "store": self.store_id}, through, None)
        query, args = f"SELECT {columns} FROM change WHERE seq > ?", [int(cursor)]
        if since is not None:
            query += " AND received_at > ?"
            args.append(since)
        for low, high in skip:
            query += " AND seq NOT BETWEEN ? AND ?"
            args += [low, high]
        return None, through, self.conn.execute(query + " ORDER BY seq LIMIT ?", (*args, limit))

    def _page_end(self, cursor: int, last: int | None, more: bool, through: int) -> dict:
        last = int(cursor) if last is None else last
        # Past the end, a device is past what was collected (else it would
        # look stale once the collected records were the newest) and past
        # the records it was spared.
        high = self._max_seq()
        end = last if more else max(last, through, high)
        return {"cursor": end, "more": more, "store": self.store_id, "high": high,
                "sweeps": self.sweeps()}

    def _sealed_page(self, cursor: int, limit: int, since: str | None, max_bytes: int,
                     skip: list[tuple[int, int]], began: int | None) -> dict:
        """A page of an end-to-end store: each batch once, whole; records of a
        batch already on the page go past ``limit`` (they cost no bytes more)."""
        stale, through, rows = self._page_start(cursor, since, "seq, batch, slot", 4 * limit + 1,
                                                skip, began)
        if stale is not None:
            return stale
        refs, blobs, numbers, size, last, more = [], [], {}, 0, None, False
        for seq, batch, slot in rows:
            if batch not in numbers:
                data = self.conn.execute("SELECT data FROM batch WHERE id = ?",
                                         (batch,)).fetchone()[0]
                if refs and (len(refs) >= limit or size + len(data) > max_bytes):
                    more = True
                    break
                numbers[batch], size = len(blobs), size + len(data)
                blobs.append(data)
            elif len(refs) >= 4 * limit:
                more = True
                break
            refs.append([numbers[batch], slot])
            last = seq
        return {"refs": refs, "blobs": blobs, **self._page_end(cursor, last, more, through)}

    def _page(self, cursor: int, limit: int, since: str | None, max_bytes: int,
              skip: list[tuple[int, int]], began: int | None) -> dict:
        stale, through, found = self._page_start(cursor, since,
                                                 "seq, tbl, sid, dev, clocks, payload", limit + 1,
                                                 skip, began)
        if stale is not None:
            return stale
        rows, size, more = [], 0, False
        for row in found:
            size += len(row["payload"]) + len(row["clocks"]) + 64
            if len(rows) == limit or (rows and size > max_bytes):
                more = True
                break
            rows.append(row)
        records = RawJSON("[" + ",".join(
            f'{{"t":{json.dumps(r["tbl"])},"id":{json.dumps(r["sid"])},'
            f'"dev":{json.dumps(r["dev"])},"c":{r["clocks"]},"p":{r["payload"]}}}'
            for r in rows) + "]")
        return {"records": records,
                **self._page_end(cursor, rows[-1]["seq"] if rows else None, more, through)}

    def stats(self) -> dict:
        """Counts for status output: records held and the newest sequence number."""
        count, last = self.conn.execute("SELECT count(*), coalesce(max(seq), 0) FROM change"
                                        ).fetchone()
        return {"records": count, "seq": last}


##### HTTP server #############################################################
# A pure dispatch(server, method, path, headers, body) -> (status, headers,
# body) and a thin BaseHTTPRequestHandler around it.  Only push, pull and
# hello are callable over the network; registration is CLI-only.

class HttpError(Exception):
    """An error answer: status code, machine-readable code, message (and for
    a 405, the method that works: ``allow``)."""

    def __init__(self, status: int, code: str, message: str, *, allow: str = "POST"):
        super().__init__(message)
        self.status, self.code, self.allow = status, code, allow


def _json_body(data: dict) -> bytes:
    return compact_json(data).encode("utf-8")


def _op_hello(store: "ServerStore", device: sqlite3.Row, payload: dict) -> dict:
    usage = store.usage(device["name"])
    return {"device": device["name"], "server_time": store.clock(), "version": __version__,
            "seq": store.stats()["seq"], "store": store.store_id,
            "usage": {k: usage[k] for k in ("stored", "hour", "limits")},
            "e2e": store.e2e_params(), "e2e_pending": store.e2e_params(key="e2e_pending")}


def _op_push(store: "ServerStore", device: sqlite3.Row, payload: dict) -> dict:
    records, cursor = payload.get("records"), payload.get("cursor")
    sealed, blobs, proof = payload.get("sealed"), payload.get("blobs"), payload.get("proof")
    if sealed is not None:              # an end-to-end push: metadata and one batch
        records = unpack_sealed(sealed) if records is None else None
        if not (records is not None and isinstance(blobs, list) and len(blobs) == 1
                and isinstance(proof, str)):
            raise HttpError(400, "bad_request", "a sealed push needs metadata, one batch "
                                                "and its proof")
    if not isinstance(records, list) or not (cursor is None or (
            isinstance(cursor, int) and 0 <= cursor < 2 ** 63)):
        raise HttpError(400, "bad_request", "push needs a list of records")
    if store.quota.push_records and len(records) > store.quota.push_records:
        raise HttpError(413, "too_large", f"at most {store.quota.push_records} records per push "
                                          f"(the server's --max-push-records)")
    return store.push(records, device=device["name"], cursor=cursor,
                      author=author_prefix(device["key_id"]),
                      sealed=(blobs[0], proof) if sealed is not None else None)


def _op_pull(store: "ServerStore", device: sqlite3.Row, payload: dict) -> dict:
    cursor, limit, since = payload.get("cursor", 0), payload.get("limit", PULL_PAGE), \
        payload.get("since")
    max_bytes = payload.get("max_bytes", PULL_PAGE_BYTES)
    if not (isinstance(cursor, int) and isinstance(limit, int) and 0 <= cursor < 2 ** 63
            and 0 < limit < 2 ** 31 and (since is None or isinstance(since, str))
            and isinstance(max_bytes, int) and max_bytes > 0):
        raise HttpError(400, "bad_request", "pull needs an integer cursor and limit")
    if since is not None:
        try:
            since = since_key(since[:64])
        except (ValueError, OverflowError):
            raise HttpError(400, "bad_request", "since is not an ISO 8601 timestamp") from None
    check, skip, began = payload.get("e2e"), payload.get("skip", []), payload.get("began")
    if not (check is None or isinstance(check, str)):
        raise HttpError(400, "bad_request", "e2e is a vault's check value")
    if not (began is None or (type(began) is int and 0 <= began < 2 ** 63)):
        raise HttpError(400, "bad_request", "began is the sweeps count a page gave")
    if not (isinstance(skip, list) and len(skip) <= 64 and all(
            isinstance(r, list) and len(r) == 2 and all(type(n) is int and 0 <= n < 2 ** 63
                                                        for n in r) for r in skip)):
        raise HttpError(400, "bad_request", "skip is at most 64 [first, last] pairs")
    ask = store.note_reader(device["name"], author_prefix(device["key_id"]),
                            payload.get("dev"), payload.get("merged"), payload.get("pins"))
    page = store.pull_raw(cursor, min(limit, MAX_PULL_PAGE), since,
                          min(max_bytes, PULL_PAGE_BYTES), check, skip, began)
    return page if ask is None else {**page, "ask": ask}


def _op_e2e(store: "ServerStore", device: sqlite3.Row, payload: dict) -> dict:
    params = payload.get("params")
    if not valid_params(params):
        raise HttpError(400, "bad_request", "malformed end-to-end parameters")
    return store.begin_e2e(params, payload.get("cursor"), replace=payload.get("replace") is True,
                           proof=payload.get("proof"), pending=payload.get("pending") is True)


def _op_verify(store: "ServerStore", device: sqlite3.Row, payload: dict) -> dict:
    store.note_digest(device["name"], author_prefix(device["key_id"]), payload.get("report"))
    return store.digests()


SERVER_POLL_S = 0.05                   # how soon serve_forever notices shutdown()
OPERATIONS = {"/v1/hello": _op_hello, "/v1/push": _op_push, "/v1/pull": _op_pull,
              "/v1/e2e": _op_e2e, "/v1/verify": _op_verify}
MAX_PULL_PAGE = 5000
# What bounds the server (see SyncServer): every figure is per connection.
MAX_CONNECTIONS = 64                   # served at once, a thread each; more go to the door
DOOR_CAPACITY = 256                    # at the door (one thread): /health, or a fast 503
DOOR_PER_ADDRESS = 32                  # of them from one address
DOOR_WAIT_S = 0.5                      # for a request head at the door
IDLE_TIMEOUT_S = 15.0                  # for a whole request head, kept-alive or new
BODY_RATE = 128 * 1024                 # bytes/s the slowest body gets time for
REFUSAL_DRAIN_S = 2.0                  # a refused body is read and dropped this long at most
REFUSAL_DRAIN = 128 * 1024 * 1024      # and this much
BUSY_RETRY_S = 1                       # Retry-After of a 503


def _authenticate_head(store: "ServerStore", method: str, path: str, headers: dict[str, str],
                       length: int) -> tuple[sqlite3.Row, bytes, str]:
    """Check key id, timestamp, head signature and nonce before the body is
    read; returns (device, context, nonce).  The nonce is taken only once the
    body's signature holds too, so a tampered copy never burns it."""
    key_id, stamp, nonce, head, signature = (headers.get(h.lower(), "") for h in
                                             (H_KEY, H_TIME, H_NONCE, H_HEAD, H_SIG))
    if not (key_id and stamp and nonce and signature):
        raise HttpError(401, "unauthenticated", "request is not signed")
    if not head:
        raise HttpError(426, "protocol", f"this device speaks an older sync protocol than "
                                         f"the server ({PROTOCOL}): upgrade ccsync on it")
    if not re.fullmatch(r"[0-9a-f]{16,64}", nonce) or not re.fullmatch(r"-?\d{1,12}", stamp) \
            or not re.fullmatch(r"[0-9a-f]{32}", key_id):
        raise HttpError(401, "unauthenticated", "malformed signature headers")
    device = store.device_by_key_id(key_id)
    if device is None:
        raise HttpError(401, "key_rejected", "API key not recognised by this server")
    context = request_context(method, path, stamp, nonce, key_id)
    if not same_signature(sign(device["mac_key"], head_context(context, length), b""), head):
        raise HttpError(401, "bad_signature", "request signature does not match")
    if device["revoked_at"]:
        raise HttpError(403, "revoked", "this device's key was revoked")
    skew = int(stamp) - store.clock()
    if abs(skew) > MAX_SKEW_S:
        raise HttpError(401, "clock_skew",
                        f"clock skew: this device's time is {skew:+.0f} s off the server's")
    if store.nonce_seen(nonce):
        raise HttpError(401, "replay", "request replayed (nonce already seen)")
    return device, context, nonce


def protocol_mismatch(device: Any, server: int) -> str | None:
    """Why a device speaking ``device`` cannot sync with a ``server`` (None: it can)."""
    if not isinstance(device, int) or isinstance(device, bool):
        return "the request names no valid sync protocol"
    if device == server:
        return None
    older = "this device" if device < server else "the server"
    return (f"this device speaks sync protocol {device} and the server {server}: "
            f"upgrade ccsync on {older}")


Answer = tuple[int, dict[str, str], bytes]


def content_length(text: str) -> int | None:
    """A Content-Length header's value (None: not a plain decimal, e.g. "-5", "²")."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) < 20 else None


def error_answer(exc: HttpError) -> Answer:
    """The JSON answer of a refused request."""
    headers = {"Content-Type": "application/json"}
    if exc.status == 405:
        headers["Allow"] = exc.allow
    if exc.status == 503:
        headers["Retry-After"] = str(BUSY_RETRY_S)
    return exc.status, headers, _json_body({"error": str(exc), "code": exc.code})


def health_answer() -> Answer:
    """The public ``GET /health`` answer."""
    return 200, {"Content-Type": "application/json"}, _json_body(
        {"status": "ok", "version": __version__})


class Admission(namedtuple("Admission", "operation device context nonce length")):
    """A request whose head authenticated: its body may now be read (the
    ``operation`` to serve, the ``device`` row, the signing ``context``, the
    request's ``nonce`` and its body's ``length``)."""

    __slots__ = ()


def admit(server: "SyncServer", method: str, path: str, headers: dict[str, str],
          length: int | None) -> Admission | Answer:
    """Everything about a request that its head decides, before its body is
    read: an :class:`Admission`, or the final answer.  Never raises.

    ``length`` is the body's declared length (None: missing or malformed).
    """
    headers = {k.lower(): v for k, v in headers.items()}
    try:
        if method not in ("GET", "POST"):
            raise HttpError(405, "method", f"method {_printable(method, 16)} is not allowed",
                            allow="GET" if path == "/health" else "POST")
        if length is None and method == "GET":
            raise HttpError(400, "bad_request", "malformed Content-Length")
        if path == "/health":
            if method != "GET":
                raise HttpError(405, "method", "use GET", allow="GET")
            return health_answer()
        operation = OPERATIONS.get(path)
        if operation is None and (path.startswith("/rpc") or headers.get(
                "authorization", "").lower().startswith("bearer ")):
            raise HttpError(421, "not_cc_sync", "this is a ccsync server, not cc's own sync "
                                                "server: cc sync (push, pull, its daemon's "
                                                "auto-sync) cannot use it; ccsync syncs this "
                                                "data (`ccsync status`)")
        if operation is None:
            raise HttpError(404, "not_found", "no such endpoint")
        if method != "POST":
            raise HttpError(405, "method", "use POST")
        if headers.get("content-type", "").split(";")[0].strip() != WIRE_TYPE:
            raise HttpError(415, "plaintext", "plaintext requests are refused")
        if length is None or length > server.max_body:
            raise HttpError(413, "too_large", "request body too large or Content-Length "
                                              f"missing/wrong (at most {server.max_body} bytes)")
        with server.store() as store:
            device, context, nonce = _authenticate_head(store, method, path, headers, length)
        server.note_device(device["name"])
        return Admission(operation, device, context, nonce, length)
    except HttpError as exc:
        return error_answer(exc)
    except Exception as exc:            # the answer is JSON, the traceback stays here
        return _server_error(server, exc)


def _server_error(server: "SyncServer", exc: Exception) -> Answer:
    server.log(f"error: {type(exc).__name__}: {exc}")
    return 500, {"Content-Type": "application/json"}, _json_body(
        {"error": "server error (see the server's log)", "code": "server_error"})


def serve_admitted(server: "SyncServer", admission: Admission, headers: dict[str, str],
                   body: bytes) -> Answer:
    """Answer an admitted request once its body is read.  Never raises."""
    device, context, nonce = admission.device, admission.context, admission.nonce
    headers = {k.lower(): v for k, v in headers.items()}
    try:
        if len(body) != admission.length:
            raise HttpError(400, "bad_body", "the body is not as long as the request said")
        if not same_signature(sign(device["mac_key"], context, body), headers.get(
                H_SIG.lower(), "")):
            raise HttpError(401, "bad_signature", "request signature does not match")
        with server.store() as store:
            if not store.admit(device["name"], nonce):
                raise HttpError(401, "replay", "request replayed (nonce already seen)")
            try:
                payload = unseal(device["enc_key"], body, context, server.max_body)
            except BodyTooLarge as exc:
                raise HttpError(413, "too_large", str(exc)) from None
            except WireError as exc:
                raise HttpError(400, "bad_body", str(exc)) from None
            mismatch = protocol_mismatch(payload.get("protocol", 1), server.protocol)
            if mismatch:
                raise HttpError(426, "protocol", mismatch)
            answer = {**admission.operation(store, device, payload), "protocol": server.protocol}
        blobs = answer.pop("blobs", ())
        sealed = seal(device["enc_key"], answer, response_context(nonce, 200), blobs)
        return 200, {"Content-Type": WIRE_TYPE,
                     H_SIG: sign(device["mac_key"], response_context(nonce, 200), sealed)}, sealed
    except HttpError as exc:
        return error_answer(exc)
    except Exception as exc:            # the answer is JSON, the traceback stays here
        return _server_error(server, exc)


def dispatch(server: "SyncServer", method: str, path: str, headers: dict[str, str],
             body: bytes) -> Answer:
    """Answer one request whose body is at hand: (status, headers, body).

    The handler does the same in two steps (:func:`admit`, then the body,
    then :func:`serve_admitted`).  Never raises, never leaks a traceback.
    """
    declared = {k.lower(): v for k, v in headers.items()}.get("content-length")
    length = (len(body) if declared is None else content_length(declared))
    step = admit(server, method, path, headers, length)
    if not isinstance(step, Admission):
        return step
    return serve_admitted(server, step, headers, body)


MAX_HEAD = 64 * 1024                   # a request line and headers, together


class _Bounded:
    """A request's input file that ends after ``limit`` bytes (for its head:
    http.server would read up to 100 header lines of 64 KiB each)."""

    def __init__(self, raw_file: Any, limit: int):
        self.raw_file, self._left = raw_file, limit
        self.ended = False          # the input ended mid-head (not at the limit)

    def readline(self, size: int = -1) -> bytes:
        """A line, cut (or empty) once the limit is reached."""
        if self._left <= 0:
            return b""
        wanted = self._left if size < 0 else min(size, self._left)
        line = self.raw_file.readline(wanted)
        self._left -= len(line)
        self.ended = len(line) < wanted and not line.endswith(b"\n")
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw_file, name)


class _Handler:
    """Thin HTTP/1.1 adapter around :func:`admit` and :func:`serve_admitted`,
    served on http.server's request handler (see :func:`_request_handler`).

    Every wait is bounded: a request head must arrive whole within the idle
    timeout (kept-alive connections too), a body within the request timeout
    plus its length at BODY_RATE; the server's reaper closes a connection that
    overstays (see SyncServer.watch).
    """

    protocol_version = "HTTP/1.1"
    server_version = f"ccsync/{__version__}"
    sys_version = ""
    disable_nagle_algorithm = True     # keep-alive without Nagle: no 40 ms stalls

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout
        super().setup()

    def handle_one_request(self) -> None:
        self.server.watch(self.connection, self.server.idle_timeout)
        body_file = self.rfile
        # The request line and headers; one byte over, so that http.server
        # sees a request line longer than 64 KiB as such (414).
        self.rfile = _Bounded(body_file, MAX_HEAD + 1)
        try:
            super().handle_one_request()
        finally:
            self.rfile = body_file

    def handle_expect_100(self) -> bool:
        return True                     # 100 Continue is sent once the head is admitted

    def parse_request(self) -> bool:
        ok = super().parse_request()
        head = self.rfile
        self.rfile = getattr(head, "raw_file", head)   # the body: unbounded
        if self.request_version == "HTTP/0.9":    # answered with a status line all the same
            self.request_version, self.close_connection = "HTTP/1.0", True
        elif ok and getattr(head, "ended", False):
            # The head stopped before its blank line (the deadline shut the input):
            # what arrived is not the request, and is never served as one.
            self.send_error(408, "the request head did not arrive in time")
            return False
        return ok

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):     # any method: admit() answers 405 where it must
            return self._serve
        raise AttributeError(name)

    def _serve(self) -> None:
        started = time.perf_counter()
        self.server.note_device(None)
        path = self.path.split("?", 1)[0]
        headers = dict(self.headers.items())
        length = self._length()
        step = admit(self.server, self.command, path, headers, length)
        waits_for_100 = self.headers.get("Expect", "").lower() == "100-continue"
        body = b""
        if isinstance(step, Admission):
            if waits_for_100:
                self.send_response_only(100)    # only now: the head authenticated
                self.end_headers()
            self.server.watch(self.connection, self.server.request_timeout
                              + step.length / BODY_RATE)
            body = self._read(step.length)
            answer = serve_admitted(self.server, step, headers, body)
        else:
            answer = step
            if (self.command != "GET" or length) and not waits_for_100:
                self._drop_body(length)     # (a client that waits for 100 sends none)
            self.close_connection = True
        self._respond(*answer)
        self.server.log(f"{self.client_address[0]} {self.server.current_device() or '-'} "
                        f"{_printable(self.command, 16)} {_printable(self.path, 80)} "
                        f"{answer[0]} {len(body)}B {(time.perf_counter() - started) * 1000:.0f}ms")

    def _length(self) -> int | None:
        text = self.headers.get("Content-Length")
        if text is None:
            return None if self.command == "POST" else 0
        return content_length(text)

    def _read(self, size: int) -> bytes:
        try:
            return self.rfile.read(size)
        except (TimeoutError, OSError):
            return b""

    def _drop_body(self, length: int | None) -> None:
        # A refused request's body is read and dropped, never kept, for a
        # short while at most, so the client gets to read the refusal instead
        # of a broken pipe; then the connection goes.
        self.close_connection = True
        left = min(length or 0, REFUSAL_DRAIN)
        self.server.watch(self.connection, REFUSAL_DRAIN_S)
        with contextlib.suppress(OSError, ValueError):
            self.connection.settimeout(0.25)    # a body that stops coming is not waited for
            while left > 0:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)

    def _respond(self, status: int, headers: dict[str, str], answer: bytes) -> None:
        self.server.watch(self.connection, self.server.request_timeout
                          + len(answer) / BODY_RATE, writing=True)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer)))
        # Kept alive only for a device's requests, and only while slots are free:
        # a connection that polls /health (or anything) cannot hold a slot for good.
        if status >= 400 or self.path.startswith("/health") or self.server.crowded():
            self.close_connection = True
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        # http.server's own refusals (a malformed request line, headers too
        # long or too many): JSON like every other answer, and a 4xx.
        self.close_connection = True
        code = code if 400 <= code < 500 else 400
        if self.request_version == "HTTP/0.9":     # unparsed yet: answer in HTTP/1.1
            self.request_version = "HTTP/1.1"
        with contextlib.suppress(OSError):
            self._respond(*error_answer(HttpError(code, "bad_request",
                                                  message or "malformed request")))

    def log_message(self, format: str, *args: Any) -> None:   # noqa: A002
        pass                            # _serve logs one line per request itself


@functools.cache
def _request_handler() -> type:
    """:class:`_Handler` on http.server's BaseHTTPRequestHandler, made when a
    server starts: a device's commands never import http.server (nor the email
    package it brings)."""
    import http.server
    return type("_Handler", (_Handler, http.server.BaseHTTPRequestHandler), {})


def raw_answer(answer: Answer) -> bytes:
    """An answer as the bytes of a whole HTTP/1.1 response that closes the connection."""
    import http
    status, headers, body = answer
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {status} {reason}", f"Server: ccsync/{__version__}",
             *(f"{k}: {v}" for k, v in headers.items()), f"Content-Length: {len(body)}",
             "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def door_answer(head: bytes) -> Answer:
    """What the door says to a request head: /health, or busy."""
    if head.startswith(b"GET /health ") or head.startswith(b"GET /health?"):
        return health_answer()
    return error_answer(HttpError(503, "busy", "the server is busy: try again shortly"))


class _Door:
    """Connections beyond the server's limit, all on one thread (a selector):
    a ``GET /health`` is answered, any other request gets a fast 503 with
    Retry-After (its body read and dropped while it keeps coming, so the
    client reads the 503), and a head that does not arrive within DOOR_WAIT_S
    is closed.  At most DOOR_CAPACITY wait here, DOOR_PER_ADDRESS from one
    address; beyond that a connection is closed at once.  So /health answers
    while every connection is taken, unless the monitor's own address floods.
    A TLS connection's handshake is made here too, without blocking, within
    the same wait."""

    def __init__(self) -> None:
        import selectors
        import threading
        self._selector = selectors.DefaultSelector()
        self._waiting: dict[socket.socket, dict] = {}
        self._per_address: Counter = Counter()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._arrived = threading.Event()       # set by take(): the door has work
        self._thread = threading.Thread(target=self._run, name="ccsync-door", daemon=True)
        self._thread.start()

    def take(self, sock: socket.socket, address: str) -> bool:
        """Hold ``sock`` at the door (False: the door is full)."""
        import selectors
        with self._lock:
            if len(self._waiting) >= DOOR_CAPACITY \
                    or self._per_address[address] >= DOOR_PER_ADDRESS:
                return False
            sock.setblocking(False)
            self._waiting[sock] = {"until": time.monotonic() + DOOR_WAIT_S, "head": b"",
                                   "address": address, "drain": None,
                                   "shaken": not hasattr(sock, "do_handshake")}
            self._per_address[address] += 1
            self._selector.register(sock, selectors.EVENT_READ)
        self._arrived.set()
        return True

    def close(self) -> None:
        """Stop the door thread and close what waits there."""
        self._closing.set()
        self._arrived.set()
        self._thread.join(2)
        with self._lock:
            for sock in list(self._waiting):
                self._drop(sock)

    def _run(self) -> None:
        while not self._closing.is_set():
            with self._lock:
                empty = not self._waiting
                if empty:
                    self._arrived.clear()
            if empty:                   # asleep until take() (or close()) wakes it
                self._arrived.wait()
                continue
            for key, _events in self._selector.select(0.05):
                self._read(key.fileobj)
            now = time.monotonic()
            with self._lock:
                for sock in [s for s, entry in self._waiting.items() if entry["until"] <= now]:
                    self._drop(sock)

    def _read(self, sock: Any) -> None:
        import ssl
        entry = self._waiting.get(sock)
        if entry is None:
            return
        try:
            if not entry["shaken"]:
                sock.do_handshake()
                # The head then gets the door's whole wait (a far client's
                # handshake takes round trips of its own).
                entry["shaken"], entry["until"] = True, time.monotonic() + DOOR_WAIT_S
                return
            data = sock.recv(65536)
            while isinstance(sock, ssl.SSLSocket) and sock.pending():
                data += sock.recv(sock.pending())   # decrypted already: no select wakes for it
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:
            data = b""
        with self._lock:
            if self._waiting.get(sock) is not entry:
                return
            if entry["drain"] is not None:          # answered: the body is dropped
                entry["drain"] -= len(data)
                if not data or entry["drain"] <= 0:
                    self._drop(sock)
                return
            entry["head"] += data
            head, blank, rest = entry["head"].partition(b"\r\n\r\n")
            if data and not blank and len(entry["head"]) < 8192:
                return
            if not head:
                self._drop(sock)
                return
            with contextlib.suppress(OSError):
                sock.send(raw_answer(door_answer(head)))
            length = next((content_length(line.split(b":", 1)[1].decode("latin-1"))
                           for line in head.split(b"\r\n")[1:]
                           if line.lower().startswith(b"content-length:")), None)
            if not data or not blank or not length or length <= len(rest):
                self._drop(sock)
                return
            entry["drain"] = min(length - len(rest), REFUSAL_DRAIN)
            entry["until"] = time.monotonic() + REFUSAL_DRAIN_S

    def _drop(self, sock: Any) -> None:
        # With the lock held.
        import socket
        entry = self._waiting.pop(sock, None)
        if entry is not None:
            self._per_address[entry["address"]] -= 1
            if self._per_address[entry["address"]] <= 0:
                del self._per_address[entry["address"]]
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        sock.close()


class SyncServer:
    """The sync endpoint: a threading HTTP server over a data file, bounded
    (on socketserver's ThreadingMixIn and TCPServer, see :func:`_on_socketserver`).

    At most ``max_connections`` connections are served at once, each on its
    own thread; a connection beyond that waits at the door (:class:`_Door`),
    where ``/health`` is answered and anything else gets a fast 503 (clients
    retry it with backoff).  A reaper cuts short any request that overstays
    its deadline (see :meth:`watch`).

    ``start()`` serves on a background thread (tests, demo); ``serve_forever``
    in the foreground (the ``server`` command).  ``stop()`` from any other thread.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128           # the default of 5 stalls concurrent clients

    def __new__(cls, *args: Any, **kwargs: Any) -> "SyncServer":
        return super().__new__(_on_socketserver(cls))

    def server_bind(self) -> None:
        """Bind, and name the address as http.server's servers do."""
        super().server_bind()
        self.server_name, self.server_port = self.server_address[:2]

    def __init__(self, address: tuple[str, int], data_path: str, *,
                 max_body: int = DEFAULT_MAX_BODY, request_timeout: float = 30.0,
                 clock: Callable[[], float] = time.time, tls: ssl.SSLContext | None = None,
                 log: Callable[[str], None] | None = None, max_value: int = MAX_VALUE_BYTES,
                 max_record: int = MAX_RECORD_BYTES, max_connections: int = MAX_CONNECTIONS,
                 idle_timeout: float = IDLE_TIMEOUT_S, quota: Quota = Quota(),
                 forget_after: float = FORGET_AFTER_S, collect_every: float = COLLECT_EVERY_S):
        import queue
        import threading
        ServerStore.open(data_path, clock=clock).conn.close()     # create schema once
        self.data_path, self.max_body, self.request_timeout = data_path, max_body, request_timeout
        self.max_value, self.max_record, self.quota = max_value, max_record, quota
        self.forget_after, self.collect_every = forget_after, collect_every
        self.max_connections, self.idle_timeout = max_connections, idle_timeout
        self.clock, self._log = clock, log
        self.protocol = PROTOCOL            # the sync protocol this server speaks
        self._pool: queue.SimpleQueue = queue.SimpleQueue()
        self._local = threading.local()
        self._thread: threading.Thread | None = None
        self._tls = tls
        self._active = 0                    # connections served now (at most max_connections)
        self._active_lock = threading.Lock()
        self._door = _Door()
        self._turned_away, self._told_at = 0, -10.0
        self._deadlines: dict[socket.socket, tuple[float, int]] = {}
        self._deadlines_lock = threading.Lock()
        self._closing = threading.Event()
        super().__init__(address, _request_handler())
        self._reaper = threading.Thread(target=self._reap, name="ccsync-reaper", daemon=True)
        self._reaper.start()
        threading.Thread(target=self._collect, name="ccsync-collector", daemon=True).start()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection (TLS-wrapped, handshake deferred)."""
        # The TLS handshake happens on the handler's thread (first read, with
        # the request timeout), so a slow client never blocks accept().
        sock, address = self.socket.accept()
        if self._tls is not None:
            sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve a connection on a thread of its own, at the door, or not at all."""
        import threading
        if self._take_slot():
            try:
                threading.Thread(target=self._serve_connection, name="ccsync-conn",
                                 daemon=True, args=(request, client_address)).start()
            except BaseException:       # no thread (the machine's limit): the slot is free
                self._free_slot()
                self.shutdown_request(request)
                raise
        elif not self._door.take(request, client_address[0]):
            self._turned_away += 1
            now = time.monotonic()
            if now - self._told_at >= 10:   # one line per 10 s, not one per connection
                self.log(f"turned away {self._turned_away} connection(s): every connection "
                         f"is busy and the door is full (last from {client_address[0]})")
                self._turned_away, self._told_at = 0, now
            self.shutdown_request(request)

    def _take_slot(self) -> bool:
        with self._active_lock:
            if self._active >= self.max_connections:
                return False
            self._active += 1
            return True

    def _free_slot(self) -> None:
        with self._active_lock:
            self._active -= 1

    def crowded(self) -> bool:
        """True when every connection slot is taken (nothing is kept alive then)."""
        return self._active >= self.max_connections

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:               # noqa: BLE001 -- one connection's trouble
            self.log(f"{client_address[0]} - connection error: {sys.exc_info()[1]!r}"[:300])
        finally:
            self.watch(request, None)
            self._free_slot()           # before the close: whoever sees it may come back
            self.shutdown_request(request)

    def watch(self, sock: Any, seconds: float | None, *, writing: bool = False) -> None:
        """Cut ``sock`` short if it is still at this step ``seconds`` from now
        (None: no longer watched).

        A late read ends as if the client had stopped sending, so the handler
        still answers; a late write (``writing``) closes the connection.
        """
        import socket
        with self._deadlines_lock:
            if seconds is None:
                self._deadlines.pop(sock, None)
            else:
                how = socket.SHUT_RDWR if writing else socket.SHUT_RD
                self._deadlines[sock] = (time.monotonic() + seconds, how)

    def _reap(self) -> None:
        import socket
        while not self._closing.wait(0.2):
            now = time.monotonic()
            with self._deadlines_lock:
                late = [(sock, how) for sock, (deadline, how) in self._deadlines.items()
                        if deadline <= now]
                for sock, _how in late:
                    del self._deadlines[sock]
            for sock, how in late:      # wakes the thread blocked on it
                with contextlib.suppress(OSError):
                    # The plain socket's shutdown: SSLSocket.shutdown would drop the
                    # TLS layer, and the answer would then go out in clear text.
                    socket.socket.shutdown(sock, how)

    @property
    def url(self) -> str:
        """The base URL clients use, e.g. http://127.0.0.1:9100."""
        host, port = self.server_address[:2]
        return f"{'https' if self._tls else 'http'}://{host}:{port}"

    def _collect(self) -> None:
        """Every ``collect_every`` seconds, drop what every device has merged."""
        while not self._closing.wait(self.collect_every):
            try:
                with self.store() as store:
                    gone = store.collect(self._closing)
            except (sqlite3.Error, CcsyncError) as exc:
                self.log(f"collecting deleted rows failed (tried again later): {exc}")
                continue
            if gone:
                self.log(f"collected {gone} deleted row(s) every device has merged")

    @contextlib.contextmanager
    def store(self) -> Iterator[ServerStore]:
        """A pooled ServerStore connection for one request."""
        import queue
        try:
            store = self._pool.get_nowait()
        except queue.Empty:
            store = ServerStore.open(self.data_path, clock=self.clock, create=False,
                                     max_value=self.max_value, max_record=self.max_record,
                                     quota=self.quota, forget_after=self.forget_after)
        try:
            yield store
        finally:
            if store.conn.in_transaction:
                store.conn.execute("ROLLBACK")
            self._pool.put(store)

    def note_device(self, name: str | None) -> None:
        """Remember which device this thread's request is from (for the log)."""
        self._local.device = name

    def current_device(self) -> str | None:
        """The device of this thread's request, if authenticated."""
        return getattr(self._local, "device", None)

    def log(self, line: str) -> None:
        """One line to the server's log."""
        if self._log is not None:
            self._log(line)

    def start(self) -> "SyncServer":
        """Serve on a daemon thread; returns self."""
        import threading
        self._thread = threading.Thread(target=self.serve_forever, args=(SERVER_POLL_S,),
                                        name="ccsync-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket and pooled connections."""
        self.shutdown()
        if self._thread is not None:
            self._thread.join(5)
        self.server_close()

    def server_close(self) -> None:
        """Close the listening socket and stop the reaper and the door."""
        import queue
        self._closing.set()
        self._door.close()
        super().server_close()
        while True:
            try:
                self._pool.get_nowait().conn.close()
            except queue.Empty:
                break


@functools.cache
def _on_socketserver(cls: type) -> type:
    """``cls`` on socketserver's threading TCP server, made when a server is:
    a device's commands never import socketserver (nor socket)."""
    import socketserver
    if issubclass(cls, socketserver.BaseServer):
        return cls
    return type(cls.__name__, (cls, socketserver.ThreadingMixIn, socketserver.TCPServer),
                {"__module__": cls.__module__, "__doc__": cls.__doc__})


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """A server TLS context from --tls-cert/--tls-key (both or neither)."""
    import ssl
    if not cert and not key:
        return None
    if not (cert and key):
        raise UsageError("--tls-cert and --tls-key go together")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate/key: {exc}") from None
    return context


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


##### Client ##################################################################
# One _request() that signs, seals, sends and maps every failure to one
# RemoteError with a kind and an actionable message.

class _StaleConnection(Exception):
    """A kept-alive connection failed before an answer: send it anew."""


class PassphraseNeeded(CcsyncError):
    """The server's store is end to end and this device cannot take part:
    it has no sync passphrase, or one that is not the store's (changed on
    another device)."""


class PlaintextStore(Exception):
    """A device with a sync passphrase met a store that is not end to end
    yet: it makes it so (see encrypt_server)."""


def sealed_batch(vault: "Vault", records: list[dict]) -> tuple[dict, bytes, str]:
    """:meth:`Vault.seal_records`; a batch too large to seal is a too_large
    RemoteError, so that the push halves it."""
    try:
        return vault.seal_records(records)
    except BodyTooLarge as exc:
        raise RemoteError(f"{exc}: sending smaller batches").with_kind("too_large") from None


def checked_mode(answer: dict, vault: "Vault | None", where: str) -> dict:
    """``answer``, unless it says the store's mode is not this device's."""
    if "plaintext" in answer:
        raise PlaintextStore()
    if "e2e" in answer:
        if vault is None:
            raise PassphraseNeeded(f"the data on {where} is encrypted end to end and this "
                                   f"device has no sync passphrase",
                                   hint="run `ccsync setup` here and enter the sync passphrase "
                                        "of your other devices")
        raise PassphraseNeeded(f"this device's sync passphrase is not the one the data on "
                               f"{where} is encrypted with (changed on another device?)",
                               hint="run `ccsync setup` here and enter the current passphrase")
    return answer


def opened_page(vault: "Vault | None", page: dict, max_size: int) -> dict:
    """A page whose records came sealed (``refs`` into ``blobs``) with its
    records opened: a batch that does not open gives stand-ins the device
    refuses (see :class:`Unreadable`), so one forged batch stops nothing."""
    if vault is None:
        return page
    if "refs" not in page:
        if page.get("records"):         # a server making up records in plaintext
            raise RemoteError("the server sent records in plaintext to an end-to-end device: "
                              "none was merged").with_kind("bad_response")
        return page
    if not (isinstance(page["refs"], list) and isinstance(page.get("blobs", []), list)):
        raise RemoteError("the server sent a malformed page of sealed records"
                          ).with_kind("bad_response")
    batches: list[list | str] = []
    for blob in page.pop("blobs", []):
        try:
            batches.append(vault.open_batch(blob, max_size))
        except WireError as exc:
            batches.append(str(exc))
    records = []
    for ref in page.pop("refs"):
        number, slot = (ref if isinstance(ref, list) and len(ref) == 2 else (None, None))
        batch = batches[number] if type(number) is int and 0 <= number < len(batches) \
            else "a record points at no batch"
        if isinstance(batch, str):
            records.append({UNREADABLE: batch})
        elif type(slot) is int and 0 <= slot < len(batch):
            records.append(batch[slot])
        else:
            records.append({UNREADABLE: "a record points past its batch"})
    return {**page, "records": records}


class WireRequest(namedtuple("WireRequest", "path headers body")):
    """One signed, sealed request as it goes out (the seam tests record)."""

    __slots__ = ()


class Client:
    """Talks to a ccsync server as one device.  Same push/pull as LocalTransport.

    One HTTP connection is kept alive across requests (a whole sync); a
    connection the server closed while idle is opened again once.
    :meth:`close` ends it.
    """

    def __init__(self, url: str, api_key: str, *, timeout: float = 60.0,
                 ca_file: str | None = None, clock: Callable[[], float] = time.time,
                 max_response: int = 4 * DEFAULT_MAX_BODY, vault: "Vault | None" = None):
        import ssl
        import threading
        import urllib.parse
        if not re.match(r"^https?://[^/\s]+", url or ""):
            bare = re.match(r"^[\w.\[\]:-]+$", url or "") and "://" not in (url or "")
            raise ConfigError(f"server URL {url!r} is not http(s)://host[:port]",
                              hint=f"write it with its scheme: http://{url}" if bare else
                              "a URL like http://pi.lan:9100 (or https:// when the server "
                              "has --tls-cert)")
        self.url = url.rstrip("/")
        self.keys = DeviceKeys.from_api_key(api_key)
        self.timeout, self.clock, self.max_response = timeout, clock, max_response
        self._ssl = ssl.create_default_context(cafile=ca_file) \
            if self.url.startswith("https") else None
        parts = urllib.parse.urlsplit(self.url)
        try:
            self._host, self._port, self._prefix = parts.hostname, parts.port, parts.path
        except ValueError:
            raise ConfigError(f"server URL {url!r} has a bad port",
                              hint="run `ccsync setup`") from None
        self._conn: http.client.HTTPConnection | None = None
        self._served = 0                # requests the open connection has answered
        self._lock = threading.Lock()
        self.vault = vault              # None: records travel as they are (a plaintext store)

    @property
    def author(self) -> str:
        """The :func:`author_prefix` of this device's key."""
        return author_prefix(self.keys.key_id)

    def hello(self) -> dict:
        """An authenticated no-op: who am I to the server, and its time."""
        return self._request("/v1/hello", {"time": self.clock()})

    def push(self, records: list[dict], cursor: int | None = None) -> dict:
        """Send records (end to end: sealed as one batch); the server's
        per-record results (see ServerStore.push)."""
        if self.vault is None:
            answer = self._request("/v1/push", {"records": records, "cursor": cursor})
        else:
            meta, blob, proof = sealed_batch(self.vault, records)
            answer = self._request("/v1/push", {"sealed": meta, "proof": proof,
                                                "cursor": cursor}, [blob])
        return checked_mode(answer, self.vault, self.url)

    def pull(self, cursor: int, limit: int = PULL_PAGE, since: str | None = None,
             report: dict | None = None, skip: list | None = None,
             began: int | None = None) -> dict:
        """One page of records after ``cursor`` (see ServerStore.pull).

        A smaller ``limit`` also asks for proportionally fewer bytes, so a
        device that got an answer too large can shrink its pages.  ``report``
        ({"dev", "merged"}) tells the server how far this device has merged
        (see ServerStore.note_reader); ``skip``, which of its own records it
        need not get back (Store.own_ranges); ``began``, the sweeps count of
        the first page of a pull from the start (ServerStore.stale).
        """
        answer = self._request("/v1/pull", {
            "cursor": cursor, "limit": limit, "since": since, "max_bytes": page_bytes(limit),
            "e2e": self.vault.check if self.vault else None, **(report or {}),
            **({"skip": skip} if skip else {}), **({"began": began} if began is not None else {})})
        return opened_page(self.vault, checked_mode(answer, self.vault, self.url),
                           self.max_response)

    def begin_e2e(self, params: dict, cursor: int, replace: bool = False,
                  proof: str | None = None, pending: bool = False) -> dict:
        """Ask the server to make its store end to end (see ServerStore.begin_e2e)."""
        return self._request("/v1/e2e", {"params": params, "cursor": cursor, "proof": proof,
                                         "pending": pending,
                                         "replace": replace})

    def verify(self, report: dict | None) -> dict:
        """Report this device's content digest; every device's reports
        (see ServerStore.digests)."""
        return self._request("/v1/verify", {"report": report})

    def close(self) -> None:
        """Close the kept-alive connection, if any (the next request opens one).

        Safe from another thread: a request in flight on it then fails.
        """
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _request(self, path: str, payload: dict, blobs: Iterable[bytes] = ()) -> dict:
        with self._lock:                # one request at a time on the one connection
            (status, headers, answer), nonce = self._send_signed(path, payload, blobs)
        return self._read_answer(status, headers, answer, nonce)

    def _read_answer(self, status: int, headers: dict, answer: bytes, nonce: str) -> dict:
        import hmac
        expected = response_context(nonce, status)
        if not hmac.compare_digest(headers.get(H_SIG.lower(), ""),
                                   sign(self.keys.mac, expected, answer)):
            raise RemoteError(f"the answer from {self.url} failed authentication",
                              hint="the server does not hold this device's key: is the URL "
                                   "right?").with_kind("bad_response")
        try:
            data = unseal(self.keys.enc, answer, expected, self.max_response)
        except WireError as exc:
            raise RemoteError(f"unreadable answer from {self.url}: {exc}").with_kind(
                "bad_response") from None
        theirs = data.get("protocol", 1)
        if theirs != PROTOCOL:
            text = protocol_mismatch(PROTOCOL, theirs if isinstance(theirs, int) else -1)
            raise RemoteError(f"{text} ({self.url})").with_kind("protocol")
        return data

    BUSY_RETRIES = 4                    # a busy server (503) is asked again, backing off

    def _send_signed(self, path: str, payload: dict,
                     blobs: Iterable[bytes] = ()) -> tuple[tuple[int, dict, bytes], str]:
        """Seal, sign and send; ((status, headers, body), nonce).

        Every try is signed anew (a replay would be refused), and every
        request may be sent again: pushes are idempotent.  A kept-alive
        connection the server closed while idle is replaced at once; a 503
        (the server took nothing) is tried BUSY_RETRIES times more after its
        Retry-After, backing off, with jitter; a connection closed before an
        answer (a full server turns it away) once more, after a pause.
        """
        import secrets
        busy = cut = 0
        while True:
            stamp, nonce = str(int(self.clock())), secrets.token_hex(16)
            context = request_context("POST", path, stamp, nonce, self.keys.key_id)
            body = seal(self.keys.enc, {**payload, "protocol": PROTOCOL}, context, blobs)
            request = WireRequest(path, {
                "Content-Type": WIRE_TYPE, "User-Agent": f"ccsync/{__version__}",
                **signed_headers(self.keys, "POST", path, body, stamp, nonce)}, body)
            try:
                return self._send(request), nonce
            except _StaleConnection:
                continue                # the next connection is new: it cannot be stale
            except RemoteError as exc:
                if exc.kind == "busy" and busy < self.BUSY_RETRIES:
                    time.sleep(min(8.0, exc.retry_after * 2 ** busy) * (0.5 + uniform()))
                    busy += 1
                elif exc.kind == "cut" and not cut:
                    time.sleep(0.5 + uniform())
                    cut += 1
                else:
                    raise

    def _send(self, request: WireRequest) -> tuple[int, dict, bytes]:
        """One POST on the kept-alive connection: (status, headers, body), or
        RemoteError (or _StaleConnection)."""
        import socket
        import http.client
        import ssl
        reused = self._conn is not None and self._served > 0
        try:
            return self._exchange(request)
        except (http.client.BadStatusLine, ConnectionResetError, BrokenPipeError,
                ssl.SSLEOFError, ssl.SSLZeroReturnError, http.client.IncompleteRead) as exc:
            self.close()
            if reused and not isinstance(exc, http.client.IncompleteRead):
                raise _StaleConnection() from None
            raise RemoteError(f"connection to {self.url} was cut mid-response "
                              f"({type(exc).__name__})", hint="try again; nothing was "
                              "half-applied").with_kind("cut") from None
        except ssl.SSLError as exc:
            self.close()
            plain = getattr(exc, "reason", "") in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE",
                                                   "HTTP_REQUEST", "UNKNOWN_PROTOCOL")
            raise RemoteError(f"TLS failure talking to {self.url}: {exc}",
                              hint="the server answers in plain HTTP there: use http:// (or "
                                   "start it with --tls-cert/--tls-key)" if plain else
                                   "set CC_CA_FILE to the server's CA certificate"
                              ).with_kind("unreachable") from None
        except (TimeoutError, socket.timeout, OSError, http.client.HTTPException) as exc:
            self.close()
            raise RemoteError(f"server unreachable at {self.url} ({exc})",
                              hint="is `ccsync server` running there, and the URL right?"
                              ).with_kind("unreachable") from None
        except BaseException:
            self.close()
            raise

    def _exchange(self, request: WireRequest) -> tuple[int, dict, bytes]:
        import http.client
        conn = self._conn
        if conn is None:
            conn = self._conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout, context=self._ssl) \
                if self._ssl is not None else \
                http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            self._served = 0
        conn.request("POST", self._prefix + request.path, body=request.body,
                     headers=request.headers)
        response = conn.getresponse()
        length = content_length(response.getheader("Content-Length", "x"))
        if length is None and response.getheader("Transfer-Encoding") is None:
            # ccsync's server always says how long its answer is: headers
            # without it were cut short (http.client takes them as they end).
            raise http.client.IncompleteRead(b"")
        too_large = length is not None and length > self.max_response
        if not too_large:           # a declared length is read whole (short: IncompleteRead)
            answer = response.read() if length is not None else \
                response.read(self.max_response + 1)
            too_large = len(answer) > self.max_response
        if too_large:
            self.close()
            raise RemoteError(f"answer from {self.url} is too large").with_kind("too_large")
        self._served += 1
        if response.will_close:
            self.close()
        if response.status >= 400:
            error = self._http_error(response.status, response.reason, answer)
            retry = response.getheader("Retry-After", "")
            error.retry_after = min(30, int(retry)) if retry.isdigit() else BUSY_RETRY_S
            raise error
        return response.status, {k.lower(): v for k, v in response.getheaders()}, answer

    def _http_error(self, status: int, reason: str, body: bytes) -> "RemoteError":
        try:
            info = json.loads(body[:65536] or b"{}")
        except ValueError:
            info = {}
        code = info.get("code", "") if isinstance(info, dict) else ""
        message = (info.get("error") if isinstance(info, dict) else None) or reason
        hints = {
            "key_rejected": ("the server rejected this device's API key",
                             "run `ccsync register --name NAME` on the server, then "
                             "`ccsync setup` here"),
            "revoked": ("this device's key was revoked on the server",
                        "run `ccsync register --name NAME --rotate` on the server, then "
                        "`ccsync setup` here"),
            "clock_skew": (message, "fix this machine's clock (enable NTP) and retry"),
            "protocol": (message, "ccsync on every device and the server must speak the same "
                                  "sync protocol (`ccsync --version` on each)"),
            "too_large": (f"body too large for the server: {message}",
                          "raise the server's --max-body, or sync again (batches are smaller)"),
            "busy": (f"the server is busy: {message}",
                     "try again in a minute; the server is at its connection limit "
                     "(its --max-connections)"),
        }
        text, hint = hints.get(code, (f"server answered {status}: {message}", None))
        kind = code if code in hints else ("too_large" if status == 413 else "http")
        return RemoteError(f"{text} ({self.url})", hint=hint).with_kind(kind)


##### Sync ####################################################################
# One sync: prepare, push in batches, pull in pages.  The transport is any
# object with push(records, cursor) and pull(cursor, limit, since).

class LocalTransport:
    """An in-process transport to a :class:`ServerStore` (tests, benchmarks).

    Records go through a JSON round trip, as they would on the wire.
    """

    def __init__(self, server: ServerStore, device: str = "local", author: str | None = None,
                 vault: "Vault | None" = None):
        self.server = server
        self.device = device
        self.author = author            # a key prefix: authorship is checked as over HTTP
        self.vault = vault              # end to end, as a Client with one

    def push(self, records: list[dict], cursor: int | None = None) -> dict:
        """Send records to the in-process server store."""
        sealed = None
        wire = json.loads(json.dumps(records))
        if self.vault is not None:
            meta, blob, proof = sealed_batch(self.vault, wire)
            wire, sealed = unpack_sealed(json.loads(json.dumps(meta))), (blob, proof)
        return checked_mode(json.loads(json.dumps(self.server.push(
            wire, device=self.device, cursor=cursor, author=self.author, sealed=sealed))),
            self.vault, "the server")

    def pull(self, cursor: int, limit: int = PULL_PAGE, since: str | None = None,
             report: dict | None = None, skip: list | None = None,
             began: int | None = None) -> dict:
        """One page of records from the in-process server store."""
        ask = self.server.note_reader(self.device, self.author, report["dev"],
                                      report["merged"], report.get("pins")) \
            if report and self.author else None
        page = self.server.pull(cursor, limit, since, page_bytes(limit),
                                check=self.vault.check if self.vault else None,
                                skip=skip or (), began=began)
        if ask is not None:
            page["ask"] = ask
        blobs = page.pop("blobs", [])
        page = {**json.loads(json.dumps(page)), "blobs": blobs}
        return opened_page(self.vault, checked_mode(page, self.vault, "the server"),
                           4 * DEFAULT_MAX_BODY)

    def begin_e2e(self, params: dict, cursor: int, replace: bool = False,
                  proof: str | None = None, pending: bool = False) -> dict:
        """As :meth:`Client.begin_e2e`, in process."""
        return self.server.begin_e2e(params, cursor, replace=replace, proof=proof,
                                     pending=pending)

    def verify(self, report: dict | None) -> dict:
        """As :meth:`Client.verify`, in process."""
        self.server.note_digest(self.device, self.author, report)
        return json.loads(json.dumps(self.server.digests()))


class SyncResult:
    """Counts from one sync, for humans and ``--json``."""

    def __init__(self, stamped: int = 0, sent: int = 0, accepted: int = 0,
                 superseded: int = 0, refused: Counter | None = None,
                 pulled: ApplyResult | None = None, waiting: int = 0, reseeded: int = 0,
                 backup: str | None = None, quota: str | None = None, rejoined: int = 0):
        self.stamped, self.sent, self.accepted = stamped, sent, accepted
        self.superseded = superseded
        self.refused = Counter() if refused is None else refused
        self.pulled = ApplyResult() if pulled is None else pulled
        self.waiting = waiting          # rows still waiting for a parent after the pull
        self.reseeded = reseeded        # records re-sent to a new server store
        self.backup = backup            # the backup made before ccsync's first change
        self.quota = quota              # why the server took no more of this push
        self.rejoined = rejoined        # rows gone here in a rejoin (collected on the server)

    def __repr__(self) -> str:
        return f"SyncResult({self.as_dict()})"

    def as_dict(self) -> dict:
        """The counts as a JSON-ready dict (the ``--json`` output)."""
        return {"stamped": self.stamped, "sent": self.sent, "accepted": self.accepted,
                "superseded": self.superseded, "refused": dict(self.refused),
                "received": self.pulled.received, "applied": self.pulled.applied,
                "rejected": dict(self.pulled.refused), "kept_aside": self.pulled.aside,
                "waiting_for_parent": self.waiting, "reseeded": self.reseeded,
                "backup": self.backup, "quota": self.quota, "rejoined": self.rejoined}


class SyncCancelled(CcsyncError):
    """A sync stopped between two batches because stop was asked for."""


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise SyncCancelled("sync stopped before it finished (nothing half-applied)")


class _InFlight:
    """One call running on its own thread: the next request goes out while
    this device works on the last answer.  :meth:`result` waits for it."""

    def __init__(self, call: Callable[..., Any], *args: Any):
        import threading
        self._outcome: tuple[bool, Any] = (False, None)
        # An Event, not Thread.join: a join that Ctrl-C interrupts marks a
        # live thread as stopped on Python <= 3.12 (gh-90882).
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(call, args), name="ccsync-request",
                         daemon=True).start()

    def _run(self, call: Callable[..., Any], args: tuple) -> None:
        try:
            self._outcome = (True, call(*args))
        except BaseException as exc:            # handed to result()
            self._outcome = (False, exc)
        finally:
            self._done.set()

    def result(self) -> Any:
        """The call's return value, or its exception raised here."""
        self._done.wait()
        done, value = self._outcome
        if not done:
            raise value
        return value

    def settle(self, transport: Any = None, patience: float | None = None) -> None:
        """Wait for the call, ignoring its outcome (a sync that ends early).

        With ``transport``, an answer nobody will read is not waited for:
        its connection is closed, which ends a :class:`Client`'s call at
        once, and ``patience`` bounds the wait (the Client's lock keeps the
        call from overlapping the next).  A transport that cannot be closed
        is waited for.
        """
        if transport is None or not hasattr(transport, "close") or self._done.wait(0.05):
            self._done.wait()
            return
        transport.close()
        self._done.wait(patience)


def _halved(exc: RemoteError, size: int) -> int:
    """The smaller batch or page to ask for after ``exc``: half of ``size``
    when the server found it too large (and a smaller one exists), else
    ``exc`` is raised again."""
    if exc.kind != "too_large" or size <= 1:
        raise exc
    return size // 2


def _batch_refused(results: list) -> bool:
    """True when the server refused records of a push for its batch's size."""
    return any(isinstance(r, dict) and r.get("batch") is True for r in results)


def push_changes(store: Store, transport: Any, result: SyncResult,
                 batch_size: int = PUSH_BATCH, stop: threading.Event | None = None,
                 progress: Progress | None = None) -> None:
    """Send every pending row in batches, settling each batch as it returns.

    While the server stores a batch of edited rows, the next one is read
    here.  Reading never depends on what settling another batch of rows
    writes; deletes and kept edits (which may) are read after it.
    ``progress`` hears how many records went, of about how many.
    """
    leg = Leg(progress, "push", store.unsent_rows() if progress else None)
    position, batch, sending, following = None, None, None, None
    try:
        while True:
            _check_stop(stop)
            batch = following or store.capture(position, batch_size)
            following = None
            if batch.next_pos is None:
                return
            records = [r for r in batch.records if r is not None]
            sending = _InFlight(transport.push, records, store.cursor) if records else None
            if batch.next_pos[1] == 1:
                following = store.capture(batch.next_pos, batch_size)
            try:
                answer = sending.result() if sending else {"results": []}
            except RemoteError as exc:
                sending = None
                batch_size = _halved(exc, batch_size)    # the same position, a smaller batch
                following = None
                continue
            sending = None
            if answer.get("stale"):         # nothing stored: catch up first (sync_once)
                raise StaleDevice("this device was away longer than the server keeps deletes")
            if "quota" in answer:           # nothing of it was stored: it all stays pending
                result.quota = str(answer["quota"])[:300]
                store.note_push_refused(result.quota)
                return
            if batch_size > 1 and _batch_refused(answer.get("results", [])):
                batch_size, following = batch_size // 2, None
                continue                    # the same position: alone each row may go
            # A fast-forward cursor from a store this device does not know is not
            # ours; the pull that follows notices the new store and re-seeds it.
            trusted = not store.server_changed(answer.get("store"))
            counts, reasons = store.ack(batch, answer.get("results", []),
                                        answer.get("cursor") if trusted else None)
            if result.sent == 0:
                store.note_push_refused(None)
            result.sent += len(records)
            result.accepted += counts.get("accepted", 0)
            result.superseded += counts.get("superseded", 0)
            result.refused.update(reasons)
            leg.at(result.sent)
            position = batch.next_pos
    finally:
        if sending is not None:         # never leave a request in flight behind (one cut
            sending.settle(transport)   # short is sent again next time: pushes are idempotent)


class StaleDevice(Exception):
    """The server collected deletes this device has not merged: it rejoins."""


def _start_rejoin(store: Store) -> None:
    _log().warning("this device was away longer than the server keeps deletes: pulling "
                   "everything again (its own edits since still go out)")
    store.start_rejoin()


def _pins(store: Store, transport: Any) -> dict | None:
    """This device's answer to the server's last ask, by the ids the server
    knows rows by (see Store.pins)."""
    vault = getattr(transport, "vault", None)
    return store.pins(vault.row_id if vault else None)


def _answer_after_pull(store: Store, transport: Any, cursor: int) -> None:
    """Answer the server's ask again once the pull is merged (see
    ServerCollection): the answer the first request carried is older than
    the time entries the pull brought, and the server takes an answer only
    when it is newer than the other devices' newest.  Only with nothing
    here unsent (the report says every edit made here is on the server)."""
    pins = _pins(store, transport)
    if not pins or any(n for counts in store.pending().values() for n in counts.values()):
        return
    with contextlib.suppress(RemoteError):      # advice: the sync is done
        page = transport.pull(cursor, 1, report={"dev": store.device_id, "merged": cursor,
                                                 "pins": pins})
        if "ask" in page:
            store.keep_ask(page["ask"])


def _left(cursor: int, high: int, spared: list[list[int]]) -> int:
    """About how many records a pull past ``cursor`` has left, up to ``high``:
    the sequence numbers between, less the ``spared`` ranges (not sent)."""
    own = sum(max(0, min(last, high) - max(first - 1, cursor)) for first, last in spared)
    return max(0, high - cursor - own)


def pull_changes(store: Store, transport: Any, result: SyncResult, page_size: int = PULL_PAGE,
                 since: str | None = None, max_pages: int = 10 ** 6,
                 stop: threading.Event | None = None, report: bool = False,
                 progress: Progress | None = None, reseed: bool = True) -> None:
    """Fetch and merge pages until the server has nothing newer.

    The next page is fetched while this one merges.  With ``since``, the
    pull starts from the beginning but only asks for changes the server
    received after that time; the cursor is not moved.  With ``report``
    (every edit made here is on the server), the first request says how
    far this device had merged, so the server may collect what all
    devices have.  A device the server finds stale, or one rejoining,
    pulls everything and then ends its rejoin (Store.finish_rejoin).  A
    new server store is re-seeded once a pull at most (a server that keeps
    changing is an error); without ``reseed`` (a pull in plaintext, before
    encrypting the store) this device only merges it from the start.
    """
    def pinned(cursor: int) -> dict:
        # The answer to what the server asked at the last report (see Store.pins).
        pins = _pins(store, transport) if cursor else None
        return {"pins": pins} if pins else {}

    def spared() -> list[list[int]]:
        # Its own records need not come back, unless it rejoins (it counts what it sees).
        return store.own_ranges() if not since and not store.rejoining() else []

    def fetch(cursor: int, report: bool = False) -> _InFlight:
        # Starting afresh (cursor 0) is always worth saying: it holds nothing collected.
        told = [{"dev": store.device_id, "merged": cursor, **pinned(cursor)}] \
            if (report or cursor == 0) and not since else []
        skip = spared()
        extra = {**({"skip": skip} if skip else {}),
                 **({"began": began} if cursor and began is not None else {})}
        call = functools.partial(transport.pull, **extra) if extra else transport.pull
        return _InFlight(call, cursor, page_size, since, *told)

    cursor = 0 if since else store.cursor
    began: int | None = None            # the sweeps count when this pull was at cursor 0
    store.watch_resends()
    reported = cursor
    restarted: list[str] = []           # new stores met (each re-seeded once)
    stales = 0
    if progress:
        progress("pull", 0, None)
        before = result.pulled.received     # a sync's second pull counts from 0 again
    fetching = fetch(cursor, report)
    try:
        for _ in range(max_pages):
            _check_stop(stop)
            try:
                page = fetching.result()
            except RemoteError as exc:
                fetching = None
                page_size = _halved(exc, page_size)      # the same cursor, a smaller page
                fetching = fetch(cursor)
                continue
            if "ask" in page:           # the answer to this sync's report
                store.keep_ask(page["ask"])
            if store.server_changed(page.get("store")) and page["store"] not in restarted:
                fetching = None
                if len(restarted) >= 2:
                    raise RemoteError("the server's store kept changing during one sync",
                                      hint="is the server's data file being replaced? "
                                           "sync again later").with_kind("bad_response")
                restarted.append(page["store"])
                if reseed:
                    reseed_server(store, transport, result, page["store"], stop)
                cursor = 0
                fetching = fetch(cursor)
                continue
            if page.get("stale"):
                fetching = None
                stales += 1
                if stales > 3:
                    raise RemoteError("the server kept saying this device is stale",
                                      hint="sync again later").with_kind("stale")
                _start_rejoin(store)
                cursor, began = 0, None
                fetching = fetch(cursor)
                continue
            if cursor == 0:             # from the start: its later pages say so (stale())
                began = page.get("sweeps") if type(page.get("sweeps")) is int else None
            records, cursor = page.get("records", []), int(page.get("cursor", cursor))
            fetching = fetch(cursor) if page.get("more") else None
            result.pulled.add(store.apply_page(records, None if since else cursor))
            if progress:                # records left: about the sequence numbers left
                high = page.get("high")
                done = result.pulled.received - before
                progress("pull", done, done + _left(cursor, high, spared()) if isinstance(
                    high, int) and page.get("more") else done)
            if fetching is None:
                store.queue_resends()
                if store.rejoining() and not since:
                    result.rejoined += store.finish_rejoin()
                result.waiting = store.resolve_pending()
                if report and not since and cursor != reported:
                    _answer_after_pull(store, transport, cursor)
                return
    finally:
        if fetching is not None:        # a page fetched ahead that nobody will merge
            fetching.settle(transport, patience=1.0)
    raise RemoteError("server kept sending pages; stopped after %d" % max_pages)


def _push_rejoining(store: Store, transport: Any, result: SyncResult, batch_size: int,
                    page_size: int, stop: threading.Event | None,
                    progress: Progress | None = None) -> None:
    """push_changes; a device the server finds stale rejoins first (a few times
    at most: the server may collect again meanwhile)."""
    for _attempt in range(3):
        try:
            push_changes(store, transport, result, batch_size, stop, progress)
            return
        except StaleDevice:
            _start_rejoin(store)
            pull_changes(store, transport, result, page_size, stop=stop, progress=progress)
    raise RemoteError("the server kept collecting while this device caught up",
                      hint="sync again; nothing was lost").with_kind("stale")


def reseed_server(store: Store, transport: Any, result: SyncResult, store_id: str,
                  stop: threading.Event | None = None) -> None:
    """Hand this device's synced state to a new (or rebuilt) server store,
    and what it keeps aside for tables it lacks, then rejoin the store
    (Store.adopt_server): what the store refused stays here."""
    _log().warning("the server's change store is new: sending this device's synced state again")
    refused: set[tuple[str, str]] = set()
    _reseed_from(store.reseed_records, None, transport, result, refused, stop)
    _reseed_from(store.aside_records, "", transport, result, refused, stop)
    if refused:
        _log().warning("the new server store refused %d rows of this device's synced state; "
                       "they stay here", len(refused))
    store.adopt_server(store_id, refused)


def _reseed_from(read: Callable[[Any, int], tuple[list[dict], Any]], start: Any,
                 transport: Any, result: SyncResult, refused: set[tuple[str, str]],
                 stop: threading.Event | None) -> None:
    """Push every batch ``read(position, size)`` gives, from ``start`` until
    it gives no next position; ``refused`` gets the rows the store refused
    and does not hold.  A quota answer stops the re-seed (not adopted: it
    is tried again whole next time)."""
    position, size = start, PUSH_BATCH
    while True:
        _check_stop(stop)
        records, following = read(position, size)
        if records:
            try:
                answer = transport.push(records, None)
            except RemoteError as exc:
                size = _halved(exc, size)               # the same position, a smaller batch
                continue
            if "quota" in answer:
                raise RemoteError(f"the new server store took no more of this device's "
                                  f"synced state: {str(answer['quota'])[:300]}",
                                  hint="its operator sets the limits (`ccsync server "
                                       "--help`); the next sync tries again").with_kind("quota")
            results = answer.get("results")
            if not (isinstance(results, list) and len(results) == len(records)):
                raise RemoteError("server answered a re-seed push with the wrong number of "
                                  "results").with_kind("bad_response")
            if size > 1 and _batch_refused(results):
                size //= 2                  # the same position: alone each row may go
                continue
            refused.update(_refused_rows(records, results))
            result.reseeded += len(records)
        if following is None:
            return
        position = following


def _refused_rows(records: list[dict], results: list) -> set[tuple[str, str]]:
    """The (table, sync_id) of the pushed ``records`` the server refused and
    does not hold (an older server never says it holds one)."""
    return {(record.get("t"), record.get("id")) for record, answer in zip(records, results)
            if isinstance(answer, dict) and answer.get("status") == "refused"
            and answer.get("held") is not True
            and isinstance(record.get("t"), str) and isinstance(record.get("id"), str)}


@contextlib.contextmanager
def _in_plaintext(transport: Any) -> Iterator[None]:
    vault, transport.vault = transport.vault, None
    try:
        yield
    finally:
        transport.vault = vault


def encrypt_server(store: Store, transport: Any, result: SyncResult,
                   stop: threading.Event | None = None) -> None:
    """Make a plaintext server store end to end under the transport's vault.

    This device first catches up in plaintext (so it holds all the store
    does), then the server starts the store afresh, encrypted, and erases
    the plaintext from its file.  This device's re-seed follows (the store
    is new), and each other device re-seeds once it has the passphrase, so
    nothing any device holds is lost.
    """
    _log().info("the server keeps this data in plaintext: encrypting it end to end")
    if store.meta("e2e_seen"):          # it was end to end: take no plaintext from it now
        with _in_plaintext(transport):
            probe = transport.pull(0, 1)
        if probe.get("records"):
            raise RemoteError("the server's store was encrypted end to end and now holds "
                              "records in plaintext: none was taken",
                              hint="was the server's data restored from a backup of before "
                                   "encryption? ask its operator; move it away to start "
                                   "afresh").with_kind("bad_response")
        _refuse_conflict(transport.begin_e2e(transport.vault.params(private=True), 0), True)
        return
    for _attempt in range(3):
        with _in_plaintext(transport):      # merge only: nothing of this device goes out
            pull_changes(store, transport, result, stop=stop, reseed=False)
        answer = transport.begin_e2e(transport.vault.params(private=True), store.cursor)
        _refuse_conflict(answer)
        if "behind" not in answer:
            return
    raise RemoteError("other devices kept pushing while this one encrypted the server's store",
                      hint="sync again; nothing was lost").with_kind("busy")


def _refuse_conflict(answer: dict, behind_too: bool = False) -> None:
    """PassphraseNeeded when begin_e2e says another passphrase took the store
    (``behind_too``: a store that holds records, for a device that merged none)."""
    if answer.get("conflict") or (behind_too and "behind" in answer):
        raise PassphraseNeeded("the server's data was just encrypted under another sync "
                               "passphrase (by another device)",
                               hint="run `ccsync setup` here and enter that passphrase")


DIGEST_EVERY_S = 600.0                  # a device reports its content digest at most this often
PLAINTEXT_DIGEST_KEY = b"ccsync-plaintext-store"


def digest_key(transport: Any) -> bytes:
    """What content digests are keyed with: the vault's key (a plaintext
    store, whose server reads everything anyway: a fixed one)."""
    vault = getattr(transport, "vault", None)
    return vault.digest_key if vault is not None else PLAINTEXT_DIGEST_KEY


def report_digest(store: Store, transport: Any) -> dict:
    """Tell the server this device's content digest at its cursor (see
    Store.content_digest); every device's reports."""
    digest = store.content_digest(digest_key(transport))
    report = None if digest is None else {"dev": store.device_id, "cursor": store.cursor,
                                          "digest": digest}
    answer = transport.verify(report)
    if report is not None:
        store.note_digest_reported(report["cursor"])
    return {**answer, "mine": report}


def sync_once(store: Store, transport: Any, *, push: bool = True, pull: bool = True,
              since: str | None = None, batch_size: int = PUSH_BATCH,
              page_size: int = PULL_PAGE, stop: threading.Event | None = None,
              digest_every: float = DIGEST_EVERY_S,
              progress: Progress | None = None) -> SyncResult:
    """One sync: stamp and capture, push pending rows, pull and merge the rest.

    ``stop`` (an Event) ends the sync between two batches or pages; every
    batch and page is its own transaction, so stopping never leaves half.
    A transport with a vault makes a plaintext store end to end first.  A
    full sync after which this device holds what the server does reports
    its content digest (for ``status --verify``) when the cursor moved, at
    most every ``digest_every`` seconds.  ``progress`` hears each leg's
    records done (see push_changes).
    """
    result = SyncResult(stamped=store.prepare(progress), backup=store.backup_path)
    if getattr(transport, "author", None):
        store.take_author(transport.author)
    try:
        try:
            _sync_legs(store, transport, result, push, pull, since, batch_size, page_size, stop,
                       progress)
        except PlaintextStore:
            encrypt_server(store, transport, result, stop)
            try:
                _sync_legs(store, transport, result, push, pull, since, batch_size, page_size,
                           stop, progress)
            except PlaintextStore:
                raise RemoteError("the server took this device's end-to-end parameters but "
                                  "still answers in plaintext", hint="is it a ccsync server "
                                  "of this version? nothing was sent in plaintext"
                                  ).with_kind("bad_response") from None
        if getattr(transport, "vault", None) is not None and not store.meta("e2e_seen"):
            store.note_e2e_seen()
        if push and pull and not since and hasattr(transport, "verify") \
                and store.digest_due(digest_every):
            with contextlib.suppress(RemoteError):     # a report is advice: the sync is done
                report_digest(store, transport)
    finally:
        if hasattr(transport, "close"):     # the connection lives as long as one sync
            transport.close()
    return result


def _sync_legs(store: Store, transport: Any, result: SyncResult, push: bool, pull: bool,
               since: str | None, batch_size: int, page_size: int,
               stop: threading.Event | None, progress: Progress | None) -> None:
    if store.rejoining():           # a copy, or an interrupted rejoin: catch up first
        pull_changes(store, transport, result, page_size, stop=stop, progress=progress)
    if push:
        _push_rejoining(store, transport, result, batch_size, page_size, stop, progress)
    if pull:
        result.pulled.add(store.retry_held())
        every_edit_sent = push and result.quota is None and not result.refused
        pull_changes(store, transport, result, page_size, since, stop=stop,
                     report=every_edit_sent, progress=progress)
        if push and store.resends_queued:   # deletes the pull found the server lacks
            _push_rejoining(store, transport, result, batch_size, page_size, stop, progress)


##### Configuration ###########################################################
# Where things live: the device's .env (server URL + API key) and the server's
# data file.  Environment variables win over the file.

ENV_SERVER, ENV_API_KEY, ENV_CA_FILE = "CCSYNC_SERVER", "CCSYNC_API_KEY", "CC_CA_FILE"
# cc's docs name these; cc 4.0's own sync reads them too, so setup writes the
# CCSYNC_ names and ccsync reads these only when those are not set.
CC_SERVER_NAMES = {ENV_SERVER: "CC_SERVER", ENV_API_KEY: "CC_API_KEY"}
ENV_E2E_KEY = "CCSYNC_E2E_KEY"          # the vault (Vault.text), written by setup
ENV_PASSPHRASE = "CCSYNC_PASSPHRASE"    # read by setup only (for scripted setups)
# scrypt's n for a new passphrase (setup only): a machine short of memory may
# ask for less than 128 MiB; every device then derives at the store's cost.
ENV_SCRYPT_N = "CCSYNC_SCRYPT_N"
CC_DIR = os.path.join("~", ".cc-cli")
DEFAULT_SERVER_DATA = os.path.join(CC_DIR, "ccsync_server.db")


class Config:
    """This device's sync settings and where each came from."""

    def __init__(self, server: str | None, api_key: str | None, ca_file: str | None,
                 env_path: str, sources: dict[str, str], e2e_key: str | None = None,
                 cc_sync: str | None = None):
        self.server, self.api_key, self.ca_file = server, api_key, ca_file
        self.env_path, self.sources, self.e2e_key = env_path, sources, e2e_key
        self.cc_sync = cc_sync          # where CC_SERVER + CC_API_KEY are set for cc's own sync

    @property
    def vault(self) -> "Vault | None":
        """The stored end-to-end key (None: none set up here)."""
        return Vault.parse(self.e2e_key) if self.e2e_key else None

    @property
    def configured(self) -> bool:
        return bool(self.server and self.api_key)


def env_file_path() -> str:
    """~/.cc-cli/.env."""
    return os.path.expanduser(os.path.join(CC_DIR, ".env"))


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (comments, blanks and quotes handled)."""
    values = {}
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return values
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    for line in lines:
        line = line.strip()
        if line.startswith("export "):
            line = line[7:].lstrip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def write_env_file(path: str, updates: dict[str, str | None]) -> None:
    """Set keys in a .env file (None: remove the key), keeping its other lines;
    written atomically, mode 600."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        lines = []
    pending = dict(updates)
    out = []
    for line in lines:
        key = line.strip().removeprefix("export ").split("=", 1)[0].strip()
        if "=" in line and key in pending:
            value = pending.pop(key)
            if value is not None:
                out.append(f"{key}={value}")
        else:
            out.append(line)
    out += [f"{key}={value}" for key, value in pending.items() if value is not None]
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(out) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_config(environ: dict) -> Config:
    """CCSYNC_SERVER / CCSYNC_API_KEY (else cc's CC_SERVER / CC_API_KEY), CC_CA_FILE
    and CCSYNC_E2E_KEY: from the environment, else from ~/.cc-cli/.env."""
    path = env_file_path()
    from_file = read_env_file(path)
    places = (("environment", environ), (path, from_file))
    # ccsync's own names, set anywhere, outrank cc's: the server and its key
    # come from one set of names, never cc's server with ccsync's key.
    own = any(found.get(name) for _where, found in places for name in CC_SERVER_NAMES)
    values, sources = {}, {}
    for name in (ENV_SERVER, ENV_API_KEY, ENV_CA_FILE, ENV_E2E_KEY):
        given = name if own else CC_SERVER_NAMES.get(name, name)
        for where, found in places:
            if found.get(given):
                values[name], sources[name] = found[given], where
                break
    cc_sync = next((where for where, found in (("the environment", environ), (path, from_file))
                    if found.get("CC_SERVER") and found.get("CC_API_KEY")), None)
    return Config(values.get(ENV_SERVER), values.get(ENV_API_KEY), values.get(ENV_CA_FILE),
                  path, sources, values.get(ENV_E2E_KEY), cc_sync)


def client_for(config: Config, *, timeout: float = 60.0) -> Client:
    """A Client from this device's configuration, or a ConfigError saying what to do."""
    if not config.configured:
        raise ConfigError("sync is not configured (no CCSYNC_SERVER / CCSYNC_API_KEY)",
                          hint="run `ccsync setup`")
    return Client(config.server, config.api_key, ca_file=config.ca_file, timeout=timeout,
                  vault=config.vault)


def resolve_db_path(arg: str | None, environ: dict) -> str:
    """--db, else $CC_DB, else ~/.cc-cli/cc_cli.db."""
    return os.path.expanduser(arg or environ.get(ENV_DB) or DEFAULT_DB)


def resolve_server_data(arg: str | None) -> str:
    """--data, else ~/.cc-cli/ccsync_server.db."""
    return os.path.expanduser(arg or DEFAULT_SERVER_DATA)


def mask_key(key: str | None) -> str:
    """An API key shown as its last four characters."""
    return f"...{key[-4:]}" if key else "none"


##### Auto-sync ###############################################################
# A background loop for cc's daemon (and the `daemon` command): one sync per
# interval, backoff with jitter after failures, one sync at a time per
# database across processes.  Never raises into the host.

MAX_BACKOFF = 3600.0
MIN_INTERVAL_S, MAX_INTERVAL_S = 10.0, 86400.0     # between syncs; cc's own is 300


def loop_interval(value: Any) -> float:
    """``value`` as seconds between syncs, within MIN_INTERVAL_S..MAX_INTERVAL_S
    (a host's 0 would hammer the server: it gets the floor, with a warning;
    what is not a number, 300)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    bounded = 300.0 if seconds != seconds else min(max(seconds, MIN_INTERVAL_S), MAX_INTERVAL_S)
    if bounded != seconds:
        _log().warning("auto-sync interval %r is not %g to %g s: using %g s", value,
                       MIN_INTERVAL_S, MAX_INTERVAL_S, bounded)
    return bounded


def next_delay(interval: float, failures: int, rand: Callable[[], float] = uniform) -> float:
    """Seconds until the next sync: ``interval`` after a success, else an
    exponential backoff (capped at an hour) with 50-100 % jitter."""
    if failures <= 0:
        return interval
    cap = max(MAX_BACKOFF, interval)
    return min(cap, interval * 2.0 ** min(failures, 64)) * (0.5 + 0.5 * rand())


class SyncLock:
    """An exclusive lock file next to the database, so two syncs (threads,
    cron and the daemon) never interleave on it."""

    def __init__(self, db_path: str):
        self.path = db_path + ".ccsync-lock"
        self._fh: Any = None

    def acquire(self, timeout: float = 0.0) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds; False if still held."""
        import threading
        deadline = time.monotonic() + timeout
        fh = open(self.path, "a+b")
        waiter = threading.Event()
        while True:
            try:
                _lock_file(fh)
            except OSError:
                if time.monotonic() >= deadline:
                    fh.close()
                    return False
                waiter.wait(0.05)
                continue
            self._fh = fh
            return True

    def release(self) -> None:
        """Let the next sync in."""
        if self._fh is not None:
            _unlock_file(self._fh)
            self._fh.close()
            self._fh = None


def _lock_file(fh: Any) -> None:
    if os.name == "nt":
        import msvcrt
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock_file(fh: Any) -> None:
    if os.name == "nt":
        import msvcrt
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class SyncBusy(CcsyncError):
    """Another sync holds this database's sync lock."""


def run_sync(store: Store, client: Any, *, push: bool = True, pull: bool = True,
             since: str | None = None, lock_timeout: float = 300.0,
             stop: threading.Event | None = None,
             clock: Callable[[], float] = time.time,
             progress: Progress | None = None) -> SyncResult:
    """sync_once under the database's sync lock, noting the outcome for status."""
    lock = SyncLock(store.path)
    if not lock.acquire(lock_timeout):
        raise SyncBusy(f"another sync is running on {store.path}",
                       hint="wait for it (cron and the daemon take turns)")
    try:
        result = sync_once(store, client, push=push, pull=pull, since=since, stop=stop,
                           progress=progress)
    except SyncCancelled:
        raise
    except CcsyncError as exc:
        _note_outcome(store, error=f"{iso_utc(clock)} {exc}")
        raise
    finally:
        lock.release()
    _note_outcome(store, ok=iso_utc(clock))
    return result


def _note_outcome(store: Store, *, ok: str | None = None, error: str | None = None) -> None:
    with contextlib.suppress(sqlite3.Error, CcsyncError):
        if store.installed():
            with transaction(store.conn):
                if ok:
                    store.set_meta("last_sync", ok)
                store.set_meta("last_error", error)


class AutoSync:
    """Background push/pull every ``interval`` seconds, for cc's daemon.

    ``db_path``, ``server`` and ``api_key`` default to --db/$CC_DB and
    CCSYNC_SERVER/CCSYNC_API_KEY, else CC_SERVER/CC_API_KEY (environment, else
    ~/.cc-cli/.env; see load_config), read at start().
    ``start()`` returns False (and does nothing) when sync is not configured.
    ``stop()`` returns within a second; a sync in flight ends at its next
    batch boundary, never inside a transaction.  Nothing here raises into
    the host: outcomes are in ``last_result`` / ``last_error`` and the
    ``ccsync`` logger.
    """

    def __init__(self, db_path: str | None = None, server: str | None = None,
                 api_key: str | None = None, interval: float = 300.0, *,
                 environ: dict | None = None, clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = uniform, lock_wait: float = 0.0):
        import threading
        self.interval = loop_interval(interval)
        self.last_result: SyncResult | None = None
        self.last_error: str | None = None
        self.last_sync_at: float | None = None
        self.failures = 0
        self._db_path, self._server, self._api_key = db_path, server, api_key
        self._environ, self._clock, self._rand, self._lock_wait = environ, clock, rand, lock_wait
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def environ(self) -> dict:
        """The environment this loop reads (the process's unless one was given)."""
        return os.environ if self._environ is None else self._environ

    def _settings(self) -> tuple[str, str | None, str | None, Config]:
        environ = self.environ
        config = load_config(environ)
        return (resolve_db_path(self._db_path, environ), self._server or config.server,
                self._api_key or config.api_key, config)

    @property
    def configured(self) -> bool:
        """True when a server URL and an API key are known."""
        try:
            _db, server, key, _config = self._settings()
        except CcsyncError:
            return False
        return bool(server and key)

    @property
    def running(self) -> bool:
        """True while the loop's thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> bool:
        """Start the loop on a daemon thread; False (a no-op) when not configured."""
        import threading
        if self.running:
            return True
        if not self.configured:
            _log().info("auto-sync not started: sync is not configured (run `ccsync setup`)")
            return False
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="ccsync-autosync", daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout: float = 1.0) -> bool:
        """Ask the loop to end and wait up to ``timeout``; True if it has ended."""
        import threading
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self.running

    def request_stop(self) -> None:
        """Ask the loop to end without waiting (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> None:
        """The loop itself, on the calling thread: sync now, then every interval."""
        delay = 0.0
        while not self._stop.wait(delay):
            self.sync_now()
            delay = next_delay(self.interval, self.failures, self._rand)
            if self.failures:
                _log().warning("next sync attempt in %.0f s", delay)

    def sync_now(self) -> SyncResult | None:
        """One sync on the calling thread; the result, or None (see last_error)."""
        try:
            result = self._sync()
        except SyncCancelled:
            _log().info("sync stopped")
            return None
        except SyncBusy as exc:
            _log().info("%s; skipped this round", exc)
            return None
        except Exception as exc:       # never raise into the host program
            self.failures += 1
            self.last_error = f"{iso_utc(self._clock)} {exc}"
            if isinstance(exc, CcsyncError):
                _log().warning("sync failed: %s", exc)
            else:
                _log().exception("sync failed unexpectedly")
            return None
        self.failures, self.last_error = 0, None
        self.last_result, self.last_sync_at = result, self._clock()
        _log().info("synced: %s", "; ".join(summary_lines(result, push=True, pull=True)))
        return result

    def _sync(self) -> SyncResult:
        db_path, server, api_key, config = self._settings()
        if not (server and api_key):
            raise ConfigError("sync is not configured", hint="run `ccsync setup`")
        store = open_store(db_path, local_settings=split_names(
            self.environ.get(ENV_LOCAL_SETTINGS)))
        try:        # end to end with the key setup stored (CCSYNC_E2E_KEY)
            client = Client(server, api_key, ca_file=config.ca_file, vault=config.vault)
            return run_sync(store, client, lock_timeout=self._lock_wait, stop=self._stop)
        finally:
            store.conn.close()


##### Resolve #################################################################
# After pulling onto a new device: point environments at versions and
# project folders that exist here.  Device-local: nothing here syncs.

def version_digits(name: Any) -> tuple[int, ...]:
    """'v17', '17.0' and 'odoo-17' all give (17,): the numbers, trailing zeros dropped."""
    numbers = [int(n) for n in re.findall(r"\d+", str(name or ""))]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


class Resolver:
    """Finds and applies the fixes `resolve` makes; I/O passed in for tests."""

    def __init__(self, store: Store, clone: bool = False, dry_run: bool = False,
                 exists: Callable[[str], bool] = os.path.isdir, git_timeout: float = 300.0,
                 home: str | None = None):
        self.store, self.clone = store, clone
        self.dry_run = dry_run          # plan clones without running git
        self.exists, self.git_timeout = exists, git_timeout
        self.home = os.path.expanduser(CC_DIR) if home is None else home

    def plan(self) -> list[dict]:
        """Every change resolve would make (cloning happens here, with --clone)."""
        tables = self.store.tables()
        if "environment" not in tables or "version" not in tables:
            return []
        conn = self.store.conn
        versions = conn.execute("SELECT id, name, path FROM version ORDER BY id").fetchall()
        projects = dict(conn.execute("SELECT id, name FROM project")) \
            if "project" in tables else {}
        links = dict(conn.execute("SELECT project, path FROM _ccsync_link"))
        changes = []
        for env in conn.execute("SELECT * FROM environment ORDER BY id").fetchall():
            label = f"{projects.get(env['project_id'], '?')}/{env['name']}"
            version = self._pick_version(env, versions, changes, label)
            changes += self._fix_project_path(env, version, projects.get(env["project_id"]),
                                              links, label)
        return changes

    def _pick_version(self, env: sqlite3.Row, versions: list, changes: list, label: str) -> Any:
        current = next((v for v in versions if v["id"] == env["version_id"]), None)
        if current is None or (current["path"] and self.exists(current["path"])):
            return current
        wanted = version_digits(current["name"])
        for candidate in versions:
            if candidate["id"] != current["id"] and candidate["path"] \
                    and self.exists(candidate["path"]) and wanted \
                    and version_digits(candidate["name"]) == wanted:
                changes.append({"environment": label, "id": env["id"], "field": "version_id",
                                "old": current["name"], "new": candidate["name"],
                                "value": candidate["id"], "how": "same version digits"})
                return candidate
        return current

    def _fix_project_path(self, env: sqlite3.Row, version: Any, project: str | None,
                          links: dict, label: str) -> list[dict]:
        path = env["project_path"]
        if path and self.exists(path):
            return []
        change = {"environment": label, "id": env["id"], "field": "project_path", "old": path}
        linked = links.get(project)
        if linked and self.exists(linked):
            return [{**change, "new": linked, "value": linked, "how": "linked path"}]
        if not path and not linked:
            return []
        base = version["path"] if version is not None else None
        if base and self.exists(base):
            for name in dict.fromkeys(filter(None, (os.path.basename(path or ""), project,
                                                    env["name"]))):
                candidate = os.path.join(base, name)
                if self.exists(candidate):
                    return [{**change, "new": candidate, "value": candidate,
                             "how": "found under the version's path"}]
        if self.clone and env["github_url"]:
            cloned, why = self._clone(env, path, base)
            if cloned:
                return [{**change, "new": cloned, "value": cloned,
                         "how": "would clone" if self.dry_run else "cloned"}]
            change["note"] = why
        if not path:
            return []
        return [{**change, "new": None, "value": None, "how": "cleared"}]

    def _clone_dir(self, base: str | None) -> str:
        row = self.store.conn.execute("SELECT value FROM setting WHERE name = 'sync.clone_dir'"
                                      ).fetchone() if "setting" in self.store.tables() else None
        if row and row[0]:
            return os.path.expanduser(row[0])
        return base if base and self.exists(base) else os.path.join(self.home, "clones")

    def _clone(self, env: sqlite3.Row, path: str | None, base: str | None) -> tuple[str | None, str]:
        import shutil
        import subprocess
        url = env["github_url"]
        name = os.path.basename(path or "") or re.sub(r"\.git$", "", url.rstrip("/").split("/")[-1])
        target = os.path.join(self._clone_dir(base), name or env["name"])
        if self.exists(os.path.join(target, ".git")):
            return target, "already cloned"
        if os.path.exists(target):
            return None, f"{target} exists and is not a git checkout"
        if self.dry_run:
            return target, f"would clone {url}"
        os.makedirs(os.path.dirname(target), exist_ok=True)
        command = ["git", "clone", "--quiet"]
        if env["branch_name"]:
            command += ["--branch", env["branch_name"]]
        environ = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true",
                   "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o ConnectTimeout=15"}
        try:
            done = subprocess.run([*command, "--", url, target], capture_output=True, text=True,
                                  timeout=self.git_timeout, env=environ, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(target, ignore_errors=True)
            return None, f"git clone failed: {exc}"
        if done.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            return None, "git clone failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
        return target, "cloned"

    def apply(self, changes: list[dict]) -> None:
        """Write the changes as device-local edits (not captured, not synced)."""
        info = self.store.tables()["environment"]
        with transaction(self.store.conn):
            self.store._suppress(True)
            for change in changes:
                self.store.conn.execute(
                    f"UPDATE environment SET {_q(change['field'])} = ? WHERE id = ?",
                    (change["value"], change["id"]))
                if change["field"] == "version_id":
                    self._remember_in_shadow(info, change)
            self.store._suppress(False)

    def _remember_in_shadow(self, info: TableInfo, change: dict) -> None:
        # The shadow takes the re-pointed reference, so a later full diff does
        # not mistake this device-local fix for an edit to send.
        sid = self.store.conn.execute("SELECT sync_id FROM environment WHERE id = ?",
                                      (change["id"],)).fetchone()[0]
        shadow = self.store._shadow("environment", sid) if sid else None
        if shadow is None:
            return
        rid, vals, clocks = shadow
        vals["version_id"] = self.store._parent_sids("version", [change["value"]]).get(
            change["value"])
        self.store._put_shadow("environment", sid, rid, vals, clocks)


def link_project(store: Store, project: str, path: str,
                 clock: Callable[[], float] = time.time) -> str:
    """Record this device's folder for a project (never synced); returns the absolute path."""
    path = os.path.abspath(os.path.expanduser(path))
    with transaction(store.conn):
        store.conn.execute("INSERT OR REPLACE INTO _ccsync_link (project, path, at) "
                           "VALUES (?, ?, ?)", (project, path, iso_utc(clock)))
    return path


def links(store: Store) -> list[dict]:
    """Linked project folders on this device."""
    if not store.installed():
        return []
    return [dict(r) for r in store.conn.execute(
        "SELECT project, path, at FROM _ccsync_link ORDER BY project")]


##### Output ##################################################################
# Human lines or one JSON object; errors always one line on stderr.

def _emit(args: argparse.Namespace, data: dict, lines: Iterable[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif not getattr(args, "quiet", False):
        for line in lines:
            print(line)


class ProgressLine:
    """One updating line per leg on a terminal: records done of about how
    many, the rate and the time left (a few updates a second at most)."""

    EVERY_S = 0.25

    def __init__(self, stream: Any, clock: Callable[[], float] = time.monotonic):
        self.stream, self.clock = stream, clock
        self.leg: str | None = None
        self.started = self.shown = 0.0
        self.width = 0

    def __call__(self, leg: str, done: int, total: int | None) -> None:
        now = self.clock()
        if leg != self.leg:
            self.end()
            self.leg, self.started, self.shown = leg, now, now
        if not done or (now - self.shown < self.EVERY_S and done != total):
            return              # nothing yet (a leg with nothing to do stays silent)
        self.shown = now
        rate = done / max(now - self.started, 1e-3)
        text = f"{leg}: {done:,}" + (f" of {total:,}" if total else "") + \
            f" records, {rate:,.0f}/s"
        if total and total > done and rate > 0:
            text += f", about {(total - done) / rate:.0f} s left"
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.width = len(text)

    def end(self) -> None:
        """Finish the current leg's line."""
        self.break_line()
        self.leg = None

    def break_line(self) -> None:
        """Move off the line (a message is printed under it); the leg's next
        update draws it again below."""
        if self.width:
            self.stream.write("\n")
            self.stream.flush()
        self.width = 0

    def write(self, text: str) -> None:
        """Print ``text`` (a log line) under the progress line, not over it."""
        self.break_line()
        self.stream.write(text)
        self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def progress_line(args: argparse.Namespace) -> Iterator[ProgressLine | None]:
    """A :class:`ProgressLine` on stderr when it is a terminal and neither
    ``--json`` nor ``--quiet`` was given (None otherwise: cron and pipes
    stay quiet), its last line finished however the command ends."""
    if not (sys.stderr.isatty() and not args.json and not getattr(args, "quiet", False)):
        yield None
        return
    import logging
    line = ProgressLine(sys.stderr)
    # What the sync says meanwhile (a rejoin, a new store) goes under the
    # line, as Python's last-resort handler would print it.
    handler = logging.StreamHandler(line)
    handler.setLevel(logging.WARNING)
    _log().addHandler(handler)
    try:
        yield line
    finally:
        _log().removeHandler(handler)
        line.end()


def _log_line(line: str) -> None:
    import datetime as _dt
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} {line}", file=sys.stderr, flush=True)


def backup_lines(path: str | None) -> list[str]:
    """Where the backup made before ccsync's first change went (if one was made now)."""
    return [f"backed up the database to {path} before ccsync's first change"] if path else []


def summary_lines(result: SyncResult, *, push: bool, pull: bool) -> list[str]:
    """A sync result in a few readable lines."""
    lines = backup_lines(result.backup)
    if push:
        lines.append(f"push: sent {result.sent}, accepted {result.accepted}, "
                     f"superseded {result.superseded}, refused {sum(result.refused.values())}")
        lines += [f"  refused: {reason} ({n})" for reason, n in result.refused.items()]
    if pull:
        lines.append(f"pull: received {result.pulled.received}, applied {result.pulled.applied}")
        lines += [f"  rejected: {reason} ({n})" for reason, n in result.pulled.refused.items()]
        if result.pulled.aside:
            lines.append(f"  kept aside for a table this database lacks: {result.pulled.aside}")
    return lines


##### Command line ############################################################
# argparse subcommands; one cmd_<name>(args) -> int each; main() maps errors.

def _store_from_args(args: argparse.Namespace, *, writes: bool = True) -> Store:
    path = resolve_db_path(args.db, os.environ)
    if writes and os.path.exists(path):
        # SQLite says only "attempt to write a readonly database", and only mid-way.
        folder = os.path.dirname(os.path.abspath(path))
        blocked = path if not os.access(path, os.W_OK) else \
            folder if not os.access(folder, os.W_OK | os.X_OK) else None
        if blocked is not None:
            raise StoreError(f"{blocked} is read-only for this user, and ccsync writes to "
                             f"the database {path} (its change log and, beside it, its "
                             f"journal)", hint="run ccsync as the user cc runs as, or make it "
                                               "writable (chmod u+w)")
    return open_store(path, local_settings=split_names(os.environ.get(ENV_LOCAL_SETTINGS)))


def cmd_stamp(args: argparse.Namespace) -> int:
    """stamp [--remove | --remove-triggers]: install change capture and give rows a sync_id."""
    store = _store_from_args(args)
    if args.remove:
        kept = store.remove()
        _emit(args, {"removed": True, "state": kept},
              ["removed ccsync's triggers and bookkeeping tables"]
              + ([f"kept the synced state in {kept}: the next `ccsync stamp` takes edits made "
                  f"meanwhile as new ones (delete it to start over)"] if kept else []))
        return EXIT_OK
    if args.remove_triggers:
        count = store.remove_triggers()
        _emit(args, {"triggers_removed": count}, [
            f"removed {count} capture trigger(s); `ccsync stamp` (or the next sync) puts them "
            "back and records what changed meanwhile"])
        return EXIT_OK
    with progress_line(args) as line:
        stamped = store.prepare(line)
    _emit(args, {"stamped": stamped, "backup": store.backup_path},
          backup_lines(store.backup_path) + [f"stamped {stamped} row(s)"])
    return EXIT_OK


def _cmd_sync(args: argparse.Namespace, *, push: bool, pull: bool) -> int:
    since = None
    if getattr(args, "since", None):
        try:
            since = since_key(args.since)
        except ValueError as exc:
            raise UsageError(f"--since: {exc}", hint="an ISO 8601 time, e.g. --since "
                                                     "2026-11-30T09:00 (local time) or "
                                                     "--since 2026-11-30T09:00:00+01:00") from None
    store = _store_from_args(args)
    client = client_for(load_config(os.environ))
    with progress_line(args) as line:
        result = run_sync(store, client, push=push, pull=pull, since=since, progress=line)
    if not pull and not result.sent:    # a wrong URL or key shows now, not at the next edit
        client.hello()
        client.close()
    _emit(args, result.as_dict(), summary_lines(result, push=push, pull=pull))
    refused = sum(result.refused.values())
    if result.quota:
        raise RemoteError(f"the server took no more of this push: {result.quota}",
                          hint="the rows stay pending and go once the server allows; "
                               "its operator sets the limits (`ccsync server --help`)")
    if refused:
        raise CcsyncError(f"the server refused {refused} row(s); they stay pending",
                          hint="`ccsync status` shows each row and the reason")
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    """push: send local changes to the server."""
    return _cmd_sync(args, push=True, pull=False)


def cmd_pull(args: argparse.Namespace) -> int:
    """pull [--since TIME]: merge changes from the server."""
    return _cmd_sync(args, push=False, pull=True)


def cmd_sync(args: argparse.Namespace) -> int:
    """sync: push, then pull."""
    return _cmd_sync(args, push=True, pull=True)


def server_state(config: Config, clock: Callable[[], float] = time.time) -> dict:
    """The server as seen from here: connected, unreachable, key rejected, ..."""
    if not config.configured:
        return {"state": "not configured", "detail": "run `ccsync setup`"}
    state = {"url": config.server}
    try:
        info = client_for(config, timeout=10).hello()
    except CryptoUnavailable as exc:
        return {**state, "state": "unavailable", "detail": str(exc)}
    except ConfigError as exc:
        return {**state, "state": "not configured", "detail": str(exc)}
    except RemoteError as exc:
        names = {"key_rejected": "key rejected", "revoked": "key revoked",
                 "clock_skew": "clock skewed", "protocol": "protocol mismatch"}
        return {**state, "state": names.get(exc.kind, "unreachable"), "detail": str(exc)}
    skew = float(info.get("server_time", clock())) - clock()
    state.update(state="connected", device=info.get("device"), skew_seconds=round(skew, 1),
                 e2e=e2e_state(info.get("e2e"), config))
    if isinstance(info.get("usage"), dict):
        state["usage"] = info["usage"]
    if abs(skew) > 60:
        state.update(state="clock skewed", detail=f"this clock is {-skew:+.0f} s off the server's")
    return state


def e2e_state(params: Any, config: Config) -> str:
    """Whether the server's data is encrypted end to end, and whether this device can read it."""
    try:
        vault = config.vault
    except ConfigError as exc:
        return f"broken here: {exc}"
    if not params:
        return ("off: the server can read this data (this device's next sync encrypts it)"
                if vault else "off: the server can read this data; `ccsync setup` sets a "
                              "sync passphrase")
    if vault is None:
        return "on, but this device has no sync passphrase: run `ccsync setup`"
    if not isinstance(params, dict) or params.get("check") != vault.check:
        return "on, under another sync passphrase than this device's: run `ccsync setup`"
    return "on"


def cmd_status(args: argparse.Namespace) -> int:
    """status: pending changes, refused rows, last sync, and the server's state."""
    store = _store_from_args(args, writes=bool(args.verify))
    config = load_config(os.environ)
    installed = store.installed()
    held = store.held()
    data = {"pending": store.pending(), "refused": store.refused(), "installed": installed,
            "rejected": held["refused"], "kept_aside": held["aside"],
            "only_here": store.kept_here(), "waiting_for_parent": store.pending_references(),
            "last_sync": store.meta("last_sync") if installed else None,
            "last_error": store.meta("last_error") if installed else None,
            "push_refused": store.meta("push_refused") if installed else None,
            "server": server_state(config), "cc_sync": config.cc_sync}
    healthy = data["server"]["state"] in ("connected", "not configured")
    if not args.verify:
        _emit(args, data, status_lines(data))
        return EXIT_OK if healthy else EXIT_FAILURE
    client = client_for(config)
    try:
        data["verify"] = verify_devices(store, client, data["server"].get("device"))
    finally:
        client.close()
    _emit(args, data, status_lines(data) + verify_lines(data["verify"], time.time()))
    differs = any(d["state"] == "differs" for d in data["verify"]["devices"])
    return EXIT_FAILURE if differs else EXIT_OK


def verify_devices(store: Store, transport: Any, name: str | None) -> dict:
    """``status --verify``: report this device's digest, then compare it with
    every other device's at the same cursor."""
    answer = {**transport.verify(None), "mine": None} if store.unsent() else \
        report_digest(store, transport)
    mine = answer["mine"]
    devices, reported = [], set()
    for r in answer.get("reports", []):
        reported.add(r["device"])
        if mine is not None and r["dev"] == mine["dev"]:
            continue
        if mine is None or r["cursor"] != mine["cursor"]:
            state = "not comparable"
        elif r["digest"].partition(".")[2] != mine["digest"].partition(".")[2]:
            state = "another schema"
        else:
            state = "agrees" if r["digest"] == mine["digest"] else "differs"
        devices.append({"device": r["device"], "dev": r["dev"], "cursor": r["cursor"],
                        "at": r["at"], "state": state})
    devices += [{"device": n, "dev": None, "cursor": None, "at": None,
                 "state": "has not reported"} for n in answer.get("devices", [])
                if n not in reported and n != name]
    return {"this": mine, "devices": devices}


def verify_lines(verify: dict, now: float) -> list[str]:
    """``status --verify`` for humans."""
    mine = verify["this"]
    if mine is None:
        lines = ["verify: this device has changes not on the server yet (or cc wrote "
                 "while it was read): run `ccsync sync`, then verify again"]
    else:
        lines = [f"verify: this device holds digest {mine['digest'][:12]} at cursor "
                 f"{mine['cursor']}"]
    for d in verify["devices"]:
        name = d["device"] + (f" ({d['dev']})" if d["dev"] else "")
        if d["state"] == "has not reported":
            lines.append(f"  {name}: has not reported (it reports after a sync)")
            continue
        ago = _ago(now - d["at"])
        if d["state"] == "not comparable":
            lines.append(f"  {name}: at cursor {d['cursor']}, reported {ago} ago: not "
                         f"comparable (sync both, then verify again)")
        elif d["state"] == "another schema":
            lines.append(f"  {name}: runs another cc schema (another cc version?): not "
                         f"compared (reported {ago} ago)")
        else:
            lines.append(f"  {name}: {d['state']} at cursor {d['cursor']} (reported {ago} ago)")
    if not verify["devices"]:
        lines.append("  no other device has reported")
    return lines


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def status_lines(data: dict) -> list[str]:
    """The status report for humans."""
    lines = [] if data["installed"] else ["ccsync is not set up in this database yet "
                                          "(`ccsync stamp` or a first sync does it)"]
    busy = {t: c for t, c in data["pending"].items() if any(c.values())}
    lines += [f"  {t:<16} {c['insert']:>6} insert {c['update']:>6} update {c['delete']:>6} delete"
              for t, c in busy.items()]
    lines.insert(0 if data["installed"] else 1, "pending:" if busy else "nothing pending")
    lines += [f"refused by the server: {r['table']} {r['sync_id']}: {r['reason']}"
              for r in data["refused"]]
    lines += [f"refused from other devices (kept for a later version): {reason} ({n})"
              for reason, n in data["rejected"].items()]
    lines += [f"kept aside until this database has their table: {reason} ({n})"
              for reason, n in data["kept_aside"].items()]
    if data["only_here"]:
        lines.append(f"{data['only_here']} row(s) only this device holds: the server's new "
                     f"store refused them when this device re-seeded it (they stay here)")
    if data["waiting_for_parent"]:
        lines.append(f"{data['waiting_for_parent']} row(s) wait for a parent not yet pulled")
    lines.append(f"last sync: {data['last_sync'] or 'never'}")
    if data["last_error"]:
        lines.append(f"last error: {data['last_error']}")
    if data["push_refused"]:
        lines.append(f"push refused by the server since {data['push_refused']}")
    server = data["server"]
    where = f" ({server['url']})" if server.get("url") else ""
    detail = f": {server['detail']}" if server.get("detail") else ""
    device = f" as '{server['device']}'" if server.get("device") else ""
    lines.append(f"server: {server['state']}{device}{where}{detail}")
    if server.get("e2e"):
        lines.append(f"end-to-end encryption: {server['e2e']}")
    if data.get("cc_sync"):
        lines.append(f"note: CC_SERVER and CC_API_KEY are set in {data['cc_sync']}: cc 4.0's "
                     f"own sync (once its plugin is enabled) syncs this database too; remove "
                     f"them (ccsync reads {ENV_SERVER} and {ENV_API_KEY}, which setup writes)")
    if server.get("usage"):
        with contextlib.suppress(KeyError, TypeError, ValueError, IndexError):
            lines.append(usage_line(server["usage"]))
    return lines


def usage_line(usage: dict) -> str:
    """This device's use of its server quota, for humans."""
    def part(used: int, limit: int, unit: str) -> str:
        return f"{used:,} {unit}" + (f" of {limit:,}" if limit else "")
    stored, hour, limits = usage["stored"], usage["hour"], usage["limits"]
    return (f"quota: stores {part(stored[0], limits['records'], 'records')}, "
            f"{part(stored[1], limits['bytes'], 'bytes')}; last hour "
            f"{part(hour[0], limits['hour_records'], 'records')}, "
            f"{part(hour[1], limits['hour_bytes'], 'bytes')}")


def cmd_server(args: argparse.Namespace) -> int:
    """server: run the sync endpoint until SIGINT (exit 130) or SIGTERM (exit 0)."""
    import signal
    if not crypto_available():          # else /health says ok and every device gets a 500
        _aes()                          # raises CryptoUnavailable, with its hint
    data = resolve_server_data(args.data)
    tls = tls_context(args.tls_cert, args.tls_key)
    try:
        server = SyncServer((args.host, args.port), data, max_body=args.max_body, tls=tls,
                            request_timeout=args.timeout, log=_log_line,
                            max_value=args.max_value, max_record=args.max_record,
                            max_connections=args.max_connections,
                            idle_timeout=args.idle_timeout, quota=Quota(
                                args.quota_records, args.quota_bytes, args.quota_hour_records,
                                args.quota_hour_bytes, args.max_push_records),
                            forget_after=args.forget_after * 86400.0)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
                          ) from None
    stopping: list[int] = []

    def _stop(signum: int, _frame: Any) -> None:
        import threading
        if not stopping:
            stopping.append(signum)
            _log_line(f"stopping ({signal.Signals(signum).name})")
            threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    if tls is None and not is_loopback(args.host):
        _log_line(f"warning: serving plain HTTP on {args.host}: bodies are encrypted and "
                  "signed, but use --tls-cert/--tls-key (or a TLS proxy) on networks you "
                  "do not trust")
    _log_line(f"ccsync {__version__} server listening on {server.url} (data: {data})")
    if args.json:                       # one object when listening, one when stopped
        print(json.dumps({"listening": server.url, "data": data, "version": __version__}),
              flush=True)
    try:
        server.serve_forever(SERVER_POLL_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.server_close()
    _log_line("stopped")
    code = exit_for_signal(stopping[0] if stopping else None)
    if args.json:
        print(json.dumps({"stopped": True, "exit_code": code}), flush=True)
    return code


def exit_for_signal(signum: int | None) -> int:
    """The exit code of a loop a signal stopped: 130 for Ctrl-C (SIGINT), 0 for
    SIGTERM (how systemd stops a service) or no signal."""
    import signal
    return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_OK


def cmd_register(args: argparse.Namespace) -> int:
    """register --name NAME [--rotate]: add a device on the server; print its key once."""
    path = resolve_server_data(args.data)
    if not (args.data or args.create or os.path.exists(path)):
        raise StoreError(f"this machine has no server store ({path})",
                         hint="run `register` on the machine where `ccsync server` runs; to "
                              "start a server store here, pass --create (or --data PATH)")
    store = ServerStore.open(path)
    api_key = store.register(args.name, rotate=args.rotate)
    _emit(args, {"name": args.name, "api_key": api_key}, [
        f"{'new key for' if args.rotate else 'registered'} device '{args.name}'. "
        "Its API key (shown only now):", api_key,
        "On that device run: ccsync setup"])
    return EXIT_OK


def cmd_reset_store(args: argparse.Namespace) -> int:
    """reset-store: empty the change store (devices stay registered)."""
    store = ServerStore.open(resolve_server_data(args.data), create=False)
    store.reset()
    _emit(args, {"reset": True, "store": store.store_id}, [
        "the server's change store is empty (devices and keys kept; its old data is erased "
        "from the file)", "next: `ccsync setup --new-passphrase` on a device that holds your "
                          "data, then `ccsync setup` on the others"])
    return EXIT_OK


def cmd_devices(args: argparse.Namespace) -> int:
    """devices: list registered devices with their last-seen time."""
    devices = ServerStore.open(resolve_server_data(args.data), create=False).devices()
    lines = [f"{d['name']:<20} last seen {d['last_seen_at'] or 'never':<22} "
             f"stores {d['records']:,} records, {d['bytes']:,} bytes"
             f"{' REVOKED ' + d['revoked_at'] if d['revoked_at'] else ''}" for d in devices]
    _emit(args, {"devices": devices}, lines or ["no devices registered"])
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    """revoke --name NAME: disable a device's key."""
    ServerStore.open(resolve_server_data(args.data), create=False).revoke(args.name)
    _emit(args, {"revoked": args.name}, [f"revoked device '{args.name}'"])
    return EXIT_OK


def _ask_setup(config: Config, server: str | None, key: str | None) -> tuple[str, str]:
    import getpass
    if server is None:
        server = input(f"Server URL [{config.server or ''}]: ").strip() or config.server
    if key is None:
        key = getpass.getpass(f"API key [{mask_key(config.api_key)}]: ").strip() or config.api_key
    return server or "", key or ""


def cmd_setup(args: argparse.Namespace) -> int:
    """setup [--server URL] [--api-key KEY|-]: verify, then save to ~/.cc-cli/.env."""
    config = load_config({})               # show what the file holds
    server, key = args.server, args.api_key
    if key == "-":
        key = sys.stdin.readline().strip()
    if (server is None or key is None) and not sys.stdin.isatty():
        raise UsageError("setup needs --server URL and --api-key KEY (or -) "
                         "when not run interactively")
    server, key = _ask_setup(config, server, key)
    if not server or not key:
        raise UsageError("a server URL and an API key are both needed")
    client = Client(server, key, ca_file=os.environ.get(ENV_CA_FILE))
    info = client.hello()
    lines = [f"verified: {server} knows this device as '{info.get('device')}'"]
    if args.new_passphrase:
        vault = _rekey(args, client, config)
        lines.append("new sync passphrase set: the server's store starts afresh under it, "
                     "re-seeded from this device; enter it at `ccsync setup` on the others")
    else:
        vault, said = _open_vault(args, client, info, server)
        lines.append(said)
    # cc's own names pointing here would switch cc 4.0's sync on against this server.
    ours = read_env_file(config.env_path).get("CC_SERVER") == server
    write_env_file(config.env_path, {ENV_SERVER: server, ENV_API_KEY: key,
                                     ENV_E2E_KEY: vault.text(),
                                     **({"CC_SERVER": None, "CC_API_KEY": None} if ours else {})})
    lines.append(f"saved to {config.env_path} as {ENV_SERVER}, {ENV_API_KEY} and "
                 f"{ENV_E2E_KEY} (mode 600; the key is derived from the passphrase, which is "
                 f"not stored)")
    shadowed = [n for n in (ENV_SERVER, ENV_API_KEY, ENV_E2E_KEY) if os.environ.get(n)]
    if shadowed:
        lines.append(f"note: {' and '.join(shadowed)} set in the environment take precedence")
    _emit(args, {"server": server, "device": info.get("device"), "saved": config.env_path,
                 "e2e": True}, lines)
    return EXIT_OK


def _scrypt_n(environ: dict) -> int:
    """scrypt's n for a new sync passphrase: $CCSYNC_SCRYPT_N, else SCRYPT_N."""
    text = environ.get(ENV_SCRYPT_N, "").strip()
    if not text:
        return SCRYPT_N
    low, high = KDF_BOUNDS["n"][0], KDF_MAX_MEMORY // SCRYPT_R     # what every device opens
    n = int(text) if text.isascii() and text.isdigit() and len(text) <= 8 else 0
    if not _valid_cost({"n": n, "r": SCRYPT_R, "p": SCRYPT_P}):
        raise UsageError(f"{ENV_SCRYPT_N}={text!r} is not a power of two from {low} to {high}",
                         hint=f"unset it for the default ({SCRYPT_N}: 128 MiB of memory)")
    return n


def _passphrase(args: argparse.Namespace, *, new: bool) -> str:
    """The sync passphrase: --passphrase-file, $CCSYNC_PASSPHRASE, or asked
    (twice when ``new``) on a terminal."""
    import getpass
    if args.passphrase_file:
        try:
            with (contextlib.nullcontext(sys.stdin) if args.passphrase_file == "-"
                  else open(args.passphrase_file, encoding="utf-8")) as fh:
                text = fh.readline().rstrip("\r\n")
        except OSError as exc:
            raise UsageError(f"cannot read {args.passphrase_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"{args.passphrase_file} is not UTF-8 text",
                             hint="write the passphrase as one line of text") from None
    elif os.environ.get(ENV_PASSPHRASE):
        text = os.environ[ENV_PASSPHRASE]
    elif sys.stdin.isatty():
        text = getpass.getpass("New sync passphrase (the same on every device): " if new
                               else "Sync passphrase (the one your other devices use): ")
        if new and getpass.getpass("The same again: ") != text:
            raise UsageError("the two passphrases differ")
    else:
        raise UsageError("setup needs the sync passphrase when not run interactively",
                         hint=f"pass --passphrase-file FILE (- reads stdin) or set "
                              f"{ENV_PASSPHRASE}")
    if not text:
        raise UsageError("the sync passphrase is empty")
    return text


def _open_vault(args: argparse.Namespace, client: Client, info: dict,
                server: str) -> tuple[Vault, str]:
    """The vault for this device, and a line saying what became of the store."""
    params = info.get("e2e")
    if params:                          # the store is end to end: the passphrase must open it
        return (Vault.opening(_passphrase(args, new=False), params, server),
                "the passphrase opens the server's data (encrypted end to end)")
    later = ("the server holds data in plaintext from before: this device's next sync "
             "encrypts it end to end (and erases the plaintext there)")
    if info.get("e2e_pending"):         # another device chose it, before any encryption
        return Vault.opening(_passphrase(args, new=False), info["e2e_pending"], server), later
    vault = Vault.new(_passphrase(args, new=True), _scrypt_n(os.environ))
    # A store with records keeps it pending (its first encrypted sync takes it).
    answer = client.begin_e2e(vault.params(private=True), 0, pending=bool(info.get("seq")))
    if answer.get("conflict"):
        raise PassphraseNeeded("another device has just set a sync passphrase on this server",
                               hint="run `ccsync setup` again and enter that passphrase")
    return vault, later if info.get("seq") else \
        "new sync passphrase set: the server keeps only encrypted data"


def _rekey(args: argparse.Namespace, client: Client, config: Config) -> Vault:
    """setup --new-passphrase: catch up under the old key (if this device has
    it), start the store afresh under a new one, and re-seed it."""
    store = open_store(resolve_db_path(args.db, os.environ))
    try:
        old = config.vault
        if old is not None and config.server == client.url:
            with contextlib.suppress(PassphraseNeeded):     # an outdated key: what it holds
                run_sync(store, Client(client.url, config.api_key or "",   # is re-seeded
                                       ca_file=config.ca_file, vault=old))
        vault = Vault.new(_passphrase(args, new=True), _scrypt_n(os.environ))
        params = vault.params(private=True)
        answer = client.begin_e2e(params, store.cursor, replace=True, proof=rekey_proof(
            old.proof, params) if old is not None else None)
        if answer.get("conflict") or "behind" in answer:
            raise PassphraseNeeded(
                "the server keeps its data under a key this device does not hold, so it "
                "cannot replace the passphrase", hint="run `setup --new-passphrase` on a "
                "device set up with the current passphrase; if no device has it, the "
                "server's operator runs `ccsync reset-store` on the server")
        client.vault = vault
        run_sync(store, client)
    finally:
        store.conn.close()
    return vault


LAUNCHER_MARK = "# ccsync launcher (ccsync install writes and removes this file)"


def installed_from() -> str:
    """The file this ccsync runs from: the .pyz it is inside, else ccsync.py."""
    here = os.path.abspath(__file__)
    outer = os.path.dirname(here)
    return outer if os.path.isfile(outer) else here


def launcher_dir() -> str:
    """Where ``install`` puts the launcher: $XDG_BIN_HOME, else ~/.local/bin."""
    return os.environ.get("XDG_BIN_HOME") or os.path.expanduser(os.path.join("~", ".local", "bin"))


def cmd_install(args: argparse.Namespace) -> int:
    """install [--remove] [--dir DIR]: put a `ccsync` command on this user's PATH."""
    folder = os.path.abspath(os.path.expanduser(args.dir or launcher_dir()))
    path = os.path.join(folder, "ccsync")
    ours = os.path.isfile(path) and LAUNCHER_MARK in open(path, encoding="utf-8",
                                                           errors="replace").read(4096)
    if os.path.exists(path) and not ours:
        raise CcsyncError(f"{path} exists and is not ccsync's launcher; left as it is",
                          hint="remove it yourself, or pass --dir DIR for another folder")
    if args.remove:
        if ours:
            os.remove(path)
        _emit(args, {"removed": path if ours else None},
              [f"removed {path}" if ours else f"no ccsync launcher at {path}"])
        return EXIT_OK
    target = installed_from()
    os.makedirs(folder, exist_ok=True)
    text = (f"#!/bin/sh\n{LAUNCHER_MARK}\n"
            f"exec {_sh_quote(sys.executable)} {_sh_quote(target)} \"$@\"\n")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    on_path, crypto = folder in os.environ.get("PATH", "").split(os.pathsep), crypto_available()
    _emit(args, {"installed": path, "runs": target, "python": sys.executable,
                 "on_path": on_path, "crypto": crypto},
          [f"installed {path} (runs {target} with {sys.executable})",
           *([] if on_path else [f"note: {folder} is not on your PATH; add it (e.g. "
                                 f"export PATH=\"{folder}:$PATH\" in ~/.profile)"]),
           *([] if crypto else [f"note: {sys.executable} has no pycryptodomex, which setup, "
                                f"sync and the server need: run `ccsync enable` (or install "
                                f"with a Python that has it)"])])
    return EXIT_OK


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def cmd_enable(args: argparse.Namespace) -> int:
    """enable: install pycryptodomex into the interpreter running ccsync."""
    import subprocess
    import sysconfig
    if crypto_available():
        _emit(args, {"installed": True, "changed": False},
              ["pycryptodomex is already installed; sync is enabled"])
        return EXIT_OK
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
               "pycryptodomex"]
    if sys.prefix == sys.base_prefix and not os.access(sysconfig.get_paths()["purelib"],
                                                       os.W_OK):
        command.append("--user")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CcsyncError(f"could not run pip: {exc}") from None
    if done.returncode != 0:
        if "No module named pip" in done.stderr:
            raise CcsyncError(f"pip is not available for {sys.executable}",
                              hint="install pip (e.g. python3 -m ensurepip) or install "
                                   "pycryptodomex with your package manager")
        last = (done.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise CcsyncError(f"pip could not install pycryptodomex: {last}",
                          hint="are you offline? `pip download pycryptodomex` elsewhere and "
                               "install the wheel")
    import importlib
    importlib.invalidate_caches()
    _aes.cache_clear()
    if not crypto_available():
        raise CcsyncError("pycryptodomex was installed but cannot be imported here",
                          hint=f"check {sys.executable} -m pip show pycryptodomex")
    _emit(args, {"installed": True, "changed": True},
          ["installed pycryptodomex; sync is enabled"])
    return EXIT_OK


def cmd_daemon(args: argparse.Namespace) -> int:
    """daemon [--interval S]: the auto-sync loop in the foreground until SIGINT/SIGTERM."""
    import logging
    import signal
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s ccsync: %(message)s", "%Y-%m-%d %H:%M:%S"))
    log = _log()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    auto = AutoSync(db_path=args.db, interval=args.interval)
    if not auto.configured:
        raise ConfigError("sync is not configured (no CCSYNC_SERVER / CCSYNC_API_KEY)",
                          hint="run `ccsync setup`")
    stopped_by: list[int] = []

    def _stop(signum: int, _frame: Any) -> None:
        stopped_by.append(signum)
        auto.request_stop()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    db = resolve_db_path(args.db, os.environ)
    log.info("auto-sync every %g s on %s", auto.interval, db)
    if args.json:                       # as the server: one object started, one stopped
        print(json.dumps({"started": True, "interval": auto.interval, "db": db}), flush=True)
    try:
        auto.run()
        log.info("stopped")
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        log.removeHandler(handler)
    code = exit_for_signal(stopped_by[0] if stopped_by else None)
    if args.json:
        print(json.dumps({"stopped": True, "exit_code": code}), flush=True)
    return code


def cmd_resolve(args: argparse.Namespace) -> int:
    """resolve [--dry-run] [--clone]: fix versions and project paths on this device."""
    store = _store_from_args(args)
    store.prepare()
    resolver = Resolver(store, clone=args.clone, dry_run=args.dry_run)
    changes = resolver.plan()
    if not args.dry_run:
        resolver.apply(changes)
    verb = "would change" if args.dry_run else "changed"
    lines = [f"{verb} {c['environment']}: {c['field']} {c['old']!r} -> {c['new']!r} ({c['how']})"
             + (f"; {c['note']}" if c.get("note") else "") for c in changes]
    public = [{k: v for k, v in c.items() if k != "value"} for c in changes]
    _emit(args, {"changes": public, "dry_run": args.dry_run},
          lines or ["nothing to resolve: every environment points at paths that exist here"])
    return EXIT_OK


def cmd_link(args: argparse.Namespace) -> int:
    """link [--project NAME --path PATH]: record or list this device's project folders."""
    store = _store_from_args(args)
    if args.project is None and args.path is None:
        found = links(store)
        _emit(args, {"links": found}, [f"{l['project']}: {l['path']}" for l in found]
              or ["no links on this device"])
        return EXIT_OK
    if not (args.project and args.path):
        raise UsageError("link needs both --project NAME and --path PATH (or neither, to list)")
    store.prepare()
    path = link_project(store, args.project, args.path)
    note = "" if os.path.isdir(path) else " (it does not exist yet)"
    _emit(args, {"project": args.project, "path": path},
          [f"linked project '{args.project}' to {path}{note}"])
    return EXIT_OK


DEMO_SCHEMA = """
CREATE TABLE version (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL,
    path TEXT NOT NULL, port TEXT, pyenv_virtualenv TEXT, branch TEXT, last_fetched_at TEXT,
    sync_id TEXT, synced_at TEXT);
CREATE TABLE setting (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL,
    value TEXT, sync_id TEXT, synced_at TEXT);
CREATE TABLE project (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL,
    is_virtual BOOLEAN, no_auto_archive BOOLEAN, home_repo TEXT, main_branch TEXT,
    workspace_id INTEGER, environment_ids TEXT, sync_id TEXT, synced_at TEXT);
CREATE TABLE environment (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
    project_path TEXT, github_url TEXT, branch_name TEXT, project_id INTEGER NOT NULL,
    version_id INTEGER, database_id INTEGER, module_ids TEXT, last_used_at TEXT, sh_url TEXT,
    notes TEXT, ticket_ids TEXT, ssh_host TEXT, ssh_user TEXT, pinned BOOLEAN, status TEXT,
    sync_id TEXT, synced_at TEXT);
CREATE UNIQUE INDEX uq_environment_project_id_name ON environment (project_id, name);
"""


def _demo_devices(tmp: str, url: str, keys: dict[str, str], vault: Vault) -> dict[str, tuple]:
    seed = {
        "laptop": ["INSERT INTO version (name, path) VALUES ('17.0', '/home/me/odoo/17.0')",
                   "INSERT INTO project (name) VALUES ('acme')",
                   "INSERT INTO environment (name, project_id, version_id) VALUES ('dev', 1, 1)",
                   "INSERT INTO setting (name, value) VALUES ('theme', 'dark')",
                   "INSERT INTO setting (name, value) VALUES ('github_pat', 'ghp_demo_secret')"],
        "desktop": ["INSERT INTO version (name, path) VALUES ('17.0', '/srv/odoo/17')",
                    "INSERT INTO version (name, path) VALUES ('18.0', '/srv/odoo/18')",
                    "INSERT INTO project (name) VALUES ('shop')"],
    }
    devices = {}
    for name, key in keys.items():
        path = os.path.join(tmp, f"{name}.db")
        conn = sqlite3.connect(path, isolation_level=None)
        conn.executescript(DEMO_SCHEMA)
        for statement in seed[name]:
            conn.execute(statement)
        devices[name] = (conn, open_store(path), Client(url, key, timeout=10, vault=vault))
    return devices


def _demo_script(devices: dict[str, tuple], say: Callable[[str], None]) -> None:
    def sync(name: str) -> SyncResult:
        _conn, store, client = devices[name]
        return sync_once(store, client)

    def rows(name: str, query: str) -> list:
        return devices[name][0].execute(query).fetchall()

    laptop, desktop = devices["laptop"][0], devices["desktop"][0]
    results = [(n, sync(n)) for n in ("laptop", "desktop", "laptop")]
    say("first sync: " + "; ".join(f"{n} sent {r.sent}, received {r.pulled.received}"
                                   for n, r in results))
    for name in devices:
        versions = [f"{n} at {p}" for n, p in rows(name, "SELECT name, path FROM version "
                                                         "ORDER BY name")]
        projects = [n for (n,) in rows(name, "SELECT name FROM project ORDER BY name")]
        say(f"  {name}: versions {versions}; projects {projects}")
    _demo_check(rows("laptop", "SELECT count(*) FROM version")[0][0] == 2,
                "both versions should be on the laptop")
    laptop.execute("UPDATE environment SET notes = 'client demo on Friday' WHERE name = 'dev'")
    sync("laptop"), sync("desktop")
    notes = rows("desktop", "SELECT notes FROM environment WHERE name = 'dev'")[0][0]
    say(f"laptop edits env 'dev' notes, both sync: desktop reads {notes!r}")
    _demo_check(notes == "client demo on Friday", "the edit should reach the desktop")
    desktop.execute("UPDATE setting SET value = 'light' WHERE name = 'theme'")
    time.sleep(0.05)
    laptop.execute("UPDATE setting SET value = 'solarized' WHERE name = 'theme'")
    sync("desktop"), sync("laptop"), sync("desktop")
    themes = {n: rows(n, "SELECT value FROM setting WHERE name = 'theme'")[0][0] for n in devices}
    say(f"conflict: desktop set theme 'light', then laptop set 'solarized': now {themes} "
        "(the later edit wins)")
    _demo_check(set(themes.values()) == {"solarized"}, "the later edit should win")
    leaked = rows("desktop", "SELECT count(*) FROM setting WHERE name = 'github_pat'")[0][0]
    say(f"the laptop's github_pat stayed on the laptop (desktop has {leaked})")
    _demo_check(leaked == 0, "secrets must not sync")


def _demo_check(ok: bool, what: str) -> None:
    if not ok:
        raise CcsyncError(f"demo failed: {what}")


def cmd_demo(args: argparse.Namespace) -> int:
    """demo: a real server and two devices on this machine, synced and cleaned up."""
    import tempfile
    say = (lambda line: None) if args.json else print
    with tempfile.TemporaryDirectory(prefix="ccsync-demo-") as tmp:
        data = os.path.join(tmp, "server.db")
        server = SyncServer(("127.0.0.1", 0), data).start()
        devices = {}
        try:
            registry = ServerStore.open(data)
            keys = {name: registry.register(name) for name in ("laptop", "desktop")}
            registry.conn.close()
            say(f"server listening on {server.url} (temporary data); "
                "registered devices 'laptop' and 'desktop'")
            devices = _demo_devices(tmp, server.url, keys, Vault.new("the demo's passphrase"))
            say("laptop has version 17.0, project acme (env dev), settings theme and "
                "github_pat; desktop has versions 17.0 and 18.0, project shop; both share "
                "a sync passphrase")
            _demo_script(devices, say)
            raw = b"".join(open(p, "rb").read() for p in (data, data + "-wal")
                           if os.path.exists(p))
            seen = [w for w in ("acme", "shop", "solarized", "client demo") if w.encode() in raw]
            say(f"the server's file holds {'none' if not seen else seen} of it in plaintext "
                f"(encrypted end to end)")
            _demo_check(not seen, "the server should hold no plaintext")
        finally:
            for conn, store, _client in devices.values():
                conn.close()
                store.conn.close()
            server.stop()
    _emit(args, {"demo": "ok"}, ["demo finished: both devices hold the same data; "
                                 "temporary files removed"])
    return EXIT_OK


class _Formatter(argparse.HelpFormatter):
    """argparse's help layout, as wide as the terminal (found without
    importing shutil, as argparse would: a tenth of ``--help``'s time), its
    text wrapped at spaces without textwrap (whose import and patterns
    cost ``--help`` another 4 %)."""

    def __init__(self, prog: str, **kwargs: Any):
        if kwargs.get("width") is None:
            kwargs["width"] = _terminal_columns() - 2
        super().__init__(prog, **kwargs)

    def _split_lines(self, text: str, width: int) -> list[str]:
        lines: list[str] = []
        for word in text.split():
            if lines and len(lines[-1]) + 1 + len(word) <= width:
                lines[-1] += " " + word
            else:
                lines.append(word)
        return lines

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line for line in self._split_lines(text, width - len(indent)))


def _terminal_columns() -> int:
    """$COLUMNS, else stdout's terminal width, else 80 (shutil's rules)."""
    with contextlib.suppress(ValueError):
        if (columns := int(os.environ.get("COLUMNS", "0"))) > 0:
            return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, with _Formatter."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:       # type: ignore[override]
        raise UsageError(message)


def _flags(parser: argparse.ArgumentParser, *, db: bool = True, data: bool = False,
           defaults: bool = False) -> None:
    """The options every command takes, before or after its name.  A
    subcommand's copies default to SUPPRESS, so that one given before the
    name is not overwritten by the subcommand's default (``defaults``: the
    main parser's copies, which set them)."""
    keep = {} if defaults else {"default": argparse.SUPPRESS}
    if db:
        parser.add_argument("--db", metavar="PATH", **keep,
                            help=f"cc database (default: ${ENV_DB} or {DEFAULT_DB})")
    if data:
        parser.add_argument("--data", metavar="PATH", **keep,
                            help=f"server data file (default: {DEFAULT_SERVER_DATA})")
    parser.add_argument("--json", action="store_true", **keep,
                        help="one JSON object on stdout (errors too)")
    parser.add_argument("--debug", action="store_true", **keep,
                        help="show tracebacks (with the same exit codes)")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, not {text!r}")
    return port


def _seconds_between(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number of seconds from ``low`` to ``high``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:        # nan fails too
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from "
                                             f"{low:g} to {high:g}")
        return value
    return parse


_seconds = _seconds_between(0.1, 3600)


def _whole(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high`` (``what`` it counts)."""
    def parse(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} from {low} to {high:,}")
        return int(text)
    return parse


_connections = _whole(1, 10000, "a connection count")
_days = _whole(1, 3650, "a number of days")
_count = _whole(0, 2 ** 62, "a limit (0: none)")


def _add_server_parser(sub: Any) -> None:
    p = sub.add_parser("server", help="run the sync server")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    p.add_argument("--port", type=_port, default=9100, help="port (default: 9100)")
    p.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate")
    p.add_argument("--tls-key", metavar="FILE", help="private key for --tls-cert")
    p.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY, metavar="BYTES",
                   help="largest request body accepted (default: 64 MiB)")
    p.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="time a request's body and answer get, plus their size at "
                        "128 KiB/s (default: 30)")
    p.add_argument("--idle-timeout", type=_seconds, default=IDLE_TIMEOUT_S, metavar="SECONDS",
                   help="time a request head gets to arrive whole; kept-alive connections "
                        "idle longer are closed (default: 15)")
    p.add_argument("--max-connections", type=_connections, default=MAX_CONNECTIONS,
                   metavar="N", help="connections served at once; more get 503 Busy, "
                                     "/health always answers (default: 64)")
    p.add_argument("--max-value", type=int, default=MAX_VALUE_BYTES, metavar="BYTES",
                   help="largest single value a push may store (default: 4 MiB)")
    p.add_argument("--max-record", type=int, default=MAX_RECORD_BYTES, metavar="BYTES",
                   help="largest record a push may store (default: 16 MiB)")
    limits = Quota()
    for option, default, what in (
            ("--max-push-records", limits.push_records, "records in one push"),
            ("--quota-records", limits.records, "records one device may store"),
            ("--quota-bytes", limits.bytes, "bytes one device may store"),
            ("--quota-hour-records", limits.hour_records,
             "records one device may push in an hour"),
            ("--quota-hour-bytes", limits.hour_bytes,
             "bytes one device may store in an hour")):
        p.add_argument(option, type=_count, default=default, metavar="N",
                       help=f"{what} (default: {default:,}; 0: no limit)")
    p.add_argument("--forget-after", type=_days, default=FORGET_AFTER_S // 86400,
                   metavar="DAYS", help="a device not seen for this long no longer holds back "
                                        "the collection of deleted rows; it catches up from "
                                        "the start when it returns (default: 30)")
    _flags(p, db=False, data=True)
    p.set_defaults(func=cmd_server)


def _add_registry_parsers(sub: Any) -> None:
    p = sub.add_parser("register", help="register a device on the server; prints its API key")
    p.add_argument("--name", required=True, help="device name")
    p.add_argument("--rotate", action="store_true", help="issue a new key for an existing name")
    p.add_argument("--create", action="store_true",
                   help="start a server store here if there is none")
    _flags(p, db=False, data=True)
    p.set_defaults(func=cmd_register)
    p = sub.add_parser("reset-store", help="empty the change store, keeping the devices (run "
                                           "on the server, when the sync passphrase is lost "
                                           "everywhere)")
    _flags(p, db=False, data=True)
    p.set_defaults(func=cmd_reset_store)
    p = sub.add_parser("devices", help="list registered devices (run on the server)")
    _flags(p, db=False, data=True)
    p.set_defaults(func=cmd_devices)
    p = sub.add_parser("revoke", help="disable a device's key (run on the server)")
    p.add_argument("--name", required=True, help="device name")
    _flags(p, db=False, data=True)
    p.set_defaults(func=cmd_revoke)


def _add_device_parsers(sub: Any) -> None:
    p = sub.add_parser("setup", help="configure and verify this device's server URL, key and "
                                     "sync passphrase")
    p.add_argument("--server", metavar="URL", help="server URL, e.g. http://pi.lan:9100")
    p.add_argument("--api-key", metavar="KEY", help="API key from `register` (- reads stdin)")
    p.add_argument("--passphrase-file", metavar="FILE",
                   help=f"read the sync passphrase from FILE's first line (- reads stdin; "
                        f"else ${ENV_PASSPHRASE}, else asked)")
    p.add_argument("--new-passphrase", action="store_true",
                   help="choose a new sync passphrase (a lost one): the server's store "
                        "starts afresh under it, re-seeded from this device")
    _flags(p)
    p.set_defaults(func=cmd_setup)
    for name, func, text in (("push", cmd_push, "send local changes to the server"),
                             ("pull", cmd_pull, "merge changes from the server"),
                             ("sync", cmd_sync, "push, then pull")):
        p = sub.add_parser(name, help=text)
        if name == "pull":
            p.add_argument("--since", metavar="ISO-TIMESTAMP",
                           help="only changes the server received after this time")
        p.add_argument("--quiet", action="store_true", help="print nothing on success")
        _flags(p)
        p.set_defaults(func=func)
    p = sub.add_parser("status", help="pending changes and the server's state")
    p.add_argument("--verify", action="store_true",
                   help="compare this device's data with every other device's (exit 1 when "
                        "one differs)")
    _flags(p)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("stamp", help="install change capture; give every row a sync_id")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--remove", action="store_true",
                      help="remove everything ccsync added (keeps cc's sync columns)")
    mode.add_argument("--remove-triggers", action="store_true",
                      help="drop only the capture triggers (run before ALTER TABLE ... DROP "
                           "COLUMN); the next stamp or sync puts them back")
    _flags(p)
    p.set_defaults(func=cmd_stamp)
    p = sub.add_parser("daemon", help="auto-sync in the foreground (every 5 minutes)")
    p.add_argument("--interval", type=_seconds_between(MIN_INTERVAL_S, MAX_INTERVAL_S),
                   default=300.0, metavar="SECONDS",
                   help=f"seconds between syncs, {MIN_INTERVAL_S:g} to {MAX_INTERVAL_S:g} "
                        f"(default: 300)")
    _flags(p)
    p.set_defaults(func=cmd_daemon)
    p = sub.add_parser("resolve", help="fix versions and paths after pulling to a new device")
    p.add_argument("--dry-run", action="store_true", help="show what would change")
    p.add_argument("--clone", action="store_true",
                   help="clone missing projects from their github_url (non-interactive git)")
    _flags(p)
    p.set_defaults(func=cmd_resolve)
    p = sub.add_parser("link", help="record this device's folder for a project (not synced)")
    p.add_argument("--project", "--name", dest="project", metavar="NAME", help="project name")
    p.add_argument("--path", metavar="PATH", help="folder on this device")
    _flags(p)
    p.set_defaults(func=cmd_link)
    p = sub.add_parser("install", help="put a `ccsync` command on your PATH (no root needed)")
    p.add_argument("--remove", action="store_true", help="take the launcher away again")
    p.add_argument("--dir", metavar="DIR", help="folder for it (default: $XDG_BIN_HOME, "
                                                "else ~/.local/bin)")
    _flags(p, db=False)
    p.set_defaults(func=cmd_install)
    p = sub.add_parser("enable", help="install pycryptodomex (needed to sync)")
    _flags(p, db=False)
    p.set_defaults(func=cmd_enable)
    p = sub.add_parser("demo", help="run a real server and two devices here, then clean up")
    _flags(p, db=False)
    p.set_defaults(func=cmd_demo)


class _Unused:
    """Stands in for the parser of a command that is not run: every call on
    it does nothing (see :class:`_OnlyCommand`)."""

    def __getattr__(self, name: str) -> Callable[..., "_Unused"]:
        return lambda *args, **kwargs: self


HELP_FIRST = "-h"      # command_named(): help is asked for before any command


class _OnlyCommand:
    """Subcommands of which only ``command``'s parser is made (None: all;
    HELP_FIRST: none, each only listed in the help).

    argparse builds a parser for every subcommand, most of a small command's
    start-up; the one run is the only one it needs, and help asked for before
    a command prints and exits before any is parsed."""

    def __init__(self, sub: Any, command: str | None):
        self.sub, self.command, self.made = sub, command, False

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        """The subcommand's parser, or a stand-in when another one runs."""
        if self.command == HELP_FIRST:      # the help's line for it, as argparse writes it
            self.sub._choices_actions.append(self.sub._ChoicesPseudoAction(
                name, (), kwargs.get("help")))
            self.made = True
            return _Unused()
        if self.command is not None and name != self.command:
            return _Unused()
        self.made = True
        return self.sub.add_parser(name, **kwargs)


def command_named(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is no option nor an
    option's value (None: none; HELP_FIRST: help asked for before it)."""
    words = iter(argv)
    for word in words:
        if word in ("-h", "--help"):
            return HELP_FIRST
        if word == "--":
            return None
        if word == "--db" or (len(word) > 3 and "--data".startswith(word)):   # --da: --data
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def show_version(args: argparse.Namespace) -> int:
    """--version: ``ccsync VERSION``, or ``{"version": VERSION}`` with --json."""
    _emit(args, {"version": __version__}, [f"ccsync {__version__}"])
    return EXIT_OK


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ccsync command line; with ``command``, only that subcommand's
    parser is made (when it is one)."""
    parser = _Parser(prog="ccsync", description="Keep cc's data the same on every machine "
                     "through a sync server you run.")
    parser.add_argument("--version", action="store_true",
                        help="show ccsync's version and exit (with --json, as JSON)")
    _flags(parser, data=True, defaults=True)
    sub = _OnlyCommand(parser.add_subparsers(dest="command", metavar="COMMAND",
                                             parser_class=_Parser), command)
    _add_server_parser(sub)
    _add_registry_parsers(sub)
    _add_device_parsers(sub)
    if command is not None and not sub.made:        # no such command: argparse says so
        return build_parser()
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 usage, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = argv or ["status"]                       # alone, as `cc sync`: the status
    parser = build_parser(command_named(argv))
    # Read before parsing: an error parsing says itself in the form asked for.
    debug, as_json = "--debug" in argv, "--json" in argv
    try:
        args = parser.parse_args(argv)
        if args.version:
            return show_version(args)
        if not getattr(args, "func", None):         # options alone (`ccsync --json`): the status
            args = build_parser("status").parse_args([*argv, "status"])
        return args.func(args)
    except CcsyncError as exc:
        return _fail(str(exc), exc.hint, exc.exit_code, debug, as_json)
    except KeyboardInterrupt:
        return _fail("interrupted", None, EXIT_INTERRUPTED, False, as_json)
    except (sqlite3.Error, OSError) as exc:
        return _fail(f"{type(exc).__name__}: {exc}", None, EXIT_FAILURE, debug, as_json)


def _fail(message: str, hint: str | None, code: int, debug: bool, as_json: bool) -> int:
    """Say why a command failed (stderr; with ``as_json`` also one JSON object
    on stdout) and return its exit code; ``debug`` adds the traceback."""
    import traceback
    if debug:
        traceback.print_exc()
    if code == EXIT_INTERRUPTED:
        print("ccsync: interrupted", file=sys.stderr)
    else:
        print(f"ccsync: error: {message}", file=sys.stderr)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": message, "hint": hint, "exit_code": code}, indent=2,
                         sort_keys=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
