"""Fuzz tests: junk, malformed and mutated records never break a device or the server.

What the properties promise (from the issue):

Device side
  * a record that cannot be applied (wrong type, missing or malformed fields,
    a non-scalar value, a bad reference, a value that breaks a local
    constraint) is refused on its own, with a counted reason
    (``ApplyResult.refused``); the rest of its page applies and the cursor
    moves to the page's cursor;
  * refusal depends only on the record and the spec: two fresh devices given
    the same page refuse the same records;
  * tables and columns this device does not have are kept aside, not refused;
  * no exception from a record escapes ``apply_page``, ``resolve_pending`` or
    a whole ``sync_once``; later good records still arrive.

Server side
  * ``ServerStore.push`` validates every record (shape, types, sizes) with one
    result per record, never raises for any JSON-like list, and still accepts
    the good records of the batch;
  * a value over ``max_value`` (default 4 MiB) or a payload over
    ``max_record`` (default 16 MiB) is refused at push with a clear reason;
  * ``ServerStore.pull(cursor, limit, max_bytes=N)`` pages are bounded in bytes
    as well as rows, and a pull loop still delivers every record exactly once;
  * nothing sent through ``dispatch`` (or real HTTP) yields a 500.

How records are made: a real device (cc's schema, cc's SQL) creates rows and
ccsync captures them (``Store.capture``), giving valid records of every table,
including updates and tombstones.  Hypothesis then mutates copies of them
(dropped keys, random JSON in any slot, other table names, negative, huge,
boolean, float or text clocks, dicts and lists where a scalar belongs, unknown
columns, malformed references and id lists, lone surrogates, very long
strings), builds record-shaped random objects, and fully random JSON.  Some
mutations are known to make a record invalid ("bad"): those must be refused.
The good records of a page come from a second device whose rows share nothing
with the mutated ones, so their arrival can be checked exactly.

Examples per test, from CCSYNC_FUZZ_EXAMPLES (N, default 200; 80 under CI, and
3,000 with fresh seeds in ``make hunt``): N for
test_device_page_with_fuzzed_records, test_server_push_validates_every_record
and test_pull_pages_are_bounded_in_bytes; N // 3 (66) for
test_sync_survives_fuzzed_pull_pages; N // 2 (100) for
test_dispatch_never_answers_500.  The other tests are fixed cases.  CI loads
the derandomized profile from conftest.py, so a red build replays; raise N for
a long hunt, e.g. ``CCSYNC_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_records.py``.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import json
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import time
import types
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import ccsync
from test_transport import signed
from conftest import SCHEMA, TMP_ROOT, Device, content, make_cc_db

EXAMPLES = int(os.environ.get("CCSYNC_FUZZ_EXAMPLES", "80"))     # make hunt: 3,000
DEVICE_EXAMPLES = EXAMPLES                      # test_device_page_with_fuzzed_records
SERVER_EXAMPLES = EXAMPLES                      # test_server_push_validates_every_record
SYNC_EXAMPLES = max(10, EXAMPLES // 3)          # test_sync_survives_fuzzed_pull_pages
PULL_EXAMPLES = EXAMPLES                        # test_pull_pages_are_bounded_in_bytes
DISPATCH_EXAMPLES = max(10, EXAMPLES // 2)      # test_dispatch_never_answers_500

FUZZ_SETTINGS = dict(deadline=None, report_multiple_bugs=False, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
    HealthCheck.filter_too_much])

MiB = 1024 * 1024
SIZE_REASON = re.compile(r"larg|size|big|limit|byte|long|exceed|MiB|KiB", re.IGNORECASE)
STATUSES = {"accepted", "superseded", "refused"}


##### The corpus: real records captured from real devices #####################

def _capture_all(store: ccsync.Store) -> list[dict]:
    """Every pending row of ``store`` as outgoing records (reads only)."""
    out, position = [], None
    while True:
        batch = store.capture(position, 500)
        if batch.next_pos is None:
            return out
        out += [r for r in batch.records if r is not None]
        position = batch.next_pos


def _create_rows(dev: Device, p: str) -> None:
    """One row (or two) in every synced table, names prefixed with ``p``."""
    sql = dev.sql
    sql("INSERT INTO version (name, path, port, pyenv_virtualenv, branch) "
        "VALUES (?, ?, '8069', 'venv17', '17.0')", f"{p}-17.0", f"/opt/{p}/17")
    sql("INSERT INTO setting (name, value) VALUES (?, 'dark')", f"{p}.theme")
    sql("INSERT INTO setting (name, value) VALUES (?, X'00ff10')", f"{p}.blob")
    sql("INSERT INTO database (name, size_bytes, in_pg) VALUES (?, 123, 1)", f"{p}_db")
    sql("INSERT INTO database (name, clone_db_id) "
        "VALUES (?, (SELECT id FROM database WHERE name = ?))", f"{p}_db_clone", f"{p}_db")
    sql("INSERT INTO workspace (name, path) VALUES (?, ?)", f"{p}-ws", f"/ws/{p}")
    sql("INSERT INTO project (name, main_branch, workspace_id) "
        "VALUES (?, 'main', (SELECT id FROM workspace WHERE name = ?))", f"{p}-proj", f"{p}-ws")
    proj = f"(SELECT id FROM project WHERE name = '{p}-proj')"
    sql(f"INSERT INTO environment (name, project_id, version_id, database_id, project_path, "
        f"notes) VALUES ('main', {proj}, (SELECT id FROM version WHERE name = ?), "
        f"(SELECT id FROM database WHERE name = ?), ?, 'n')",
        f"{p}-17.0", f"{p}_db", f"/work/{p}/main")
    sql(f"INSERT INTO environment (name, project_id, version_id) VALUES "
        f"('staging', {proj}, (SELECT id FROM version WHERE name = ?))", f"{p}-17.0")
    sql(f"UPDATE project SET environment_ids = (SELECT json_group_array(id) FROM "
        f"(SELECT id FROM environment WHERE project_id = {proj} ORDER BY id)) "
        f"WHERE id = {proj}")
    env = f"(SELECT id FROM environment WHERE project_id = {proj} AND name = 'main')"
    sql(f"INSERT INTO switch_log (environment_id, switched_at, note) "
        f"VALUES ({env}, '2024-05-01T09:00:00', 'x')")
    sql("INSERT INTO backup (name, env_name, db_name, database_id, file_path, created_at) "
        "VALUES ('b1', 'main', ?, (SELECT id FROM database WHERE name = ?), ?, '2024-05-01')",
        f"{p}_db", f"{p}_db", f"/backups/{p}/b1")
    sql("INSERT INTO repository (name, path, origin_url, enabled) VALUES ('r', ?, ?, 1)",
        f"/src/{p}/r", f"https://git.example/{p}.git")
    repo = f"(SELECT id FROM repository WHERE name = 'r' AND path = '/src/{p}/r')"
    sql(f"INSERT INTO skill_tag (repository_id, commit_sha, tag, weight) "
        f"VALUES ({repo}, 'abc123', 'python', 3)")
    sql(f"INSERT INTO knowledge_index (repository_id, symbol, symbol_kind, commit_count) "
        f"VALUES ({repo}, 'do_thing', 'function', 2)")
    sql(f"UPDATE repository SET "
        f"skill_tag_ids = (SELECT group_concat(id) FROM skill_tag WHERE repository_id = {repo}), "
        f"knowledge_index_ids = (SELECT json_group_array(id) FROM knowledge_index "
        f"WHERE repository_id = {repo}) WHERE id = {repo}")


@functools.lru_cache(maxsize=None)
def corpus() -> types.SimpleNamespace:
    """Captured records (built once per process).

    ``good``: inserts from device "good" (real clocks); ``later``: two more
    rows it made afterwards; ``bases``: records from device "fz" (first-install
    inserts with clock 0, then updates and tombstones), the material to mutate.
    ``expected``: conftest.content() of the good device, to compare arrivals.
    """
    holder = tempfile.TemporaryDirectory(dir=TMP_ROOT)
    root = Path(holder.name)
    template = root / "template.db"
    make_cc_db(template).close()
    scratch = ccsync.ServerStore.open(str(root / "scratch-server.db"))

    good = Device(root / "good.db", scratch, "good")
    good.store.prepare()                        # capture first: real clocks
    _create_rows(good, "good")
    good.store.prepare()
    good_records = _capture_all(good.store)
    good.push()                                 # settle them: the next capture is new rows
    good.sql("INSERT INTO version (name, path, port) VALUES ('good-later', '/opt/later', '9')")
    good.sql("INSERT INTO environment (name, project_id, version_id, notes) VALUES ('later', "
             "(SELECT id FROM project WHERE name = 'good-proj'), "
             "(SELECT id FROM version WHERE name = 'good-later'), 'arrived')")
    good.store.prepare()
    later_records = _capture_all(good.store)
    expected = content(good.cc)

    fz = Device(root / "fz.db", scratch, "fz")
    _create_rows(fz, "fz")                      # before install: clock-0 inserts
    fz.store.prepare()
    bases = _capture_all(fz.store)
    fz.push()
    fz.sql("UPDATE version SET port = '9069', branch = NULL")
    fz.sql("UPDATE project SET main_branch = 'master'")
    fz.sql("UPDATE environment SET notes = 'edited', version_id = NULL WHERE name = 'staging'")
    fz.sql("UPDATE repository SET skill_tag_ids = ''")
    fz.sql("DELETE FROM switch_log")
    fz.sql("DELETE FROM setting WHERE name = 'fz.theme'")
    fz.store.prepare()
    bases += _capture_all(fz.store)

    for dev in (good, fz):
        dev.store.conn.close()
        dev.cc.close()
    scratch.conn.close()

    schema = sqlite3.connect(str(template))
    columns = {spec.name: [r[1] for r in schema.execute(f'PRAGMA table_info("{spec.name}")')]
               for spec in ccsync.SPEC}
    schema.close()
    assert {r["t"] for r in good_records} == set(ccsync.SPEC_BY_NAME), "corpus misses a table"
    assert any(ccsync.TOMBSTONE in r["c"] for r in bases), "corpus has no tombstone"
    return types.SimpleNamespace(
        holder=holder, template=template, good=good_records, later=later_records,
        bases=bases, expected=expected, columns=columns,
        good_keys=[(r["t"], r["id"]) for r in good_records],
        later_keys=[(r["t"], r["id"]) for r in later_records],
        fuzz_sids=sorted({r["id"] for r in bases}),
    )


def wire(obj):
    """``obj`` as it comes off the wire (a JSON round trip, fresh objects)."""
    return json.loads(json.dumps(obj))


def _no_lock_gaps(store: ccsync.Store) -> None:
    """No pauses between ccsync's write transactions: nobody else writes these test
    databases, and hundreds of examples must stay fast.  (Only when the store has such
    a pacing gate; nothing here depends on it.)"""
    gate = getattr(store, "gate", None)
    for attr in ("gap_s", "ratio"):
        if gate is not None and isinstance(getattr(gate, attr, None), (int, float)):
            setattr(gate, attr, 0.0)


@contextlib.contextmanager
def fresh_devices(*names: str, server: ccsync.ServerStore | None = None,
                  schema: str | None = None):
    """Fresh cc databases (copies of one empty cc 4.0 database), ccsync installed."""
    corp = corpus()
    with tempfile.TemporaryDirectory(dir=TMP_ROOT) as tmp:
        made: list[Device] = []
        try:
            for name in names:
                path = Path(tmp) / f"{name}.db"
                if schema is None:
                    shutil.copyfile(corp.template, path)
                else:
                    conn = sqlite3.connect(str(path), isolation_level=None)
                    conn.executescript(schema)
                    conn.close()
                dev = Device(path, server, name)
                made.append(dev)
                for conn in (dev.cc, dev.store.conn):
                    conn.execute("PRAGMA synchronous = OFF")
                _no_lock_gaps(dev.store)
                dev.store.prepare()
            yield made
        finally:
            for dev in made:
                dev.store.conn.close()
                dev.cc.close()


@contextlib.contextmanager
def fresh_server(**kw):
    """A new, empty server store in its own temporary directory."""
    with tempfile.TemporaryDirectory(dir=TMP_ROOT) as tmp:
        store = ccsync.ServerStore.open(str(Path(tmp) / "server.db"), **kw)
        try:
            yield store
        finally:
            store.conn.close()


def pull_all(pull) -> list[dict]:
    """Every record, by pulling pages (``pull(cursor)`` -> page) until no more."""
    records, cursor = [], 0
    for _ in range(100_000):
        page = pull(cursor)
        records += page["records"]
        cursor = page["cursor"]
        if not page["more"]:
            return records
    raise AssertionError("the server kept answering more=True")


def assert_arrived(dev: Device, keys: list[tuple[str, str]]) -> None:
    """The rows of these records are in cc's tables, exactly as on the good device."""
    expected, have = corpus().expected, content(dev.cc)
    for table, sid in keys:
        assert sid in have[table], f"{table} {sid} did not arrive"
        assert have[table][sid] == expected[table][sid], f"{table} {sid} arrived wrong"


