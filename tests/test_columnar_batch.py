"""An end-to-end batch names each table's columns once (sync protocol 6).

What a user depends on: the records a device seals come out of the batch on
every other device exactly as they went in (same records, same order: the
server points at a record by its place in the batch); batches a server
stored before protocol 6 (a plain list of records) still open after the
upgrade; a batch whose columnar form is broken costs only its own records
(each refused as unreadable, never kept), never the sync.

Examples for the properties: CCSYNC_FUZZ_EXAMPLES (as test_fuzz_records).
"""

from __future__ import annotations

import json
import os

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

import ccsync
from conftest import content, key_author, make_cc_db

EXAMPLES = int(os.environ.get("CCSYNC_FUZZ_EXAMPLES", "200"))
SID = st.text("0123456789abcdef", min_size=32, max_size=32)
NAME = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
               max_size=12)
VALUE = st.one_of(st.none(), st.integers(-2 ** 63, 2 ** 63 - 1), st.text(max_size=40),
                  st.floats(allow_nan=False, allow_infinity=False),
                  st.builds(lambda b: {"$b64": b}, st.text("AQID", max_size=8)))


@st.composite
def wire_record(draw, tables=("switch_log", "project", "version", "setting")):
    """A record as a device makes it: some columns (or a delete), a key, a local part."""
    cols = draw(st.lists(st.one_of(NAME, st.just(ccsync.TOMBSTONE)), min_size=1, max_size=6,
                         unique=True))
    clocks = {c: draw(st.integers(0, ccsync.MAX_HLC - 1)) for c in cols}
    values = {c: draw(VALUE) for c in cols if c != ccsync.TOMBSTONE}
    part = lambda: draw(st.dictionaries(NAME, VALUE, max_size=2))   # noqa: E731
    return {"t": draw(st.sampled_from(tables)), "id": draw(SID), "dev": draw(NAME),
            "c": clocks, "p": {"v": values, "l": part(), "k": part()}}


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(wire_record(), max_size=12))
def test_a_batch_gives_back_its_records_in_their_order(records):
    packed = json.loads(json.dumps(ccsync.pack_records(records)))
    assert ccsync.unpack_records(packed) == records


def test_columns_are_named_once_per_table_not_once_per_record():
    records = [{"t": "switch_log", "id": f"{i:032x}", "dev": "lap.1",
                "c": {"note": 10 + i, "flagged": 10 + i},
                "p": {"v": {"note": f"n{i}", "flagged": 0}, "l": {},
                      "k": {"environment_id": "e" * 32, "switched_at": f"2026-12-0{i % 9 + 1}"}}}
               for i in range(100)]
    text = json.dumps(ccsync.pack_records(records))
    assert text.count('"note"') == 1 and text.count('"switched_at"') == 1
    assert len(text) < 0.7 * len(json.dumps(records))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=5)),
                    lambda inner: st.one_of(st.lists(inner, max_size=4),
                                            st.dictionaries(st.sampled_from(
                                                ["format", "groups", "t", "cols", "key",
                                                 "local", "rows", "x"]), inner, max_size=5)),
                    max_leaves=30))
def test_any_batch_content_opens_to_records_or_a_wire_error(junk):
    for batch in (junk, {"format": ccsync.BATCH_FORMAT, "groups": [junk]},
                  {"format": ccsync.BATCH_FORMAT, "groups": [
                      {"t": "project", "cols": ["name"], "key": [], "local": [],
                       "rows": [junk]}]}):
        try:
            records = ccsync.unpack_records(batch)
        except ccsync.WireError:
            continue
        assert isinstance(records, list)
        for record in records:        # whatever comes out, the one parser judges
            try:
                ccsync.parse_record(record)
            except ccsync.RecordRefused:
                pass


def _device(tmp_path, server, name, vault):
    cc = make_cc_db(tmp_path / f"{name}.db")
    store = ccsync.open_store(str(tmp_path / f"{name}.db"))
    key = server.register(name)
    return cc, store, ccsync.LocalTransport(server, name, author=key_author(key), vault=vault)


def _vault():
    return ccsync.Vault.derive("in-process passphrase", b"0123456789abcdef", n=2 ** 10)


def _sealed_as_protocol_5(vault, records):
    """(metadata, batch, proof) as a protocol 5 device sealed them: the
    metadata one list per record, the batch the plain list of records."""
    import zlib
    from Cryptodome.Cipher import AES
    meta = [[r["t"], vault.row_id(r["t"], r["id"]), r["dev"], r["c"]] for r in records]
    cipher = AES.new(vault._batch_key, AES.MODE_GCM, nonce=b"\x07" * 12)
    cipher.update(ccsync.E2E_AAD)
    sealed, tag = cipher.encrypt_and_digest(zlib.compress(json.dumps(records).encode()))
    blob = b"\x07" * 12 + sealed + tag
    return meta, blob, ccsync.batch_proof(vault.proof, blob)


def test_batches_stored_before_protocol_6_still_open(tmp_path, server):
    vault = _vault()
    lap = _device(tmp_path, server, "lap", vault)
    desk = _device(tmp_path, server, "desk", vault)
    lap[0].execute("INSERT INTO project (name) VALUES ('from-after')")
    ccsync.sync_once(lap[1], lap[2])              # sets the store's parameters
    old = [{"t": "setting", "id": ccsync.natural_id("setting", [name]), "dev": lap[1].device_id,
            "c": {"name": 10 ** 15, "value": 10 ** 15},
            "p": {"v": {"name": name, "value": "dark"}, "l": {}, "k": {"name": name}}}
           for name in ("theme", "font")]
    meta, blob, proof = _sealed_as_protocol_5(vault, old)
    answer = server.push(meta, device="lap", author=lap[2].author, sealed=(blob, proof))
    assert [r["status"] for r in answer["results"]] == ["accepted", "accepted"]
    result = ccsync.sync_once(desk[1], desk[2])
    assert not result.pulled.refused
    assert {n for (n,) in desk[0].execute("SELECT name FROM project")} == {"from-after"}
    assert set(desk[0].execute("SELECT name, value FROM setting")) == {("theme", "dark"),
                                                                       ("font", "dark")}


