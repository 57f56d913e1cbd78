"""Pure functions from a job to the child objects it should have.

No client, no I/O: reconcile compares what these return with what exists.
Children are: a headless Service (stable DNS for the coordinator and the
workers, published before readiness so rendezvous can start), a ConfigMap
holding the TrainerConfig, the coordinator pod (the membership store, kept off
preemptible nodes) and one pod per worker slot.
"""

from __future__ import annotations

import json
from typing import Any

from dtj_trainer.config import TrainerConfig
from kubernetes.utils import parse_quantity

from . import api
from .observed import SPEC_DIGEST, digest

STORE_PORT = 29400
METRICS_PORT = 9400
CONFIG_DIR = api.CONFIG_DIR
CONFIG_KEY = "config.json"
LABEL_JOB = f"{api.GROUP}/job"
LABEL_SLOT = f"{api.GROUP}/slot"
LABEL_POOL = f"{api.GROUP}/pool"
LABEL_COMPONENT = "app.kubernetes.io/component"
MANAGED_BY = "dtj-operator"
WORKER, COORDINATOR = "worker", "coordinator"
GPU_RESOURCE = "nvidia.com/gpu"
RUN_AS_USER = 1000
PORTS = {
    WORKER: [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
    COORDINATOR: [{"name": "store", "containerPort": STORE_PORT, "protocol": "TCP"}],
}
# Let node autoscalers scale down around workers (they are elastic: a moved worker is
# a preemption its peers shrug off; without this, their emptyDir would pin the node),
# but not move the coordinator (it holds the job's membership store).
SAFE_TO_EVICT = "cluster-autoscaler.kubernetes.io/safe-to-evict"
DO_NOT_DISRUPT = "karpenter.sh/do-not-disrupt"
DEFAULT_ANNOTATIONS = {
    WORKER: {SAFE_TO_EVICT: "true"},
    COORDINATOR: {SAFE_TO_EVICT: "false", DO_NOT_DISRUPT: "true"},
}
# Workers and the coordinator listen on their pod's IP (gloo, store, metrics).
TRAINER_COMMAND = ("python", "-m", "dtj_trainer")  # the built-in trainer
POD_IP_ENV = {"name": "DTJ_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def labels(job: api.DecentralizedTrainingJob, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "dtj-trainer",
        "app.kubernetes.io/instance": job.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_COMPONENT: component,
        LABEL_JOB: job.name,
    }


def worker_selector(job_name: str) -> str:
    """The label selector of a job's workers (status.selector, for the scale subresource)."""
    return f"{LABEL_JOB}={job_name},{LABEL_COMPONENT}={WORKER}"


def worker_selector_all() -> str:
    """The label selector of every job's workers."""
    return f"app.kubernetes.io/managed-by={MANAGED_BY},{LABEL_COMPONENT}={WORKER}"


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


# Holds a worker pod until the operator has counted how it ended (as the Job
# controller's batch.kubernetes.io/job-tracking): no loss goes uncounted when the
# operator misses the pod's events (restarted, between leaders, a watch gap).
TRACKING_FINALIZER = "training.dtj.io/worker-tracking"
# Set on a pod the operator moves off a node that announced its end: why, in words.
ANNOTATION_MOVED = "training.dtj.io/moved-away"
# Set on a worker the operator removes on purpose (suspended, scaled away) before its
# delete: seen terminating after a resume or a scale back up, it is not a loss.
ANNOTATION_RELEASED = "training.dtj.io/released"


def tracked(pod: dict[str, Any]) -> bool:
    return TRACKING_FINALIZER in (pod["metadata"].get("finalizers") or [])


def owned_by(obj: dict[str, Any], uid: str | None) -> bool:
    """Whether `obj` belongs to the job with that uid: a job re-created under the
    same name must not adopt (or count the losses of) its predecessor's pods."""
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return uid is not None and any(r.get("uid") == uid for r in refs)


def _meta(
    job: api.DecentralizedTrainingJob, name: str, component: str, owner: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": labels(job, component),
        "ownerReferences": [owner],
    }


def worker_name(job_name: str, slot: int) -> str:
    return f"{job_name}-worker-{slot}"


def coordinator_name(job_name: str) -> str:
    return f"{job_name}-coordinator"


def uses_gpu(job: api.DecentralizedTrainingJob) -> bool:
    """A GPU limit above zero (`nvidia.com/gpu: "0"` is a CPU pod: gloo, not nccl)."""
    limits = job.spec.template.resources.get("limits", {}) or {}
    return parse_quantity(limits.get(GPU_RESOURCE, 0)) > 0


def trainer_config(
    job: api.DecentralizedTrainingJob,
    *,
    store_host: str | None = None,
    store_port: int = STORE_PORT,
) -> TrainerConfig:
    """What every worker of `job` is told (the launcher passes a loopback store)."""
    s = job.spec
    return TrainerConfig(
        job=job.name or "local",
        replicas=s.replicas,
        min_replicas=s.min_replicas,
        algorithm=s.algorithm,
        optimizer=s.optimizer,
        batching=s.batching,
        training=s.training,
        store_host=store_host or f"{COORDINATOR}.{job.name}.{job.namespace}.svc",
        store_port=store_port,
        backend="nccl" if uses_gpu(job) else "gloo",
    )


def service(job: api.DecentralizedTrainingJob, owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, job.name, "network", owner),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: job.name},
            "ports": [{"name": "store", "port": STORE_PORT, "targetPort": STORE_PORT}],
        },
    }


