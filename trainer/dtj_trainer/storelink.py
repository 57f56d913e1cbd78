"""A client of the job's coordinator store that survives the coordinator's replacement.

If the coordinator pod is lost, the operator starts a new one under the same
name: the connection breaks, the name then resolves to the new pod, and its
store is empty. `StoreLink` reconnects on the first call that fails (the
TCPStore client itself retries the connection for `timeout` seconds) and then
calls `on_reconnect`, with which the worker registers again. Data-plane groups
already formed never use the store, so training goes on meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class StoreLink:
    def __init__(
        self,
        connect: Callable[[], Any],
        on_reconnect: Callable[[], None] | None = None,
        store: Any = None,
    ) -> None:
        self._connect = connect
        self.on_reconnect = on_reconnect
        self.store = connect() if store is None else store  # `store`: connected already
        self._lock = threading.Lock()

    def call(self, op: Callable[[Any], T]) -> T:
        """`op(store)`, reconnecting once if the store is gone."""
        store = self.store
        try:
            return op(store)
        except RuntimeError:  # DistNetworkError, DistStoreError: the coordinator went away
            self._reconnect(store)
            return op(self.store)

    def _reconnect(self, broken: Any) -> None:
        with self._lock:
            if self.store is not broken:  # another thread reconnected meanwhile
                return
            self.store = self._connect()
        if self.on_reconnect is not None:
            self.on_reconnect()

    def set(self, key: str, value: str | bytes) -> None:
        self.call(lambda s: s.set(key, value))

    def get(self, key: str) -> bytes:
        return bytes(self.call(lambda s: s.get(key)))

    def check(self, keys: list[str]) -> bool:
        return bool(self.call(lambda s: s.check(keys)))

    def add(self, key: str, amount: int) -> int:
        return int(self.call(lambda s: s.add(key, amount)))

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        return bytes(self.call(lambda s: s.compare_set(key, expected, desired)))

    def delete_key(self, key: str) -> bool:
        return bool(self.call(lambda s: s.delete_key(key)))

    def append(self, key: str, value: str) -> None:
        self.call(lambda s: s.append(key, value))
