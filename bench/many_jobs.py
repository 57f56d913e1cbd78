"""100 jobs x 8 workers applied at once to the local control plane.

    .venv/bin/python bench/many_jobs.py [--jobs 100] [--workers 8]

Starts the pinned local control plane with an audit log, then measures:
1. a plain client script creating exactly the objects the operator would
   (Service, ConfigMap, coordinator and worker pods per job; one request
   each), the lower bound;
2. the operator (a real `kopf run`) reconciling the same jobs applied in one
   `kubectl apply`.
For both: seconds until every pod exists and until every pod is Running
(for the operator: every job's status.phase is Running), API requests per
job (from the audit log, by user), and the operator's peak memory. Writes
JSON and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from dtj_devcluster import controlplane as devcluster
from dtj_operator import api, render
from dtj_operator.cli import operator_command

ROOT = Path(__file__).resolve().parents[1]
ANY_NODE = {
    "name": "any",
    "tolerations": [{"key": "pool", "operator": "Exists", "effect": "NoSchedule"}],
}


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


def pod_phases(cluster: devcluster.LocalCluster, namespace: str) -> list[str]:
    out = kubectl(
        cluster,
        "admin",
        "get",
        "pods",
        "-n",
        namespace,
        "-o",
        'jsonpath={range .items[*]}{.status.phase}{"\\n"}{end}',
    )
    return out.split()


def audit_counts(log: Path, user: str, namespace: str) -> int:
    n = 0
    with open(log) as f:
        for line in f:
            e = json.loads(line)
            if e.get("user", {}).get("username") != user:
                continue
            ns = (e.get("objectRef") or {}).get("namespace")
            if ns in (namespace, None):
                n += 1
    return n


def baseline(
    cluster: devcluster.LocalCluster, ns: str, jobs: int, workers: int, timeout: float
) -> dict[str, Any]:
    from kubernetes import client, config

    kubectl(cluster, "admin", "create", "namespace", ns)
    api_client = config.new_client_from_config(str(cluster.directory / "bench-client.kubeconfig"))
    core = client.CoreV1Api(api_client)
    objs = []
    for m in manifests(ns, jobs, workers):
        job = api.DecentralizedTrainingJob.from_body(m)
        body = {**m, "metadata": {**m["metadata"], "uid": "none"}}
        for o in render.desired_children(job, body):
            o["metadata"].pop("ownerReferences")  # no owner: the garbage collector would reap them
            objs.append(o)
    wait(
        "service account",
        lambda: (
            subprocess.run(
                [
                    str(cluster.bin / "kubectl"),
                    "--kubeconfig",
                    str(cluster.kubeconfig),
                    "get",
                    "sa",
                    "default",
                    "-n",
                    ns,
                ],
                capture_output=True,
            ).returncode
            == 0
        ),
        60,
    )
    t0 = time.monotonic()
    for o in objs:
        create = {
            "Pod": core.create_namespaced_pod,
            "Service": core.create_namespaced_service,
            "ConfigMap": core.create_namespaced_config_map,
        }[o["kind"]]
        create(ns, o)
    pods = jobs * (workers + 1)
    t_exist = time.monotonic()
    t_run = wait(
        "baseline pods running", lambda: pod_phases(cluster, ns).count("Running") == pods, timeout
    )
    return {
        "seconds_until_pods_exist": t_exist - t0,
        "seconds_until_running": t_run - t0,
        "requests": audit_counts(cluster.audit_log, "bench-client", ns),
    }


def operated(
    cluster: devcluster.LocalCluster, ns: str, jobs: int, workers: int, timeout: float
) -> dict[str, Any]:
    kubectl(cluster, "admin", "create", "namespace", ns)
    log = open(cluster.directory / "logs" / "operator.log", "wb")  # noqa: SIM115
    env = {
        "KUBECONFIG": str(cluster.directory / "dtj-operator.kubeconfig"),
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.Popen(
        operator_command(ns),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    try:
        time.sleep(3)  # let kopf start watching before the burst (excluded from the timings)
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
        t_exist = wait("all pods created", lambda: len(pod_phases(cluster, ns)) >= pods, timeout)

        def all_running() -> bool:
            out = kubectl(
                cluster,
                "admin",
                "get",
                "dtj",
                "-n",
                ns,
                "-o",
                'jsonpath={range .items[*]}{.status.phase}{"\\n"}{end}',
            )
            return out.split().count("Running") == jobs

        t_run = wait("all jobs Running", all_running, timeout)
        time.sleep(5)  # let the operator settle, then count its requests
        peak_kib = 0
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak_kib = int(line.split()[1])
        return {
            "seconds_until_pods_exist": t_exist - t0,
            "seconds_until_running": t_run - t0,
            "requests": audit_counts(cluster.audit_log, "dtj-operator", ns),
            "operator_peak_memory_mib": peak_kib / 1024,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default="bench/results/many_jobs.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dtj-bench-") as tmp:
        cluster = devcluster.LocalCluster(Path(tmp) / "cluster", devcluster.build())
        cluster.start(audit=True, process_nodes=0)
        try:
            kubectl(cluster, "admin", "apply", "-f", str(ROOT / "crds"))
            kubectl(
                cluster,
                "admin",
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                f"crd/{api.PLURAL}.{api.GROUP}",
            )
            base = baseline(cluster, "baseline", args.jobs, args.workers, args.timeout)
            print(f"plain client: {json.dumps(base)}", flush=True)
            op = operated(cluster, "operated", args.jobs, args.workers, args.timeout)
            print(f"operator:     {json.dumps(op)}", flush=True)
        finally:
            cluster.stop()
    report = {
        "jobs": args.jobs,
        "workers_per_job": args.workers,
        "plain_client": {**base, "requests_per_job": base["requests"] / args.jobs},
        "operator": {**op, "requests_per_job": op["requests"] / args.jobs},
        "ratios_operator_over_plain": {
            "seconds_until_pods_exist": op["seconds_until_pods_exist"]
            / base["seconds_until_pods_exist"],
            "seconds_until_running": op["seconds_until_running"] / base["seconds_until_running"],
            "requests_per_job": op["requests"] / base["requests"],
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    r = report["ratios_operator_over_plain"]
    print(
        f"operator / plain client: pods exist x{r['seconds_until_pods_exist']:.1f}, "
        f"running x{r['seconds_until_running']:.1f}, "
        f"requests per job x{r['requests_per_job']:.1f}; "
        f"operator peak memory {op['operator_peak_memory_mib']:.0f} MiB; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