def assert_reasons(refused: Counter) -> None:
    for reason, count in refused.items():
        assert isinstance(reason, str) and reason.strip(), f"refusal without a reason: {reason!r}"
        assert count > 0


##### Strategies ##############################################################

NOW_HLC = ccsync.hlc_at(int(time.time() * 1000))
HOUR_HLC = ccsync.hlc_at(3600 * 1000)
# Drawn clocks use fixed bounds, so derandomized runs draw the same examples every day.
PAST_HLC = ccsync.hlc_at(1_735_689_600_000)              # 2025-01-01T00:00:00Z
FUTURE_HLC = ccsync.hlc_at(7_258_118_400_000)            # 2200-01-01: ahead of every clock
TABLES = sorted(ccsync.SPEC_BY_NAME)

ANY_CHAR = st.characters(exclude_categories=())          # lone surrogates included
ODD_TEXT = st.sampled_from([
    "", " ", "~", "*", "-", "id", "rowid", "sync_id", "synced_at", "name", "$b64", "ids", "fmt",
    "\ud800", "a\udfffb", "\x00", "é", "a b", "x" * 70, "'; DROP TABLE version; --", '"', "\\",
    "17.0", "main", "null", "[1, 2]", "1,2"])
LONG_TEXT = st.integers(1000, 120_000).map(lambda n: "L" * n)
TEXT = st.one_of(st.text(ANY_CHAR, max_size=12), ODD_TEXT, LONG_TEXT)
KEY_TEXT = st.one_of(st.text(ANY_CHAR, max_size=8), ODD_TEXT)
EDGE_INTS = st.sampled_from([0, 1, -1, 2 ** 31, 2 ** 53 + 1, 2 ** 62, 2 ** 63 - 1, 2 ** 63,
                             -(2 ** 63), -(2 ** 63) - 1, 2 ** 64, 10 ** 40, -(10 ** 40)])
INTS = st.one_of(st.integers(), EDGE_INTS)
HUGE_INTS = st.one_of(st.integers(min_value=2 ** 63, max_value=2 ** 90),
                      st.integers(max_value=-(2 ** 63) - 1, min_value=-(2 ** 90)))
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(KEY_TEXT, inner, max_size=4)), max_leaves=10)
NON_STRING = st.one_of(st.none(), st.booleans(), INTS, FLOATS,
                       st.lists(SCALARS, max_size=3), st.dictionaries(KEY_TEXT, SCALARS, max_size=3))