def config_map(job: api.DecentralizedTrainingJob, owner: dict[str, Any]) -> dict[str, Any]:
    cfg = trainer_config(job)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(job, f"{job.name}-config", "config", owner),
        "data": {CONFIG_KEY: json.dumps(cfg.wire(), indent=2, sort_keys=True)},
    }


def assign_pools(job: api.DecentralizedTrainingJob) -> list[api.NodePool | None]:
    """The pool of each worker slot: pools in spec order, each filled up to maxWorkers.

    Slots left over once every pool is full go to the last pool without a
    limit. The API refuses more replicas than all-bounded pools hold; a job
    stored before that rule gets its overflow without a pool.
    """
    pools = job.spec.node_pools
    if not pools:
        return [None] * job.spec.replicas
    out: list[api.NodePool | None] = []
    for pool in pools:
        room = job.spec.replicas - len(out)
        take = room if pool.max_workers is None else min(room, pool.max_workers)
        out.extend([pool] * take)
    unbounded = [p for p in pools if p.max_workers is None]
    out.extend([unbounded[-1] if unbounded else None] * (job.spec.replicas - len(out)))
    return out


def quantities(resources: dict[str, Any]) -> dict[str, Any]:
    """Resource quantities as strings (YAML lets users write `nvidia.com/gpu: 1`)."""
    return {
        section: {k: str(v) for k, v in (values or {}).items()}
        if isinstance(values, dict)
        else values
        for section, values in resources.items()
    }


