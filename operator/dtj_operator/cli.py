"""`dtj`: the user-facing command line.

dtj local FILE          train a DecentralizedTrainingJob manifest with local processes
dtj operator            run the operator (kopf) against the current kubeconfig
dtj crd                 print the generated CRD
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

import pydantic
import yaml

from .api import DecentralizedTrainingJob


def load_manifest(path: Path) -> DecentralizedTrainingJob:
    """Parse and validate a manifest; errors name the field to change."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"cannot read {path}: {e}") from None
    jobs = [d for d in docs if d.get("kind") == "DecentralizedTrainingJob"]
    if len(jobs) != 1:
        raise SystemExit(f"{path} must hold exactly one DecentralizedTrainingJob")
    try:
        return DecentralizedTrainingJob.from_body(jobs[0])
    except pydantic.ValidationError as e:
        problems = "; ".join(
            f"field {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise SystemExit(f"{path} is not a valid DecentralizedTrainingJob: {problems}") from None


def cmd_local(args: argparse.Namespace) -> int:
    from dtj_trainer import launcher

    from . import render

    job = load_manifest(Path(args.file))
    cfg = render.trainer_config(job, store_host="127.0.0.1")
    cfg = cfg.model_copy(update={"backend": "gloo"})  # local processes run on the CPU
    if args.replicas:
        cfg = cfg.model_copy(update={"replicas": args.replicas})
    print(f"job {cfg.job}: {args.file}", flush=True)
    command, working_dir = local_command(job, Path(args.file))
    try:
        result = launcher.run(
            cfg,
            extra_env=local_env(job, cfg.replicas, args),
            command=command,
            working_dir=working_dir,
        )
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    how = f"{cfg.replicas} workers, {cfg.algorithm.name}, wall time {result.wall_seconds:.1f}s"
    if result.averaged_accuracy is None:  # the user's loop: what it reported
        numbers = ", ".join(f"{k} {v:.4g}" for k, v in (result.metrics or {}).items())
        print(f"Result: {numbers or 'no numbers reported'} (workers' mean), {how}", flush=True)
        return 0
    lo, hi = min(result.worker_accuracies), max(result.worker_accuracies)
    print(
        f"Result: test accuracy {100 * result.averaged_accuracy:.1f}% on {cfg.training.dataset} "
        f"(averaged model; workers {100 * lo:.1f}-{100 * hi:.1f}%), {how}",
        flush=True,
    )
    return 0


def local_command(
    job: DecentralizedTrainingJob, manifest: Path
) -> tuple[list[str] | None, Path | None]:
    """What local workers run: the template's command and args (the user's script), with
    `python` meaning this interpreter, in its workingDir taken relative to the
    manifest's folder; (None, None) for the built-in trainer."""
    template = job.spec.template
    if not template.command:
        return None, None
    command = list(template.command) + list(template.args)
    if command[0] in ("python", "python3"):
        command[0] = sys.executable
    where = manifest.parent / template.working_dir if template.working_dir else None
    return command, where


def local_env(
    job: DecentralizedTrainingJob, replicas: int, args: argparse.Namespace
) -> dict[str, dict[str, str]]:
    """Per-slot environment of local workers: their pools' speed hints (as the operator
    renders them) and the benchmark knobs for modelled, heterogeneous compute."""
    from . import render

    pools = render.assign_pools(
        job.model_copy(update={"spec": job.spec.model_copy(update={"replicas": replicas})})
    )
    env: dict[str, dict[str, str]] = {str(s): {} for s in range(replicas)}
    for slot, pool in enumerate(pools):
        if pool is not None:
            env[str(slot)]["DTJ_SPEED_HINT"] = str(pool.speed)
        if args.simulate_sample_seconds:
            env[str(slot)]["DTJ_SIMULATE_SAMPLE_SECONDS"] = str(args.simulate_sample_seconds)
    for item in args.simulate_slowdown or []:
        slot, _, factor = item.partition("=")
        if slot not in env or not factor:
            raise SystemExit(f"--simulate-slowdown {item}: expected SLOT=FACTOR, SLOT < {replicas}")
        env[slot]["DTJ_SIMULATE_SLOWDOWN"] = factor
    return env


def operator_command(namespace: str | None = None, liveness: str | None = None) -> list[str]:
    """How the operator is run (here, in tests and benchmarks): kopf over our handlers.

    `namespace` may be a kopf glob such as `e2e-*`; None watches all namespaces.
    `liveness` is kopf's health endpoint (e.g. http://0.0.0.0:8081/healthz).
    """
    cmd = [sys.executable, "-m", "kopf", "run", "--standalone", "-m", "dtj_operator.handlers"]
    if namespace and any(c in namespace for c in "*?[,!"):
        # A pattern: one cluster-wide watch per kind, filtered here. kopf would start
        # watchers per matching namespace, and with indexes every new namespace holds
        # all handling until its lists arrive (a namespace deleted meanwhile stalls it).
        cmd = ["env", f"DTJ_NAMESPACES={namespace}", *cmd, "--all-namespaces"]
    elif namespace:
        # One namespace: nothing to discover (and a Role there grants no namespace
        # listing, which kopf would retry for half a minute before starting).
        cmd = ["env", "DTJ_ONE_NAMESPACE=1", *cmd, f"--namespace={namespace}"]
    else:
        cmd += ["--all-namespaces"]
    return cmd + ([f"--liveness={liveness}"] if liveness else [])


def cmd_operator(args: argparse.Namespace) -> int:
    cmd = operator_command(args.namespace, args.liveness)
    if args.leader_elect:
        from . import leader

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        election = leader.Election(
            namespace=args.lease_namespace or os.environ.get("POD_NAMESPACE") or "default",
            identity=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
            name=args.lease_name,
        )
        return leader.run(election, cmd, args.liveness)
    os.execvp(cmd[0], cmd)


def cmd_release_workers(args: argparse.Namespace) -> int:
    """Lift the tracking finalizer off every worker pod: the last word of an
    operator going away (the chart's pre-delete hook), so no pod, job or
    namespace waits for an operator that will not come back."""
    from . import render
    from .cluster import Cluster

    cluster = Cluster()
    selector = render.worker_selector_all()
    if args.namespace:
        pods = cluster.core.list_namespaced_pod(args.namespace, label_selector=selector)
    else:
        pods = cluster.core.list_pod_for_all_namespaces(label_selector=selector)
    released = 0
    for item in pods.items:
        pod = cluster.core.api_client.sanitize_for_serialization(item)
        if render.tracked(pod):
            cluster.release(pod, render.TRACKING_FINALIZER)
            released += 1
    where = f"namespace {args.namespace}" if args.namespace else "all namespaces"
    print(f"released {released} worker pod(s) in {where} from {render.TRACKING_FINALIZER}")
    return 0


def cmd_crd(_: argparse.Namespace) -> int:
    from . import crdgen

    print(crdgen.render(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dtj", description="Decentralized training jobs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("local", help="train a manifest with local worker processes")
    p.add_argument("file", help="a DecentralizedTrainingJob manifest")
    p.add_argument("--replicas", type=int, help="override spec.replicas")
    p.add_argument(
        "--simulate-sample-seconds",
        type=float,
        help="benchmark knob: modelled compute seconds per sample on every worker",
    )
    p.add_argument(
        "--simulate-slowdown",
        action="append",
        metavar="SLOT=FACTOR",
        help="benchmark knob: make one worker's compute FACTOR times slower (repeatable)",
    )
    p.set_defaults(func=cmd_local)
    p = sub.add_parser("operator", help="run the operator against the current kubeconfig")
    p.add_argument("--namespace", help="watch one namespace (default: all)")
    p.add_argument(
        "--liveness",
        metavar="URL",
        help="serve kopf's liveness probe there, e.g. http://0.0.0.0:8081/healthz",
    )
    p.add_argument(
        "--leader-elect",
        action="store_true",
        help="run only while holding the Lease --lease-name (for several replicas)",
    )
    p.add_argument(
        "--lease-name",
        default="dtj-operator",
        help="the Lease the replicas share (the chart: its release's full name, so two "
        "releases in one namespace do not take turns)",
    )
    p.add_argument(
        "--lease-namespace",
        help="namespace of the Lease (default: $POD_NAMESPACE, else default)",
    )
    p.set_defaults(func=cmd_operator)
    p = sub.add_parser(
        "release-workers",
        help="remove the operator's finalizer from every worker pod (before uninstalling it)",
    )
    p.add_argument("--namespace", help="only this namespace (default: all)")
    p.set_defaults(func=cmd_release_workers)
    p = sub.add_parser("crd", help="print the generated CRD")
    p.set_defaults(func=cmd_crd)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
