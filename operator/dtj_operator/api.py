"""The DecentralizedTrainingJob API (v1alpha1): the source of truth for the CRD.

`crds/` is generated from these models by `dtj_operator.crdgen` and a test
fails when the committed YAML drifts. The algorithm, optimizer, batching and
training sections are the trainer's own config models, so what a user writes
is exactly what a worker is told.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from dtj_trainer.config import (
    MOMENTUM_IS_SGDS,
    ROUND_SECONDS_IS_ALLREDUCES,
    TELEPORTATION_NEEDS_PLAIN_SGD,
    AlgorithmSpec,
    BatchingSpec,
    Model,
    OptimizerSpec,
    TrainingSpec,
    nested_default,
)
from pydantic import Field, model_validator

GROUP = "training.dtj.io"
VERSION = "v1alpha1"
KIND = "DecentralizedTrainingJob"
PLURAL = "decentralizedtrainingjobs"
SINGULAR = "decentralizedtrainingjob"
SHORT_NAMES = ["dtj"]
API_VERSION = f"{GROUP}/{VERSION}"
DEFAULT_IMAGE = "ghcr.io/dtj-project/dtj-trainer:0.1.0"
COORDINATOR_ACCOUNT_SUFFIX = "-coordinator"
COORDINATOR_ACCOUNT_MESSAGE = (
    "template.serviceAccountName: names ending in -coordinator are the jobs' coordinator "
    "accounts (each may write its job's status); give the workers another service account"
)
# Pod Security "restricted" admits these volume types only; the CRD refuses the others
# by name (CEL reads only declared fields, so the other types are declared below).
RESTRICTED_VOLUME_TYPES = (
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "image",
    "persistentVolumeClaim",
    "projected",
    "secret",
)
OTHER_VOLUME_TYPES = (
    "awsElasticBlockStore",
    "azureDisk",
    "azureFile",
    "cephfs",
    "cinder",
    "fc",
    "flexVolume",
    "flocker",
    "gcePersistentDisk",
    "gitRepo",
    "glusterfs",
    "hostPath",
    "iscsi",
    "nfs",
    "photonPersistentDisk",
    "portworxVolume",
    "quobyte",
    "rbd",
    "scaleIO",
    "storageos",
    "vsphereVolume",
)
# A job's pods carry no API credentials (automountServiceAccountToken: false); a
# projected token would hand them back. System priority classes outrank the cluster's
# own components, and the control-plane taints keep workloads off the control plane.
SYSTEM_PRIORITY_PREFIX = "system-"
CONTROL_PLANE_TAINTS = (
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
)
MAX_NAME_LENGTH = 45  # leaves room for "-worker-NNNN" within a 63-character DNS label
# The job's Service, its pods' hostnames and subdomain are named after it: a DNS-1035
# label (no dots, a letter first), which the API server takes for a dtj's name otherwise.
NAME_PATTERN = "^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_MESSAGE = (
    f"at most {MAX_NAME_LENGTH} lowercase letters, digits and '-', starting with a letter "
    "and ending with a letter or digit, without dots (the job's Service and its pods' "
    "hostnames are named after it)"
)

OBJECT_LIST = {"x-kubernetes-preserve-unknown-fields": True}
# A resource quantity, as the Pod API takes it (the pattern of apimachinery's Quantity).
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITIES: dict[str, Any] = {
    "type": "object",
    "maxProperties": 64,
    "additionalProperties": {
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": QUANTITY_PATTERN,
        "x-kubernetes-int-or-string": True,
    },
}
RESOURCES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,  # no free-form object: unknown fields are refused
    "properties": {
        "limits": {**_QUANTITIES, "description": "The most of each resource (core/v1)."},
        "requests": {**_QUANTITIES, "description": "What each resource needs (core/v1)."},
        "claims": {
            "type": "array",
            "maxItems": 16,
            "items": {"type": "object", **OBJECT_LIST},
            "description": "Dynamic resource claims used (core/v1 ResourceClaim names).",
        },
    },
}


def resources_problem(resources: Any) -> str | None:
    """What is wrong with a template's resources, as the CRD's schema says it (for
    objects stored before the schema had it), or None."""
    if not isinstance(resources, dict):
        return "template.resources must be an object (limits, requests, claims)"
    unknown = sorted(set(resources) - {"limits", "requests", "claims"})
    if unknown:
        return f"template.resources: unknown fields {unknown}: use limits, requests, claims"
    for section in ("limits", "requests"):
        values = resources.get(section)
        if values is None:
            continue
        if not isinstance(values, dict):
            return f"template.resources.{section} must map resource names to quantities"
        for name, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                return (
                    f"template.resources.{section}.{name}: {v!r} is not a quantity; write an "
                    'integer or a string such as "500m", "0.5", "16Gi"'
                )
            if isinstance(v, str) and not re.match(QUANTITY_PATTERN, v):
                return f"template.resources.{section}.{name}: {v!r} is not a quantity"
    return None


# What the template may not set: the job's own identity and plumbing (the operator's
# labels, the trainer's DTJ_* settings, its config and scratch volumes) and the node.
RESERVED_PREFIX = f"{GROUP}/"
RESERVED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/component",
)
# What the operator sets in the trainer's env (a test checks render against it);
# other DTJ_* names (the DTJ_SIMULATE_* benchmark knobs) stay the user's.
RESERVED_ENV = (
    "DTJ_CONFIG",
    "DTJ_RANK",
    "DTJ_POD_NAME",
    "DTJ_POD_IP",
    "DTJ_METRICS_PORT",
    "DTJ_SPEED_HINT",
    "DTJ_NAMESPACE",
    # torchrun's names for the process on its node (one per pod): for a script that
    # picks its GPU with LOCAL_RANK. RANK and WORLD_SIZE change with every generation.
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
)
# The trainer's own volumes: its config (read-only) and scratch space (the root is read-only).
CONFIG_VOLUME, CONFIG_DIR = "config", "/etc/dtj"
SCRATCH_VOLUME, SCRATCH_DIR = "tmp", "/tmp"
RESERVED_VOLUMES = (CONFIG_VOLUME, SCRATCH_VOLUME)
RESERVED_MOUNT_PATHS = (CONFIG_DIR, SCRATCH_DIR)
# The same paths however written (/tmp/, //tmp, /etc//dtj/x): one RE2/Python pattern
# for the CEL rule and the Python check alike.
RESERVED_MOUNT_PATTERN = "^/+(etc/+dtj(/.*)?|tmp)/*$"
assert CONFIG_DIR == "/etc/dtj" and SCRATCH_DIR == "/tmp", "RESERVED_MOUNT_PATTERN spells them"
MAX_ITEMS = 64  # bounds the CEL rules' cost (the API server estimates it per list)
MAX_STRING = 1024  # ... and per string the rules read (a name, a mount path)


def _known(name: str, kind: str | dict[str, Any]) -> dict[str, Any]:
    """A field the CEL rules read: a type name, or a schema of its own."""
    if isinstance(kind, dict):
        return {"description": f"{name} (as in the Kubernetes API).", **kind}
    return {
        "type": kind,
        "description": f"{name} (as in the Kubernetes API).",
        **(OBJECT_LIST if kind == "object" else {}),
        **({"maxLength": MAX_STRING} if kind == "string" else {}),  # bounds the rules' cost
    }


# A projected volume's sources, declared so that a rule can find a serviceAccountToken.
_PROJECTED: dict[str, Any] = {
    "type": "object",
    **OBJECT_LIST,
    "properties": {
        "sources": {
            "description": "sources (as in the Kubernetes API).",
            "type": "array",
            "maxItems": MAX_ITEMS,
            "items": {
                "type": "object",
                **OBJECT_LIST,
                "properties": {
                    "serviceAccountToken": {
                        "description": "serviceAccountToken (as in the Kubernetes API): refused.",
                        "type": "object",
                        **OBJECT_LIST,
                    }
                },
            },
        }
    },
}


def _bounded(description: str, **known: str | dict[str, Any]) -> Any:
    """A bounded list of Kubernetes objects; `known` declares the fields the CEL rules
    read (name -> type or schema), the rest is left to the Pod API to validate."""
    props = {k: _known(k, t) for k, t in known.items()}
    item: dict[str, Any] = {"type": "object", **OBJECT_LIST}
    if props:
        item["properties"] = props
    extra: Any = {"items": item, "maxItems": MAX_ITEMS}
    return Field(
        default_factory=list,
        description=description,
        json_schema_extra=extra,
    )


class WorkerTemplate(Model):
    """How each worker container looks; merged into the rendered pod."""

    image: str = Field(DEFAULT_IMAGE, min_length=1, description="Trainer container image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Image pull policy."
    )
    command: list[str] = Field(
        default_factory=list,
        max_length=MAX_ITEMS,
        description=(
            "The worker container's entrypoint, to run your own training script in your "
            "image (default: python -m dtj_trainer, the built-in trainer). It gets the "
            "same rendered config and environment (DTJ_CONFIG, DTJ_RANK, DTJ_POD_NAME, "
            "DTJ_POD_IP, DTJ_METRICS_PORT). The coordinator always runs "
            "python -m dtj_trainer.coordinator from the same image."
        ),
    )
    args: list[str] = Field(
        default_factory=list,
        max_length=MAX_ITEMS,
        description="Arguments to template.command (which they need: the built-in "
        "trainer takes none).",
    )
    working_dir: str | None = Field(
        None, min_length=1, description="Working directory of the worker container."
    )
    resources: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Container resources (requests/limits), e.g. limits: {nvidia.com/gpu: 1}. "
            'Quantities as in a Pod: integers or strings ("500m", "0.5", "16Gi"). '
            "A GPU limit above 0 switches the trainer to the nccl backend."
        ),
        json_schema_extra=RESOURCES_SCHEMA,
    )
    env: list[dict[str, Any]] = _bounded(
        "Extra environment variables (core/v1 EnvVar). The names the operator sets are "
        f"refused: {', '.join(RESERVED_ENV)}.",
        name="string",
    )
    volumes: list[dict[str, Any]] = _bounded(
        "Extra pod volumes (core/v1 Volume): the types Pod Security 'restricted' admits ("
        f"{', '.join(RESTRICTED_VOLUME_TYPES)}), without projected serviceAccountToken "
        "sources (the pods carry no API credentials). The names config and tmp are the "
        "trainer's.",
        name="string",
        projected=_PROJECTED,
        **dict.fromkeys(OTHER_VOLUME_TYPES, "object"),
    )
    volume_mounts: list[dict[str, Any]] = _bounded(
        "Extra container volume mounts (core/v1 VolumeMount). /etc/dtj and /tmp are the "
        "trainer's and are refused.",
        name="string",
        mountPath="string",
    )
    service_account_name: str | None = Field(
        None,
        max_length=253,
        description="Service account of the worker pods (default: the namespace default); its "
        "token is not mounted. Names ending in -coordinator (the jobs' coordinator accounts) "
        "are refused.",
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Extra labels on every pod of the job, e.g. kueue.x-k8s.io/queue-name. Keys "
            "under training.dtj.io/ and the app.kubernetes.io/ labels the operator sets "
            "are refused."
        ),
        json_schema_extra={"maxProperties": MAX_ITEMS},
    )
    annotations: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Extra annotations on every pod of the job; they override the defaults "
            "(workers: cluster-autoscaler.kubernetes.io/safe-to-evict=true; coordinator: "
            "safe-to-evict=false and karpenter.sh/do-not-disrupt=true). Keys under "
            "training.dtj.io/ are refused."
        ),
        json_schema_extra={"maxProperties": MAX_ITEMS},
    )
    priority_class_name: str | None = Field(
        None,
        max_length=253,
        description="PriorityClass of the worker pods (the coordinator's too). The system- "
        "classes (the cluster's own components') are refused.",
    )
    scheduler_name: str | None = Field(
        None, description="Scheduler of every pod of the job (default: the cluster's)."
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="Affinity of the worker pods (core/v1 Affinity), e.g. to spread them "
        "over zones; node pools add their nodeSelector beside it.",
        json_schema_extra={"type": "object", **OBJECT_LIST},
    )


class NodePool(Model):
    """A group of nodes workers may run on (e.g. on-demand GPUs and spot GPUs)."""

    name: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=30,
        description="Pool name (a DNS label), recorded on each worker pod.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels a worker of this pool requires."
    )
    tolerations: list[dict[str, Any]] = _bounded(
        "Tolerations for the pool's taints (core/v1 Toleration). Each names its taint's "
        "key (an empty key tolerates every taint); the control-plane taints "
        f"({', '.join(CONTROL_PLANE_TAINTS)}) are refused.",
        key="string",
    )
    max_workers: int | None = Field(
        None, ge=0, description="At most this many workers in the pool (unset = no limit)."
    )
    preemptible: bool = Field(
        False,
        description="Nodes may vanish (spot); losing a worker here is a preemption, not a failure.",
    )
    speed: float = Field(
        1.0,
        gt=0,
        description=(
            "Relative speed of the pool's workers (2 = twice the samples per second of "
            "1): with batching.dynamic, the first batch plan; measured speed takes over."
        ),
    )


class RunPolicy(Model):
    """Lifecycle rules, named as in Kubernetes Jobs and Kubeflow's run policy."""

    backoff_limit: int = Field(
        3, ge=0, description="Worker failures (not preemptions) tolerated before the job fails."
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=1,
        description="Fail the job if it is active longer than this many seconds, counted "
        "from when it was created or last resumed (status.activeSince), whether or not "
        "its workers ever ran (as a batch Job: a job stuck Pending times out too); the "
        "clock stops while suspended.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the job this long after it succeeded or failed."
    )
    clean_pod_policy: Literal["All", "Running", "None"] = Field(
        "Running",
        description="Which pods to delete when the job finishes: All, Running (those "
        "still running), None (keep them). A job that failed (its deadline, its backoff "
        "limit) stops its running pods whatever this says, as a batch/v1 Job does.",
    )
    suspend: bool = Field(
        False, description="Delete the workers but keep the job (queueing systems set this)."
    )


