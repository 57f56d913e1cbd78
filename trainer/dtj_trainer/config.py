"""What a worker is told: the one config model shared by the operator and the trainer.

The operator embeds these sections in the DecentralizedTrainingJob spec (so the
CRD schema is generated from them) and renders a `TrainerConfig` into each job's
ConfigMap; the trainer parses the same model. Pure pydantic: importing this
module must never import torch or kopf.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

AlgorithmName = Literal["allreduce", "dpsgd", "gosgd", "dasgd", "teleportation"]
TopologyName = Literal["ring", "torus", "exponential", "one-peer-exponential", "complete"]
ASYNC_ALGORITHMS = frozenset({"gosgd", "dasgd"})


class Model(BaseModel):
    """Base for every API section: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    def wire(self) -> dict[str, Any]:
        """The JSON-ready camelCase form, as stored in Kubernetes objects."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def nested_default() -> Any:
    """Schema extra for an object field whose sub-fields all have defaults.

    `default: {}` lets the API server fill the nested defaults in, so
    `kubectl get -o yaml` and the printer columns show the effective values.
    """
    return {"default": {}}


class AlgorithmSpec(Model):
    """Which decentralized method the workers run, and its knobs."""

    name: AlgorithmName = Field(
        "dpsgd",
        description=(
            "Training method: allreduce (DDP baseline), dpsgd (synchronous gossip), "
            "gosgd (asynchronous sum-weight gossip), dasgd (asynchronous decentralized "
            "SGD: every gradient to all peers, each applied by everyone, scaled by 1/n: "
            "see scaleGradients), teleportation (k active slots that move between workers)."
        ),
    )
    topology: TopologyName = Field(
        "ring",
        description=(
            "Communication graph for dpsgd (and among teleportation's active workers): "
            "ring, torus (2-D), exponential, "
            "one-peer-exponential (time-varying, one peer per step) or complete."
        ),
    )
    gossip_probability: float = Field(
        0.1,
        gt=0,
        le=1,
        description=(
            "gosgd: probability that a worker pushes its model after a step (the paper "
            "explores 0.01-1; pushes that pile up faster than peers merge them go stale)."
        ),
    )
    active_nodes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description=(
            "teleportation: number k of active slots, or 'auto' to search k during "
            "training. Must not exceed replicas."
        ),
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    staleness_bound: int = Field(
        4,
        ge=0,
        description=(
            "dasgd: a received gradient is dropped when its sender had missed more than "
            "this many rounds of the other workers' updates (bound x (n-1) updates; "
            "0 = apply only fresh gradients). Drops are counted in "
            "dtj_worker_dropped_updates_total."
        ),
    )
    round_seconds: float | None = Field(
        None,
        gt=0,
        description=(
            "allreduce: bound each round by time instead of by batch: every worker computes "
            "mini-batches of its batch size (accumulating their gradients, the last one cut "
            "to what the time left fits) until this many seconds have passed, then the "
            "round's gradient is the mean over all the "
            "samples the workers computed, each worker weighted by its count. A slow, "
            "jittery or newly slowed worker contributes fewer samples, nobody waits for "
            "it. Aim for about ten of the fastest worker's mini-batches."
        ),
    )
    scale_gradients: bool = Field(
        True,
        description=(
            "dasgd: scale every applied gradient, own or received, by 1/n: each worker "
            "applies ~n gradients a round, so the job's step stays optimizer.lr (as a "
            "single worker's). false applies each at lr, as in the paper: then divide "
            "lr by ~n yourself or training diverges."
        ),
    )


class ScheduleSpec(Model):
    """How the step size moves over training, by the job's progress: its steps, or
    the share of its budget spent (so it works the same with steps or a budget)."""

    warmup: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Fraction of training over which lr rises linearly from 0 to optimizer.lr.",
    )
    decay: Literal["constant", "cosine"] = Field(
        "constant",
        description="After the warm-up: keep optimizer.lr, or follow a cosine down to "
        "endFactor x optimizer.lr at the end.",
    )
    end_factor: float = Field(
        0.0, ge=0, le=1, description="cosine: the final step size, as a fraction of lr."
    )

    def factor(self, progress: float) -> float:
        """The multiplier on lr when `progress` (0-1) of training is done."""
        progress = min(max(progress, 0.0), 1.0)
        if progress < self.warmup:
            return progress / self.warmup
        if self.decay == "constant":
            return 1.0
        t = (progress - self.warmup) / (1.0 - self.warmup)
        return self.end_factor + (1.0 - self.end_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


class OptimizerSpec(Model):
    """The local optimizer each worker applies to its own gradients."""

    name: Literal["sgd", "adamw"] = Field(
        "sgd", description="Local optimizer: sgd (with optional momentum) or adamw."
    )
    lr: float = Field(0.05, gt=0, description="Step size (the peak one with a schedule).")
    momentum: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "sgd: heavy-ball momentum (0 = plain SGD; adamw uses beta1 instead). "
            "teleportation requires 0: its slot models move between workers without the "
            "optimizer state."
        ),
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="adamw: first-moment decay.")
    beta2: float = Field(0.999, ge=0, lt=1, description="adamw: second-moment decay.")
    eps: float = Field(1e-8, gt=0, description="adamw: term added to the denominator.")
    weight_decay: float = Field(
        0.0, ge=0, description="sgd: L2 penalty; adamw: decoupled weight decay."
    )
    grad_clip_norm: float | None = Field(
        None,
        gt=0,
        description="Clip every gradient before the optimizer applies it to this L2 norm "
        "(unset: no clipping).",
    )
    schedule: ScheduleSpec = Field(
        default_factory=ScheduleSpec,
        description="Warm-up and decay of the step size.",
        json_schema_extra=nested_default(),
    )

    @model_validator(mode="after")
    def _momentum_is_sgds(self) -> OptimizerSpec:
        if self.name != "sgd" and self.momentum:
            raise ValueError(MOMENTUM_IS_SGDS)
        return self


ROUND_SECONDS_IS_ALLREDUCES = (
    "algorithm.roundSeconds bounds allreduce's rounds by time: use algorithm allreduce, "
    "or remove roundSeconds"
)
MOMENTUM_IS_SGDS = (
    "optimizer.momentum is sgd's; adamw keeps its own moments (beta1, beta2): remove momentum"
)


class BatchingSpec(Model):
    """Per-worker batch sizes; dynamic batching moves samples to fast workers."""

    per_worker: int = Field(
        32,
        ge=1,
        description="Local mini-batch size (with dynamic: the average one, unless globalBatch).",
    )
    dynamic: bool = Field(
        False,
        description=(
            "Give fast workers bigger batches, in proportion to their measured compute "
            "throughput (damped, re-planned every 10 rounds), so synchronous rounds wait "
            "for nobody; gradients are weighted by batch size so the update stays the "
            "sample-weighted mean. Asynchronous methods: sets each worker's samples per "
            "gossip round the same way. Seeded by nodePools[].speed."
        ),
    )
    global_batch: int | None = Field(
        None,
        ge=1,
        description="dynamic: total samples per round, split across workers "
        "(default: perWorker x workers).",
    )
    min_per_worker: int = Field(4, ge=1, description="dynamic: smallest local batch.")
    max_per_worker: int = Field(512, ge=1, description="dynamic: largest local batch.")


class DataSplitSpec(Model):
    """How the training set is divided among workers."""

    kind: Literal["ledger", "iid", "dirichlet"] = Field(
        "ledger",
        description=(
            "ledger: the coordinator leases chunks of each epoch's seeded order to the "
            "workers as they need them, so every sample is trained once per epoch whatever "
            "joins, leaves or is faster (docs/data.md). iid, dirichlet: a fixed shard per "
            "worker slot (uniform, or label-skewed Dirichlet(alpha)), a research option: "
            "shards do not follow membership changes or uneven speeds."
        ),
    )
    alpha: float = Field(
        0.5, gt=0, description="dirichlet: concentration; smaller means more skew."
    )
    chunk_samples: int | None = Field(
        None,
        ge=1,
        description=(
            "ledger: samples per chunk (default: 1/16 of a worker's share of an epoch, at "
            "least 4 batches). A killed worker's chunk is trained again: at most this "
            "many samples repeat per kill."
        ),
    )


class CheckpointSpec(Model):
    """Whole-job checkpoints, read back when workers start: a suspended job resumes,
    a job that lost every pod goes on (joiners of a running job still warm-start
    from the members)."""

    path: str = Field(
        description="Directory for atomic per-worker checkpoints, on a volume that outlives "
        "the pods; a worker starting with one there resumes from it (model, optimizer "
        "state, data position, step). Point a new job at an old one's to continue it."
    )
    every_steps: int = Field(
        100, ge=1, description="Steps between checkpoints (a stopped worker also writes one)."
    )


class BudgetSpec(Model):
    """How much training the whole job does, counted over all workers together.

    Fast workers do more of it: the job ends when the workers' samples add
    up to the budget (or the time is up), not when the slowest worker has
    run a fixed number of steps."""

    samples: int | None = Field(
        None, ge=1, description="Samples trained on by all workers together."
    )
    epochs: float | None = Field(
        None,
        gt=0,
        description="Passes over the training set by all workers together (samples = "
        "epochs x training-set size).",
    )
    seconds: float | None = Field(
        None, gt=0, description="Wall-clock limit of training, whichever comes first."
    )

    @model_validator(mode="after")
    def _one_amount(self) -> BudgetSpec:
        if self.samples is not None and self.epochs is not None:
            raise ValueError("training.budget: set samples or epochs, not both")
        if self.samples is None and self.epochs is None and self.seconds is None:
            raise ValueError("training.budget: set samples, epochs or seconds")
        return self


DEFAULT_STEPS = 300
TELEPORTATION_NEEDS_PLAIN_SGD = (
    "teleportation moves slot models between workers without their optimizer state: "
    "use optimizer.name sgd with momentum 0 (plain SGD)"
)


class TrainingSpec(Model):
    """What is trained, on what, for how long."""

    model: str = Field(
        "mlp",
        min_length=1,
        description="Built-in model (mlp, logreg) or an importable factory 'module:function'.",
    )
    dataset: str = Field(
        "digits",
        min_length=1,
        description=(
            "Built-in offline data set (digits; synthetic: a Gaussian mixture; clusters: "
            "harder, needs the mlp) or an importable factory 'module:function'."
        ),
    )
    steps: int | None = Field(
        None,
        ge=1,
        description=(
            f"Rounds each worker runs, when no budget is set (default {DEFAULT_STEPS}). "
            "Asynchronous workers then all run this many, so the slowest sets the pace; "
            "a budget lets the fast ones do more."
        ),
    )
    budget: BudgetSpec | None = Field(
        None,
        description="Job-wide training budget (samples, epochs and/or seconds) instead of steps.",
    )
    eval_every: int = Field(50, ge=1, description="Steps between progress reports.")
    seed: int = Field(0, ge=0, description="Seed shared by all workers (init, shards, schedules).")
    data_split: DataSplitSpec = Field(
        default_factory=DataSplitSpec,
        description="How the data is split across workers.",
        json_schema_extra=nested_default(),
    )
    checkpoint: CheckpointSpec | None = Field(None, description="Optional checkpointing.")
    loss: str = Field(
        "cross_entropy",
        min_length=1,
        description=(
            "Built-in loss (cross_entropy) or an importable factory 'module:function' "
            "returning a callable (logits, targets) -> loss. A model whose output has a "
            "non-None .loss (a transformers-style output object) is trained on that."
        ),
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: forward and loss under torch.autocast in bfloat16 "
        "(parameters, gradients and the exchanges stay fp32).",
    )

    @model_validator(mode="after")
    def _steps_or_budget(self) -> TrainingSpec:
        if self.steps is not None and self.budget is not None:
            raise ValueError("training: set steps or budget, not both")
        return self

    @property
    def rounds(self) -> int | None:
        """Rounds per worker when training is counted in steps (no budget)."""
        return None if self.budget is not None else (self.steps or DEFAULT_STEPS)


class TrainerConfig(Model):
    """Everything one worker needs; rendered by the operator, parsed by the trainer."""

    job: str = Field(description="Name of the DecentralizedTrainingJob.")
    replicas: int = Field(ge=1, description="Number of worker slots.")
    min_replicas: int | None = Field(
        None, ge=1, description="Members needed to train (default: replicas); fewer wait."
    )
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    store_host: str = Field("127.0.0.1", description="Host of the job's coordinator store.")
    store_port: int = Field(29400, ge=1, le=65535, description="Port of the coordinator store.")
    backend: Literal["gloo", "nccl"] = Field("gloo", description="torch.distributed backend.")
    timeout_seconds: float = Field(
        60.0, gt=0, description="Collective and rendezvous timeout (torch's 30 min hides hangs)."
    )

    @model_validator(mode="after")
    def _fits(self) -> TrainerConfig:
        if self.algorithm.round_seconds is not None and self.algorithm.name != "allreduce":
            raise ValueError(ROUND_SECONDS_IS_ALLREDUCES)
        k = self.algorithm.active_nodes
        if isinstance(k, int) and k > self.replicas:
            raise ValueError(
                f"algorithm.activeNodes ({k}) must not exceed replicas ({self.replicas})"
            )
        plain = self.optimizer.name == "sgd" and not self.optimizer.momentum
        if self.algorithm.name == "teleportation" and not plain:
            raise ValueError(TELEPORTATION_NEEDS_PLAIN_SGD)
        return self
