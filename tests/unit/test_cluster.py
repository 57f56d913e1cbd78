"""The API client's verbs: every request is bounded in time."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import urllib3
from dtj_operator.cluster import REQUEST_TIMEOUT, timed_client
from kubernetes import client


def test_a_black_holed_api_server_fails_a_request_in_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 21: no API call had a request timeout, so a connection that accepts and
    never answers hung a pass thread (and the leader's renewals) for good."""
    assert REQUEST_TIMEOUT[1] <= 60
    # A client of its own (another test in this process may have loaded a kubeconfig
    # as the default: then the request went to that cluster instead).
    monkeypatch.setattr(client.Configuration, "_default", None)
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(hole.accept()[0]), daemon=True).start()
    api_client = timed_client((1.0, 1.0))
    api_client.configuration.host = f"http://127.0.0.1:{hole.getsockname()[1]}"
    api_client.configuration.retries = 0
    started = time.monotonic()
    with pytest.raises(urllib3.exceptions.HTTPError):
        client.CoreV1Api(api_client).list_namespaced_pod("default")
    assert time.monotonic() - started < 10
    hole.close()
