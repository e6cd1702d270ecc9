"""The merge rules as pure functions: no SQLite, no server, just records and clocks.

Every decision about which edit wins goes through ``ccsync.newer``; these tests pin
what devices rely on for convergence: merging the same cells in any order gives the
same state, the server keeps every version that still wins a column, a delete is
undone only by a later edit, and identity depends on the natural key alone.
"""

from __future__ import annotations

import itertools
import json
import uuid

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

import ccsync
from ccsync import TOMBSTONE

COLUMNS = ["name", "port", "branch", TOMBSTONE]
DEVICES = ["dev-a", "dev-b", "dev-c"]

clock = st.tuples(st.integers(0, 6), st.sampled_from(DEVICES)).map(list)
record = st.fixed_dictionaries({}, optional={c: st.tuples(clock, st.sampled_from("xyz"))
                                             for c in COLUMNS})


def merged(records) -> tuple[dict, dict]:
    vals, clocks = {}, {}
    for rec in records:
        ccsync.merge_cells(vals, clocks, {c: v for c, (_k, v) in rec.items()},
                           {c: k for c, (k, _v) in rec.items()})
    return {c: v for c, v in vals.items() if c in clocks}, clocks


@settings(max_examples=300, deadline=None)
@given(st.lists(record, min_size=1, max_size=4))
def test_merge_order_does_not_matter(records):
    # Equal clocks carry equal values (one clock is one edit on one device).
    seen = {}
    for rec in records:
        for col, (k, v) in list(rec.items()):
            rec[col] = (k, seen.setdefault((col, tuple(k)), v))
    reference = merged(records)
    for order in itertools.permutations(records):
        assert merged(order) == reference


@given(st.lists(record, min_size=1, max_size=4))
def test_merging_a_record_twice_changes_nothing(records):
    vals, clocks = merged(records)
    first = records[0]
    again = ccsync.merge_cells(dict(vals), dict(clocks), {c: v for c, (_k, v) in first.items()},
                               {c: k for c, (k, _v) in first.items()})
    assert again == []


def test_the_later_edit_wins_and_ties_go_to_the_larger_device_id():
    assert ccsync.newer([2, "dev-a"], [1, "dev-z"])
    assert ccsync.newer([1, "dev-b"], [1, "dev-a"])
    assert not ccsync.newer([1, "dev-a"], [1, "dev-a"])
    assert ccsync.newer([0, "dev-a"], None) and not ccsync.newer(None, [0, "dev-a"])
    assert ccsync.winning_cells({"port": [3, "dev-a"]},
                                {"port": [2, "dev-b"], "branch": [1, "dev-b"]}) == ["branch"]


def test_a_delete_is_undone_only_by_a_later_edit():
    assert ccsync.is_deleted({TOMBSTONE: [5, "dev-a"], "port": [4, "dev-b"]})
    assert not ccsync.is_deleted({TOMBSTONE: [5, "dev-a"], "port": [6, "dev-b"]})
    assert not ccsync.is_deleted({"port": [6, "dev-b"]})


@given(st.lists(st.tuples(st.sampled_from(DEVICES),
                          st.dictionaries(st.sampled_from(COLUMNS), st.integers(0, 6),
                                          min_size=1)), min_size=1, max_size=6))
def test_the_server_keeps_every_version_that_still_wins_a_column(versions):
    numbered = [(i, dev, cells) for i, (dev, cells) in enumerate(versions)]
    kept = ccsync.surviving_versions(numbered)
    for col in {c for _i, _d, cells in numbered for c in cells}:
        best = max((cells[col], dev) for _i, dev, cells in numbered if col in cells)
        assert any((cells.get(col), dev) == best for i, dev, cells in numbered if i in kept)
    for i, dev, cells in numbered:          # and only those
        if i in kept:
            assert any((hlc, dev) == max((c[col], d) for _j, d, c in numbered if col in c)
                       for col, hlc in cells.items())


def test_identity_comes_from_the_natural_key_alone():
    key = ("name",)
    acme = ccsync.row_identity("project", {"name": "acme"}, key)
    assert acme == ccsync.row_identity("project", {"name": "acme", "other": 1}, key)
    assert acme != ccsync.row_identity("project", {"name": "globex"}, key)      # a rename
    assert acme != ccsync.row_identity("version", {"name": "acme"}, key)
    assert ccsync.row_identity("project", {}, key) is None                     # key unknown
    assert ccsync.row_identity("project", {"name": None}, key) is None         # key empty


key_value = st.one_of(st.none(), st.text(), st.integers(-2 ** 63, 2 ** 63 - 1),
                      st.floats(allow_nan=False, allow_infinity=False))


# The namespace of every natural id users' databases hold (ccsync keeps its 16 bytes).
ID_NAMESPACE = uuid.UUID("6f0c5d1e-8a53-4c43-9a55-2f7c1c0ccc51")


def test_the_namespace_of_natural_ids_stays_the_same():
    assert ccsync.ID_NAMESPACE == ID_NAMESPACE.bytes


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["project", "setting", "knowledge_index"]),
       st.lists(key_value, min_size=1, max_size=3))
def test_ids_already_in_users_databases_stay_the_same(table, values):
    # natural_id spells uuid5 out for speed; every id it ever gave must stay.
    if all(v is None or v == "" for v in values):
        assert ccsync.natural_id(table, values) is None
        return
    text = json.dumps([table, *values], separators=(",", ":"), ensure_ascii=False)
    try:
        expected = str(uuid.uuid5(ID_NAMESPACE, text))
    except UnicodeEncodeError:              # a lone surrogate: neither can encode it
        with pytest.raises(UnicodeEncodeError):
            ccsync.natural_id(table, values)
        return
    assert ccsync.natural_id(table, values) == expected


def test_a_reference_to_a_row_that_is_not_here():
    assert ccsync.missing_parent(required=False, parent_deleted=False) == "wait"
    assert ccsync.missing_parent(required=True, parent_deleted=False) == "wait"
    assert ccsync.missing_parent(required=False, parent_deleted=True) == "empty"
    assert ccsync.missing_parent(required=True, parent_deleted=True) == "revive"
    assert ccsync.stays(deleted=True, needed=True) and not ccsync.stays(True, False)
    assert ccsync.stays(deleted=False, needed=False)
