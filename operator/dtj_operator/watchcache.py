"""The operator's view of a job between passes: kopf's indexes plus what it did.

kopf keeps the indexes (jobs, their pods, their other children) from its
watches; it runs no handler before every index has its initial listing, so a
restarted operator never acts on a partial view. What the indexes cannot show
yet are this operator's own latest writes; `WatchCache` remembers them for a
moment (client-go's "expectations"):
- pods it created, until they appear (no second create that would get a 409),
- pods it deleted, until they show as terminating (no second delete),
- the job as its last status write returned it, until the watch delivers that
  version or a newer one (no pass working from the status before its own write).

And what the indexes can get wrong: after a watch gap (410 Gone) kopf relists
but keeps objects the relist no longer has, so a pod deleted in the gap would
stay indexed and its slot would never be refilled. A periodic resync lists the
pods and hides those (client-go's informer does this in `Replace()`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .observed import Observed
from .reconcile import EXPECTATION_SECONDS, Pass, create_backoff

Key = tuple[str, str]  # (namespace, job name)
Index = Mapping[Any, Iterable[Any]]  # what kopf.Index looks like from here


@dataclass
class _Expected:
    created: dict[str, float] = field(default_factory=dict)  # pod name -> until
    deleting: dict[str, float] = field(default_factory=dict)  # pod uid -> until


@dataclass
class WatchCache:
    indexes: dict[str, Index] = field(default_factory=dict)
    children_indexes: tuple[str, ...] = ()
    clock: Any = time.monotonic
    _fresher: dict[Key, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    _expected: dict[Key, _Expected] = field(default_factory=dict)
    _refused: dict[Key, tuple[int, float]] = field(default_factory=dict)  # count, until
    _gone: set[str] = field(default_factory=set)  # uids of indexed pods the API lacks

    def attach(self, **indexes: Index) -> None:
        """Keep kopf's index objects (they are live views, passed to every handler)."""
        self.indexes.update(indexes)

    def job(self, key: Key) -> dict[str, Any] | None:
        return next(iter(self.indexes["jobs"].get(key, ())), None)

    def snapshot(self, key: Key) -> Observed | None:
        """The job as a pass should see it, or None if it is gone."""
        cached = self.job(key)
        if cached is None:
            return None
        body = cached
        seen_version = cached["metadata"].get("resourceVersion", "")
        fresher = self._fresher.get(key)
        if fresher is not None:
            if fresher[0] == seen_version:
                body = fresher[1]  # the watch has not delivered our write yet
            else:
                del self._fresher[key]
        pods = [
            p for p in self.indexes["pods"].get(key, ()) if p["metadata"]["uid"] not in self._gone
        ]
        children = [c for name in self.children_indexes for c in self.indexes[name].get(key, ())]
        now = self.clock()
        exp = self._expected.get(key, _Expected())
        names = {p["metadata"]["name"] for p in pods}
        live = {p["metadata"]["uid"] for p in pods if not p["metadata"].get("deletionTimestamp")}
        exp.created = {n: t for n, t in exp.created.items() if t > now and n not in names}
        exp.deleting = {u: t for u, t in exp.deleting.items() if t > now and u in live}
        if exp.created or exp.deleting:
            self._expected[key] = exp
        else:
            self._expected.pop(key, None)
        refusals, until = self._refused.get(key, (0, now))
        return Observed(
            body=body,
            pods=pods,
            children=children,
            created=set(exp.created),
            deleting=set(exp.deleting),
            seen_version=seen_version,
            refusals=refusals,
            create_backoff=max(0.0, until - now),
        )

    def remember(self, key: Key, obs: Observed, done: Pass) -> None:
        """What the pass did, until the watch shows it."""
        if done.written is not None:
            self._fresher[key] = (obs.seen_version, done.written)
        if done.refusals is not None:
            if done.refusals:
                until = self.clock() + create_backoff(done.refusals)
                self._refused[key] = (done.refusals, until)
            else:
                self._refused.pop(key, None)
        if done.created or done.deleted:
            until = self.clock() + EXPECTATION_SECONDS
            exp = self._expected.setdefault(key, _Expected())
            exp.created.update(dict.fromkeys(done.created, until))
            exp.deleting.update(dict.fromkeys(done.deleted, until))

    def indexed_pods(self) -> dict[Key, set[str]]:
        """The uids the pod index holds now, by job (read before a resync's listing)."""
        return {k: {p["metadata"]["uid"] for p in pods} for k, pods in self.indexes["pods"].items()}

    def purge(self, indexed: dict[Key, set[str]], listed: set[str]) -> set[Key]:
        """Hide the pods indexed before the listing that it did not hold (deleted
        meanwhile, their DELETED event lost); returns the jobs to reconcile."""
        gone = stale(indexed, listed)
        now = set().union(*self.indexed_pods().values())
        self._gone = (self._gone & now) | set().union(*gone.values())  # bounded by the index
        return set(gone)

    def forget(self, key: Key) -> None:
        self._fresher.pop(key, None)
        self._refused.pop(key, None)
        self._expected.pop(key, None)


def stale(indexed: dict[Key, set[str]], listed: set[str]) -> dict[Key, set[str]]:
    """The pods of each job that were indexed before the listing and are not in it.

    The index is read first: a pod that existed then and still exists at the
    listing is in it, so one missing was deleted. (A pod created after the
    read is not looked at: it may be indexed and not yet listed.)"""
    out = {key: uids - listed for key, uids in indexed.items()}
    return {key: uids for key, uids in out.items() if uids}