NON_DICT = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT, st.lists(JSON, max_size=3))
SPECIAL_VALUES = st.sampled_from([
    {"$b64": "AAAA"}, {"$b64": "AP8Q"}, {"$b64": "!!"}, {"$b64": "AAA"}, {"$b64": 1},
    {"$b64": None}, {"$b64": "AAAA", "x": 1}, {"ids": [], "fmt": "json"},
    {"ids": ["x"], "fmt": "csv"}, {"ids": [1], "fmt": "json"}, {"ids": "x", "fmt": "json"},
    {"ids": [], "fmt": "xml"}, {"ids": [None], "fmt": "json"}, [], [1, 2], {}])
VALID_SID = st.from_regex(r"\A[A-Za-z0-9._:-]{1,64}\Z")
BAD_SID_TEXT = st.one_of(
    st.sampled_from(["", " ", "a b", "x" * 65, "é", "a/b", "a,b", "'", "\ud800", "{}", "a\n"]),
    st.text(ANY_CHAR, max_size=70).filter(lambda s: not ccsync.made_of(s, ccsync.SYNC_ID_CHARS)))
VALID_CLOCK = st.integers(0, PAST_HLC)
BAD_CLOCK = st.one_of(
    st.integers(max_value=-1), st.booleans(), FLOATS, TEXT, st.none(),
    st.lists(st.integers(), max_size=2), st.dictionaries(KEY_TEXT, st.integers(), max_size=1),
    st.integers(min_value=2 ** 63, max_value=2 ** 90),
    st.integers(FUTURE_HLC, 2 ** 62 - 1))
ANY_CLOCK = st.one_of(VALID_CLOCK, BAD_CLOCK)


def _is_blob(value) -> bool:
    if not (isinstance(value, dict) and set(value) == {"$b64"} and isinstance(value["$b64"], str)):
        return False
    try:
        base64.b64decode(value["$b64"], validate=True)
    except ValueError:
        return False
    return True


NON_SCALAR = st.one_of(
    st.lists(SCALARS, max_size=3), st.dictionaries(KEY_TEXT, SCALARS, max_size=3),
    st.booleans(), HUGE_INTS,
    st.sampled_from([{"$b64": 1}, {"$b64": "!!"}, {"$b64": "AAA"}, {"$b64": None},
                     {"$b64": "AAAA", "x": "y"}, {"ids": [], "fmt": "json"}, [], {}]),
).filter(lambda v: not _is_blob(v))


def _columns(table: str) -> list[str]:
    return corpus().columns[table]


def _plain_columns(table: str) -> list[str]:
    """Synced columns of ``table`` that hold a plain SQLite value."""
    spec = ccsync.SPEC_BY_NAME[table]
    special = {"id", *ccsync.SYNC_COLUMNS, *spec.local, *spec.refs, *spec.list_refs,
               *spec.name_refs}
    return [c for c in _columns(table) if c not in special]


def _all_columns() -> list[str]:
    return sorted({c for cols in corpus().columns.values() for c in cols}
                  | {ccsync.TOMBSTONE, "*", "-", "color", "x y", "", "c" * 129})


def _bases(draw, where=lambda r: True) -> dict:
    candidates = [r for r in corpus().bases if where(r)]
    return copy.deepcopy(draw(st.sampled_from(candidates)))


def _row_base(draw, tables=None) -> dict:
    """A base record that carries values (not a tombstone), of one of ``tables``."""
    return _bases(draw, lambda r: ccsync.TOMBSTONE not in r["c"] and r["p"]["v"]
                  and (tables is None or r["t"] in tables))


def _set_cell(draw, rec: dict, col: str, value) -> dict:
    """Give ``rec`` a valid clock and ``value`` for ``col``."""
    rec["c"].pop(ccsync.TOMBSTONE, None)
    rec["c"][col] = draw(VALID_CLOCK)
    rec["p"]["v"][col] = value
    return rec


# -- mutations that make a record invalid for devices and for the server ------

def _bad_shape(draw, kind: str) -> dict:
    rec = _bases(draw)
    if kind == "not a dict":
        return draw(NON_DICT)
    if kind == "missing field":
        del rec[draw(st.sampled_from(["t", "id", "dev", "c", "p"]))]
    elif kind == "t not a string":
        rec["t"] = draw(NON_STRING)
    elif kind == "malformed id":
        rec["id"] = draw(st.one_of(NON_STRING, BAD_SID_TEXT))
    elif kind == "dev not a string":
        rec["dev"] = draw(NON_STRING)
    elif kind == "clocks not a non-empty object":
        rec["c"] = draw(st.one_of(NON_DICT, st.just({})))
    elif kind == "bad clock":
        rec["c"][draw(st.sampled_from(sorted(rec["c"])))] = draw(BAD_CLOCK)
    elif kind == "payload not an object":
        rec["p"] = draw(NON_DICT)
    elif kind == "payload part not an object":
        rec["p"][draw(st.sampled_from(["v", "l", "k"]))] = draw(NON_DICT)
    else:
        raise AssertionError(kind)
    return rec


SHAPE_KINDS = ["not a dict", "missing field", "t not a string", "malformed id",
               "dev not a string", "clocks not a non-empty object", "bad clock",
               "payload not an object", "payload part not an object"]


# -- mutations that make a record one no device can apply ---------------------

def _bad_content(draw, kind: str) -> dict:
    if kind == "non-scalar value":
        rec = _row_base(draw)
        col = draw(st.sampled_from(_plain_columns(rec["t"])))
        return _set_cell(draw, rec, col, draw(NON_SCALAR))
    if kind == "workspace_id not a name":
        rec = _row_base(draw, ("project",))
        return _set_cell(draw, rec, "workspace_id", draw(st.one_of(
            st.sampled_from([{"$b64": "AAAA"}, {"$b64": "AP8Q"}]),
            st.lists(SCALARS, max_size=2), st.dictionaries(KEY_TEXT, SCALARS, max_size=2))))
    if kind == "bad reference":
        rec = _row_base(draw, [t for t in TABLES if ccsync.SPEC_BY_NAME[t].refs])
        col = draw(st.sampled_from(sorted(ccsync.SPEC_BY_NAME[rec["t"]].refs)))
        return _set_cell(draw, rec, col, draw(st.one_of(
            INTS, st.booleans(), FLOATS, BAD_SID_TEXT, st.lists(VALID_SID, max_size=2),
            st.dictionaries(KEY_TEXT, SCALARS, max_size=2), st.just({"$b64": "AAAA"}))))
    if kind == "bad id list":
        rec = _row_base(draw, [t for t in TABLES if ccsync.SPEC_BY_NAME[t].list_refs])
        col = draw(st.sampled_from(sorted(ccsync.SPEC_BY_NAME[rec["t"]].list_refs)))
        bad_item = st.one_of(NON_STRING, BAD_SID_TEXT)
        return _set_cell(draw, rec, col, draw(st.one_of(
            st.builds(lambda ids: {"ids": ids, "fmt": "json"},
                      st.one_of(NON_STRING.filter(lambda v: not isinstance(v, list)), TEXT)),
            st.builds(lambda ids, fmt: {"ids": ids, "fmt": fmt},
                      st.lists(bad_item, min_size=1, max_size=3), st.sampled_from(["json", "csv"])),
            st.builds(lambda fmt: {"ids": [], "fmt": fmt},
                      st.sampled_from(["xml", "", "JSON", None, 1, True, []])),
            st.sampled_from([{"ids": [], "fmt": "json", "extra": 1}, {"ids": []},
                             {"fmt": "csv"}]),
            st.lists(VALID_SID, max_size=3))))
    if kind == "non-scalar key value":
        rec = _bases(draw, lambda r: r["p"]["k"])
        rec["p"]["k"][draw(st.sampled_from(sorted(rec["p"]["k"])))] = draw(NON_SCALAR)
        return rec
    if kind == "non-scalar local value":
        rec = _bases(draw, lambda r: r["p"]["l"])
        rec["p"]["l"][draw(st.sampled_from(sorted(rec["p"]["l"])))] = draw(NON_SCALAR)
        return rec
    if kind == "clock without a value":
        rec = _row_base(draw)
        col = draw(st.sampled_from(_plain_columns(rec["t"])))
        _set_cell(draw, rec, col, None)
        del rec["p"]["v"][col]
        return rec
    if kind == "column that never syncs":
        rec = _row_base(draw)
        spec = ccsync.SPEC_BY_NAME[rec["t"]]
        col = draw(st.sampled_from(["id", *ccsync.SYNC_COLUMNS, *spec.local]))
        return _set_cell(draw, rec, col, draw(st.one_of(st.none(), st.integers(0, 99), TEXT)))
    raise AssertionError(kind)