def _security() -> tuple[dict[str, Any], dict[str, Any]]:
    pod = {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    return pod, container


def _pod(
    job: api.DecentralizedTrainingJob,
    owner: dict[str, Any],
    *,
    name: str,
    hostname: str,
    component: str,
    command: list[str],
    env: list[dict[str, Any]],
    resources: dict[str, Any],
    pool: api.NodePool | None,
    extra_labels: dict[str, str],
) -> dict[str, Any]:
    t = job.spec.template
    pod_sec, container_sec = _security()
    meta = _meta(job, name, component, owner)
    meta["labels"] = {**t.labels, **meta["labels"], **extra_labels}
    meta["annotations"] = {**DEFAULT_ANNOTATIONS[component], **t.annotations}
    spec: dict[str, Any] = {
        "hostname": hostname,
        "subdomain": job.name,
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": pod_sec,
        "containers": [
            {
                "name": component,
                "image": t.image,
                "imagePullPolicy": t.image_pull_policy,
                "command": command,
                "env": [*env, POD_IP_ENV],
                "ports": [dict(p) for p in PORTS[component]],
                "resources": resources,
                # A worker that fails says why in its last log lines: the pod's
                # status carries them and the operator quotes them.
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": container_sec,
                "volumeMounts": [
                    {"name": api.CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": api.SCRATCH_VOLUME, "mountPath": api.SCRATCH_DIR},
                    *t.volume_mounts,
                ],
            }
        ],
        "volumes": [
            {"name": api.CONFIG_VOLUME, "configMap": {"name": f"{job.name}-config"}},
            {"name": api.SCRATCH_VOLUME, "emptyDir": {}},
            *t.volumes,
        ],
    }
    if t.service_account_name:
        spec["serviceAccountName"] = t.service_account_name
    if t.priority_class_name:
        spec["priorityClassName"] = t.priority_class_name
    if t.scheduler_name:
        spec["schedulerName"] = t.scheduler_name
    if t.affinity and component == WORKER:
        spec["affinity"] = dict(t.affinity)
    if pool is not None:
        meta["labels"][LABEL_POOL] = pool.name
        if pool.node_selector:
            spec["nodeSelector"] = dict(pool.node_selector)
        if pool.tolerations:
            spec["tolerations"] = list(pool.tolerations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def worker_pod(
    job: api.DecentralizedTrainingJob, owner: dict[str, Any], slot: int
) -> dict[str, Any]:
    pool = assign_pools(job)[slot]
    env: list[dict[str, Any]] = [
        {"name": "DTJ_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
        {"name": "DTJ_RANK", "value": str(slot)},
        {"name": "DTJ_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "DTJ_METRICS_PORT", "value": str(METRICS_PORT)},
        {"name": "LOCAL_RANK", "value": "0"},  # one worker process per pod
        {"name": "LOCAL_WORLD_SIZE", "value": "1"},
        *job.spec.template.env,
    ]
    if pool is not None:
        # The pool's relative speed seeds the batch plan; measured speed takes over.
        env.append({"name": "DTJ_SPEED_HINT", "value": str(pool.speed)})
    pod = _pod(
        job,
        owner,
        name=worker_name(job.name, slot),
        hostname=f"{WORKER}-{slot}",
        component=WORKER,
        command=list(job.spec.template.command) or list(TRAINER_COMMAND),
        env=env,
        resources=quantities(job.spec.template.resources),
        pool=pool,
        extra_labels={LABEL_SLOT: str(slot)},
    )
    container = pod["spec"]["containers"][0]
    if job.spec.template.args:
        container["args"] = list(job.spec.template.args)
    if job.spec.template.working_dir:
        container["workingDir"] = job.spec.template.working_dir
    pod["metadata"]["finalizers"] = [TRACKING_FINALIZER]
    return pod


def coordinator_pod(job: api.DecentralizedTrainingJob, owner: dict[str, Any]) -> dict[str, Any]:
    """The store host: small, CPU-only, on a non-preemptible pool when there is one.

    It is the only pod with API credentials: a service account that may patch
    this job's status and nothing else (dtj_trainer.progress).
    """
    stable = [p for p in job.spec.node_pools if not p.preemptible]
    pod = _pod(
        job,
        owner,
        name=coordinator_name(job.name),
        hostname=COORDINATOR,
        component=COORDINATOR,
        command=[
            "python",
            "-m",
            "dtj_trainer.coordinator",
            "--port",
            str(STORE_PORT),
            "--report-status",
        ],
        env=[
            {"name": "DTJ_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
            {
                "name": "DTJ_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
        ],
        resources={"requests": {"cpu": "100m", "memory": "256Mi"}},
        pool=stable[0] if stable else None,
        extra_labels={},
    )
    pod["spec"]["serviceAccountName"] = coordinator_name(job.name)
    pod["spec"]["automountServiceAccountToken"] = True
    return pod


def progress_rbac(job: api.DecentralizedTrainingJob, owner: dict[str, Any]) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding: the coordinator may patch this job's status only."""
    name = coordinator_name(job.name)
    rbac = "rbac.authorization.k8s.io"
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(job, name, COORDINATOR, owner),
        },
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "Role",
            "metadata": _meta(job, name, COORDINATOR, owner),
            "rules": [
                {
                    "apiGroups": [api.GROUP],
                    "resources": [f"{api.PLURAL}/status"],
                    "resourceNames": [job.name],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "RoleBinding",
            "metadata": _meta(job, name, COORDINATOR, owner),
            "roleRef": {"apiGroup": rbac, "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": job.namespace}],
        },
    ]


def equality_selector(text: str) -> dict[str, str]:
    """`a=b,c=d` as matchLabels (the operator's --metrics-from setting); "" is none."""
    out: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = term.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{term!r} is not key=value (a label selector of equalities)")
        out[key.strip()] = value.strip()
    return out


def network_policy(
    job: api.DecentralizedTrainingJob,
    owner: dict[str, Any],
    metrics_from: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Only the job's own pods reach its store, gossip and metrics ports; the metrics
    port also from the namespaces `metrics_from` selects (Prometheus). gloo picks its
    ports at run time, so the policy allows every port between the job's pods."""
    own = {"matchLabels": {LABEL_JOB: job.name, "app.kubernetes.io/managed-by": MANAGED_BY}}
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": own}]}]
    if metrics_from:
        ingress.append(
            {
                "from": [{"namespaceSelector": {"matchLabels": dict(metrics_from)}}],
                "ports": [{"port": "metrics", "protocol": "TCP"}],
            }
        )
    spec = {"podSelector": own, "policyTypes": ["Ingress"], "ingress": ingress}
    meta = _meta(job, job.name, "network", owner)
    meta["annotations"] = {SPEC_DIGEST: digest(spec)}  # a changed policy reaches old jobs
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta,
        "spec": spec,
    }


def desired_children(
    job: api.DecentralizedTrainingJob,
    body: dict[str, Any],
    metrics_from: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Every object the job should own right now, workers last."""
    owner = owner_reference(body)
    objs = [
        network_policy(job, owner, metrics_from),
        service(job, owner),
        config_map(job, owner),
        *progress_rbac(job, owner),
    ]
    if job.spec.run_policy.suspend:
        return objs
    objs.append(coordinator_pod(job, owner))
    objs.extend(worker_pod(job, owner, slot) for slot in range(job.spec.replicas))
    return objs
