"""Leader election: of several operator replicas only the one holding a Lease acts.

The official client's LeaderElection (coordination.k8s.io Lease) decides; the
leader runs kopf as a child process and renews the Lease beside it. A leader
that cannot renew kills its kopf at once and exits (its pod restarts as a
follower), so two replicas never reconcile together for longer than the
renew deadline. A follower answers the liveness probe while it waits. On
SIGTERM the leader stops kopf and hands the Lease back, so a follower takes
over within a retry period instead of a lease duration.
"""

from __future__ import annotations

import http.server
import logging
import signal
import subprocess
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

from .cluster import timed_client

log = logging.getLogger("dtj.leader")


@dataclass(frozen=True)
class Election:
    namespace: str  # where the Lease lives (the operator's own namespace)
    identity: str  # this replica (its pod name)
    name: str = "dtj-operator"
    lease_seconds: int = 15
    renew_deadline_seconds: int = 10
    retry_seconds: int = 2


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"following\n")

    def log_message(self, *_: Any) -> None:
        pass


def _follower_health(liveness: str | None) -> http.server.HTTPServer | None:
    """Answer the liveness probe on kopf's address until kopf takes it over."""
    if not liveness:
        return None
    url = urllib.parse.urlsplit(liveness)
    server = http.server.HTTPServer((url.hostname or "0.0.0.0", url.port or 80), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _release(lock: LeaseLock, identity: str) -> None:
    """Give the Lease up (holder cleared) if this replica still holds it."""
    try:
        lease = lock.api_instance.read_namespaced_lease(lock.name, lock.namespace)
        if lease.spec is None or lease.spec.holder_identity != identity:
            return
        lease.spec.holder_identity = None
        lock.api_instance.replace_namespaced_lease(lock.name, lock.namespace, lease)
        log.info("handed the lease %s/%s back", lock.namespace, lock.name)
    except client.exceptions.ApiException as e:
        log.warning("could not hand the lease back (%s); it expires on its own", e.reason)


def run(election: Election, command: list[str], liveness: str | None) -> int:
    """Wait for the Lease, then run `command` (kopf) while holding it; its exit code."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    logging.getLogger("leaderelection").setLevel(logging.WARNING)  # one line per retry
    lock = LeaseLock(election.name, election.namespace, election.identity)
    # Renewals end within the renew deadline, however the connection hangs: a leader
    # that cannot renew gives up in time instead of hanging while another takes over.
    lock.api_instance = client.CoordinationV1Api(
        timed_client((2.0, float(election.renew_deadline_seconds) / 2))
    )
    elector = leaderelection.LeaderElection(
        electionconfig.Config(
            lock,
            lease_duration=election.lease_seconds,
            renew_deadline=election.renew_deadline_seconds,
            retry_period=election.retry_seconds,
            onstarted_leading=lambda: None,
            onstopped_leading=None,
        )
    )
    stopping = threading.Event()
    child: subprocess.Popen[bytes] | None = None

    def on_term(signum: int, _: Any) -> None:
        stopping.set()
        if child is not None:
            child.send_signal(signum)
        else:
            raise SystemExit(0)  # a follower: nothing to stop

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    health = _follower_health(liveness)
    log.info(
        "%s waits for the lease %s/%s (another replica may hold it)",
        election.identity,
        election.namespace,
        election.name,
    )
    elector.acquire()
    log.info("%s leads: starting the operator", election.identity)
    if health is not None:
        health.shutdown()
        health.server_close()
    child = subprocess.Popen(command)

    def renew() -> None:
        elector.renew_loop()
        if not stopping.is_set() and child.poll() is None:
            log.error("lost the lease %s/%s: stopping at once", election.namespace, election.name)
            child.kill()

    threading.Thread(target=renew, daemon=True).start()
    code = child.wait()
    _release(lock, election.identity)  # a no-op once the lease is lost
    if stopping.is_set():
        return 0
    return code if code > 0 else 1
