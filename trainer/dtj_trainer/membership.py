"""Membership generations: who trains together, kept in the job's coordinator store.

    worker --append members/requests {"join"|"leave": id}--> store <--reads-- Registrar
    worker --add hb/<id> every second-------------------->  store <--reads-- Registrar
    Registrar --set gen/<g> {members}, gen/current = g--> store --read--> workers

The Registrar (in the coordinator: its own pod on a cluster, the launcher
process locally) is the only writer of generations. It admits joiners, drops
leavers at once and drops a member whose heartbeat stopped for `dead_after`
seconds (SIGKILL, lost node, SIGSTOP). Each generation lists its members in
rank order; the data plane of generation g lives under PrefixStore("gen{g}/").
Below `min_members` a generation is published with `paused: true`: workers
wait (and the status says so) instead of training short-handed or hanging.

A worker id is "<slot>.<incarnation>": a replacement for the same slot is a
new member, and the old incarnation is dropped when the new one registers.

Before forming a generation's process groups its members `assemble`: gloo
waits up to the collective timeout for every peer, and a peer that already
moved on to a newer generation never comes, so members meeting first on the
store (where waiting can be abandoned) keeps a superseded generation from
stalling anyone.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REQUESTS = "members/requests"
ABORTED = 1_000_000  # added to a generation's arrival count when it will never form
ASSEMBLY_POLL_SECONDS = 0.05
CURRENT = "gen/current"
HEARTBEAT_SECONDS = 0.2  # also how often a worker looks for a new generation


class Cancelled(Exception):
    """The worker was asked to stop while it waited for a generation."""


def gen_key(g: int) -> str:
    return f"gen/{g}"


def new_id(slot: int) -> str:
    return f"{slot}.{secrets.token_hex(4)}"


def slot_of(member: str) -> int:
    return int(member.split(".", 1)[0])


@dataclass(frozen=True)
class Generation:
    number: int
    members: tuple[str, ...]
    paused: bool = False

    def rank_of(self, member: str) -> int | None:
        return self.members.index(member) if member in self.members else None

    def wire(self) -> str:
        return json.dumps({"members": list(self.members), "paused": self.paused})


def read_current(store: Any) -> Generation | None:
    """The latest published generation, or None before the first."""
    if not store.check([CURRENT]):
        return None
    g = int(store.get(CURRENT))
    info = json.loads(store.get(gen_key(g)))
    return Generation(g, tuple(info["members"]), bool(info.get("paused")))


class Superseded(RuntimeError):
    """A generation was given up before all its members arrived to form it."""


def assemble(store: Any, gen: Generation, timeout: float, newest: Callable[[], int | None]) -> None:
    """Wait until every member of `gen` has arrived to form its groups.

    One atomic counter per generation: each member adds 1 on arrival. A member
    that sees a newer generation (`newest()`), or waits `timeout`, gives the
    generation up by adding ABORTED with compare-and-set, which succeeds only
    while someone is still missing. So either every member sees the full count
    and forms the groups, or every member (including late arrivals) sees it
    given up and raises Superseded; nobody forms a group that others abandoned.
    """
    key, size = f"assembly/{gen.number}", len(gen.members)
    deadline = time.monotonic() + timeout
    count = int(store.add(key, 1))
    while count < size:
        latest = newest()
        if (latest is not None and latest > gen.number) or time.monotonic() > deadline:
            count = _give_up(store, key, size)
            if count == size:  # the last member arrived just before: form after all
                return
            why = (
                f"generation {latest} replaced it"
                if latest and latest > gen.number
                else (f"not every member arrived within {timeout:.0f}s")
            )
            raise Superseded(f"generation {gen.number} given up before it formed: {why}")
        time.sleep(ASSEMBLY_POLL_SECONDS)
        count = int(store.add(key, 0))
    if count >= ABORTED:
        raise Superseded(f"generation {gen.number} was given up by another member")


def _give_up(store: Any, key: str, size: int) -> int:
    """Mark the generation given up unless it is complete; returns the final count."""
    while True:
        count = int(store.add(key, 0))
        if count >= size:
            return count
        given_up = str(count + ABORTED)
        if bytes(store.compare_set(key, str(count), given_up)) == given_up.encode():
            return count + ABORTED


@dataclass
class Registrar:
    """Decides the generations from join/leave requests and heartbeats."""

    store: Any
    min_members: int
    expected: int  # workers the job asks for: the first generation waits for them
    dead_after: float = 5.0
    settle: float = 1.0  # batch joins arriving together into one generation
    startup: float = 30.0  # ... or starts with those there after this long (>= min_members)
    clock: Callable[[], float] = time.monotonic
    members: list[str] = field(default_factory=list)
    ever: set[str] = field(default_factory=set)  # every member admitted so far
    generation: int = -1
    _offset: int = 0
    _beats: dict[str, tuple[int, float]] = field(default_factory=dict)
    _waiting: list[str] = field(default_factory=list)
    _first_wait: float | None = None
    _reform_since: float | None = None
    _resized: bool = False
    _published_min: int = 0
    log: Callable[[str], None] = print
    # A member is gone (left, dropped, replaced): the data ledger takes its leases back.
    on_removed: Callable[[str], None] = lambda _member: None

    @property
    def paused(self) -> bool:
        """Training waits: a generation exists but has fewer members than the minimum."""
        return self.generation >= 0 and len(self.members) < self.min_members

    def resize(self, *, min_members: int, expected: int) -> None:
        """Follow the job's spec (replicas, minReplicas changed by kubectl scale or an
        HPA): the next step republishes the generation if it is paused only by the
        old minimum, or could now train."""
        if (min_members, expected) == (self.min_members, self.expected):
            return
        self.log(
            f"the job now asks for {expected} workers, {min_members} to train "
            f"(was {self.expected}, {self.min_members})"
        )
        self.min_members, self.expected = min_members, expected
        self._resized = True

    def requests(self) -> list[dict[str, str]]:
        if not self.store.check([REQUESTS]):
            return []
        raw = self.store.get(REQUESTS).decode()
        new, self._offset = raw[self._offset :], len(raw)
        return [json.loads(line) for line in new.splitlines() if line.strip()]

    def alive(self, member: str) -> bool:
        """A member is alive while its heartbeat counter moves (no shared clock needed)."""
        beat = int(self.store.add(f"hb/{member}", 0))
        now = self.clock()
        last = self._beats.get(member)
        if last is None or beat != last[0]:
            self._beats[member] = (beat, now)
            return True
        return now - last[1] < self.dead_after

    def step(self) -> Generation | None:
        """One look at requests and heartbeats; returns a newly published generation."""
        members = list(self.members)
        changed = False
        for req in self.requests():
            if "join" in req:
                joiner = req["join"]
                # A coordinator that replaced a lost one continues the numbering.
                self.generation = max(self.generation, int(req.get("after", -1)))
                same_slot = [m for m in members + self._waiting if slot_of(m) == slot_of(joiner)]
                for old in same_slot:  # its replacement is here: the old one is gone
                    if old in members:
                        members.remove(old)
                        self.on_removed(old)
                        changed = True
                    if old in self._waiting:
                        self._waiting.remove(old)
                self._waiting.append(joiner)
                if self._first_wait is None:
                    self._first_wait = self.clock()
            elif "leave" in req and req["leave"] in members:
                members.remove(req["leave"])
                self.on_removed(req["leave"])
                self.log(f"member {req['leave']} left")
                changed = True
            elif "leave" in req and req["leave"] in self._waiting:
                self._waiting.remove(req["leave"])
            elif "reform" in req and req["reform"] in members and self._reform_since is None:
                self._reform_since = self.clock()
        for m in list(members):
            if not self.alive(m):
                members.remove(m)
                self.on_removed(m)
                self.log(f"member {m} stopped answering for {self.dead_after:.0f}s: dropped")
                changed = True
        self._waiting = [m for m in self._waiting if self.alive(m)]
        if self._waiting and self._admit(members):
            members += sorted(self._waiting, key=slot_of)
            self._waiting, self._first_wait = [], None
            changed = True
        # A collective failed with nobody gone that we know of: give heartbeats
        # `dead_after` to find a dead member first, then re-form the same members.
        reform = self._reform_since is not None and (
            self.clock() - self._reform_since >= self.dead_after
        )
        if self._resized:
            self._resized = False
            # Paused before and not now (or the reverse): the members must be told.
            was_paused = self.generation >= 0 and len(self.members) < self._published_min
            changed = changed or was_paused != (len(members) < self.min_members)
        if not (changed or reform) and self.ever:
            return None
        if not members:
            return None
        return self.publish(members)

    def _admit(self, members: list[str]) -> bool:
        """Whether the waiting joiners enter now: at once when all expected workers are
        there; before the first generation, after `startup` with at least min_members;
        later, `settle` after the first of them (joins close together share a generation)."""
        assert self._first_wait is not None
        waited = self.clock() - self._first_wait
        everyone = len(members) + len(self._waiting)
        if everyone >= self.expected:
            return True
        if not self.ever:  # this coordinator's first generation
            return waited >= self.startup and everyone >= self.min_members
        return waited >= self.settle

    def publish(self, members: list[str]) -> Generation:
        self.members = members
        self._published_min = self.min_members
        self.ever.update(members)
        self._reform_since = None
        self.generation += 1
        gen = Generation(self.generation, tuple(members), len(members) < self.min_members)
        self.store.set(gen_key(gen.number), gen.wire())
        self.store.set(CURRENT, str(gen.number))
        state = "paused, below minReplicas" if gen.paused else "training"
        self.log(f"generation {gen.number}: {len(members)} members ({state}): {' '.join(members)}")
        return gen

    def run(self, stop: threading.Event, every: float = 0.2) -> None:
        while not stop.wait(every):
            try:
                self.step()
            except Exception as e:
                if stop.is_set():  # the store closed under us as the job ends
                    return
                # A store call that timed out under load must not end membership for
                # good (every later join or loss would wait forever): look again.
                self.log(f"registrar: {type(e).__name__}: {str(e)[:200]}; trying again")


class Member:
    """This worker's side: register, heartbeat, leave, and watch for new generations."""

    def __init__(
        self,
        store: Any,
        heartbeat_store: Any,
        slot: int,
        on_newer: Callable[[int], None] | None = None,
    ) -> None:
        """`on_newer(g)` is called from the heartbeat thread once for each generation g
        published (the worker breaks its groups if they are older)."""
        self.store = store
        self.id = new_id(slot)
        self.on_newer = on_newer
        self.generation = -1  # the last generation this worker was admitted to
        self._hb_store = heartbeat_store  # its own connection: used from another thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="dtj-heartbeat", daemon=True)
        self._outbox: dict[str, str] = {}  # latest value per key, written by the heartbeat
        self._outbox_lock = threading.Lock()

    def join(self) -> None:
        self._hb_store.add(f"hb/{self.id}", 1)
        self._thread.start()
        self.store.append(REQUESTS, json.dumps({"join": self.id}) + "\n")

    def rejoin(self) -> None:
        """Register with a new coordinator (the old one was replaced): same id, and the
        generation reached, so the new one numbers its generations after it."""
        request = {"join": self.id, "after": self.generation}
        self._hb_store.append(REQUESTS, json.dumps(request) + "\n")

    def leave(self) -> None:
        self._last_words()
        self.store.append(REQUESTS, json.dumps({"leave": self.id}) + "\n")
        self._halt()

    def _halt(self) -> None:
        """Stop the heartbeat and wait for it: a thread still inside a store call while
        the interpreter exits can abort the process (C++ threads torn down under it)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10 * HEARTBEAT_SECONDS + 5)

    def _last_words(self) -> None:
        """The last progress posted, written now (on this thread's own connection): the
        heartbeat that would have sent it is about to stop."""
        with contextlib.suppress(Exception):
            self._flush(self.store)

    def post(self, key: str, value: str) -> None:
        """Write `key` from the heartbeat thread (the latest value wins): progress
        reports never block training, and reach a replaced coordinator once the
        heartbeat's connection has found it."""
        with self._outbox_lock:
            self._outbox[key] = value

    def _flush(self, store: Any = None) -> None:
        """Write what was posted, on `store` (default: the heartbeat's connection)."""
        store = self._hb_store if store is None else store
        with self._outbox_lock:
            pending, self._outbox = self._outbox, {}
        try:
            for key, value in pending.items():
                store.set(key, value)
        except Exception:
            with self._outbox_lock:  # keep what was not written; newer values win
                self._outbox = {**pending, **self._outbox}
            raise

    def request_reform(self) -> None:
        """A collective failed but no generation changed: ask for a fresh one."""
        self.store.append(REQUESTS, json.dumps({"reform": self.id}) + "\n")

    def _beat(self) -> None:
        """Heartbeat, and watch for new generations."""
        announced = -1
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._hb_store.add(f"hb/{self.id}", 1)
                self._flush()
                if self.on_newer is None or not self._hb_store.check([CURRENT]):
                    continue
                newest = int(self._hb_store.get(CURRENT))
                if newest != announced:
                    announced = newest
                    self.on_newer(newest)
            except Exception:  # the coordinator may be restarting: keep trying
                time.sleep(HEARTBEAT_SECONDS)

    def current(self) -> Generation | None:
        return read_current(self.store)

    def latest(self) -> int | None:
        """The number of the newest published generation (one store read)."""
        return int(self.store.get(CURRENT)) if self.store.check([CURRENT]) else None

    def assemble(self, gen: Generation, timeout: float) -> None:
        """Meet the other members of `gen` before forming its groups (see `assemble`)."""
        assemble(self.store, gen, timeout, self.latest)

    def wait_for(
        self,
        after: int,
        timeout: float,
        say: Callable[[str], None],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Generation:
        """The first generation newer than `after` that this worker trains in.

        While a generation admits this worker but is paused below minReplicas it
        waits as long as it takes, saying so; `timeout` bounds only waiting to be
        admitted at all. `cancelled()` (SIGTERM) ends the wait with Left."""
        deadline = time.monotonic() + timeout
        told = ""
        rejoined = False
        while True:
            if cancelled():
                raise Cancelled()
            gen = self.current()
            if (
                gen is not None
                and gen.number > after
                and self.id not in gen.members
                and self.generation >= 0
                and not rejoined
            ):
                # Dropped while frozen or cut off (SIGSTOP, a stalled node): ask back in.
                say(
                    f"generation {gen.number} dropped this worker (it stopped answering); rejoining"
                )
                self.rejoin()
                rejoined = True
                deadline = time.monotonic() + timeout
            if gen is not None and gen.number > after and self.id in gen.members:
                if not gen.paused:
                    self.generation = gen.number
                    return gen
                deadline = time.monotonic() + timeout
                note = (
                    f"waiting: generation {gen.number} has {len(gen.members)} members, "
                    "fewer than minReplicas"
                )
                if note != told:
                    say(note)
                    told = note
            elif time.monotonic() > deadline:
                raise TimeoutError(
                    f"no generation admitted worker {self.id} within {timeout:.0f}s; "
                    "is the coordinator running?"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        self._last_words()
        self._halt()