class JobSpec(Model):
    """Desired state of a decentralized training job."""

    replicas: int = Field(4, ge=1, le=1024, description="Number of worker slots.")
    min_replicas: int | None = Field(
        None, ge=1, description="Training starts (and continues) once this many workers are ready."
    )
    max_replicas: int | None = Field(
        None, ge=1, le=1024, description="Upper bound for scaling (kubectl scale, HPA)."
    )
    algorithm: AlgorithmSpec = Field(
        default_factory=AlgorithmSpec,
        description=(
            "Training method and its settings. Immutable: every worker of a job runs the "
            "same method (create a new job to change it)."
        ),
        json_schema_extra=nested_default(),
    )
    optimizer: OptimizerSpec = Field(
        default_factory=OptimizerSpec,
        description=(
            "Local optimizer of every worker. Immutable: replacements must apply the "
            "same update rule as the workers they join."
        ),
        json_schema_extra=nested_default(),
    )
    batching: BatchingSpec = Field(
        default_factory=BatchingSpec,
        description=(
            "Per-worker batch sizes and dynamic rebalancing. Immutable: the members plan "
            "their batches together."
        ),
        json_schema_extra=nested_default(),
    )
    training: TrainingSpec = Field(
        default_factory=TrainingSpec,
        description=(
            "Model, data set, length and checkpoints. Immutable: every worker, replacements "
            "included, must train the same model on the same data for the same length "
            "(workers read it once). replicas and minReplicas may change while it runs."
        ),
        json_schema_extra=nested_default(),
    )
    template: WorkerTemplate = Field(
        default_factory=WorkerTemplate,
        description=(
            "Worker container settings. A change applies to workers created afterwards "
            "(replacements, scale-ups); running workers keep theirs."
        ),
        json_schema_extra=nested_default(),
    )
    node_pools: list[NodePool] = Field(
        default_factory=list,
        max_length=MAX_ITEMS,
        description="Node pools to spread workers over, in order of preference. When every "
        "pool has maxWorkers, replicas may not exceed their sum.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy,
        description="Failure budget, deadline, clean-up and suspension.",
        json_schema_extra=nested_default(),
    )

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        """The same rules as the CRD's CEL, for manifests that never meet an API server."""
        if problem := resources_problem(self.template.resources):
            raise ValueError(f"spec.{problem}")
        for rule in CEL_RULES:
            if not rule.check(self):
                raise ValueError(f"{rule.field}: {rule.message}")
        return self