CONTENT_KINDS = ["non-scalar value", "workspace_id not a name", "bad reference", "bad id list",
                 "non-scalar key value", "non-scalar local value", "clock without a value",
                 "column that never syncs"]


# -- mutations the server must refuse (devices may keep them aside) ------------

def _bad_for_server(draw, kind: str) -> dict:
    rec = _bases(draw)
    if kind == "empty or long dev":
        rec["dev"] = draw(st.one_of(st.just(""), st.integers(65, 300).map(lambda n: "d" * n)))
    elif kind == "unknown table":
        rec["t"] = draw(st.one_of(
            st.sampled_from(["workspace", "device", "bogus", "", "VERSION", "version ",
                             "sqlite_master", "_ccsync_meta", "schema_migrations"]),
            TEXT.filter(lambda s: s not in ccsync.SPEC_BY_NAME)))
    elif kind == "bad clock column name":
        name = draw(st.sampled_from(["", "c" * 129, "c" * 1000]))
        rec["c"][name] = draw(VALID_CLOCK)
        if isinstance(rec["p"].get("v"), dict):
            rec["p"]["v"][name] = "x"
    else:
        raise AssertionError(kind)
    return rec


SERVER_KINDS = ["empty or long dev", "unknown table", "bad clock column name"]


@st.composite
def device_bad(draw):
    """(record, kind): a record every device must refuse."""
    kind = draw(st.sampled_from(SHAPE_KINDS + CONTENT_KINDS))
    rec = _bad_shape(draw, kind) if kind in SHAPE_KINDS else _bad_content(draw, kind)
    return rec, kind


@st.composite
def server_bad(draw):
    """(record, kind): a record the server must refuse at push."""
    kind = draw(st.sampled_from(SHAPE_KINDS + SERVER_KINDS))
    rec = _bad_shape(draw, kind) if kind in SHAPE_KINDS else _bad_for_server(draw, kind)
    return rec, kind


# -- wild mutations: anything, no verdict -------------------------------------

def _part(rec, name):
    p = rec.get("p") if isinstance(rec, dict) else None
    part = p.get(name) if isinstance(p, dict) else None
    return part if isinstance(part, dict) else None


def _column(draw, rec, existing=None) -> str:
    table = rec.get("t") if isinstance(rec, dict) else None
    pool = list(existing or ())
    if isinstance(table, str) and table in ccsync.SPEC_BY_NAME:
        pool += _columns(table)
    if pool and draw(st.booleans()):
        return draw(st.sampled_from(sorted(set(pool))))
    return draw(st.one_of(st.sampled_from(_all_columns()), KEY_TEXT))


def _value(draw):
    return draw(st.one_of(SCALARS, SPECIAL_VALUES, JSON, st.sampled_from(corpus().fuzz_sids),
                          VALID_SID))


def _wild_op(draw, rec):
    op = draw(st.sampled_from([
        "drop key", "set key", "table", "id", "dev", "clock", "drop clock", "value",
        "drop value", "part", "local", "natural key", "unknown column", "tombstone", "graft",
        "replace", "bad"]))
    if op == "replace":
        return draw(JSON)
    if op == "bad":
        kind = draw(st.sampled_from(SHAPE_KINDS + CONTENT_KINDS + SERVER_KINDS))
        if kind in SHAPE_KINDS:
            return _bad_shape(draw, kind)
        return _bad_content(draw, kind) if kind in CONTENT_KINDS else _bad_for_server(draw, kind)
    if not isinstance(rec, dict):
        return rec
    clocks, values = rec.get("c"), _part(rec, "v")
    if op == "drop key" and rec:
        del rec[draw(st.sampled_from(sorted(rec)))]
    elif op == "set key":
        rec[draw(st.one_of(st.sampled_from(["t", "id", "dev", "c", "p"]), KEY_TEXT))] = draw(JSON)
    elif op == "table":
        rec["t"] = draw(st.sampled_from(TABLES + ["workspace", "bogus", ""]))
    elif op == "id":
        rec["id"] = draw(st.one_of(st.sampled_from(corpus().fuzz_sids), VALID_SID, BAD_SID_TEXT))
    elif op == "dev":
        rec["dev"] = draw(st.one_of(st.sampled_from(["dev-x", "", "d" * 65]), TEXT))
    elif op == "clock" and isinstance(clocks, dict):
        clocks[_column(draw, rec, clocks)] = draw(ANY_CLOCK)
    elif op == "drop clock" and isinstance(clocks, dict) and clocks:
        del clocks[draw(st.sampled_from(sorted(clocks)))]
    elif op == "value" and values is not None:
        col = _column(draw, rec, values)
        values[col] = _value(draw)
        if isinstance(clocks, dict) and draw(st.booleans()):
            clocks[col] = draw(VALID_CLOCK)
    elif op == "drop value" and values:
        del values[draw(st.sampled_from(sorted(values)))]
    elif op == "part" and isinstance(rec.get("p"), dict):
        rec["p"][draw(st.one_of(st.sampled_from(["v", "l", "k"]), KEY_TEXT))] = draw(JSON)
    elif op == "local" and _part(rec, "l") is not None:
        local = _part(rec, "l")
        local[_column(draw, rec, local)] = _value(draw)
    elif op == "natural key" and _part(rec, "k") is not None:
        key = _part(rec, "k")
        key[_column(draw, rec, key)] = _value(draw)
    elif op == "unknown column" and isinstance(clocks, dict) and values is not None:
        col = draw(st.one_of(st.sampled_from(["color", "size", "new_col", "x" * 40]), KEY_TEXT))
        clocks[col] = draw(VALID_CLOCK)
        values[col] = draw(SCALARS)
    elif op == "tombstone" and isinstance(rec.get("p"), dict):
        rec["c"] = {ccsync.TOMBSTONE: draw(VALID_CLOCK)}
        rec["p"]["v"] = {}
    elif op == "graft":
        other = _bases(draw)
        part = draw(st.sampled_from(["t", "id", "dev", "c", "p"]))
        rec[part] = other[part]
    return rec


@st.composite
def wild_record(draw):
    rec = _bases(draw)
    for _ in range(draw(st.integers(1, 4))):
        rec = _wild_op(draw, rec)
    return rec


RECORDISH = st.fixed_dictionaries(
    {},
    optional={
        "t": st.one_of(st.sampled_from(TABLES), JSON),
        "id": st.one_of(VALID_SID, JSON),
        "dev": st.one_of(st.sampled_from(["dev-x", "d1"]), JSON),
        "c": st.one_of(st.dictionaries(KEY_TEXT | st.sampled_from(["name", "port", "~"]),
                                       ANY_CLOCK, max_size=4), JSON),
        "p": st.one_of(st.fixed_dictionaries({}, optional={
            part: st.one_of(st.dictionaries(KEY_TEXT | st.sampled_from(["name", "port", "path"]),
                                            st.one_of(SCALARS, SPECIAL_VALUES, JSON), max_size=4),
                            JSON)
            for part in ("v", "l", "k")}), JSON),
        "x": JSON,
    })


