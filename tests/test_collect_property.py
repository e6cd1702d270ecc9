"""Property: random multi-device programs *with collection* keep every row the model keeps.

Each example builds a server store with a fake clock and three devices ('a',
'b', 'c'), each under its own registered key (a keyed LocalTransport, so
authorship is checked and devices report how far they have merged, as over
HTTP).  A shared base (two projects with an environment and a time entry,
a setting) is synced everywhere; then a random program runs, drawn from

* cc's own write forms (model_sim.cc_op: ORM create and write, setting
  upserts, ``cc switch``, punch-outs, manual spans, plain and ORM updates,
  cascading deletes) on projects, environments, settings and switch_log,
  and the code index's (a repository, the indexer's skill_tag upserts,
  re-indexing, deletes of its rows);
* sync / push / pull on a device (skipped while that device is offline);
* ``server.collect()``;
* a jump of the server's (and every device's) clock by 31 days, past the
  server's forget_after, so a device that has not synced since is
  forgotten and must rejoin when it comes back;
* a device going offline for a number of steps;
* a device's database copied to a new path (``VACUUM INTO``) and the device
  going on with the copy, under the same key (a copy rejoins).

At the end every device comes online and syncs until a round moves nothing
(bounded; the server collects after each round), and a newcomer (a fourth
key) pulls the server's state.  Then:

1. every device, the newcomer included, holds the same synced content, with
   nothing pending, waiting for a parent, refused, held or dangling;
2. existence, judged by model_sim's causal model (vector clocks per device,
   events per logical row): a row whose causally latest events are all
   deletes is gone everywhere (unless a live row needs it as its required
   parent), a row whose latest events include no delete (never deleted, or
   created again after its delete) is everywhere, and no row exists that no
   device ever wrote;
3. the server's usage table equals the change table counted afresh;
4. after a month and three more rounds (report, ask, answer, collect), the
   server keeps no deleted row of a referenced table that no device holds
   or names.

Cells are not judged (a row a rejoining device sends again as new carries its
own values: that is the documented rule, not the model's latest-edit one).

CCSYNC_COLLECT_EXAMPLES sets the number of examples (default 25; the CI
profile in conftest makes them the same every run).  ``FOUND`` holds the
programs this test found failing, minimized: each runs as an explicit example.
Replay one outside pytest with ``run_program(steps)``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ccsync
import model_sim
from conftest import TMP_ROOT, Device, content, keyed
from model_sim import Model, cc_op, diff_events, logical_view, maximal, needed
from test_property import DAY_MS, JD_EPOCH, fresh_cc_db

EXAMPLES = int(os.environ.get("CCSYNC_COLLECT_EXAMPLES", "25"))
NAMES = ("a", "b", "c")
JUMP_MS = 31 * DAY_MS                    # past the server's forget_after (30 days)
STEP_MS = 1000                           # every step moves the clocks on a second
# Pull pages of a few records: catching up (a newcomer, a rejoin) spans many
# pages, below and past what collection has marked.
PAGE = 3
SETTLE_ROUNDS = 8

PROJECTS = ["acme", "globex", "initech"]
SETTINGS = ["theme", "theme.accent", "default_version"]     # synced settings only
VALUES = ["x", "y", "z", None]
UPDATES = [("project", "main_branch"), ("project", "home_repo"), ("project", "is_virtual"),
           ("environment", "notes"), ("environment", "branch_name"), ("setting", "value"),
           ("switch_log", "note"), ("switch_log", "flagged")]
DELETABLE = ["project", "project", "environment", "environment", "setting", "switch_log",
             "repository", "skill_tag", "knowledge_index", "knowledge_index"]

# A shared base every device has merged before the program starts.
BASE = [("project", 0, "acme", "master"), ("project", 0, "globex", None),
        ("environment", 0, 0, "main", None, "x"), ("environment", 0, 1, "staging", None, None),
        ("switch", 0, 0, 0), ("setting", 0, "theme", "light"),
        ("repository", 0, 0), ("reindex", 0, 0, [0, 1, 2]),
        ("skill_tags", 0, 0, [(0, 0, 1, None), (1, 1, 2, "a.py")]),
        ("sync", 0, "sync"), ("sync", 1, "sync"), ("sync", 2, "sync")]


##### The network: a server with a fake clock, keyed devices ##################

class Net:
    """A server store and three keyed devices on one fake clock (ms)."""

    def __init__(self, root: Path):
        self.root = root
        self.now_ms = 1_800_000_000_000
        self.server = ccsync.ServerStore.open(str(root / "server.db"),
                                              clock=lambda: self.now_ms / 1000)
        self.server.conn.execute("PRAGMA synchronous = OFF")
        self.keys: dict[str, str] = {}
        self.devices = [self._device(root / f"{name}.db", name, fresh=True) for name in NAMES]
        self.offline_until = [0] * len(NAMES)
        self.copies = 0

    def _device(self, path: Path, name: str, fresh: bool = False) -> Device:
        if fresh:
            fresh_cc_db(path)
            self.keys[name] = self.server.register(name)
        dev = Device(path, self.server, name)
        dev.transport, _ = keyed(self.server, name, self.keys[name])
        for conn in (dev.cc, dev.store.conn):
            conn.execute("PRAGMA synchronous = OFF")
        dev.cc.create_function("julianday", 1, self._julianday)
        dev.store.clock = lambda: self.now_ms / 1000
        dev.store.prepare()
        return dev

    def _julianday(self, arg):
        assert arg == "now", arg          # ccsync's triggers only ask for 'now'
        return JD_EPOCH + (self.now_ms + 0.5) / DAY_MS

    def copy(self, i: int) -> None:
        """Device i goes on with a copy of its database at a new path (same key)."""
        old = self.devices[i]
        self.copies += 1
        path = self.root / f"{old.name}-copy{self.copies}.db"
        old.cc.execute("VACUUM INTO ?", (str(path),))
        old.store.conn.close()
        old.cc.close()
        self.devices[i] = self._device(path, old.name)

    def newcomer(self) -> Device:
        """A device under a fourth key, joining at the end."""
        return self._device(self.root / "n.db", "n", fresh=True)

    def close(self) -> None:
        for dev in self.devices:
            dev.store.conn.close()
            dev.cc.close()
        self.server.conn.close()


def activity(result: ccsync.SyncResult) -> int:
    """How much a sync moved (0: the device was already in step)."""
    return (result.sent + result.pulled.applied + result.rejoined + result.reseeded
            + len(result.refused) + len(result.pulled.refused))


##### Running a program #######################################################

def run_step(net: Net, model: Model, i: int, step: tuple) -> None:
    """Step ``i`` of a program; every step moves the clocks on by STEP_MS."""
    kind = step[0]
    net.now_ms += STEP_MS
    if kind == "sync":
        _, d, mode = step
        if i >= net.offline_until[d]:
            sync(net, model, d, mode)
    elif kind == "collect":
        net.server.collect()
    elif kind == "jump":
        net.now_ms += JUMP_MS
    elif kind == "offline":
        net.offline_until[step[1]] = i + step[2]
    elif kind == "copy":
        net.copy(step[1])
    else:
        cc_write(net, model, i, step)


def sync(net: Net, model: Model, d: int, mode: str) -> ccsync.SyncResult:
    """Sync, push or pull device d; the model's clocks follow what went where."""
    dev = net.devices[d]
    result = dev.sync(push=mode != "pull", pull=mode != "push", page_size=PAGE)
    if mode in ("sync", "push"):
        model.push(dev.name)
    if mode in ("sync", "pull"):
        model.pull(dev.name)
    return result