class _Rule:
    """A cross-field rule, stated once for CEL and for Python."""

    def __init__(self, cel: str, message: str, field: str, check: Any) -> None:
        self.cel, self.message, self.field, self.check = cel, message, field, check


CEL_RULES = [
    _Rule(
        "!has(self.minReplicas) || self.minReplicas <= self.replicas",
        "minReplicas must not exceed replicas",
        "spec.minReplicas",
        lambda s: s.min_replicas is None or s.min_replicas <= s.replicas,
    ),
    _Rule(
        "!has(self.maxReplicas) || self.replicas <= self.maxReplicas",
        "replicas must not exceed maxReplicas",
        "spec.replicas",
        lambda s: s.max_replicas is None or s.replicas <= s.max_replicas,
    ),
    _Rule(
        "!has(self.algorithm.activeNodes) || type(self.algorithm.activeNodes) == string"
        " || int(self.algorithm.activeNodes) <= self.replicas",
        "algorithm.activeNodes must not exceed replicas",
        "spec.algorithm.activeNodes",
        lambda s: (
            not isinstance(s.algorithm.active_nodes, int) or s.algorithm.active_nodes <= s.replicas
        ),
    ),
    _Rule(
        "!has(self.batching.globalBatch) || !self.batching.dynamic"
        " || self.batching.globalBatch >= self.replicas * self.batching.minPerWorker",
        "batching.globalBatch must be at least replicas x minPerWorker",
        "spec.batching.globalBatch",
        lambda s: (
            s.batching.global_batch is None
            or not s.batching.dynamic
            or s.batching.global_batch >= s.replicas * s.batching.min_per_worker
        ),
    ),
    _Rule(
        "!has(self.algorithm.name) || self.algorithm.name != 'teleportation'"
        " || ((!has(self.optimizer.name) || self.optimizer.name == 'sgd')"
        " && (!has(self.optimizer.momentum) || double(self.optimizer.momentum) == 0.0))",
        TELEPORTATION_NEEDS_PLAIN_SGD,
        "spec.optimizer",
        lambda s: (
            s.algorithm.name != "teleportation"
            or (s.optimizer.name == "sgd" and s.optimizer.momentum == 0)
        ),
    ),
    _Rule(
        "!has(self.algorithm.roundSeconds)"
        " || (has(self.algorithm.name) && self.algorithm.name == 'allreduce')",
        ROUND_SECONDS_IS_ALLREDUCES,
        "spec.algorithm.roundSeconds",
        lambda s: s.algorithm.round_seconds is None or s.algorithm.name == "allreduce",
    ),
    _Rule(
        "!has(self.optimizer.name) || self.optimizer.name == 'sgd'"
        " || !has(self.optimizer.momentum) || double(self.optimizer.momentum) == 0.0",
        MOMENTUM_IS_SGDS,
        "spec.optimizer.momentum",
        lambda s: s.optimizer.name == "sgd" or s.optimizer.momentum == 0,
    ),
    _Rule(
        "!has(self.template.args) || size(self.template.args) == 0"
        " || (has(self.template.command) && size(self.template.command) > 0)",
        "template.args are arguments to template.command: set the command too (the "
        "built-in trainer takes none)",
        "spec.template.args",
        lambda s: not s.template.args or bool(s.template.command),
    ),
    _Rule(
        "!(has(self.training.steps) && has(self.training.budget))",
        "set training.steps (rounds per worker) or training.budget (job-wide), not both",
        "spec.training.steps",
        lambda s: s.training.steps is None or s.training.budget is None,
    ),
    _Rule(
        "!has(self.training.budget) || !(has(self.training.budget.samples)"
        " && has(self.training.budget.epochs))",
        "set training.budget.samples or training.budget.epochs, not both",
        "spec.training.budget",
        lambda s: (
            s.training.budget is None
            or s.training.budget.samples is None
            or s.training.budget.epochs is None
        ),
    ),
    _Rule(
        "!has(self.training.budget) || has(self.training.budget.samples)"
        " || has(self.training.budget.epochs) || has(self.training.budget.seconds)",
        "training.budget needs samples, epochs or seconds",
        "spec.training.budget",
        lambda s: (
            s.training.budget is None
            or s.training.budget.samples is not None
            or s.training.budget.epochs is not None
            or s.training.budget.seconds is not None
        ),
    ),
    _Rule(
        "!has(self.template.env) || self.template.env.all(e, !has(e.name)"
        f" || !(e.name in {list(RESERVED_ENV)}))",
        f"template.env: {', '.join(RESERVED_ENV)} are set by the operator; rename the variable",
        "spec.template.env",
        lambda s: not any(e.get("name") in RESERVED_ENV for e in s.template.env),
    ),
    _Rule(
        "!has(self.template.volumes) || self.template.volumes.all(v, "
        + " && ".join(f"!has(v.{t})" for t in OTHER_VOLUME_TYPES)
        + ")",
        "template.volumes: only the volume types Pod Security 'restricted' admits are "
        f"allowed ({', '.join(RESTRICTED_VOLUME_TYPES)}); a worker must not reach into its "
        "node or mount storage the job's namespace does not hold",
        "spec.template.volumes",
        lambda s: not any(t in v for v in s.template.volumes for t in OTHER_VOLUME_TYPES),
    ),
    _Rule(
        "!has(self.template.volumes) || self.template.volumes.all(v, !has(v.projected)"
        " || !has(v.projected.sources)"
        " || v.projected.sources.all(p, !has(p.serviceAccountToken)))",
        "template.volumes: projected serviceAccountToken sources are refused (the worker "
        "pods carry no API credentials); mount a secret the job's namespace holds instead",
        "spec.template.volumes",
        lambda s: (
            not any(
                "serviceAccountToken" in src
                for v in s.template.volumes
                for src in ((v.get("projected") or {}).get("sources") or [])
                if isinstance(src, dict)
            )
        ),
    ),
    _Rule(
        "!has(self.template.volumes) || self.template.volumes.all(v, !has(v.name)"
        f" || !(v.name in {list(RESERVED_VOLUMES)}))",
        f"template.volumes: the names {', '.join(RESERVED_VOLUMES)} are the trainer's; "
        "use another volume name",
        "spec.template.volumes",
        lambda s: not any(v.get("name") in RESERVED_VOLUMES for v in s.template.volumes),
    ),
    _Rule(
        "!has(self.template.serviceAccountName)"
        f" || !self.template.serviceAccountName.endsWith('{COORDINATOR_ACCOUNT_SUFFIX}')",
        COORDINATOR_ACCOUNT_MESSAGE,
        "spec.template.serviceAccountName",
        lambda s: not (s.template.service_account_name or "").endswith(COORDINATOR_ACCOUNT_SUFFIX),
    ),
    _Rule(
        "!has(self.template.priorityClassName)"
        f" || !self.template.priorityClassName.startsWith('{SYSTEM_PRIORITY_PREFIX}')",
        f"template.priorityClassName: the {SYSTEM_PRIORITY_PREFIX} classes belong to the "
        "cluster's own components (a job's pods would preempt them); use one of the "
        "cluster's workload classes",
        "spec.template.priorityClassName",
        lambda s: not (s.template.priority_class_name or "").startswith(SYSTEM_PRIORITY_PREFIX),
    ),
    _Rule(
        "!has(self.nodePools) || self.nodePools.all(p, !has(p.tolerations)"
        " || p.tolerations.all(t, has(t.key) && t.key != ''"
        f" && !(t.key in {list(CONTROL_PLANE_TAINTS)})))",
        "nodePools[].tolerations: each toleration names its taint's key (an empty key "
        "tolerates every taint) and the control-plane taints "
        f"({', '.join(CONTROL_PLANE_TAINTS)}) are refused: workers stay off the control "
        "plane",
        "spec.nodePools",
        lambda s: all(
            isinstance(t, dict) and t.get("key") and t.get("key") not in CONTROL_PLANE_TAINTS
            for p in s.node_pools
            for t in p.tolerations
        ),
    ),
    _Rule(
        "!has(self.nodePools) || size(self.nodePools) == 0"
        " || !self.nodePools.all(p, has(p.maxWorkers))"
        " || self.replicas <= self.nodePools.map(p, p.maxWorkers).sum()",
        "replicas must not exceed the sum of the node pools' maxWorkers (every pool is "
        "bounded, so the rest would have nowhere to run); raise a pool's maxWorkers or add "
        "a pool without one",
        "spec.replicas",
        lambda s: (
            not s.node_pools
            or any(p.max_workers is None for p in s.node_pools)
            or s.replicas <= sum(p.max_workers or 0 for p in s.node_pools)
        ),
    ),
    _Rule(
        "!has(self.template.volumeMounts) || self.template.volumeMounts.all(m,"
        f" !has(m.mountPath) || !m.mountPath.matches('{RESERVED_MOUNT_PATTERN}'))",
        f"template.volumeMounts: {' and '.join(RESERVED_MOUNT_PATHS)} are the trainer's; "
        "mount somewhere else",
        "spec.template.volumeMounts",
        lambda s: (
            not any(
                re.search(RESERVED_MOUNT_PATTERN, str(m.get("mountPath", "")))
                for m in s.template.volume_mounts
            )
        ),
    ),
    _Rule(
        "!has(self.template.labels) || self.template.labels.all(k,"
        f" !k.startsWith('{RESERVED_PREFIX}') && !(k in {list(RESERVED_LABELS)}))",
        f"template.labels: keys under {RESERVED_PREFIX} and the app.kubernetes.io/ labels "
        "the operator sets are reserved; choose another key",
        "spec.template.labels",
        lambda s: (
            not any(
                k.startswith(RESERVED_PREFIX) or k in RESERVED_LABELS for k in s.template.labels
            )
        ),
    ),
    _Rule(
        "!has(self.template.annotations) || self.template.annotations.all(k,"
        f" !k.startsWith('{RESERVED_PREFIX}'))",
        f"template.annotations: keys under {RESERVED_PREFIX} are the operator's; choose "
        "another key",
        "spec.template.annotations",
        lambda s: not any(k.startswith(RESERVED_PREFIX) for k in s.template.annotations),
    ),
    _Rule(
        "self.batching.minPerWorker <= self.batching.maxPerWorker",
        "batching.minPerWorker must not exceed maxPerWorker",
        "spec.batching.minPerWorker",
        lambda s: s.batching.min_per_worker <= s.batching.max_per_worker,
    ),
]


Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]
ConditionType = Literal[
    "Created", "Running", "Degraded", "Suspended", "Succeeded", "Failed", "Reconciled"
]


