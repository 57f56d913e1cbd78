"""The job's data ledger: every sample once per epoch, whatever the membership.

    worker --lease / done / back--> store --> Service (coordinator) --> Ledger
    Ledger --grant {items, held, state}--> store --> worker's Reader

The data set is cut into chunks (ranges of samples, or one shard file each);
each epoch is a seeded permutation of the chunk ids, and a chunk's samples
are read in a seeded order of their own (`Plan`: pure functions, the same on
every worker). The coordinator's `Ledger` hands chunks out as leases: the
chunks leavers handed back or crashed workers held come first (oldest first),
then the next chunk of the current epoch. Workers report a chunk done when its
last sample's round is over (`Reader.commit`); a leaver hands back the
unconsumed rest of what it holds; a member the registrar drops (crashed,
frozen, replaced) has its leases returned whole, and the chunk it had begun is
counted as `reissued` (its samples since the last hand-off died with it and
are trained again: at most one chunk per kill).

Fast workers simply lease more chunks, so with dynamic batching every sample
is still drawn once per epoch. The ledger's state is small (an epoch, a
cursor, a pool, the leases) and travels with every grant, so each worker holds
a recent copy: a replacement coordinator starts empty and is seeded from the
members' copies and their own leases (the newest copy wins; leases of members
that never come back return to the pool), and a checkpoint holds the copy, so a
resumed job goes on mid-epoch.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Item = tuple[int, int, int, int]  # (epoch, chunk, begin, end): offsets in the chunk's order
COUNT = "ledger/n"
STATE = "ledger/state"
SEED_WAIT_SECONDS = 10.0  # a replacement coordinator waits this long for the members' copies
# ... then grants, and gives a holder that has not spoken yet this long (it may be stuck
# reconnecting, still training its chunks) before its leases go to others as reissued.
UNHEARD_SECONDS = 60.0


def request_key(i: int) -> str:
    return f"ledger/req/{i}"


def grant_key(member: str, r: int) -> str:
    return f"ledger/grant/{member}/{r}"


@functools.lru_cache(maxsize=8)
def _order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 7]).permutation(n)


@functools.lru_cache(maxsize=4)  # a worker reads from a chunk or two at a time
def _chunk_order(seed: int, epoch: int, chunk: int, n: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch, chunk, 11]).permutation(n)
    order.flags.writeable = False  # shared by every call
    return order


@dataclass(frozen=True)
class Plan:
    """The chunks of a data set: chunk c is samples [starts[c], starts[c+1])."""

    starts: tuple[int, ...]
    seed: int = 0

    @classmethod
    def even(cls, size: int, chunk: int, seed: int = 0) -> Plan:
        if size <= 0 or chunk <= 0:
            raise ValueError(f"a ledger needs samples and a chunk size (got {size}, {chunk})")
        return cls((*range(0, size, chunk), size), seed)

    @classmethod
    def of_sizes(cls, sizes: list[int], seed: int = 0) -> Plan:
        """One chunk per shard file of `sizes[i]` samples (the samples numbered in order)."""
        if not sizes or min(sizes) <= 0:
            raise ValueError("every shard needs at least one sample")
        return cls((0, *np.cumsum(sizes).tolist()), seed)

    @property
    def chunks(self) -> int:
        return len(self.starts) - 1

    @property
    def size(self) -> int:
        return self.starts[-1]

    def length(self, chunk: int) -> int:
        return self.starts[chunk + 1] - self.starts[chunk]

    def chunk_at(self, epoch: int, position: int) -> int:
        """The chunk at `position` of `epoch`'s order."""
        return int(_order(self.seed, epoch, self.chunks)[position])

    def fresh(self, epoch: int, position: int) -> Item:
        c = self.chunk_at(epoch, position)
        return (epoch, c, 0, self.length(c))

    def samples(self, item: Item) -> np.ndarray:
        """The sample indices of `item`, in the order they are trained."""
        epoch, c, begin, end = item
        return _chunk_order(self.seed, epoch, c, self.length(c))[begin:end] + self.starts[c]

    def wire(self) -> dict[str, Any]:
        """What identifies the plan (workers must agree on it), and rebuilds it."""
        first = self.length(0)
        if all(self.length(c) == first for c in range(self.chunks - 1)):
            return {"size": self.size, "chunk": first, "seed": self.seed}
        return {"sizes": [self.length(c) for c in range(self.chunks)], "seed": self.seed}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Plan:
        if "chunk" in wire:
            return cls.even(int(wire["size"]), int(wire["chunk"]), int(wire["seed"]))
        return cls.of_sizes([int(n) for n in wire["sizes"]], int(wire["seed"]))