def cc_write(net: Net, model: Model, i: int, step: tuple) -> None:
    """One of cc's writes on its own connection, recorded as model events."""
    dev = net.devices[step[1]]
    before = logical_view(dev.cc)
    cc_op(net, model, step)
    diff_events(model, before, logical_view(dev.cc), dev.name, i)


def settle(net: Net, model: Model) -> list[str]:
    """Sync every device, the server collecting after each round, until a
    round moves nothing; a complaint if that never happens."""
    for _ in range(SETTLE_ROUNDS):
        moved = [activity(sync(net, model, d, "sync")) for d in range(len(net.devices))]
        net.server.collect()
        if not any(moved):
            return []
    return [f"still moving after {SETTLE_ROUNDS} rounds of syncs"]


def collect_unheld(net: Net, model: Model) -> list[str]:
    """A month on (device ids that no longer sync, such as the one a copied
    database had, stop holding collection back; rows a device held are asked
    about again), then rounds in which the server asks about the deleted
    rows of referenced tables and collects those no device holds: report,
    ask, answer, collect."""
    net.now_ms += JUMP_MS
    for _ in range(3):
        for d in range(len(net.devices)):
            sync(net, model, d, "sync")
        net.server.collect()
    return settle(net, model)


def run_program(steps: list) -> list[str]:
    """Run BASE + ``steps`` on a fresh network; every complaint of the oracle."""
    model_sim._COLUMNS.clear()          # model_sim caches columns by connection id
    model = Model()
    with tempfile.TemporaryDirectory(dir=TMP_ROOT) as tmp:
        net = Net(Path(tmp))
        try:
            for i, step in enumerate(BASE + steps):
                run_step(net, model, i, step)
            complaints = settle(net, model) + collect_unheld(net, model)
            newcomer = net.newcomer()
            try:
                newcomer.sync(page_size=PAGE)
                complaints += oracle(net, model, newcomer)
            finally:
                newcomer.store.conn.close()
                newcomer.cc.close()
        finally:
            net.close()
    return complaints


