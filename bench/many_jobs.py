"""Many jobs x 8 workers applied at once to the local control plane.

    .venv/bin/python bench/many_jobs.py [--jobs 100] [--workers 8] [--rest 60]

Each arm runs alone, on a fresh control plane with an audit log:
1. a plain client script creating exactly the objects the operator would
   (per job: Service, ConfigMap, ServiceAccount, Role, RoleBinding, the
   coordinator and worker pods; one request each), the lower bound;
2. the operator (a real `kopf run`) reconciling the same jobs applied in one
   `kubectl apply`.
For both: seconds until every pod exists and until every pod is Running (the
same test in both arms; for the operator also until every job says Running),
API requests per job (audit log, by user, one per request), the operator's
peak memory, then `--rest` seconds of steady state: its requests, writes and
LISTs at rest, and its reconcile latency percentiles (from its own histogram).
Writes JSON, with the issue's targets checked, and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from dtj_devcluster import controlplane as devcluster
from dtj_operator import api, render
from dtj_operator.cli import operator_command

ROOT = Path(__file__).resolve().parents[1]
PODS_PER_NODE = 200  # bench nodes: a /24 loopback pod CIDR each
ANY_NODE = {
    "name": "any",
    "tolerations": [{"key": "pool", "operator": "Exists", "effect": "NoSchedule"}],
}
# The targets (operator over plain client).
TARGETS = {"requests_per_job": 1.5, "seconds_until_running": 1.3, "operator_peak_memory_mib": 150}


def bench_nodes(count: int) -> list[dict[str, Any]]:
    """Extra kwok nodes so that every pod has a place (kwok runs nothing on them)."""
    capacity = {"cpu": "1000", "memory": "4Ti", "pods": str(PODS_PER_NODE)}
    return [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": f"bench-{i}",
                "labels": {"type": "kwok", "kubernetes.io/hostname": f"bench-{i}"},
                "annotations": devcluster.FAKE_NODE,
            },
            "spec": {"podCIDR": f"127.{200 + i // 250}.{i % 250}.0/24"},
            "status": {"capacity": capacity, "allocatable": capacity},
        }
        for i in range(count)
    ]


def manifests(namespace: str, jobs: int, workers: int) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": f"job-{i:03d}", "namespace": namespace},
            "spec": {"replicas": workers, "nodePools": [ANY_NODE]},
        }
        for i in range(jobs)
    ]


def kubectl(cluster: devcluster.LocalCluster, user: str, *args: str, **kw: Any) -> str:
    out = subprocess.run(
        [
            str(cluster.bin / "kubectl"),
            "--kubeconfig",
            str(cluster.directory / f"{user}.kubeconfig"),
            *args,
        ],
        check=True,
        capture_output=True,
        text=True,
        **kw,
    )
    return out.stdout


def wait(what: str, probe: Any, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if probe():
            return time.monotonic()
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")


def phases(cluster: devcluster.LocalCluster, namespace: str, kind: str) -> list[str]:
    out = kubectl(
        cluster,
        "admin",
        "get",
        kind,
        "-n",
        namespace,
        "-o",
        'jsonpath={range .items[*]}{.status.phase}{"\\n"}{end}',
    )
    return out.split()


def requests(log: Path, user: str, since: str = "") -> dict[str, int]:
    """The user's API requests from the audit log (one per auditID), by verb."""
    seen: set[str] = set()
    verbs: dict[str, int] = {}
    with open(log) as f:
        for line in f:
            e = json.loads(line)
            if e.get("user", {}).get("username") != user or e["auditID"] in seen:
                continue
            if e.get("requestReceivedTimestamp", "") < since:
                continue
            seen.add(e["auditID"])
            verbs[e.get("verb", "?")] = verbs.get(e.get("verb", "?"), 0) + 1
    return verbs