class Condition(Model):
    """A standard metav1.Condition."""

    type: ConditionType = Field(description="Condition type.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason.")
    message: str = Field("", description="What happened, for a person.")
    last_transition_time: str = Field(description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="Generation the condition is for.")


class WorkerProgress(Model):
    """One worker's share of the work, as the dynamic batch controller set it."""

    slot: int = Field(description="Worker slot.")
    step: int | None = Field(None, description="Rounds this worker has run.")
    batch: int | None = Field(None, description="Its local batch size.")
    compute_samples_per_second: str | None = Field(
        None, description="Its measured compute throughput (waiting excluded)."
    )


class TrainingProgress(Model):
    """Training progress as last reported by the workers."""

    step: int | None = Field(None, description="Lowest step reached by the live workers.")
    loss: str | None = Field(None, description="Mean training loss (decimal string).")
    samples_per_second: str | None = Field(None, description="Summed throughput.")
    consensus_distance: str | None = Field(None, description="(1/n) sum ||x_i - x_bar||^2.")
    updated: str | None = Field(None, description="When the workers last reported.")
    generation: int | None = Field(
        None, description="Membership generation (it changes when workers join or leave)."
    )
    members: int | None = Field(None, description="Workers training in this generation.")
    samples: int | None = Field(
        None, description="Samples trained on by all workers together (jobs with a budget)."
    )
    workers: list[WorkerProgress] | None = Field(
        None, description="Each worker's batch and measured speed (dynamic batching)."
    )
    paused: bool | None = Field(
        None,
        description="Training waits: fewer live members than minReplicas (see the Degraded "
        "condition).",
    )