##### The oracle ##############################################################

def oracle(net: Net, model: Model, newcomer: Device) -> list[str]:
    """Every complaint about the settled network (empty when all is well)."""
    devices = net.devices + [newcomer]
    out = []
    first = content(devices[0].cc)
    for dev in devices:
        snap = content(dev.cc)
        if snap != first:
            out.append(f"{dev.name} differs from a: {first_difference(first, snap)}")
        out += [f"{dev.name}: {c}" for c in leftovers(dev, snap)]
        out += existence(model, logical_view(dev.cc), dev.name)
    out += usage_complaints(net.server)
    out += unheld_left(net.server, devices)
    return out


def unheld_left(server: ccsync.ServerStore, devices: list) -> list[str]:
    """Collection goes on: the server keeps no deleted row of a referenced
    table that no device has or names (content() writes references as ids)."""
    named = set()
    for dev in devices:
        for rows in content(dev.cc).values():
            named |= set(rows)
            named |= {v for row in rows.values() for v in row.values() if isinstance(v, str)}
    rows = {(t, sid) for t, sid in server.conn.execute(
        f"SELECT tbl, sid FROM change WHERE tbl IN ({','.join('?' * len(ccsync.REFERENCED))})",
        ccsync.REFERENCED)}
    return [f"the server keeps deleted {t} {sid}, which no device holds"
            for (t, sid), versions in sorted(server._versions(rows).items())
            if sid not in named and ccsync.versions_deleted([(v[1], v[2]) for v in versions])]


def first_difference(a: dict, b: dict) -> str:
    """The first row two snapshots disagree on, for the message."""
    for table in sorted(set(a) | set(b)):
        ra, rb = a.get(table, {}), b.get(table, {})
        for sid in sorted(set(ra) | set(rb)):
            if ra.get(sid) != rb.get(sid):
                return f"{table} {sid[:8]}: {ra.get(sid)} vs {rb.get(sid)}"
    return "?"


def leftovers(dev: Device, snap: dict) -> list[str]:
    """What a settled device must not hold: pending, waiting, refused, held, dangling."""
    out = []
    pending = {t: c for t, c in dev.store.pending().items() if any(c.values())}
    if pending:
        out.append(f"pending {pending}")
    if dev.store.pending_references():
        out.append(f"{dev.store.pending_references()} row(s) waiting for a parent")
    if dev.store.refused():
        out.append(f"refused {dev.store.refused()}")
    if any(dev.store.held().values()):
        out.append(f"held {dev.store.held()}")
    for table, rows in snap.items():
        for rec in rows.values():
            if any(isinstance(v, str) and v.startswith("dangling:") for v in rec.values()):
                out.append(f"{table} row {rec} names a missing row")
    return out


def existence(model: Model, view: dict, who: str) -> list[str]:
    """model_sim's check 3: rows the model keeps are here, rows it deletes are not."""
    out = []
    for key, events in model.rows.items():
        if model.is_tainted(key):
            continue
        top = maximal(events)
        present = key in view
        latest = ",".join(f"{e.kind}@{e.dev}#{e.step}" for e in top)
        if all(e.kind == "delete" for e in top):
            if present and not needed(key, view):
                out.append(f"{who}: {model_sim.fmt_key(key)} is back, though its latest "
                           f"events are deletes ({latest})")
        elif not any(e.kind == "delete" for e in top) and not present:
            out.append(f"{who}: {model_sim.fmt_key(key)} is missing, though its latest "
                       f"events are {latest}")
    for key in view:
        if key not in model.rows:
            out.append(f"{who}: {model_sim.fmt_key(key)} exists, but no device wrote it")
    return out