def auto_chunk(size: int, replicas: int, batch: int) -> int:
    """A chunk of about 1/16 of a worker's share of an epoch, and at least four
    batches: few ledger calls, and at most this many samples repeat per kill."""
    return max(1, min(size, max(4 * batch, -(-size // (16 * max(replicas, 1))))))


@dataclass
class Ledger:
    """The coordinator's book of who holds which chunk (pure: no store, no clock)."""

    plan: Plan
    epoch: int = 0
    cursor: int = 0  # positions of `epoch`'s order handed out so far
    pool: list[Item] = field(default_factory=list)  # handed back or taken from the dropped
    leases: dict[str, list[Item]] = field(default_factory=dict)
    version: int = 0
    reissued: int = 0  # samples of begun chunks returned from dropped members
    handed_back: int = 0  # samples leavers returned unconsumed

    def lease(self, member: str, k: int = 1) -> list[Item]:
        out = []
        for _ in range(k):
            if self.pool:  # the oldest epoch's first
                item = self.pool.pop(min(range(len(self.pool)), key=lambda i: self.pool[i][0]))
            else:
                if self.cursor >= self.plan.chunks:
                    self.epoch, self.cursor = self.epoch + 1, 0
                item = self.plan.fresh(self.epoch, self.cursor)
                self.cursor += 1
            out.append(item)
        self.leases.setdefault(member, []).extend(out)
        self.version += 1
        return out

    def done(self, member: str, item: Item) -> Item | None:
        """The chunk of `item` is trained: its lease (returned) leaves the book."""
        held = self.leases.get(member, [])
        for i, it in enumerate(held):
            if it[:2] == item[:2]:
                del held[i]
                self.version += 1
                return it
        return None

    def hand_back(self, member: str, rest: list[Item]) -> None:
        """A leaver returns what it did not train (`rest`: the remainders of its leases).
        A lease it does not mention (it lost track of it) returns whole."""
        held = self.leases.pop(member, [])
        for item in rest:
            if any(it[:2] == item[:2] for it in held) and item[3] > item[2]:
                self.pool.append(item)
                self.handed_back += item[3] - item[2]
        told = {it[:2] for it in rest}
        self.pool.extend(it for it in held if it[:2] not in told)
        self.version += 1

    def drop(self, member: str) -> int:
        """A member is gone without handing back: its leases return whole; the first (the
        one it was training) counts as reissued. Returns the samples reissued."""
        held = self.leases.pop(member, [])
        if not held:
            return 0
        self.pool.extend(held)
        begun = held[0][3] - held[0][2]
        self.reissued += begun
        self.version += 1
        return begun

    def held(self, member: str) -> list[Item]:
        return list(self.leases.get(member, []))

    def snapshot(self) -> dict[str, Any]:
        return {
            "plan": self.plan.wire(),
            "epoch": self.epoch,
            "cursor": self.cursor,
            "pool": [list(it) for it in self.pool],
            "leases": {m: [list(it) for it in items] for m, items in self.leases.items()},
            "version": self.version,
            "reissued": self.reissued,
            "handed_back": self.handed_back,
        }

    @classmethod
    def restore(cls, plan: Plan, snap: dict[str, Any]) -> Ledger:
        return cls(
            plan,
            int(snap["epoch"]),
            int(snap["cursor"]),
            [_item(it) for it in snap["pool"]],
            {m: [_item(it) for it in items] for m, items in snap["leases"].items()},
            int(snap["version"]),
            int(snap.get("reissued", 0)),
            int(snap.get("handed_back", 0)),
        )

    @classmethod
    def reseeded(
        cls,
        plan: Plan,
        copies: list[dict[str, Any]],
        held: dict[str, list[Item]],
        was: dict[str, str] | None = None,
    ) -> Ledger:
        """A replacement coordinator's ledger from the members' copies of the old one's
        (the newest wins) and what each member says it holds (the truth for it; `was`:
        the id a member had before a restart from its checkpoint). Leases of members
        that did not speak stay theirs: a member late to reach the new coordinator
        trains them meanwhile (the Service drops it if it never speaks, `unheard`)."""
        newest = max(copies, key=lambda s: int(s["version"]), default=None)
        book = cls(plan) if newest is None else cls.restore(plan, newest)
        for old in (was or {}).values():
            book.leases.pop(old, None)  # its own held leases replace them
        for member, items in held.items():
            book.adopt(member, items)
        book.version += 1
        return book

    def adopt(self, member: str, items: list[Item]) -> None:
        """What `member` says it holds is the truth for it: those chunks are its, not
        the pool's or another member's (a copy can be older than what it was granted)."""
        keys = {it[:2] for it in items}
        self.pool = [it for it in self.pool if it[:2] not in keys]
        for other, theirs in self.leases.items():
            if other != member:
                theirs[:] = [it for it in theirs if it[:2] not in keys]
        self.leases[member] = list(items)
        self.version += 1

    def unheard(self, heard: set[str]) -> set[str]:
        """Members holding leases that are not in `heard`."""
        return {m for m, items in self.leases.items() if items and m not in heard}


def _item(raw: Any) -> Item:
    e, c, b, n = (int(v) for v in raw)
    return (e, c, b, n)


def submit(store: Any, request: dict[str, Any]) -> None:
    """Queue a request for the coordinator's ledger (in order, one key each)."""
    i = int(store.add(COUNT, 1))
    store.set(request_key(i), json.dumps(request))


class Service:
    """The ledger's keeper in the coordinator: applies the requests in their order.

    A replacement starts empty: a request carrying a copy newer than its book
    means the old coordinator was lost, and it seeds itself from every member's
    copy (waiting for the registrar's members, at most `seed_wait` seconds)
    before it grants anything."""

    def __init__(
        self,
        store: Any,
        members: Callable[[], list[str]] = list,
        seed_wait: float = SEED_WAIT_SECONDS,
        unheard_wait: float = UNHEARD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] = print,
    ) -> None:
        self.store, self.members = store, members
        self.seed_wait, self.unheard_wait, self.clock = seed_wait, unheard_wait, clock
        self._unheard: dict[str, float] = {}  # holders seeding did not hear -> drop time
        self.log = log
        self.book: Ledger | None = None
        self._next = 1
        self._missing_since: float | None = None
        self._seeding_since: float | None = None
        self._copies: list[dict[str, Any]] = []
        self._held: dict[str, list[Item]] = {}
        self._was: dict[str, str] = {}
        self._deferred: list[dict[str, Any]] = []
        self._published = -1

    def step(self) -> None:
        count = int(self.store.add(COUNT, 0))
        while self._next <= count:
            key = request_key(self._next)
            if not self.store.check([key]):  # queued but not written yet
                now = self.clock()
                self._missing_since = self._missing_since or now
                if now - self._missing_since < 5.0:
                    break
                self._next += 1  # its writer died between the two calls
                self._missing_since = None
                continue
            self._missing_since = None
            request = json.loads(self.store.get(key))
            self.store.delete_key(key)
            self._next += 1
            self.apply(request)
        self._finish_seeding()
        self._drop_unheard()
        if self.book is not None and self.book.version != self._published:
            self.store.set(STATE, json.dumps(self.book.snapshot()))
            self._published = self.book.version

    def _drop_unheard(self) -> None:
        now = self.clock()
        for member in [m for m, t in self._unheard.items() if now >= t]:
            del self._unheard[member]
            if self.book is not None and (n := self.book.drop(member)):
                self.log(
                    f"ledger: {member} never reached this coordinator; its chunk of {n} "
                    "samples goes to another worker"
                )

    def apply(self, req: dict[str, Any]) -> None:
        op, member = req["op"], req["m"]
        if member in self._unheard and self.book is not None and self._seeding_since is None:
            if op in ("lease", "seed") and "held" in req:  # late, alive: its word stands
                self.book.adopt(member, [_item(it) for it in req["held"]])
            if op != "done":
                del self._unheard[member]
        if op in ("lease", "seed") and self._wants_seed(req):
            self._copies.append(req["copy"])
            if op == "seed":
                self._deferred.append({**req, "copy": None})  # its plan, if the first
            self._held[member] = [_item(it) for it in req.get("held", [])]
            if req.get("was") and req["was"] != member:
                self._was[member] = req["was"]
            if op == "lease":
                self._deferred.append(req)
            return
        if self._seeding_since is not None:  # answer after seeding, in order
            self._deferred.append(req)
            return
        if op == "seed":
            return
        if op == "drop":
            if self.book is not None and (n := self.book.drop(member)):
                self.log(f"ledger: {member}'s chunk of {n} samples goes to another worker")
            return
        book = self._book(req)
        if book is None:
            return
        if op == "lease":
            items = book.lease(member, int(req.get("k", 1)))
            grant = {"items": items, "held": book.held(member), "copy": book.snapshot()}
            self.store.set(grant_key(member, int(req["r"])), json.dumps(grant))
        elif op == "done":
            book.done(member, _item(req["item"]))
        elif op == "back":
            book.hand_back(member, [_item(it) for it in req["items"]])

    def _book(self, req: dict[str, Any]) -> Ledger | None:
        plan = req.get("plan")
        if self.book is None:
            if plan is None:
                return None
            self.book = Ledger(Plan.from_wire(plan))
        elif plan is not None and plan != self.book.plan.wire():
            self.log(
                f"ledger: worker {req['m']} has another data set ({plan}, the job's is "
                f"{self.book.plan.wire()}); it gets nothing"
            )
            return None
        return self.book

    def _wants_seed(self, req: dict[str, Any]) -> bool:
        """Whether this request's copy says the job had a ledger this coordinator lacks
        (it replaced a lost one, or the job resumes from checkpoints)."""
        copy = req.get("copy")
        if self._seeding_since is not None:
            return copy is not None
        if self.book is not None or copy is None or int(copy["version"]) == 0:
            return False
        self._seeding_since = self.clock()
        self.log("ledger: seeding the job's ledger from the members' copies")
        return True

    def _finish_seeding(self) -> None:
        if self._seeding_since is None:
            return
        waited = self.clock() - self._seeding_since
        # Who to wait for: every worker that held leases in the newest copy (one that
        # died is waited for `seed_wait`), and the registrar's members. Not longer: a
        # member's word may wait on the others' rounds, which wait on data. Holders
        # not heard by then keep their leases (`unheard`).
        newest = max(self._copies, key=lambda c: int(c["version"]))
        holders = {m for m, items in newest["leases"].items() if items}
        was = set(self._was.values())
        expected = {m for m in holders if m not in was} | set(self.members())
        if not expected <= set(self._held) and waited < self.seed_wait:
            return
        plan_req = next((r for r in self._deferred if r.get("plan")), None)
        if plan_req is None:
            return  # nothing to grant yet; keep the copies until a lease comes
        plan = plan_req["plan"]
        self.book = Ledger.reseeded(Plan.from_wire(plan), self._copies, self._held, self._was)
        unheard = self.book.unheard(set(self._held))
        self._unheard = dict.fromkeys(unheard, self.clock() + self.unheard_wait)
        self.log(
            f"ledger: seeded from {len(self._held)} members at epoch {self.book.epoch}, "
            f"{self.book.cursor} of {self.book.plan.chunks} chunks handed out"
            + (f"; waiting for {', '.join(sorted(unheard))}" if unheard else "")
        )
        self._seeding_since, self._copies, self._held, self._was = None, [], {}, {}
        deferred, self._deferred = self._deferred, []
        for req in deferred:
            req = {**req, "copy": None}
            self.apply(req)

    def run(self, stop: Any, every: float = 0.005) -> None:
        while not stop.wait(every):
            try:
                self.step()
            except Exception as e:  # a store call timed out under load: look again
                if stop.is_set():
                    return
                self.log(f"ledger: {type(e).__name__}: {str(e)[:200]}; trying again")


class Reader:
    """A worker's side: the chunks it holds, and where it is in them.

    `take(n)` hands out the next `n` sample indices (leasing more chunks ahead of
    need); `commit()` after the round that trained them (finished chunks are
    reported done), `rollback()` after a round that failed (they are taken
    again). `hand_back()` when leaving, `forget()` when the ledger dropped this
    worker (its leases went to others)."""

    def __init__(
        self,
        plan: Plan,
        store: Callable[[], Any],
        member: Callable[[], str],
        *,
        timeout: float = 60.0,
        pump: Callable[[], None] | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        self.plan, self._store, self._member = plan, store, member
        self.timeout, self._pump, self.say = timeout, pump, say
        self.held: list[Item] = []  # in order; the first's begin is where this worker is
        self.pending = 0  # samples taken since the last commit
        self.copy: dict[str, Any] | None = None  # the newest copy of the ledger seen
        self._asked: int | None = None  # the outstanding lease request
        self._requests = 0
        self._view: list[Item] | None = None  # the ledger's leases of this worker
        self._done: set[tuple[int, int]] = set()  # chunks reported done since the ask
        self.epoch = 0  # the epoch of the last sample taken
        self._reseed = False  # a new coordinator wants this worker's copy
        self._recheck = False  # ask the ledger what this worker still holds
        self._unsent: list[dict[str, Any]] = []  # requests the coordinator has not had yet
        self._away = False  # told the user the coordinator is away
        self._was: str | None = None  # this worker's id before a restart from a checkpoint
        # What each commit trained, as items (the simulator's ground truth for the checks).
        self.on_commit: Callable[[list[Item]], None] | None = None

    # -- reading ---------------------------------------------------------------------

    def available(self) -> int:
        return sum(it[3] - it[2] for it in self.held) - self.pending

    def take(self, n: int) -> np.ndarray:
        self._seed()
        if self._recheck and not self.pending:
            self._recheck = False
            self._ask(n)
            self._receive(wait=True)  # its view of this worker's leases settles them
        ahead = 2 * n  # two batches in hand: a slow worker hoards no chunk of a later epoch
        while self.available() < n:
            self._ask(n + ahead - self.available())
            self._receive(wait=True)
        if self.available() - n < ahead:  # lease ahead of need: no wait next time
            self._ask(ahead)
            self._receive(wait=False)
        out, skip, need = [], self.pending, n
        for item in self.held:
            size = item[3] - item[2]
            if skip >= size:
                skip -= size
                continue
            part = (item[0], item[1], item[2] + skip, min(item[3], item[2] + skip + need))
            out.append(self.plan.samples(part))
            self.epoch = item[0]
            need -= part[3] - part[2]
            skip = 0
            if need == 0:
                break
        self.pending += n
        return np.concatenate(out)

    def commit(self, n: int | None = None) -> None:
        """The first `n` samples taken since the last commit (all of them by default)
        are trained; the rest (loaded ahead) stay taken."""
        left, parts = self.pending if n is None else min(n, self.pending), []
        self.pending -= left
        while left > 0:
            e, c, b, end = self.held[0]
            if b + left >= end:
                left -= end - b
                self.held.pop(0)
                parts.append((e, c, b, end))
                self._send({"op": "done", "item": [e, c, b, end]})
                self._done.add((e, c))
            else:
                self.held[0] = (e, c, b + left, end)
                parts.append((e, c, b, b + left))
                left = 0
        if self.on_commit is not None:
            self.on_commit(parts)
        self._settle()

    def rollback(self) -> None:
        """The round that trained them failed: the same samples come again (and so do
        any loaded ahead)."""
        self.pending = 0
        self._settle()

    def unread(self, n: int) -> None:
        """The last `n` samples taken were not used (loaded ahead, then dropped): they
        come again."""
        self.pending -= min(n, self.pending)
        self._settle()

    def hand_back(self) -> None:
        """This worker leaves: what it did not train goes back to the ledger (a new
        coordinator hears what it holds first)."""
        self._seed()
        self.pending = 0
        self._send({"op": "back", "items": [list(it) for it in self.held]})
        self._flush(patience=min(self.timeout, 20.0))  # a coordinator being replaced too
        self.held = []

    def forget(self) -> None:
        """The job dropped this worker for a while (it missed generations): before its
        next batch it asks the ledger which of its chunks it still holds (those of a
        drop went to others; a new coordinator may have seeded them back to it)."""
        self._recheck = True

    def reseed(self, *, now: bool = False) -> None:
        """A new coordinator: give it this worker's copy of the ledger and its leases
        (from the training thread, at its next call here, unless `now`)."""
        self._reseed = True
        if now:
            self._seed()

    def announce(self, store: Any) -> None:
        """From the heartbeat thread, on its own store connection, as soon as it meets
        a new coordinator: this worker's copy of the ledger and what it holds. The
        training thread says it again at its next batch; a worker regrouping slowly
        under load would say it too late (after the seeding wait, with a chunk only
        it knew of given out again)."""
        fields = self._seed_fields()
        if fields["copy"] is not None:
            submit(store, {"op": "seed", "plan": self.plan.wire(), **fields, "m": self._member()})

    def _seed(self) -> None:
        if not self._reseed:
            return
        self._reseed = False
        self._asked = None  # the old coordinator's grant will never come
        if self.copy is not None:
            self._send({"op": "seed", "plan": self.plan.wire(), **self._seed_fields()})

    def _seed_fields(self) -> dict[str, Any]:
        return {"copy": self.copy, "held": [list(it) for it in self.held], "was": self._was}

    # -- the ledger's side -------------------------------------------------------------

    def _ask(self, samples: int) -> None:
        if self._asked is not None:
            return
        self._requests += 1
        self._asked = self._requests
        self._done = set()
        k = max(1, -(-samples // self.plan.length(0)))
        self._send(
            {
                "op": "lease",
                "r": self._asked,
                "k": k,
                "plan": self.plan.wire(),
                **self._seed_fields(),
            }
        )

    def _receive(self, *, wait: bool) -> None:
        if self._asked is None:
            return
        key = grant_key(self._member(), self._asked)
        started = time.monotonic()
        deadline, told = started + self.timeout, False
        while not self._granted(key):
            if wait and not told and time.monotonic() - started > 2.0:
                self.say(
                    "waiting for data from the job's ledger: the coordinator may be "
                    "restarting (or seeding a new ledger)"
                )
                told = True
            if self._reseed:  # the coordinator was replaced while we waited: ask again
                self._seed()
                self._ask(self.plan.length(0))
                key = grant_key(self._member(), self._asked or 0)
            if not wait:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the job's data ledger granted no data within {self.timeout:.0f}s"
                )
            if self._pump is not None:
                self._pump()
            else:
                time.sleep(0.002)
        if wait and not told and time.monotonic() - started > 2.0:  # blocked in a call
            self.say(
                f"waited {time.monotonic() - started:.0f}s for data from the job's ledger: "
                "the coordinator may be restarting"
            )
        try:
            grant = json.loads(self._store().get(key))
            self._store().delete_key(key)
        except (RuntimeError, TimeoutError):  # gone between check and get: ask again
            self._asked = None
            return
        self._asked = None
        self.copy = grant["copy"]
        self._view = [_item(it) for it in grant["held"]]
        self.held.extend(_item(it) for it in grant["items"])
        # Chunks the ledger has this worker hold that it lacks came in a grant it never
        # read (asked of a coordinator just before its replacement): taken up now (at
        # the end of the queue), bar those it reported done after asking.
        mine = {it[:2] for it in self.held} | self._done
        self.held.extend(it for it in self._view if it[:2] not in mine)
        self._settle()

    def _granted(self, key: str) -> bool:
        """Whether the grant is there; a coordinator that is away (being replaced)
        counts as not yet: its successor is seeded from the workers' copies."""
        try:
            if self._unsent:  # what waited for the coordinator goes first (it pumps too)
                self._flush()
            return bool(self._store().check([key]))
        except (RuntimeError, TimeoutError) as e:
            self._said_away(e)
            time.sleep(0.2)
            return False

    def _said_away(self, e: Exception) -> None:
        if not self._away:
            self.say(
                f"the job's coordinator is away ({str(e).splitlines()[0][:100]}); "
                "the coordinator may be restarting: data ledger reports wait for it"
            )
            self._away = True

    def _settle(self) -> None:
        """Once nothing taken is pending: let go of the chunks the ledger's last view
        no longer lists (a drop gave them to others)."""
        if self._view is None or self.pending:
            return
        keep = {it[:2] for it in self._view}
        self.held = [it for it in self.held if it[:2] in keep]
        self._view = None

    def _send(self, request: dict[str, Any]) -> None:
        """Queue `request` for the ledger, in order; if the coordinator is away (being
        replaced) it waits here and goes with the next call."""
        self._unsent.append({**request, "m": self._member()})
        self._flush()

    def _flush(self, patience: float = 0.0) -> None:
        deadline = time.monotonic() + patience
        while self._unsent:
            try:
                submit(self._store(), self._unsent[0])
            except (RuntimeError, TimeoutError) as e:
                self._said_away(e)
                if time.monotonic() > deadline:
                    return
                time.sleep(0.5)
                continue
            self._away = False
            self._unsent.pop(0)
        if self._pump is not None:
            self._pump()

    def state_dict(self) -> dict[str, Any]:
        return {**self._seed_fields(), "plan": self.plan.wire(), "member": self._member()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("plan") != self.plan.wire():
            return  # another data set or chunking: start afresh
        self.held = [_item(it) for it in state["held"]]
        self.copy = state["copy"]
        self._was = state.get("member")
        self.pending = 0