def test_a_broken_row_costs_its_record_and_a_broken_batch_its_records(tmp_path, server,
                                                                      monkeypatch):
    vault = _vault()
    lap = _device(tmp_path, server, "lap", vault)
    desk = _device(tmp_path, server, "desk", vault)
    real = ccsync.pack_records

    def broken_row(records):                  # its metadata is right, its row is not
        packed = real(records)
        packed["groups"][0]["rows"][0][4] = ["a key", "too long", "for its columns"]
        return packed

    def broken_batch(records):
        return {**real(records), "format": 99}

    for name, breaking in (("row", broken_row), ("batch", broken_batch)):
        with monkeypatch.context() as hostile:
            hostile.setattr(ccsync, "pack_records", breaking)
            lap[0].executemany("INSERT INTO setting (name, value) VALUES (?, ?)",
                               [(f"{name}-{i}", "x") for i in range(3)])
            ccsync.sync_once(lap[1], lap[2])
        lap[0].execute("INSERT INTO project (name) VALUES (?)", (f"after-{name}",))
        ccsync.sync_once(lap[1], lap[2])
        result = ccsync.sync_once(desk[1], desk[2])
        assert sum(result.pulled.refused.values()) == (1 if name == "row" else 3)
        assert desk[1].held()["refused"] == {}                 # never kept for a later try
        assert (f"after-{name}",) in desk[0].execute("SELECT name FROM project").fetchall()
    settings_here = {n for (n,) in desk[0].execute("SELECT name FROM setting")}
    assert settings_here == {"row-1", "row-2"}


def test_the_servers_metadata_names_columns_once_and_matches_the_batch():
    vault = _vault()
    records = [{"t": "setting", "id": f"{i:032x}", "dev": "lap.1", "c": {"value": 5 + i},
                "p": {"v": {"value": str(i)}, "l": {}, "k": {"name": f"s{i}"}}}
               for i in range(50)]
    meta, blob, _proof = vault.seal_records(records)
    assert json.dumps(meta).count('"value"') == 1
    opened = vault.open_batch(blob, 1 << 20)
    assert opened == records
    assert ccsync.unpack_sealed(json.loads(json.dumps(meta))) == [
        ["setting", vault.row_id("setting", r["id"]), "lap.1", r["c"]] for r in records]


def test_metadata_out_of_shape_is_refused_and_a_bad_row_is_one_refusal():
    vault = _vault()
    meta, blob, proof = vault.seal_records(
        [{"t": "project", "id": f"{i:032x}", "dev": "x.y", "c": {"name": 1},
          "p": {"v": {"name": f"p{i}"}}} for i in range(3)])
    assert ccsync.unpack_sealed({**meta, "format": 5}) is None
    assert ccsync.unpack_sealed([["project", "e" * 41, "x.y", {"name": 1}]]) is None
    broken = json.loads(json.dumps(meta))
    broken["groups"][0]["rows"][1] = ["only", "two"]
    rows = ccsync.unpack_sealed(broken)
    assert rows[1] is None and rows[0][0] == "project"
    with pytest.raises(ccsync.RecordRefused):
        ccsync.parse_sealed(rows[1])


def test_a_delete_that_came_without_values_seals_again(tmp_path):
    """parse_record takes a delete whose payload has no "v" (an older
    device's, or one a plaintext server handed on).  A device that keeps it
    aside (its cc lacks the table) hands it back when a new server store is
    re-seeded: sealing it must not fail, or no sync with that store ever
    succeeds."""
    delete = {"t": "knowledge_index", "id": "ab" * 16, "dev": "x.y",
              "c": {ccsync.TOMBSTONE: 10 ** 15}, "p": {}}
    ccsync.parse_record(delete)
    vault = _vault()
    meta, blob, proof = vault.seal_records([delete])
    (opened,) = vault.open_batch(blob, 10 ** 6)
    assert ccsync.TOMBSTONE in ccsync.parse_record(opened).clocks
    server = ccsync.ServerStore.open(str(tmp_path / "server.db"))
    desk = _device(tmp_path, server, "desk", vault)
    lap = _device(tmp_path, server, "lap", vault)
    lap[0].execute("DROP TABLE knowledge_index")        # an older cc: kept aside there
    ccsync.sync_once(desk[1], desk[2])
    meta, blob, proof = _sealed_as_protocol_5(vault, [dict(delete, dev=desk[1].device_id)])
    server.push(meta, device="desk", author=desk[2].author, sealed=(blob, proof))
    ccsync.sync_once(lap[1], lap[2])
    assert lap[1].held()["aside"]
    rebuilt = ccsync.ServerStore.open(str(tmp_path / "rebuilt.db"))     # the server's data lost
    moved = ccsync.LocalTransport(rebuilt, "lap", author=key_author(rebuilt.register("lap")),
                                  vault=vault)
    ccsync.sync_once(lap[1], moved)
    assert ccsync.sync_once(lap[1], moved).pulled.refused == {}
    assert rebuilt.conn.execute("SELECT count(*) FROM change WHERE tbl = 'knowledge_index'"
                                ).fetchone()[0] == 1