class TrainingResult(Model):
    """How training ended, written once every worker has finished."""

    test_accuracy: str | None = Field(
        None, description="Test accuracy of the workers' averaged model (decimal string, 0-1)."
    )
    worker_accuracy: str | None = Field(
        None, description="Range of the workers' own models' test accuracy (min-max)."
    )
    steps: int | None = Field(None, description="Training steps each worker ran.")
    workers: int | None = Field(None, description="Workers that reported a result.")
    metrics: dict[str, str] | None = Field(
        None,
        description="A user's own training loop: the mean over the workers of the numbers "
        "each reported last with job.report() (decimal strings), e.g. validation loss.",
    )


class JobStatus(Model):
    """Observed state of the job, written only by the operator."""

    phase: Phase | None = Field(None, description="Pending, Running, Suspended, Succeeded, Failed.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Latest observations of the job's state.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(None, description="Last spec generation acted on.")
    replicas: int | None = Field(None, description="Worker pods that exist.")
    ready_replicas: int | None = Field(None, description="Worker pods that are ready.")
    pending_replicas: int | None = Field(
        None, description="Worker pods waiting for a node (the cluster autoscaler's signal)."
    )
    selector: str | None = Field(None, description="Label selector of the workers (for HPA).")
    preemptions: int | None = Field(None, description="Workers lost to preemption or eviction.")
    failures: int | None = Field(
        None, description="Workers that failed (counts toward backoffLimit)."
    )
    counted_pods: list[str] | None = Field(
        None,
        description="Operator bookkeeping: uids of ended workers already counted in "
        "failures or preemptions whose tracking finalizer is not yet removed.",
    )
    last_failure: str | None = Field(None, description="The last worker failure, in a sentence.")
    last_preemption: str | None = Field(
        None, description="The last worker lost to the platform, and why, in a sentence."
    )
    start_time: str | None = Field(
        None,
        description="When the job's workers first trained, or did after its last resume "
        "(cleared while suspended).",
    )
    active_since: str | None = Field(
        None,
        description="When the job was created or last resumed: activeDeadlineSeconds "
        "counts from it (cleared while suspended).",
    )
    completion_time: str | None = Field(None, description="When the job finished.")
    progress: TrainingProgress | None = Field(None, description="Training progress.")
    result: TrainingResult | None = Field(None, description="Final result of a finished run.")


class DecentralizedTrainingJob(Model):
    """A manifest as users write it (kind, metadata and spec)."""

    api_version: Literal["training.dtj.io/v1alpha1"] = "training.dtj.io/v1alpha1"
    kind: Literal["DecentralizedTrainingJob"] = "DecentralizedTrainingJob"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: JobSpec = Field(default_factory=JobSpec)
    status: JobStatus | None = None

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace") or "default")

    @model_validator(mode="after")
    def _own_identity(self) -> DecentralizedTrainingJob:
        """The CRD's root rule, for manifests that never meet an API server."""
        if self.name and (
            len(self.name) > MAX_NAME_LENGTH or not re.match(NAME_PATTERN, self.name)
        ):
            raise ValueError(f"metadata.name {self.name!r}: {NAME_MESSAGE}")
        return self

    @classmethod
    def from_body(cls, body: Any) -> DecentralizedTrainingJob:
        """Parse a manifest or a kopf body, ignoring server-owned fields."""
        raw = dict(body)
        raw.pop("status", None)
        return cls.model_validate(raw)