def fresh_cluster(tmp: Path, name: str, pods: int) -> devcluster.LocalCluster:
    cluster = devcluster.LocalCluster(tmp / name, devcluster.build())
    cluster.start(audit=True, process_nodes=0)
    kubectl(cluster, "admin", "apply", "-f", str(ROOT / "crds"))
    nodes = {"apiVersion": "v1", "kind": "List", "items": bench_nodes(-(-pods // PODS_PER_NODE))}
    kubectl(cluster, "admin", "apply", "-f", "-", input=json.dumps(nodes))
    kubectl(
        cluster,
        "admin",
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        f"crd/{api.PLURAL}.{api.GROUP}",
    )
    return cluster


def namespace(cluster: devcluster.LocalCluster, ns: str) -> None:
    kubectl(cluster, "admin", "create", "namespace", ns)

    def has_default_sa() -> bool:
        cmd = [str(cluster.bin / "kubectl"), "--kubeconfig", str(cluster.kubeconfig)]
        got = subprocess.run([*cmd, "get", "sa", "default", "-n", ns], capture_output=True)
        return got.returncode == 0

    wait("the namespace's default service account", has_default_sa, 60)


def baseline(cluster: devcluster.LocalCluster, jobs: int, workers: int, timeout: float) -> dict:
    import urllib3
    from kubernetes import client, config

    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # the local test CA
    ns = "bench"
    namespace(cluster, ns)
    api_client = config.new_client_from_config(str(cluster.directory / "bench-client.kubeconfig"))
    core, rbac = client.CoreV1Api(api_client), client.RbacAuthorizationV1Api(api_client)
    create = {
        "Pod": core.create_namespaced_pod,
        "Service": core.create_namespaced_service,
        "ConfigMap": core.create_namespaced_config_map,
        "ServiceAccount": core.create_namespaced_service_account,
        "Role": rbac.create_namespaced_role,
        "RoleBinding": rbac.create_namespaced_role_binding,
    }
    objs = []
    for m in manifests(ns, jobs, workers):
        job = api.DecentralizedTrainingJob.from_body(m)
        body = {**m, "metadata": {**m["metadata"], "uid": "none"}}
        for o in render.desired_children(job, body):
            # No owner (the garbage collector would reap them), no finalizer to release.
            o["metadata"].pop("ownerReferences")
            o["metadata"].pop("finalizers", None)
            objs.append(o)
    pods = jobs * (workers + 1)
    t0 = time.monotonic()
    for o in objs:
        create[o["kind"]](ns, o, _preload_content=False).read()
    t_exist = time.monotonic()
    t_run = wait(
        "all pods Running", lambda: phases(cluster, ns, "pods").count("Running") == pods, timeout
    )
    verbs = requests(cluster.audit_log, "bench-client")
    return {
        "seconds_until_pods_exist": t_exist - t0,
        "seconds_until_running": t_run - t0,
        "requests": sum(verbs.values()),
        "requests_by_verb": verbs,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reconcile_percentiles(metrics_text: str) -> dict[str, float]:
    """p50/p90/p99 of dtj_operator_reconcile_duration_seconds (bucket upper bounds)."""
    buckets: list[tuple[float, float]] = []
    for line in metrics_text.splitlines():
        if line.startswith("dtj_operator_reconcile_duration_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((math.inf if le == "+Inf" else float(le), float(line.split()[-1])))
    total = buckets[-1][1] if buckets else 0
    out = {"passes": total}
    for q in (0.5, 0.9, 0.99):
        out[f"p{int(q * 100)}_seconds"] = next((le for le, n in buckets if n >= q * total), 0.0)
    return out


def operated(
    cluster: devcluster.LocalCluster, jobs: int, workers: int, timeout: float, rest: float
) -> dict[str, Any]:
    ns = "bench"
    namespace(cluster, ns)
    log = open(cluster.directory / "logs" / "operator.log", "wb")  # noqa: SIM115
    port = free_port()
    env = {
        "KUBECONFIG": str(cluster.directory / "dtj-operator.kubeconfig"),
        "PATH": "/usr/bin:/bin",
        "DTJ_OPERATOR_METRICS_PORT": str(port),
        "DTJ_OPERATOR_METRICS_ADDR": "127.0.0.1",
        "HOME": os.environ.get("HOME", "/tmp"),
    }
    proc = subprocess.Popen(
        [*operator_command(ns), "--quiet"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    try:
        time.sleep(5)  # let kopf start watching before the burst (excluded from the timings)
        pods = jobs * (workers + 1)
        t0 = time.monotonic()
        kubectl(
            cluster,
            "bench-client",
            "apply",
            "-f",
            "-",
            input=yaml.safe_dump_all(manifests(ns, jobs, workers)),
        )
        t_exist = wait(
            "all pods created", lambda: len(phases(cluster, ns, "pods")) >= pods, timeout
        )
        t_run = wait(
            "all pods Running",
            lambda: phases(cluster, ns, "pods").count("Running") == pods,
            timeout,
        )
        t_jobs = wait(
            "all jobs Running", lambda: phases(cluster, ns, "dtj").count("Running") == jobs, timeout
        )
        time.sleep(10)  # let the last passes finish, then count the burst
        burst = requests(cluster.audit_log, "dtj-operator")
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        time.sleep(rest)
        at_rest = requests(cluster.audit_log, "dtj-operator", since)
        peak_kib = 0
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak_kib = int(line.split()[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            latency = reconcile_percentiles(r.read().decode())
        writes = sum(n for v, n in at_rest.items() if v in ("create", "update", "patch", "delete"))
        return {
            "seconds_until_pods_exist": t_exist - t0,
            "seconds_until_running": t_run - t0,
            "seconds_until_jobs_running": t_jobs - t0,
            "requests": sum(burst.values()),
            "requests_by_verb": burst,
            "operator_peak_memory_mib": peak_kib / 1024,
            "reconcile_latency": latency,
            "at_rest": {
                "seconds": rest,
                "requests_per_minute": sum(at_rest.values()) * 60 / rest,
                "writes": writes,
                "lists": at_rest.get("list", 0),
                "by_verb": at_rest,
            },
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--rest", type=float, default=60, help="seconds of steady state measured")
    parser.add_argument("--skip-baseline", action="store_true", help="the operator arm only")
    parser.add_argument("--out", default="bench/results/many_jobs.json")
    args = parser.parse_args()
    pods = args.jobs * (args.workers + 1)
    base: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dtj-bench-") as tmp:
        if not args.skip_baseline:
            cluster = fresh_cluster(Path(tmp), "baseline", pods)
            try:
                base = baseline(cluster, args.jobs, args.workers, args.timeout)
            finally:
                cluster.stop()
            print(f"plain client: {json.dumps(base)}", flush=True)
        cluster = fresh_cluster(Path(tmp), "operated", pods)
        try:
            op = operated(cluster, args.jobs, args.workers, args.timeout, args.rest)
        finally:
            cluster.stop()
        print(f"operator:     {json.dumps(op)}", flush=True)
    report: dict[str, Any] = {
        "jobs": args.jobs,
        "workers_per_job": args.workers,
        "operator": {**op, "requests_per_job": op["requests"] / args.jobs},
    }
    if base:
        report["plain_client"] = {**base, "requests_per_job": base["requests"] / args.jobs}
        ratios = {
            "seconds_until_pods_exist": op["seconds_until_pods_exist"]
            / base["seconds_until_pods_exist"],
            "seconds_until_running": op["seconds_until_running"] / base["seconds_until_running"],
            "requests_per_job": op["requests"] / base["requests"],
        }
        report["ratios_operator_over_plain"] = ratios
        report["targets_met"] = {
            "requests_per_job": ratios["requests_per_job"] <= TARGETS["requests_per_job"],
            "seconds_until_running": ratios["seconds_until_running"]
            <= TARGETS["seconds_until_running"],
            "operator_peak_memory_mib": op["operator_peak_memory_mib"]
            <= TARGETS["operator_peak_memory_mib"],
            "no_writes_or_lists_at_rest": op["at_rest"]["writes"] == 0
            and op["at_rest"]["lists"] == 0,
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(
        f"operator: {op['requests'] / args.jobs:.1f} requests per job, "
        f"pods Running in {op['seconds_until_running']:.1f}s, "
        f"peak memory {op['operator_peak_memory_mib']:.0f} MiB, "
        f"reconcile p50/p99 {op['reconcile_latency']['p50_seconds']}/"
        f"{op['reconcile_latency']['p99_seconds']}s, "
        f"{op['at_rest']['requests_per_minute']:.1f} requests/min at rest"
    )
    if base:
        r = report["ratios_operator_over_plain"]
        print(
            f"operator / plain client: requests per job x{r['requests_per_job']:.2f}, "
            f"pods Running x{r['seconds_until_running']:.2f}; targets met: "
            f"{report['targets_met']}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