def fuzz_entries(bad):
    """(record, kind or None): bad records (must be refused), wild ones, random JSON."""
    return st.one_of(
        bad(),
        wild_record().map(lambda r: (r, None)),
        RECORDISH.map(lambda r: (r, None)),
        JSON.map(lambda r: (r, None)),
    )


##### Device side #############################################################

@settings(max_examples=DEVICE_EXAMPLES, **FUZZ_SETTINGS)
@given(fuzz=st.lists(fuzz_entries(device_bad), min_size=1, max_size=8), data=st.data())
def test_device_page_with_fuzzed_records(fuzz, data):
    """Bad records are refused one by one; the page's good records apply; the cursor moves;
    two fresh devices refuse the same; later good records still arrive."""
    corp = corpus()
    records = corp.good + [r for r, _ in fuzz]
    order = data.draw(st.permutations(range(len(records))), label="page order")
    page = wire([records[i] for i in order])
    cursor = data.draw(st.integers(1, 2 ** 40), label="cursor")
    bad_kinds = [kind for _, kind in fuzz if kind is not None]
    note(f"bad kinds: {bad_kinds}")
    with fresh_devices("a", "b") as (a, b):
        results = []
        for dev in (a, b):
            result = dev.store.apply_page(wire(page), cursor)
            dev.store.resolve_pending()
            results.append(result)
            assert dev.store.cursor == cursor
            assert result.received == len(page)
            assert_reasons(result.refused)
            assert sum(result.refused.values()) >= len(bad_kinds), \
                f"{len(bad_kinds)} bad records ({bad_kinds}), refused only {dict(result.refused)}"
            assert result.applied + result.unchanged + sum(result.refused.values()) \
                <= result.received
            assert_arrived(dev, corp.good_keys)
        assert results[0].refused == results[1].refused, "two fresh devices refused differently"

        later = a.store.apply_page(wire(corp.later), cursor + 1)
        a.store.resolve_pending()
        assert later.refused == Counter()
        assert a.store.cursor == cursor + 1
        assert_arrived(a, corp.later_keys)


class FuzzTransport(ccsync.LocalTransport):
    """The in-process transport, with fuzzed records mixed into one pulled page."""

    def __init__(self, server, device, inject: list, at_page: int):
        super().__init__(server, device)
        self.inject, self.at_page, self.pages = inject, at_page, 0

    def pull(self, cursor, *args, **kwargs):
        page = super().pull(cursor, *args, **kwargs)
        if self.inject and (self.pages >= self.at_page or not page.get("more")):
            records = page.get("records", [])
            cut = len(records) // 2
            page["records"] = records[:cut] + wire(self.inject) + records[cut:]
            self.inject = []
        self.pages += 1
        return page


@settings(max_examples=SYNC_EXAMPLES, **FUZZ_SETTINGS)
@given(fuzz=st.lists(fuzz_entries(device_bad), min_size=1, max_size=6),
       page_size=st.integers(1, 20), at_page=st.integers(0, 20))
def test_sync_survives_fuzzed_pull_pages(fuzz, page_size, at_page):
    """A whole sync_once returns normally around fuzzed records in its pull pages, the
    cursor reaches the server's end, and later good records (both ways) still go through."""
    corp = corpus()
    with fresh_server() as server:
        answer = server.push(wire(corp.good), device="good")
        assert [r["status"] for r in answer["results"]] == ["accepted"] * len(corp.good)
        with fresh_devices("b", server=server) as (b,):
            b.transport = FuzzTransport(server, "b", [r for r, _ in fuzz], at_page)
            result = b.sync(page_size=page_size)
            assert result.pulled.received >= len(corp.good) + len(fuzz)
            assert b.store.cursor == server.stats()["seq"]
            assert_arrived(b, corp.good_keys)

            answer = server.push(wire(corp.later), device="good")
            assert {r["status"] for r in answer["results"]} == {"accepted"}
            b.transport = ccsync.LocalTransport(server, "b")
            b.sql("INSERT INTO setting (name, value) VALUES ('b.after-fuzz', 'yes')")
            result = b.sync(page_size=page_size)
            assert b.store.cursor == server.stats()["seq"]
            assert_arrived(b, corp.later_keys)
            assert result.accepted >= 1
            names = [r["p"]["v"].get("name") for r in pull_all(server.pull)
                     if r["t"] == "setting"]
            assert "b.after-fuzz" in names


def _good(table: str) -> dict:
    return next(r for r in corpus().good if r["t"] == table)


def _base(table: str, tomb: bool = False) -> dict:
    return next(r for r in corpus().bases
                if r["t"] == table and (ccsync.TOMBSTONE in r["c"]) == tomb)


def _cell(rec: dict, col: str, value, clock: int | None = None) -> dict:
    rec = copy.deepcopy(rec)
    rec["c"][col] = NOW_HLC - 1000 if clock is None else clock
    rec["p"]["v"][col] = value
    return rec


def _without(rec: dict, key: str) -> dict:
    rec = copy.deepcopy(rec)
    del rec[key]
    return rec


def _with(rec: dict, **top) -> dict:
    rec = copy.deepcopy(rec)
    rec.update(top)
    return rec


def _with_part(rec: dict, part: str, col: str, value) -> dict:
    rec = copy.deepcopy(rec)
    rec["p"][part][col] = value
    return rec


def _without_value(rec: dict, col: str) -> dict:
    rec = copy.deepcopy(rec)
    del rec["p"]["v"][col]
    return rec


def _repository_stub() -> dict:
    repo = _base("repository")
    ki = _base("knowledge_index")
    return {"t": "repository", "id": "repo-stub-1", "dev": repo["dev"],
            "c": {"origin_url": NOW_HLC - 5000, "knowledge_index_ids": NOW_HLC - 5000},
            "p": {"v": {"origin_url": "https://git.example/stub.git",
                        "knowledge_index_ids": {"ids": [ki["id"], "ki-not-here"], "fmt": "json"}},
                  "l": {}, "k": {"origin_url": "https://git.example/stub.git"}}}


def _not_null_broken() -> list[dict]:
    version = _base("version")
    return [version, _cell({**version, "c": {}, "p": {"v": {}, "l": {}, "k": {}}}, "name", None)]


