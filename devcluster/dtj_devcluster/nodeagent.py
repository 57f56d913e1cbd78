"""Executing nodes for the local cluster: a small kubelet that runs pods as local processes.

kwok's fake nodes execute nothing. The nodes this agent registers (label
`dtj.io/runtime=process`) really run the pods the scheduler binds to them:

- each pod gets a loopback IP from its node's podCIDR (127.x.y.z) and every
  container runs as a process in a root of its own (dtj_devcluster.sandbox):
  the pod's env (downward API included), its ConfigMap/Secret/token/emptyDir
  volumes as files at their mountPaths, its own /etc/hosts naming the
  executing pods (cluster DNS stand-in), its user (runAsUser), hostname and
  working directory; the project's virtualenv plays the image;
- pod status follows the process: Running with podIP, then the exit code,
  `terminationMessagePolicy: FallbackToLogsOnError`, restartPolicy;
- deletion honours the grace period (SIGTERM, then SIGKILL), then removes
  the pod as a kubelet does; a deleted node takes its processes with it;
- stdout/stderr are kept per container and served to `kubectl logs` through
  a kubelet-style HTTPS endpoint on 127.0.0.1.

Every process it starts carries DTJ_LOCAL_CLUSTER=<cluster dir> and
DTJ_LOCAL_POD=<namespace>/<pod> in its environment, so `dtj-cluster down` (and
the tests) can find anything that survives.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from . import logserver, podspec

log = logging.getLogger("dtj-node-agent")
RUNTIME_LABEL = "dtj.io/runtime"
MARKER_ENV = "DTJ_LOCAL_CLUSTER"
POD_ENV = "DTJ_LOCAL_POD"  # <namespace>/<name>: which pod a process belongs to
HOST_IP = "127.0.0.1"
HEARTBEAT_SECONDS = 10.0
NODE_RETURNS_SECONDS = 20.0  # a deleted node is replaced by a new one (a new name)
RETRY_SECONDS = 2.0
TOKEN_SECONDS = 3607
SANDBOX = [
    *("unshare", "--mount", "--uts", "--propagation", "private", "--"),
    *(sys.executable, "-m", "dtj_devcluster.sandbox"),
]


PROCESS_TAINT = {"key": RUNTIME_LABEL, "value": "process", "effect": "NoSchedule"}


START_RECORDS = "starts.jsonl"  # in the cluster's directory, one JSON line per process start


def process_node(
    name: str, cidr: str, log_port: int, gpus: int, *, tainted: bool
) -> dict[str, Any]:
    """An executing node: loopback pod CIDR, fake GPUs (the trainer falls back to gloo).

    `tainted` keeps pods that do not tolerate it away (in the shared test
    cluster, only jobs that ask for executing nodes really run)."""
    capacity = {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                RUNTIME_LABEL: "process",
                "pool": "process",
                "type": "process",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
        },
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr], "taints": [PROCESS_TAINT] if tainted else []},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            # Only an IP: a Hostname address would send the API server to DNS.
            "addresses": [{"type": "InternalIP", "address": HOST_IP}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": log_port}},
            "nodeInfo": {
                "kubeletVersion": "v1.36.3",
                "containerRuntimeVersion": "dtj-process://0.1",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "kernelVersion": os.uname().release,
                "osImage": "local processes",
                "kubeProxyVersion": "",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        },
    }


def ready_conditions() -> list[dict[str, Any]]:
    ts = podspec.now()
    conds = [
        {"type": t, "status": "False", "reason": f"No{t}", "message": "", "lastHeartbeatTime": ts}
        for t in ("MemoryPressure", "DiskPressure", "PIDPressure")
    ]
    conds.append(
        {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "dtj node agent runs pods as local processes",
            "lastHeartbeatTime": ts,
        }
    )
    return conds


@dataclass
class Container:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    started: str
    policy: str


@dataclass
class PodRun:
    """A pod this agent runs: its IP, sandbox and container processes."""

    uid: str
    namespace: str
    name: str
    node: str
    ip: str
    sandbox: Path
    pod: dict[str, Any]
    containers: dict[str, Container] = field(default_factory=dict)
    exits: dict[str, podspec.Exit] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    stopping: bool = False
    deleted: bool = False

    @property
    def peer(self) -> podspec.Peer:
        spec = self.pod["spec"]
        return podspec.Peer(
            self.namespace, podspec.hostname(self.pod), spec.get("subdomain"), self.ip
        )


class NodeAgent:
    def __init__(
        self,
        *,
        directory: Path,
        nodes: dict[str, str],
        api_port: int,
        image_paths: list[str],
        gpus: int,
        cluster_marker: str,
        tainted: bool,
    ) -> None:
        self.tainted = tainted
        config.load_kube_config(str(directory / "dtj-node-agent.kubeconfig"))
        self.api = client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.coord = client.CoordinationV1Api(self.api)
        self.dir = directory / "pods"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.nodes = dict(nodes)  # name -> podCIDR
        self.api_port = api_port
        self.image_paths = image_paths
        self.gpus = gpus
        self.marker = cluster_marker
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.runs: dict[str, PodRun] = {}
        self.done: set[str] = set()  # uids that ran to the end here
        self.waiting: dict[str, dict[str, Any]] = {}  # uid -> pod waiting for a volume
        self.free_ips = {n: list(IPv4Network(c).hosts())[1:] for n, c in nodes.items()}
        self.stop = threading.Event()
        self._watchers: dict[str, int] = {}  # node -> incarnation of its pod watcher
        self.run_as_users = self._can_drop_privileges(directory)
        self.logs = logserver.LogServer(self._log_path, directory / "logserver")

    # -- nodes ---------------------------------------------------------------

    def _can_drop_privileges(self, directory: Path) -> bool:
        """Pods run as their runAsUser only if that user can run the image (the project's
        Python and checkout); tried once through the sandbox itself."""
        probe = directory / "probe"
        (probe / "tmp").mkdir(parents=True, exist_ok=True)
        spec = {
            "root": str(probe / "rootfs"),
            "etc": str(probe / "etc"),
            "tmp": str(probe / "tmp"),
            "image_paths": self.image_paths,
            "mounts": [],
            "read_only_root": True,
            "hostname": "probe",
            "workdir": "/",
            "user": {"uid": 1000, "gid": 1000},
            "groups": [],
            "no_new_privs": True,
            "argv": [sys.executable, "-c", "import dtj_trainer"],
            "env": {"PATH": "/usr/bin:/bin", "HOME": "/"},
        }
        (probe / "spec.json").write_text(json.dumps(spec))
        result = subprocess.run(
            [*SANDBOX, str(probe / "spec.json")], capture_output=True, env=self._sandbox_env()
        )
        shutil.rmtree(probe, ignore_errors=True)
        if result.returncode != 0:
            log.warning(
                "a non-root user cannot run %s here (%s); pods will run as root instead of "
                "their runAsUser",
                sys.executable,
                result.stderr.decode(errors="replace").strip()[-300:],
            )
        return result.returncode == 0

    def _sandbox_env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            MARKER_ENV: self.marker,
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }

    def register(self, names: list[str] | None = None) -> None:
        for name in names or list(self.nodes):
            cidr = self.nodes[name]
            body: Any = process_node(name, cidr, self.logs.port, self.gpus, tainted=self.tainted)
            with contextlib.suppress(ApiException):
                self.core.create_node(body)
            status = dict(body["status"], conditions=ready_conditions())
            self.core.patch_node_status(name, {"status": status})

    def heartbeat(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            for name in list(self.nodes):
                try:
                    self.core.patch_node_status(
                        name, {"status": {"conditions": ready_conditions()}}
                    )
                    self._renew_lease(name)
                except ApiException as e:
                    if e.status == 404:
                        self.events.put(("node-gone", name))
                except Exception as e:  # the API server may be briefly away
                    log.warning("heartbeat of %s failed: %s", name, e)

    def _renew_lease(self, name: str) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        spec = {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now}
        try:
            self.coord.patch_namespaced_lease(name, "kube-node-lease", {"spec": spec})
        except ApiException as e:
            if e.status != 404:
                raise
            node: Any = self.core.read_node(name)
            owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node.metadata.uid}
            lease: Any = {"metadata": {"name": name, "ownerReferences": [owner]}, "spec": spec}
            self.coord.create_namespaced_lease("kube-node-lease", lease)

    def watch_nodes(self) -> None:
        while not self.stop.is_set():
            try:
                for ev in watch.Watch().stream(
                    self.core.list_node,
                    label_selector=f"{RUNTIME_LABEL}=process",
                    timeout_seconds=60,
                ):
                    if ev["type"] == "DELETED":
                        self.events.put(("node-gone", ev["object"].metadata.name))
            except Exception as e:
                if not self.stop.is_set():
                    log.warning("node watch restarts: %s", e)
                    time.sleep(1)

    def watch_pods(self, node: str) -> None:
        """List then watch the pods bound to `node`; relist after any break. Ends when
        the node is deleted (a returning node gets a watcher of its own)."""
        self._watchers[node] = incarnation = self._watchers.get(node, 0) + 1
        while not self.stop.is_set() and self._watchers.get(node) == incarnation:
            try:
                listed: Any = self.core.list_pod_for_all_namespaces(
                    field_selector=f"spec.nodeName={node}"
                )
                pods = [self.api.sanitize_for_serialization(p) for p in listed.items]
                self.events.put(("sync", (node, pods)))
                for ev in watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=f"spec.nodeName={node}",
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=120,
                ):
                    pod = self.api.sanitize_for_serialization(ev["object"])
                    if self._watchers.get(node) != incarnation:
                        return
                    self.events.put(("pod", (ev["type"], pod)))
            except Exception as e:
                if not self.stop.is_set():
                    log.warning("pod watch of %s restarts: %s", node, e)
                    time.sleep(1)

    # -- the event loop ----------------------------------------------------------

    def run(self) -> None:
        self.register()
        self.logs.start()
        threads = [threading.Thread(target=self.heartbeat, daemon=True)]
        threads.append(threading.Thread(target=self.watch_nodes, daemon=True))
        threads += [
            threading.Thread(target=self.watch_pods, args=(n,), daemon=True) for n in self.nodes
        ]
        for t in threads:
            t.start()
        log.info(
            "node agent ready: %s (logs on 127.0.0.1:%d)", ", ".join(self.nodes), self.logs.port
        )
        next_retry = time.monotonic() + RETRY_SECONDS
        while not self.stop.is_set():
            try:
                kind, payload = self.events.get(timeout=RETRY_SECONDS)
            except queue.Empty:
                kind, payload = "tick", None
            try:
                self.handle(kind, payload)
                if time.monotonic() >= next_retry:
                    next_retry = time.monotonic() + RETRY_SECONDS
                    for pod in list(self.waiting.values()):
                        self.start(pod)
            except Exception:
                log.exception("node agent: handling %s failed", kind)
        self.shutdown()

    def handle(self, kind: str, payload: Any) -> None:
        if kind == "pod":
            type_, pod = payload
            if type_ == "DELETED":
                self.forget(pod, lost=True)
            else:
                self.observe(pod)
        elif kind == "sync":
            node, pods = payload
            seen = {p["metadata"]["uid"] for p in pods}
            for run in [r for r in self.runs.values() if r.node == node and r.uid not in seen]:
                self.forget(run.pod, lost=True)
            for pod in pods:
                self.observe(pod)
        elif kind == "exit":
            uid, name, code = payload
            self.exited(uid, name, code)
        elif kind == "kill":
            target = self.runs.get(payload)
            if target is not None:
                self._signal(target, signal.SIGKILL)
        elif kind == "node-gone" and payload in self.nodes:
            cidr = self.nodes.pop(payload)
            self._watchers[payload] = self._watchers.get(payload, 0) + 1  # ends its watcher
            log.info("node %s was deleted: its processes die with it", payload)
            for gone in [r for r in self.runs.values() if r.node == payload]:
                self.forget(gone.pod, lost=True)
            back = threading.Timer(
                NODE_RETURNS_SECONDS, self.events.put, [("node-back", (payload, cidr))]
            )
            back.daemon = True
            back.start()
        elif kind == "node-back":
            old, cidr = payload
            name = next(
                f"process-{i}"
                for i in range(len(self._watchers) + 1)
                if f"process-{i}" not in self._watchers
            )
            log.info("a new machine, %s, replaces node %s", name, old)
            self.nodes[name] = cidr
            self.free_ips[name] = list(IPv4Network(cidr).hosts())[1:]
            self.register([name])
            threading.Thread(target=self.watch_pods, args=(name,), daemon=True).start()

    def observe(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if pod["spec"].get("nodeName") not in self.nodes:
            return
        terminating = bool(meta.get("deletionTimestamp"))
        run = self.runs.get(uid)
        if run is not None:
            run.pod = pod
            if terminating and not run.stopping:
                self.stop_pod(run, meta.get("deletionGracePeriodSeconds"))
            return
        phase = (pod.get("status") or {}).get("phase")
        if uid in self.done or phase in ("Succeeded", "Failed"):
            if terminating:
                self.remove(pod)
            return
        if terminating:
            self.waiting.pop(uid, None)
            self.remove(pod)
            return
        self.start(pod)

    # -- starting ------------------------------------------------------------------

    def start(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid, node = meta["uid"], spec["nodeName"]
        if uid in self.runs or node not in self.nodes:
            return
        sandbox = self.dir / uid
        ip = str(self.free_ips[node][0]) if self.free_ips[node] else None
        if ip is None:
            self._patch_status(
                pod, podspec.failed_status("OutOfPodIPs", f"node {node} has no free pod IP")
            )
            return
        try:
            if spec.get("initContainers"):
                raise podspec.Unsupported(
                    "init containers are not supported by the process runtime"
                )
            mounts_by_volume = self._volumes(pod, sandbox)
            run = PodRun(uid, meta["namespace"], meta["name"], node, ip, sandbox, pod)
            specs = [self._container_spec(run, c, mounts_by_volume) for c in spec["containers"]]
        except podspec.NotReadyYet as e:
            if uid not in self.waiting:
                log.info("pod %s/%s waits: %s", meta["namespace"], meta["name"], e)
                self._patch_status(pod, podspec.waiting_status(pod, "ContainerCreating", str(e)))
            self.waiting[uid] = pod
            return
        except podspec.Unsupported as e:
            self.waiting.pop(uid, None)
            log.warning("pod %s/%s cannot run here: %s", meta["namespace"], meta["name"], e)
            self._patch_status(pod, podspec.failed_status("UnsupportedByProcessRuntime", str(e)))
            self.done.add(uid)
            return
        self.waiting.pop(uid, None)
        sandbox.mkdir(parents=True, exist_ok=True)
        (sandbox / "pod.json").write_text(json.dumps([meta["namespace"], meta["name"]]))
        self.free_ips[node].pop(0)
        self.runs[uid] = run
        self._write_etc(run)
        self.refresh_hosts()
        for c, sbx in zip(spec["containers"], specs, strict=True):
            self._spawn(run, c, sbx)
        started = {n: c.started for n, c in run.containers.items()}
        self._patch_status(pod, podspec.running_status(pod, ip, HOST_IP, started, run.restarts))
        log.info("started pod %s/%s on %s at %s", run.namespace, run.name, node, ip)

    def _lookup(self, namespace: str) -> podspec.Lookup:
        def lookup(kind: str, name: str) -> dict[str, str] | None:
            try:
                if kind.startswith("configMap"):
                    return dict(self.core.read_namespaced_config_map(name, namespace).data or {})
                secret = self.core.read_namespaced_secret(name, namespace)
                return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
            except ApiException as e:
                if e.status == 404:
                    return None
                raise

        return lookup

    def _volumes(self, pod: dict[str, Any], sandbox: Path) -> dict[str, Path]:
        """Materialise every volume under sandbox/volumes; name -> directory."""
        ns = pod["metadata"]["namespace"]
        lookup = self._lookup(ns)
        out: dict[str, Path] = {}
        for vol in pod["spec"].get("volumes") or []:
            name = vol["name"]
            d = sandbox / "volumes" / name
            d.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in vol:
                d.chmod(0o1777)
            elif "configMap" in vol or "secret" in vol:
                kind = "configMap" if "configMap" in vol else "secret"
                src = vol[kind]
                ref = src.get("name") or src.get("secretName")
                data = lookup(kind, ref)
                if data is None:
                    if src.get("optional"):
                        continue
                    raise podspec.NotReadyYet(f"{kind} {ref} not found")
                _write_items(d, data, src.get("items"))
            elif "projected" in vol:
                for source in vol["projected"].get("sources") or []:
                    self._projected(pod, source, d, lookup)
            elif "downwardAPI" in vol:
                for item in vol["downwardAPI"].get("items") or []:
                    value = podspec.field_value(pod, item["fieldRef"]["fieldPath"], "", HOST_IP)
                    _write_file(d / item["path"], value)
            elif "persistentVolumeClaim" in vol:
                d = self._claimed(ns, vol["persistentVolumeClaim"]["claimName"])
            else:
                kinds = sorted(k for k in vol if k != "name")
                raise podspec.Unsupported(f"volume {name} ({', '.join(kinds)}) is not supported")
            out[name] = d
        return out

    def _claimed(self, namespace: str, claim: str) -> Path:
        """A bound claim's volume: the directory of its PersistentVolume on this machine
        (hostPath or local; every executing node is this machine, so it outlives pods
        and is shared by them, as a ReadWriteMany volume would be)."""
        try:
            pvc = self.api.sanitize_for_serialization(
                self.core.read_namespaced_persistent_volume_claim(claim, namespace)
            )
        except ApiException as e:
            if e.status == 404:
                raise podspec.NotReadyYet(f"persistentVolumeClaim {claim} not found") from e
            raise
        volume = pvc["spec"].get("volumeName")
        if pvc.get("status", {}).get("phase") != "Bound" or not volume:
            raise podspec.NotReadyYet(f"persistentVolumeClaim {claim} is not bound yet")
        pv = self.api.sanitize_for_serialization(self.core.read_persistent_volume(volume))
        source = pv["spec"].get("hostPath") or pv["spec"].get("local")
        if source is None:
            raise podspec.Unsupported(
                f"persistentVolume {volume}: only hostPath and local volumes are supported "
                "on executing nodes"
            )
        path = Path(source["path"])
        if not path.is_dir():
            raise podspec.NotReadyYet(f"persistentVolume {volume}: {path} is missing")
        return path

    def _projected(
        self, pod: dict[str, Any], source: dict[str, Any], d: Path, lookup: podspec.Lookup
    ) -> None:
        meta = pod["metadata"]
        if "serviceAccountToken" in source:
            sat = source["serviceAccountToken"]
            body: Any = {
                "spec": {
                    "audiences": [sat["audience"]] if sat.get("audience") else [],
                    "expirationSeconds": sat.get("expirationSeconds", TOKEN_SECONDS),
                    "boundObjectRef": {
                        "kind": "Pod",
                        "apiVersion": "v1",
                        "name": meta["name"],
                        "uid": meta["uid"],
                    },
                }
            }
            sa = pod["spec"].get("serviceAccountName") or "default"
            tr: Any = self.core.create_namespaced_service_account_token(sa, meta["namespace"], body)
            _write_file(d / sat["path"], tr.status.token)
        elif "configMap" in source or "secret" in source:
            kind = "configMap" if "configMap" in source else "secret"
            data = lookup(kind, source[kind]["name"])
            if data is None:
                if source[kind].get("optional"):
                    return
                raise podspec.NotReadyYet(f"{kind} {source[kind]['name']} not found")
            _write_items(d, data, source[kind].get("items"))
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items") or []:
                value = podspec.field_value(pod, item["fieldRef"]["fieldPath"], "", HOST_IP)
                _write_file(d / item["path"], value)

    def _container_spec(
        self, run: PodRun, c: dict[str, Any], volumes: dict[str, Path]
    ) -> dict[str, Any]:
        pod = run.pod
        base = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": "/",
            "HOSTNAME": podspec.hostname(pod),
            "KUBERNETES_SERVICE_HOST": HOST_IP,  # the API server's loopback address
            "KUBERNETES_SERVICE_PORT": str(self.api_port),
            MARKER_ENV: self.marker,
        }
        env = podspec.container_env(
            pod, c, base=base, pod_ip=run.ip, host_ip=HOST_IP, lookup=self._lookup(run.namespace)
        )
        env[MARKER_ENV] = self.marker
        env[POD_ENV] = f"{run.namespace}/{run.name}"
        argv = podspec.argv(c, env)
        tmp = run.sandbox / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        tmp.chmod(0o1777)
        mounts = []
        for m in c.get("volumeMounts") or []:
            if m["name"] not in volumes:
                raise podspec.Unsupported(f"volumeMount {m['name']} names no volume of the pod")
            source = volumes[m["name"]] / m.get("subPath", "")
            if m["mountPath"] == "/tmp":
                tmp = source
                continue
            mounts.append(
                {"source": str(source), "path": m["mountPath"], "readOnly": bool(m.get("readOnly"))}
            )
        user = podspec.user(pod, c) if self.run_as_users else None
        sc = c.get("securityContext") or {}
        return {
            "root": str(run.sandbox / "rootfs"),
            "etc": str(run.sandbox / "etc"),
            "tmp": str(tmp),
            "image_paths": self.image_paths,
            "mounts": mounts,
            "read_only_root": bool(sc.get("readOnlyRootFilesystem")),
            "hostname": podspec.hostname(pod),
            "workdir": c.get("workingDir") or "/",
            "user": None if user is None else {"uid": user.uid, "gid": user.gid},
            "groups": [] if user is None else user.groups,
            "no_new_privs": sc.get("allowPrivilegeEscalation") is False,
            "argv": argv,
            "env": env,
        }

    def _write_etc(self, run: PodRun) -> None:
        upper = run.sandbox / "etc" / "upper"
        upper.mkdir(parents=True, exist_ok=True)
        (upper / "resolv.conf").write_text(podspec.RESOLV_CONF)
        (upper / "hostname").write_text(podspec.hostname(run.pod) + "\n")

    def refresh_hosts(self) -> None:
        """Rewrite every pod's /etc/hosts in place (its overlay shows the same inode)."""
        peers = [r.peer for r in self.runs.values() if not r.deleted]
        for run in self.runs.values():
            path = run.sandbox / "etc" / "upper" / "hosts"
            content = podspec.hosts_file(run.peer, peers)
            if not path.exists() or path.read_text() != content:
                with open(path, "w") as f:
                    f.write(content)

    def _spawn(self, run: PodRun, c: dict[str, Any], sbx: dict[str, Any]) -> None:
        name = c["name"]
        logs = run.sandbox / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        spec_path = run.sandbox / f"{name}.json"
        spec_path.write_text(json.dumps(sbx))
        log_path = logs / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                [*SANDBOX, str(spec_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self._sandbox_env(),
            )
        run.containers[name] = Container(
            name, proc, log_path, podspec.now(), c.get("terminationMessagePolicy", "File")
        )
        # A record of every process start that outlives the pod (tests read who kept
        # running through an event even after the job ended and its pods are gone).
        record: dict[str, Any] = {"namespace": run.namespace, "pod": run.name, "uid": run.uid}
        record |= {"container": name, "pid": proc.pid, "time": time.time()}
        with open(self.dir.parent / START_RECORDS, "a") as f:
            f.write(json.dumps(record) + "\n")

        def wait() -> None:
            self.events.put(("exit", (run.uid, name, proc.wait())))

        threading.Thread(target=wait, daemon=True).start()

    # -- exits and stopping --------------------------------------------------------

    def exited(self, uid: str, name: str, code: int) -> None:
        run = self.runs.get(uid)
        if run is None or name not in run.containers:
            return
        c = run.containers.pop(name)
        if code < 0:  # killed by a signal: shells report 128 + signal
            code = 128 - code
        policy = run.pod["spec"].get("restartPolicy", "Always")
        log.info("pod %s/%s container %s exited with code %d", run.namespace, run.name, name, code)
        again = not run.stopping and (policy == "Always" or (policy == "OnFailure" and code != 0))
        if again:
            run.restarts[name] = run.restarts.get(name, 0) + 1
            container = next(x for x in run.pod["spec"]["containers"] if x["name"] == name)
            sbx = json.loads((run.sandbox / f"{name}.json").read_text())
            time.sleep(min(2 ** run.restarts[name], 30) / 10)
            self._spawn(run, container, sbx)
            started = {n: x.started for n, x in run.containers.items()}
            self._patch_status(
                run.pod, podspec.running_status(run.pod, run.ip, HOST_IP, started, run.restarts)
            )
            return
        tail = _tail(c.log)
        message = podspec.termination_message(tail, c.policy, code)
        run.exits[name] = podspec.Exit(code, c.started, podspec.now(), message)
        if run.containers:
            return
        if not run.deleted:
            self._patch_status(run.pod, podspec.terminated_status(run.pod, run.exits))
        self.done.add(uid)
        self._release(run)
        if run.stopping and not run.deleted:
            self.remove(run.pod)

    def stop_pod(self, run: PodRun, grace: int | None) -> None:
        """Graceful deletion: SIGTERM now, SIGKILL when the grace period is over."""
        run.stopping = True
        seconds = 30 if grace is None else int(grace)
        log.info("stopping pod %s/%s (grace %ds)", run.namespace, run.name, seconds)
        self._signal(run, signal.SIGTERM if seconds > 0 else signal.SIGKILL)
        timer = threading.Timer(seconds, lambda: self.events.put(("kill", run.uid)))
        timer.daemon = True
        timer.start()

    def forget(self, pod: dict[str, Any], *, lost: bool) -> None:
        """The pod object is gone (or its node is): kill what still runs, free its IP."""
        uid = pod["metadata"]["uid"]
        self.waiting.pop(uid, None)
        run = self.runs.get(uid)
        if run is None:
            return
        run.deleted = run.stopping = True
        self._signal(run, signal.SIGKILL)
        if not run.containers:
            self._release(run)

    def _signal(self, run: PodRun, sig: int) -> None:
        for c in run.containers.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.proc.pid, sig)

    def _release(self, run: PodRun) -> None:
        if self.runs.pop(run.uid, None) is None:
            return
        if run.node in self.free_ips:
            self.free_ips[run.node].append(IPv4Network(f"{run.ip}/32").network_address)
            self.free_ips[run.node].sort()
        self.refresh_hosts()

    def remove(self, pod: dict[str, Any]) -> None:
        """The kubelet's last word on a terminating pod: delete it for good (uid-guarded)."""
        meta = pod["metadata"]
        opts = client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])
        )
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], body=opts)

    def _patch_status(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            self.core.patch_namespaced_pod_status(
                meta["name"], meta["namespace"], {"status": status}
            )
        except ApiException as e:
            if e.status != 404:
                log.warning(
                    "cannot update status of pod %s/%s: %s",
                    meta["namespace"],
                    meta["name"],
                    e.reason,
                )

    def _log_path(self, namespace: str, pod: str, container: str) -> Path | None:
        for run in self.runs.values():
            if (run.namespace, run.name) == (namespace, pod):
                return run.sandbox / "logs" / f"{container}.log"
        matches = sorted(self.dir.glob(f"*/logs/{container}.log"), key=lambda p: p.stat().st_mtime)
        for path in reversed(matches):
            meta = path.parents[1] / "pod.json"
            if meta.exists() and json.loads(meta.read_text()) == [namespace, pod]:
                return path
        return None

    def shutdown(self) -> None:
        """Stop every pod process (SIGTERM, then SIGKILL after 5 s)."""
        runs = list(self.runs.values())
        for run in runs:
            self._signal(run, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for run in runs:
            for c in run.containers.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            self._signal(run, signal.SIGKILL)
        self.logs.stop()


def _write_file(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(content)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _write_items(d: Path, data: dict[str, str], items: list[dict[str, Any]] | None) -> None:
    if items:
        for item in items:
            if item["key"] in data:
                _write_file(d / item["path"], data[item["key"]])
    else:
        for key, value in data.items():
            _write_file(d / key, value)


def _tail(path: Path, limit: int = 16384) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - limit))
        return f.read().decode(errors="replace")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the local cluster's executing nodes.")
    parser.add_argument("--dir", required=True, help="the local cluster's state directory")
    parser.add_argument("--node", action="append", default=[], help="NAME=PODCIDR (repeatable)")
    parser.add_argument("--api-port", type=int, required=True)
    parser.add_argument(
        "--image-path", action="append", default=[], help="paths the pods' image needs"
    )
    parser.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu each node advertises")
    parser.add_argument(
        "--taint", action="store_true", help=f"taint the nodes {RUNTIME_LABEL}=process"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import urllib3

    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # local, self-signed
    nodes = dict(n.split("=", 1) for n in args.node)
    directory = Path(args.dir)
    agent = NodeAgent(
        directory=directory,
        nodes=nodes,
        api_port=args.api_port,
        image_paths=args.image_path,
        gpus=args.gpus,
        cluster_marker=str(directory),
        tainted=args.taint,
    )
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stop.set())
    agent.run()
    shutil.rmtree(agent.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
