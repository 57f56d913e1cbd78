"""A real, local Kubernetes control plane for tests and demos, without Docker.

    dtj-cluster up      # build (once, cached) and start; prints `export KUBECONFIG=...`
    dtj-cluster down    # stop every process and remove the state directory

etcd, kube-apiserver, kube-controller-manager and kube-scheduler are the real
binaries, built from pinned Go modules by hack/controlplane/build.sh and
cached under the user's cache directory. Two kinds of nodes:

- executing nodes (`dtj.io/runtime=process`): the node agent
  (dtj_devcluster.nodeagent) runs their pods as local processes;
- fake GPU nodes in two pools: kwok keeps them alive and moves their pods to
  Running without running anything (scheduling, scale and node-pool tests).

Everything binds to 127.0.0.1 and every node gets a loopback pod CIDR, so
nothing can leave the machine. We start the processes ourselves rather than
through kwokctl to keep ports, CIDRs and teardown under our control and to
never trigger a download.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import nodeagent

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "hack" / "controlplane" / "build.sh"
KWOK_STAGES = ROOT / "hack" / "kwok" / "stages.yaml"
FAKE_NODE = {"kwok.x-k8s.io/node": "fake"}
GPU = "nvidia.com/gpu"
SPOT_TAINT = {"key": "pool", "value": "spot", "effect": "NoSchedule"}
# (pool, count, gpus per node, preemptible)
NODE_POOLS = [("ondemand", 2, 8, False), ("spot", 4, 4, True)]
# Executing nodes: their names; each gets a loopback /24 claimed for its cluster
# (`claim_pod_cidrs`), so clusters running side by side never share pod IPs.
PROCESS_NODES = ("process-0", "process-1")
# Second octets that loopback pod CIDRs are claimed from: 127.<o>.0.0/24.
POD_OCTETS = range(100, 250)


def claims_dir() -> Path:
    """Where every local cluster on this machine claims its pod CIDRs (one file each)."""
    return state_root().parent / "pod-cidrs"


def claim_pod_cidrs(directory: Path, count: int) -> list[str]:
    """`count` loopback /24s no other live cluster holds, claimed for the cluster in
    `directory`. A claim is a file created exclusively (atomic) naming its cluster's
    directory; a claim whose cluster directory is gone is stale and taken over."""
    root = claims_dir()
    root.mkdir(parents=True, exist_ok=True)
    mine: list[str] = []
    for octet in POD_OCTETS:
        if len(mine) == count:
            break
        claim = root / f"127.{octet}"
        for _ in range(2):
            try:
                with open(claim, "x") as f:
                    f.write(str(directory))
                mine.append(f"127.{octet}.0.0/24")
                break
            except FileExistsError:
                owner = Path(claim.read_text().strip() or "/nonexistent")
                if owner == directory or not owner.is_dir():
                    claim.unlink(missing_ok=True)  # stale (or our own from a crash)
                    continue
                break
    if len(mine) < count:
        release_pod_cidrs(directory)
        raise RuntimeError(f"no free loopback pod CIDRs left in {root}: stop other clusters")
    return mine


def release_pod_cidrs(directory: Path) -> None:
    root = claims_dir()
    if not root.is_dir():
        return
    for claim in root.iterdir():
        with contextlib.suppress(OSError):
            if claim.read_text().strip() == str(directory):
                claim.unlink()


def state_root() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "dtj" / "cluster"


def build(*, quiet: bool = False) -> Path:
    """The directory holding the pinned binaries, building them on first use."""
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        check=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL if quiet else None,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kubeconfig(server: str, token: str, user: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "dtj-local", "cluster": {"server": server, "insecure-skip-tls-verify": True}}
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "dtj-local", "context": {"cluster": "dtj-local", "user": user}}],
        "current-context": "dtj-local",
    }


def image_paths() -> list[str]:
    """What pods on executing nodes need of this machine: the checkout and its virtualenv."""
    return sorted({str(ROOT), sys.prefix, sys.base_prefix})


def fake_gpu_nodes() -> list[dict[str, Any]]:
    """Two node pools of fake GPU nodes, each with a loopback pod CIDR."""
    nodes = []
    index = 0
    for pool, count, gpus, preemptible in NODE_POOLS:
        for i in range(count):
            index += 1
            labels = {
                "pool": pool,
                "type": "kwok",
                "kubernetes.io/hostname": f"{pool}-{i}",
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "nvidia.com/gpu.present": "true",
            }
            if preemptible:
                labels["node.kubernetes.io/lifecycle"] = "spot"
            capacity = {"cpu": "32", "memory": "256Gi", "pods": "500", GPU: str(gpus)}
            nodes.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": f"{pool}-{i}", "labels": labels, "annotations": FAKE_NODE},
                    "spec": {
                        "podCIDR": f"127.{10 + index}.0.0/24",
                        "taints": [SPOT_TAINT] if preemptible else [],
                    },
                    "status": {"capacity": capacity, "allocatable": capacity},
                }
            )
    return nodes


@dataclass
class LocalCluster:
    """A running control plane; `kubeconfig` is what users and tests point at."""

    directory: Path
    bin: Path

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    @property
    def pidfile(self) -> Path:
        return self.directory / "pids.json"

    def wait_established(self, crd: str, timeout: float = 60) -> None:
        """Until the API server serves `crd` (polled: `kubectl wait` fails outright when
        it reads the CRD before its status has conditions)."""
        deadline = time.monotonic() + timeout
        while not established(json.loads(self.kubectl("get", "crd", crd, "-o", "json").stdout)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"CRD {crd} not established after {timeout:.0f}s")
            time.sleep(0.2)

    def kubectl(
        self, *args: str, check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            check=check,
            capture_output=True,
            text=True,
            **kw,
        )

    # -- lifecycle ---------------------------------------------------------

    def start(
        self,
        *,
        timeout: float = 120.0,
        audit: bool = False,
        fake_nodes: bool = True,
        process_nodes: int = len(PROCESS_NODES),
    ) -> None:
        """Start everything; `audit` writes every request's metadata to audit.log
        (by default it holds the job status writes only).

        `fake_nodes` adds kwok's two GPU pools; `process_nodes` executing nodes
        (0 to 2) run their pods as local processes.
        """
        d = self.directory
        if self.pidfile.exists():
            raise RuntimeError(f"a cluster already runs from {d}; run `dtj cluster down` first")
        (d / "logs").mkdir(parents=True, exist_ok=True)
        (d / "certs").mkdir(exist_ok=True)
        sa_key, sa_pub = d / "certs" / "sa.key", d / "certs" / "sa.pub"
        subprocess.run(
            ["openssl", "genrsa", "-out", sa_key, "2048"], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "rsa", "-in", sa_key, "-pubout", "-out", sa_pub],
            check=True,
            capture_output=True,
        )
        tokens = {
            "admin": (secrets.token_hex(16), "system:masters"),
            # Controllers run under the manager's own identity here (no per-controller
            # service-account credentials), which needs more than its bootstrap role.
            "system:kube-controller-manager": (secrets.token_hex(16), "system:masters"),
            "system:kube-scheduler": (secrets.token_hex(16), ""),
            # Separate identities so an audit log can tell who made which request.
            "dtj-operator": (secrets.token_hex(16), "system:masters"),
            "bench-client": (secrets.token_hex(16), "system:masters"),
            # The executing nodes' kubelet stand-in: registers nodes, runs pods,
            # mints their service-account tokens.
            "dtj-node-agent": (secrets.token_hex(16), "system:masters"),
        }
        (d / "tokens.csv").write_text(
            "".join(f'{tok},{user},{user},"{grp}"\n' for user, (tok, grp) in tokens.items())
        )
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        server = f"https://127.0.0.1:{api_port}"
        configs = {}
        for user, (tok, _) in tokens.items():
            path = d / f"{user.split(':')[-1]}.kubeconfig"
            path.write_text(yaml.safe_dump(kubeconfig(server, tok, user)))
            configs[user] = path
        (d / "kubeconfig").write_text(configs["admin"].read_text())

        b = self.bin
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        commands = {
            "etcd": [
                b / "etcd",
                f"--data-dir={d / 'etcd'}",
                "--name=default",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            "kube-apiserver": [
                b / "kube-apiserver",
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--cert-dir={d / 'certs'}",
                f"--token-auth-file={d / 'tokens.csv'}",
                "--authorization-mode=Node,RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--endpoint-reconciler-type=none",
                "--enable-priority-and-fairness=false",
                f"--audit-policy-file={self._audit_policy(everything=audit)}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
            ],
            "kube-controller-manager": [
                b / "kube-controller-manager",
                f"--kubeconfig={configs['system:kube-controller-manager']}",
                "--leader-elect=false",
                "--secure-port=0",
                f"--service-account-private-key-file={sa_key}",
                "--controllers=*,-nodeipam,-service-lb-controller",
                # Published as kube-root-ca.crt: pods trust the API server with it.
                f"--root-ca-file={d / 'certs' / 'apiserver.crt'}",
                "--concurrent-gc-syncs=10",
            ],
            "kube-scheduler": [
                b / "kube-scheduler",
                f"--kubeconfig={configs['system:kube-scheduler']}",
                "--leader-elect=false",
                "--secure-port=0",
            ],
            "kwok": [
                b / "kwok",
                f"--kubeconfig={configs['admin']}",
                f"--config={KWOK_STAGES}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--cidr=127.200.0.0/16",
                "--node-ip=127.0.0.1",
                "--node-lease-duration-seconds=40",
            ],
        }
        if not fake_nodes:
            del commands["kwok"]
        names = PROCESS_NODES[:process_nodes]
        executing = dict(zip(names, claim_pod_cidrs(d, len(names)), strict=True))
        if executing:
            commands["node-agent"] = [
                sys.executable,
                "-m",
                "dtj_devcluster.nodeagent",
                f"--dir={d}",
                f"--api-port={api_port}",
                *(f"--node={n}={cidr}" for n, cidr in executing.items()),
                *(f"--image-path={p}" for p in image_paths()),
                # Beside kwok's pools, only pods that ask for executing nodes run there.
                *(["--taint"] if fake_nodes else []),
            ]
        pids: dict[str, int] = {}
        try:
            for name, cmd in commands.items():
                log = open(d / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
                proc = subprocess.Popen(
                    [str(c) for c in cmd],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
                pids[name] = proc.pid
                self.pidfile.write_text(json.dumps(pids))
                if name == "etcd":
                    self._wait_port(etcd_port, name, timeout)
                if name == "kube-apiserver":
                    self._wait_ready(server, tokens["admin"][0], timeout)
            self._wait_default_service_account(timeout)
            if fake_nodes:
                self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(fake_gpu_nodes()))
            self._wait_nodes(len(executing) + (len(fake_gpu_nodes()) if fake_nodes else 0), timeout)
        except BaseException:
            self.stop(keep_logs=True)
            raise

    @property
    def audit_log(self) -> Path:
        return self.directory / "audit.log"

    def _audit_policy(self, *, everything: bool) -> Path:
        """Who wrote a job's status is always recorded (tests check the coordinator's
        identity); `everything` records every request (the many-jobs benchmark)."""
        status_writes = {
            "level": "Metadata",
            "verbs": ["patch", "update"],
            "resources": [
                {"group": "training.dtj.io", "resources": ["decentralizedtrainingjobs/status"]}
            ],
        }
        path = self.directory / "audit-policy.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "audit.k8s.io/v1",
                    "kind": "Policy",
                    "omitStages": ["RequestReceived"],
                    "rules": [{"level": "Metadata"}]
                    if everything
                    else [status_writes, {"level": "None"}],
                }
            )
        )
        return path

    def _wait_port(self, port: int, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not listen on 127.0.0.1:{port}; see {self.directory}/logs")

    def _wait_ready(self, server: str, token: str, timeout: float) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            req = urllib.request.Request(
                f"{server}/readyz", headers={"Authorization": f"Bearer {token}"}
            )
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"kube-apiserver not ready; see {self.directory}/logs/kube-apiserver.log"
        )

    def _wait_nodes(self, count: int, timeout: float) -> None:
        def ready() -> int:
            out = self.kubectl("get", "nodes", "-o", "json", check=False)
            if out.returncode != 0:
                return 0
            return sum(
                any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in n["status"].get("conditions") or []
                )
                for n in json.loads(out.stdout)["items"]
            )

        deadline = time.monotonic() + timeout
        while ready() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} nodes never became Ready; see {self.directory}/logs")
            time.sleep(0.5)

    def _wait_default_service_account(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise TimeoutError("the default service account never appeared (kube-controller-manager)")

    def stop(self, *, keep_logs: bool = False) -> None:
        """Stop every component (newest first) and remove the state directory."""
        if self.pidfile.exists():
            pids = json.loads(self.pidfile.read_text())
            for pid in reversed(list(pids.values())):
                _terminate(pid)
            self.pidfile.unlink()
        for pid in leftover_processes(self.directory):  # pods outliving a killed agent
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        release_pod_cidrs(self.directory)
        if keep_logs:
            print(f"control plane logs kept in {self.directory / 'logs'}", file=sys.stderr)
        elif self.directory.exists():
            subprocess.run(["rm", "-rf", str(self.directory)], check=False)


def start_records(directory: Path, namespace: str | None = None) -> list[dict[str, Any]]:
    """Every container process the executing nodes started (namespace, pod, uid,
    container, pid, time), oldest first; kept after the pods are gone."""
    path = directory / nodeagent.START_RECORDS
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if namespace is None or r["namespace"] == namespace]


def leftover_processes(directory: Path, namespace: str | None = None) -> list[int]:
    """Processes started for pods of the cluster in `directory` (of one namespace's
    pods when given) that still run."""
    marker = f"{nodeagent.MARKER_ENV}={directory}".encode()
    prefix = f"{nodeagent.POD_ENV}={namespace}/".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in env and (namespace is None or any(e.startswith(prefix) for e in env)):
            out.append(int(entry.name))
    return out


def _terminate(pid: int, grace: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):  # reap it if it is our child
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def up(directory: Path | None = None, *, fake_nodes: bool = True) -> LocalCluster:
    cluster = LocalCluster(directory or state_root() / "default", build())
    t0 = time.monotonic()
    cluster.start(fake_nodes=fake_nodes)
    print(
        f"local control plane ready in {time.monotonic() - t0:.0f}s "
        f"(logs: {cluster.directory / 'logs'})",
        file=sys.stderr,
    )
    return cluster


def down(directory: Path | None = None) -> None:
    LocalCluster(directory or state_root() / "default", Path()).stop()


def established(crd: dict[str, Any]) -> bool:
    """Whether a CRD object (as read) says the API server serves it."""
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)