# (extra records first in the page, the record under test, must it be refused?)
LISTED_CASES = {
    "project.workspace_id is a blob": lambda: ([], _cell(_base("project"), "workspace_id",
                                                         {"$b64": "AAAA"}), True),
    "version.port is a list": lambda: ([], _cell(_base("version"), "port", ["8069"]), True),
    "version.port is a dict": lambda: ([], _cell(_base("version"), "port", {"a": 1}), True),
    "version.port is a huge int": lambda: ([], _cell(_base("version"), "port", 2 ** 64), True),
    "version.port is a boolean": lambda: ([], _cell(_base("version"), "port", True), True),
    "setting.value is a bad blob": lambda: ([], _cell(_base("setting"), "value",
                                                      {"$b64": "!!"}), True),
    "environment.project_id is an int": lambda: ([], _cell(_base("environment"), "project_id",
                                                           5), True),
    "environment.version_id is empty": lambda: ([], _cell(_base("environment"), "version_id",
                                                          ""), True),
    "environment.database_id is a dict": lambda: ([], _cell(_base("environment"), "database_id",
                                                            {"id": "x"}), True),
    "skill_tag.repository_id is a list": lambda: ([], _cell(_base("skill_tag"), "repository_id",
                                                            ["x"]), True),
    "knowledge_index.repository_id is a blob": lambda: (
        [], _cell(_base("knowledge_index"), "repository_id", {"$b64": "AAAA"}), True),
    "project.environment_ids has an int id": lambda: (
        [], _cell(_base("project"), "environment_ids", {"ids": [1], "fmt": "json"}), True),
    "repository.skill_tag_ids has a bad format": lambda: (
        [], _cell(_base("repository"), "skill_tag_ids", {"ids": [], "fmt": "xml"}), True),
    "negative clock": lambda: ([], _with(_base("version"), c={"name": -1}), True),
    "boolean clock": lambda: ([], _with(_base("setting"), c={"name": True, "value": True}), True),
    "text clock": lambda: ([], _with(_base("setting"), c={"name": "1", "value": "1"}), True),
    "float clock": lambda: ([], _with(_base("setting"), c={"name": 1.5, "value": 1.5}), True),
    "huge clock": lambda: ([], _with(_base("setting"), c={"name": 2 ** 64, "value": 2 ** 64}),
                           True),
    "clock days ahead": lambda: ([], _with(_base("switch_log", tomb=True),
                                           c={"~": NOW_HLC + 72 * HOUR_HLC}), True),
    "no id": lambda: ([], _without(_base("version"), "id"), True),
    "no clocks": lambda: ([], _without(_base("version"), "c"), True),
    "no payload": lambda: ([], _without(_base("version"), "p"), True),
    "no table": lambda: ([], _without(_base("version"), "t"), True),
    "no dev": lambda: ([], _without(_base("version"), "dev"), True),
    "table is a list": lambda: ([], _with(_base("version"), t=["version"]), True),
    "table is a dict": lambda: ([], _with(_base("version"), t={"version": 1}), True),
    "id is an int": lambda: ([], _with(_base("version"), id=7), True),
    "clocks are a list": lambda: ([], _with(_base("version"), c=[1, 2]), True),
    "payload is a list": lambda: ([], _with(_base("version"), p=[]), True),
    "values are a list": lambda: ([], _with(_base("version"), p={"v": [], "l": {}, "k": {}}),
                                  True),
    "record is a list": lambda: ([], [_base("version")], True),
    "record is null": lambda: ([], None, True),
    "key value is a huge int": lambda: ([], _with_part(_base("version"), "k", "name", 2 ** 70),
                                        True),
    "key value is a list": lambda: ([], _with_part(_base("version"), "k", "name", ["a"]), True),
    "local value is a huge int": lambda: ([], _with_part(_base("version"), "l", "path", 2 ** 70),
                                          True),
    "local value is a dict": lambda: ([], _with_part(_base("version"), "l", "path", {"a": 1}),
                                      True),
    "clock without a value": lambda: ([], _without_value(_base("version"), "port"), True),
    "lone surrogate as the id": lambda: ([], _with(_base("version"), id="\ud800"), True),
    # Not necessarily refused (a device may apply or hold them), but nothing may escape:
    "lone surrogate in a value": lambda: ([], _cell(_base("version"), "branch", "a\ud800b"),
                                          False),
    "lone surrogate in the natural key": lambda: (
        [], _with_part(_cell(_base("version"), "name", "v\udfff"), "k", "name", "v\udfff"), False),
    "lone surrogate in dev": lambda: ([], _with(_base("version"), dev="\ud800"), False),
    "lone surrogate in the table name": lambda: ([], _with(_base("version"), t="v\udc00"), False),
    "lone surrogate in a column name": lambda: ([], _cell(_base("version"), "col\ud800", "x"),
                                                False),
    "lone surrogate in a local value": lambda: (
        [], _with_part(_base("version"), "l", "path", "/opt/\ud800"), False),
    "repository with only origin_url and knowledge_index_ids": lambda: (
        [], _repository_stub(), False),
    "NOT NULL column set to null": lambda: (_not_null_broken()[:1], _not_null_broken()[1], False),
    "unknown table name": lambda: ([], _with(_base("version"), t="bogus"), False),
    "very long value": lambda: ([], _cell(_base("version"), "branch", "x" * 300_000), False),
}


@pytest.mark.parametrize("case", sorted(LISTED_CASES))
def test_device_listed_bad_record_is_refused_alone(case):
    """Each case from the issue, alone among good records: refused with a reason (or at
    least harmless), the good records apply, the cursor moves, later records arrive."""
    corp = corpus()
    extra, record, must_refuse = LISTED_CASES[case]()
    page = wire(corp.good + extra + [record])
    with fresh_devices("a", "b") as (a, b):
        results = []
        for dev in (a, b):
            result = dev.store.apply_page(wire(page), 41)
            dev.store.resolve_pending()
            results.append(result)
            assert dev.store.cursor == 41
            assert_reasons(result.refused)
            refused = sum(result.refused.values())
            if must_refuse:
                assert refused == 1, f"refused {dict(result.refused)}"
            else:
                assert refused <= 1, f"refused {dict(result.refused)}"
            assert_arrived(dev, corp.good_keys)
        assert results[0].refused == results[1].refused
        later = a.store.apply_page(wire(corp.later), 42)
        a.store.resolve_pending()
        assert later.refused == Counter() and a.store.cursor == 42
        assert_arrived(a, corp.later_keys)


def _older_schema() -> str:
    """cc's schema without the knowledge_index table and without version.pyenv_virtualenv."""
    lines = [line for line in SCHEMA.splitlines()
             if "TABLE knowledge_index" not in line and " ON knowledge_index " not in line]
    text = "\n".join(lines)
    assert "pyenv_virtualenv TEXT, " in text
    return text.replace("pyenv_virtualenv TEXT, ", "")


def test_device_keeps_aside_tables_and_columns_it_does_not_have():
    """A table or column this device lacks is kept aside, not refused; the rest applies."""
    corp = corpus()
    version = _good("version")
    with_new_column = _cell(version, "color", "red", clock=version["c"]["name"])
    only_new_column = {**copy.deepcopy(version), "c": {"color": NOW_HLC - 10},
                       "p": {"v": {"color": "blue"}, "l": {}, "k": version["p"]["k"]}}
    only_missing_column = {**copy.deepcopy(version), "c": {"pyenv_virtualenv": NOW_HLC - 10},
                           "p": {"v": {"pyenv_virtualenv": "venv-new"}, "l": {},
                                 "k": version["p"]["k"]}}
    page = [with_new_column if r is version else r for r in corp.good]
    page += [only_new_column, only_missing_column]
    with fresh_devices("old", schema=_older_schema()) as (old,):
        result = old.store.apply_page(wire(page), 9)
        old.store.resolve_pending()
        assert result.refused == Counter(), dict(result.refused)
        assert old.store.cursor == 9
        for table, sid in corp.good_keys:
            if table != "knowledge_index":
                assert old.sql(f'SELECT 1 FROM "{table}" WHERE sync_id = ?', sid) == [(1,)], \
                    f"{table} {sid} did not arrive"
        row = old.sql("SELECT name, port, branch FROM version WHERE sync_id = ?", version["id"])
        assert row == [("good-17.0", "8069", "17.0")]
        tag = old.sql("SELECT r.sync_id, t.commit_sha, t.tag, t.weight FROM skill_tag t "
                      "JOIN repository r ON r.id = t.repository_id")
        assert tag == [(_good("repository")["id"], "abc123", "python", 3)]


##### Server side #############################################################

def _check_results(answer: dict, batch: list) -> list[dict]:
    results = answer["results"]
    assert isinstance(results, list) and len(results) == len(batch), "one result per record"
    for result in results:
        assert isinstance(result, dict) and result.get("status") in STATUSES, result
        if result["status"] == "refused":
            reason = result.get("reason")
            assert isinstance(reason, str) and reason.strip(), f"refused without reason: {result}"
    return results


