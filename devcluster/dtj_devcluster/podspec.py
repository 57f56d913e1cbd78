"""Pure pieces of the process runtime: what a pod's process is given, and its status.

No client and no processes here, so the kubelet-like rules (downward API,
$(VAR) expansion, security context, /etc/hosts, pod phases) are unit-tested.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

CLUSTER_DOMAIN = "cluster.local"
TERMINATION_MESSAGE_LIMIT = 4096
TERMINATION_MESSAGE_LINES = 80
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class Unsupported(Exception):
    """The pod asks for something the process runtime cannot do; it fails with this."""


class NotReadyYet(Exception):
    """Something the pod needs (a ConfigMap, a Secret) is not there yet; retried."""


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known names are replaced, $$ escapes, others stay."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, value)


def field_value(pod: dict[str, Any], path: str, pod_ip: str, host_ip: str) -> str:
    """A downward-API fieldRef of `pod` (the fields the kubelet supports)."""
    meta, spec = pod["metadata"], pod["spec"]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple: dict[str, Callable[[], str]] = {
        "metadata.name": lambda: meta["name"],
        "metadata.namespace": lambda: meta["namespace"],
        "metadata.uid": lambda: meta["uid"],
        "spec.nodeName": lambda: spec.get("nodeName", ""),
        "spec.serviceAccountName": lambda: spec.get("serviceAccountName", "default"),
        "status.podIP": lambda: pod_ip,
        "status.podIPs": lambda: pod_ip,
        "status.hostIP": lambda: host_ip,
        "status.hostIPs": lambda: host_ip,
    }
    if path not in simple:
        raise Unsupported(f"fieldRef {path!r} is not supported by the process runtime")
    return simple[path]()


# (kind, name) -> the data of that ConfigMap ("configMap...") or Secret (decoded), None if absent
Lookup = Callable[[str, str], dict[str, str] | None]


def container_env(
    pod: dict[str, Any],
    container: dict[str, Any],
    *,
    base: Mapping[str, str],
    pod_ip: str,
    host_ip: str,
    lookup: Lookup,
) -> dict[str, str]:
    """The environment of one container: base (image, cluster), envFrom, then env in order."""
    env = dict(base)
    for src in container.get("envFrom") or []:
        for kind in ("configMapRef", "secretRef"):
            ref = src.get(kind)
            if ref is None:
                continue
            data = lookup(kind, ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise NotReadyYet(f"{kind} {ref['name']} not found")
            for k, v in data.items():
                env[src.get("prefix", "") + k] = v
    for var in container.get("env") or []:
        name = var["name"]
        if "value" in var or "valueFrom" not in var:
            env[name] = expand(str(var.get("value", "")), env)
            continue
        vf = var["valueFrom"]
        if "fieldRef" in vf:
            env[name] = field_value(pod, vf["fieldRef"]["fieldPath"], pod_ip, host_ip)
        elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
            kind = "configMapKeyRef" if "configMapKeyRef" in vf else "secretKeyRef"
            ref = vf[kind]
            value = (lookup(kind, ref["name"]) or {}).get(ref["key"])
            if value is None:
                if ref.get("optional"):
                    continue
                raise NotReadyYet(f"{kind} {ref['name']}/{ref['key']} not found")
            env[name] = value
        else:
            raise Unsupported(f"env {name}: valueFrom {sorted(vf)} is not supported")
    return env


def argv(container: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    """command + args with $(VAR) expanded; images have no entrypoint here, so command is needed."""
    command = container.get("command") or []
    if not command:
        raise Unsupported(
            f"container {container['name']} has no command: the process runtime runs the "
            "project's virtualenv as the image and has no image entrypoint"
        )
    return [expand(a, env) for a in [*command, *(container.get("args") or [])]]


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    groups: list[int]


def user(pod: dict[str, Any], container: dict[str, Any]) -> User | None:
    """Who the process runs as (container securityContext over pod's); None keeps root."""
    psc = pod["spec"].get("securityContext") or {}
    csc = container.get("securityContext") or {}
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    if uid is None:
        return None
    gid = csc.get("runAsGroup", psc.get("runAsGroup", uid))
    groups = [g for g in [psc.get("fsGroup"), *(psc.get("supplementalGroups") or [])] if g]
    return User(int(uid), int(gid), sorted({int(g) for g in groups}))


def hostname(pod: dict[str, Any]) -> str:
    return str(pod["spec"].get("hostname") or pod["metadata"]["name"])


def fqdn(namespace: str, host: str, subdomain: str | None) -> list[str]:
    """The DNS names of a pod with hostname/subdomain (a headless Service's records)."""
    if not subdomain:
        return []
    svc = f"{host}.{subdomain}.{namespace}.svc"
    return [f"{svc}.{CLUSTER_DOMAIN}", svc]


@dataclass(frozen=True)
class Peer:
    """An executing pod as the hosts files list it."""

    namespace: str
    hostname: str
    subdomain: str | None
    ip: str


def hosts_file(me: Peer, peers: list[Peer]) -> str:
    """/etc/hosts of a pod: itself, then every executing pod's DNS names.

    Stands in for cluster DNS: names of pods in the pod's own namespace also
    resolve in their short `host.subdomain` form.
    """
    lines = [
        "127.0.0.1\tlocalhost",
        f"{me.ip}\t{' '.join([*fqdn(me.namespace, me.hostname, me.subdomain), me.hostname])}",
    ]
    for p in sorted(peers, key=lambda p: (p.namespace, p.hostname, p.ip)):
        if p == me:
            continue
        names = fqdn(p.namespace, p.hostname, p.subdomain)
        if p.namespace == me.namespace and p.subdomain:
            names.append(f"{p.hostname}.{p.subdomain}")
        if names:
            lines.append(f"{p.ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


RESOLV_CONF = (
    "# The local cluster has no DNS server: names come from /etc/hosts, and a\n"
    "# lookup that misses fails at once on loopback instead of leaving the machine.\n"
    "nameserver 127.0.0.1\noptions attempts:1 timeout:1\n"
)


def termination_message(log_tail: str, policy: str, exit_code: int) -> str:
    """FallbackToLogsOnError: the last lines of the log when the container failed."""
    if policy != "FallbackToLogsOnError" or exit_code == 0:
        return ""
    lines = log_tail.splitlines()[-TERMINATION_MESSAGE_LINES:]
    return "\n".join(lines)[-TERMINATION_MESSAGE_LIMIT:]


def running_status(
    pod: dict[str, Any], ip: str, host_ip: str, started: dict[str, str], restarts: dict[str, int]
) -> dict[str, Any]:
    """The status patch of a pod whose containers have started."""
    ts = now()
    conds = [
        {"type": t, "status": "True", "lastTransitionTime": ts}
        for t in ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")
    ]
    return {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": (pod.get("status") or {}).get("startTime") or ts,
        "conditions": conds,
        "containerStatuses": [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "ready": True,
                "started": True,
                "restartCount": restarts.get(c["name"], 0),
                "state": {"running": {"startedAt": started[c["name"]]}, "waiting": None},
            }
            for c in pod["spec"]["containers"]
        ],
    }


@dataclass(frozen=True)
class Exit:
    code: int
    started: str
    finished: str
    message: str


def terminated_status(pod: dict[str, Any], exits: dict[str, Exit]) -> dict[str, Any]:
    """The status patch once every container has exited for good (restartPolicy)."""
    failed = any(e.code != 0 for e in exits.values())
    conds = [
        {"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": now()}
        for t in ("ContainersReady", "Ready")
    ]
    statuses = []
    for c in pod["spec"]["containers"]:
        e = exits[c["name"]]
        term = {
            "exitCode": e.code,
            "reason": "Completed" if e.code == 0 else "Error",
            "startedAt": e.started,
            "finishedAt": e.finished,
        }
        if e.message:
            term["message"] = e.message
        statuses.append(
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "ready": False,
                "started": False,
                "state": {"terminated": term, "running": None, "waiting": None},
            }
        )
    return {
        "phase": "Failed" if failed else "Succeeded",
        "conditions": conds,
        "containerStatuses": statuses,
    }


def waiting_status(pod: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    return {
        "containerStatuses": [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "ready": False,
                "started": False,
                "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": message}},
            }
            for c in pod["spec"]["containers"]
        ]
    }


def failed_status(reason: str, message: str) -> dict[str, Any]:
    """A pod the runtime cannot run at all (kubelet's admission-style failure)."""
    return {"phase": "Failed", "reason": reason, "message": message}