def usage_complaints(server: ccsync.ServerStore) -> list[str]:
    """The usage table must equal the change table counted afresh."""
    usage = {d: (n, b) for d, n, b in server.conn.execute(
        "SELECT device, records, bytes FROM usage WHERE records != 0 OR bytes != 0")}
    counted = {d: (n, b) for d, n, b in server.conn.execute(
        "SELECT coalesce(device, ''), count(*), sum(length(payload) + length(clocks)) "
        "FROM change GROUP BY 1")}
    return [] if usage == counted else [f"usage {usage} != recount {counted}"]


##### Programs ################################################################

def steps():
    """One step of a program (see the module docstring for the kinds)."""
    dev = st.integers(0, len(NAMES) - 1)
    index = st.integers(0, 5)
    value = st.sampled_from(VALUES)
    update = st.sampled_from(UPDATES).flatmap(lambda tc: st.tuples(
        st.just("update"), dev, st.just(tc[0]), st.just(tc[1]), index,
        st.sampled_from([0, 1]) if tc[1] in ("is_virtual", "flagged") else value,
        st.sampled_from(["plain", "orm"])))
    delete = st.tuples(st.just("delete"), dev, st.sampled_from(DELETABLE), index)
    sync_step = st.tuples(st.just("sync"), dev, st.sampled_from(["sync", "sync", "push", "pull"]))
    return st.one_of(
        st.tuples(st.just("project"), dev, st.sampled_from(PROJECTS), value),
        st.tuples(st.just("environment"), dev, index, st.sampled_from(["main", "staging"]),
                  st.none(), value),
        st.tuples(st.just("setting"), dev, st.sampled_from(SETTINGS), value),
        st.tuples(st.just("switch"), dev, index, st.integers(0, 2)),
        st.tuples(st.just("punch"), dev, st.integers(0, 1)),
        st.tuples(st.just("span"), dev, index, st.sampled_from([None, "2024-05-01T11:00:00"]),
                  value),
        # the code index: a repository, the indexer's skill_tag upserts and re-indexing
        st.tuples(st.just("repository"), dev, st.integers(0, len(model_sim.ORIGINS) - 1)),
        st.tuples(st.just("skill_tags"), dev, st.integers(0, 1), st.lists(st.tuples(
            st.integers(0, len(model_sim.SHAS) - 1), st.integers(0, len(model_sim.TAGS) - 1),
            st.integers(1, 3), st.sampled_from(model_sim.TOP_FILES)), min_size=1, max_size=3)),
        st.tuples(st.just("reindex"), dev, st.integers(0, 1), st.lists(
            st.integers(0, len(model_sim.SYMBOLS) - 1), min_size=1, max_size=3, unique=True)),
        update, update, delete, delete, delete,
        sync_step, sync_step, sync_step, sync_step,
        st.tuples(st.just("collect")), st.tuples(st.just("collect")),
        st.tuples(st.just("collect")),
        st.tuples(st.just("jump")),
        st.tuples(st.just("offline"), dev, st.integers(3, 15)),
        st.tuples(st.just("offline"), dev, st.integers(3, 15)),
        st.tuples(st.just("copy"), dev),
    )


# Programs this test found failing, minimized (see the module docstring).
FOUND = [
    # a switches to globex/staging (a new time entry) while b deletes globex
    # (and, as cc does, its environments): staging and globex stay, kept
    # for the entry; the server, reading them as deleted, collects them, and
    # the newcomer's entry waits for staging for ever.
    [("switch", 0, 1, 0), ("delete", 1, "project", 1)],
    # The same with b editing acme/main's time entry while a deletes acme.
    [("delete", 0, "project", 0), ("span", 1, 0, None, "x")],
    # c only pulls (never reports) and edits a time entry after a deleted
    # it; c is forgotten after 31 days, b's reports let the server collect
    # the entry, and c's edit, sent at the end, is all the server has of it
    # (the newcomer's entry lacks flagged and source).
    [("delete", 0, "switch_log", 0), ("sync", 0, "push"),
     ("update", 2, "switch_log", "note", 0, "y", "plain"), ("sync", 2, "pull"), ("jump",),
     ("sync", 1, "sync"), ("sync", 1, "sync"), ("collect",)],
]


def with_found(test):
    """Run every program of FOUND as an explicit example of ``test``."""
    for program in FOUND:
        test = example(program)(test)
    return test


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(steps(), min_size=1, max_size=20))
@with_found
def test_random_programs_with_collection_keep_what_the_model_keeps(program):
    """Checks 1-3 of the module docstring after BASE + ``program``."""
    complaints = run_program(program)
    assert not complaints, "\n".join(complaints[:12])


if __name__ == "__main__":               # pragma: no cover - replay: python this.py
    for found in FOUND:
        print(found, run_program(found) or "ok")