@settings(max_examples=SERVER_EXAMPLES, **FUZZ_SETTINGS)
@given(fuzz=st.lists(fuzz_entries(server_bad), max_size=12), data=st.data())
def test_server_push_validates_every_record(fuzz, data):
    """push never raises; one result per record; bad ones refused with a reason; the good
    records of the batch are accepted; what was stored pulls back as JSON."""
    corp = corpus()
    entries = [(r, "good") for r in corp.good] + list(fuzz)
    order = data.draw(st.permutations(range(len(entries))), label="batch order")
    entries = [entries[i] for i in order]
    batch = wire([r for r, _ in entries])
    cursor = data.draw(st.sampled_from([None, 0]), label="cursor")
    with fresh_server() as server:
        answer = server.push(batch, device="fuzzer", cursor=cursor)
        results = _check_results(answer, batch)
        for (record, kind), result in zip(entries, results):
            if kind == "good":
                assert result["status"] == "accepted", (result, record)
            elif kind is not None:
                assert result["status"] == "refused", (kind, result)
        stored = pull_all(server.pull)
        json.dumps(stored)
        assert set(corp.good_keys) <= {(r["t"], r["id"]) for r in stored}


def _v(**top):
    """The first captured version record, with top-level fields replaced."""
    return lambda: _with(_base("version"), **top)


# name -> (build the record, must the server refuse it?)
SERVER_CASES = {
    "null": (lambda: None, True),
    "int": (lambda: 7, True),
    "string": (lambda: "record", True),
    "list": (lambda: [_base("version")], True),
    "empty object": (lambda: {}, True),
    **{f"no {key}": (functools.partial(lambda k: _without(_base("version"), k), key), True)
       for key in ("t", "id", "dev", "c", "p")},
    "table is a list": (_v(t=["version"]), True),
    "table is a dict": (_v(t={"version": 1}), True),
    "unknown table": (_v(t="workspace"), True),
    "id is an int": (_v(id=12), True),
    "id too long": (_v(id="x" * 65), True),
    "id with a space": (_v(id="a b"), True),
    "id is a lone surrogate": (_v(id="\ud800"), True),
    "dev is an int": (_v(dev=3), True),
    "dev is empty": (_v(dev=""), True),
    "dev too long": (_v(dev="d" * 65), True),
    "clocks are a list": (_v(c=[1]), True),
    "clocks are empty": (_v(c={}), True),
    "negative clock": (_v(c={"name": -1}), True),
    "boolean clock": (_v(c={"name": True}), True),
    "float clock": (_v(c={"name": 1.0}), True),
    "text clock": (_v(c={"name": "1"}), True),
    "null clock": (_v(c={"name": None}), True),
    "huge clock": (_v(c={"name": 2 ** 64}), True),
    "clock days ahead": (_v(c={"name": NOW_HLC + 72 * HOUR_HLC}), True),
    "empty clock column": (_v(c={"": 1, "name": 1}), True),
    "clock column of 129 chars": (_v(c={"c" * 129: 1, "name": 1}), True),
    "payload is a list": (_v(p=[]), True),
    "payload is a string": (_v(p="p"), True),
    "payload values are a list": (_v(p={"v": [], "l": {}, "k": {}}), True),
    "payload local part is a string": (_v(p={"v": {}, "l": "x", "k": {}}), True),
    "payload key part is null": (_v(p={"v": {}, "l": {}, "k": None}), True),
    # Must not raise, whatever the verdict:
    "dev is a lone surrogate": (_v(dev="\ud800"), False),
    "value with a lone surrogate": (lambda: _cell(_base("version"), "branch", "a\udfffb"), False),
    "value is a huge int": (lambda: _cell(_base("version"), "port", 2 ** 100), False),
    "value is deeply nested": (lambda: _cell(_base("version"), "port", functools.reduce(
        lambda inner, _: [inner], range(40), 1)), False),
    "very long value": (lambda: _cell(_base("version"), "branch", "x" * 500_000), False),
    "extra top-level keys": (_v(extra={"a": [1, 2]}, z=None), False),
}


@pytest.mark.parametrize("case", list(SERVER_CASES))
def test_server_push_listed_bad_record(case):
    """Each case alone among good records: push answers one result per record, refuses the
    bad one with a reason, accepts the good ones, and never raises."""
    corp = corpus()
    build, must_refuse = SERVER_CASES[case]
    batch = wire(corp.good[:3] + [build()] + corp.good[3:])
    with fresh_server() as server:
        results = _check_results(server.push(batch, device="fuzzer"), batch)
        statuses = [r["status"] for r in results]
        assert statuses[:3] + statuses[4:] == ["accepted"] * len(corp.good), statuses
        if must_refuse:
            assert statuses[3] == "refused", results[3]
        json.dumps(pull_all(server.pull))


def _version(sid: str, **values) -> dict:
    values.setdefault("name", sid)
    local = {"path": values.pop("path")} if "path" in values else {}
    return {"t": "version", "id": sid, "dev": "sizes",
            "c": {col: NOW_HLC - 60_000_000 for col in values},
            "p": {"v": values, "l": local, "k": {"name": values["name"]}}}


def _environment(sid: str, width: int, columns: int) -> dict:
    cols = ["github_url", "branch_name", "module_ids", "sh_url", "notes", "ticket_ids",
            "ssh_host", "ssh_user", "status"][:columns]
    values = {col: "e" * width for col in cols}
    values["name"] = sid
    return {"t": "environment", "id": sid, "dev": "sizes",
            "c": {col: NOW_HLC - 60_000_000 for col in values},
            "p": {"v": values, "l": {}, "k": {"name": sid}}}


def _assert_size_refusal(result: dict, what: str) -> None:
    assert result["status"] == "refused", f"{what}: {result}"
    assert SIZE_REASON.search(result.get("reason") or ""), f"{what}: unclear reason {result}"


def test_push_refuses_oversized_values_and_records_small_limits(tmp_path):
    """With max_value=1000 and max_record=5000: any one value over 1000 bytes, or a payload
    over 5000 in all, is refused with a reason naming the size; the rest is accepted."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"), max_value=1000,
                                     max_record=5000)
    try:
        blob = base64.b64encode(bytes(range(256)) * 4 + b"x" * 1).decode()   # 1025 bytes
        cases = [
            ("small", _version("ok-small", branch="17.0"), "accepted"),
            ("value just under", _version("ok-900", branch="b" * 900), "accepted"),
            ("record under", _environment("ok-env", 900, 4), "accepted"),
            ("value over in v", _version("big-v", branch="b" * 1001), "refused"),
            ("non-ASCII value over in bytes", _version("big-utf8", branch="é" * 501), "refused"),
            ("value over in l", _version("big-l", branch="x", path="/" + "p" * 1000), "refused"),
            ("value over in k", _version("k" * 10, name="n" * 1001), "refused"),
            ("blob over", _version("big-blob", branch={"$b64": blob}), "refused"),
            ("record over", _environment("big-env", 900, 7), "refused"),
        ]
        batch = wire([rec for _, rec, _ in cases])
        results = _check_results(server.push(batch, device="sizes"), batch)
        for (what, _rec, want), result in zip(cases, results):
            if want == "accepted":
                assert result["status"] == "accepted", f"{what}: {result}"
            else:
                _assert_size_refusal(result, what)
    finally:
        server.conn.close()


def test_push_refuses_a_value_over_4_mib_by_default(tmp_path):
    """The default bound: a single value of 4 MiB + 1 byte is refused, one just under is not."""
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    try:
        batch = [_version("big-default", branch="x" * (4 * MiB + 1)),
                 _version("under-default", branch="x" * (4 * MiB - 4096))]
        results = _check_results(server.push(batch, device="sizes"), batch)
        _assert_size_refusal(results[0], "4 MiB + 1 byte")
        assert results[1]["status"] == "accepted", results[1]
    finally:
        server.conn.close()


def _value_bytes(records: list[dict]) -> int:
    """The text bytes of a page's payload values: a floor under any way to count its bytes."""
    total = 0
    for rec in records:
        for part in rec["p"].values():
            for value in part.values():
                if isinstance(value, str):
                    total += len(value.encode("utf-8"))
    return total


def _generous_bytes(records: list[dict]) -> int:
    """A ceiling over any way to count a page's bytes (whole records, JSON, envelope)."""
    return 512 + sum(len(json.dumps(r)) + 64 for r in records)


@settings(max_examples=PULL_EXAMPLES, **FUZZ_SETTINGS)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=20),
       max_bytes=st.integers(1, 8000), limit=st.integers(1, 25))
def test_pull_pages_are_bounded_in_bytes(sizes, max_bytes, limit):
    """pull(cursor, limit, max_bytes=N): at least one record, never over N bytes (past the
    first record), not stopped needlessly early; a loop delivers every record exactly once."""
    with fresh_server() as server:
        batch = [_version(f"pb-{i}", branch="b" * size) for i, size in enumerate(sizes)]
        results = _check_results(server.push(batch, device="pager"), batch)
        assert {r["status"] for r in results} == {"accepted"}
        everything = pull_all(server.pull)
        order = [(r["t"], r["id"]) for r in everything]
        assert sorted(order) == sorted((r["t"], r["id"]) for r in batch)

        seen: list[tuple[str, str]] = []
        cursor = 0
        for _ in range(len(batch) + 2):
            page = server.pull(cursor, limit, max_bytes=max_bytes)
            records = page["records"]
            remaining = len(order) - len(seen)
            if remaining:
                assert records, "a page with records left must hold at least one"
            assert len(records) <= limit
            if len(records) > 1:
                assert _value_bytes(records) <= max_bytes, \
                    f"{len(records)} records, {_value_bytes(records)} bytes > {max_bytes}"
            if page["more"]:
                assert len(seen) + len(records) < len(everything), "more, but nothing left"
            if page["more"] and 0 < len(records) < limit:
                following = everything[len(seen) + len(records)]
                assert _generous_bytes(records + [following]) > max_bytes, \
                    "page stopped early with room for the next record"
            if records:
                assert page["cursor"] > cursor
            seen += [(r["t"], r["id"]) for r in records]
            cursor = page["cursor"]
            if not page["more"]:
                break
        assert seen == order, "every record exactly once, in order"
        assert server.pull(cursor, limit, max_bytes=max_bytes)["records"] == []


##### dispatch and HTTP ########################################################

@pytest.fixture(scope="module")
def sync_server(tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz-http") / "server.db"
    lines: list[str] = []
    srv = ccsync.SyncServer(("127.0.0.1", 0), str(data), log=lines.append).start()
    srv.lines = lines
    store = ccsync.ServerStore.open(str(data))
    try:
        srv.api_key = store.register("fuzzer")
    finally:
        store.conn.close()
    yield srv
    srv.stop()


def _signed(api_key: str, path: str, payload) -> tuple[dict, bytes, str]:
    """A request built the way Client._request builds one, and its nonce."""
    nonce = secrets.token_hex(16)
    headers, body = signed(api_key, path, payload, nonce=nonce)
    return headers, body, nonce


JUNK_CURSOR = st.one_of(st.none(), st.integers(-5, 10 ** 6), EDGE_INTS, st.booleans(), FLOATS,
                        TEXT, st.lists(SCALARS, max_size=2))


@st.composite
def device_requests(draw):
    path = draw(st.sampled_from(["/v1/push", "/v1/push", "/v1/pull", "/v1/hello"]))
    if path == "/v1/push":
        records = draw(st.one_of(
            st.lists(fuzz_entries(server_bad).map(lambda e: e[0]), max_size=8), JSON))
        payload = {"records": records, "cursor": draw(JUNK_CURSOR)}
    elif path == "/v1/pull":
        payload = {"cursor": draw(JUNK_CURSOR), "limit": draw(JUNK_CURSOR),
                   "since": draw(st.one_of(st.none(), TEXT, st.just("2024-01-01T00:00:00Z"),
                                           NON_STRING))}
    else:
        payload = draw(st.dictionaries(KEY_TEXT, JSON, max_size=3))
    if draw(st.booleans()):
        payload = {k: v for k, v in payload.items() if draw(st.booleans())}
    return path, payload


@settings(max_examples=DISPATCH_EXAMPLES, **FUZZ_SETTINGS)
@given(req=device_requests())
def test_dispatch_never_answers_500(sync_server, req):
    """Whatever a (correctly signed) device sends, dispatch answers without a 500; a push
    of a list gets one result per record."""
    path, payload = req
    headers, body, nonce = _signed(sync_server.api_key, path, payload)
    status, _headers, answer = ccsync.dispatch(sync_server, "POST", path, headers, body)
    assert status != 500, f"500 from {path}; server log: {sync_server.lines[-3:]}"
    assert b"Traceback" not in answer
    if status == 200 and path == "/v1/push":
        keys = ccsync.DeviceKeys.from_api_key(sync_server.api_key)
        reply = ccsync.unseal(keys.enc, answer, ccsync.response_context(nonce, 200), 1 << 30)
        _check_results(reply, payload["records"])
    if path == "/v1/push" and isinstance(payload.get("records"), list) \
            and len(payload["records"]) <= 5000 and payload.get("cursor", None) is None:
        assert status == 200, f"push of a list answered {status}"


def test_http_push_and_pull_of_junk_never_fail(sync_server):
    """Over real HTTP with a real Client: junk records get per-record answers (never a
    500), a 4 MiB + 1 byte value is refused at push, odd pull arguments are answered."""
    corp = corpus()
    logged = len(sync_server.lines)
    client = ccsync.Client(sync_server.url, sync_server.api_key, timeout=30)
    good = _good("setting")
    junk = [
        None, 7, "record", [good], {}, {"t": ["version"]}, {"t": {"a": 1}, "id": "x"},
        _with(good, dev="\ud800"), _with(good, dev="d" * 10_000), _with(good, id="\udfff"),
        _with(good, c={"name": 2 ** 100, "value": 1}), _with(good, c={"value": True}),
        _with(good, c={"\ud800": 1}), _with(good, p=[[[[[[[[[[[]]]]]]]]]]]),
        _with(good, p={"v": {"name": "\ud800", "value": 10 ** 40}, "l": {}, "k": {}}),
        _with(good, t="version", id="x" * 64, p={"v": {"name": "L" * 200_000}, "l": {}, "k": {}},
              c={"name": NOW_HLC - 1}),
        _version("http-big", branch="x" * (4 * MiB + 1)),
    ]
    batch = wire(corp.good + junk)
    answer = client.push(batch, None)
    results = _check_results(answer, batch)
    assert [r["status"] for r in results[:len(corp.good)]] == ["accepted"] * len(corp.good)
    _assert_size_refusal(results[-1], "4 MiB + 1 byte over HTTP")
    for since in (None, "9999-12-31T23:59:59Z"):
        page = client.pull(0, 5000, since)
        assert isinstance(page["records"], list)
    for since in ("\ud800", "not a time", "L" * 100_000):       # a clean 400, never a 500
        with pytest.raises(ccsync.RemoteError, match="answered 400: since is not an ISO"):
            client.pull(0, 5000, since)
    pulled = {(r["t"], r["id"]) for r in pull_all(lambda cursor: client.pull(cursor, 5000))}
    assert set(corp.good_keys) <= pulled
    errors = [line for line in sync_server.lines[logged:] if "error" in line or " 500 " in line]
    assert not errors, errors[:5]
