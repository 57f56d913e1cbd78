"""General training in the built-in path: adamw, the schedule, clipping, bf16, model
outputs with .logits/.loss, a user loss, and evaluation in eval mode (simulator)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from dtj_operator import api
from dtj_trainer import objective, simulator
from dtj_trainer.algorithms.base import Local
from dtj_trainer.config import OptimizerSpec, ScheduleSpec, TrainerConfig
from pydantic import ValidationError
from torch import nn


def cfg(**sections: Any) -> TrainerConfig:
    training = {"steps": 60, "evalEvery": 20, **sections.pop("training", {})}
    return TrainerConfig.model_validate(
        {"job": "obj", "replicas": 4, "training": training, **sections}
    )


def test_the_schedule_warms_up_then_follows_a_cosine_to_its_end_factor():
    s = ScheduleSpec(warmup=0.1, decay="cosine", end_factor=0.1)
    assert s.factor(0.0) == 0.0
    assert s.factor(0.05) == pytest.approx(0.5)
    assert s.factor(0.1) == pytest.approx(1.0)
    assert s.factor(0.55) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the cosine
    assert s.factor(1.0) == pytest.approx(0.1)
    assert ScheduleSpec().factor(0.7) == 1.0  # the default changes nothing


def test_adamw_trains_with_its_betas_and_the_scheduled_lr_is_applied():
    c = cfg(
        optimizer={
            "name": "adamw",
            "lr": 0.01,
            "beta1": 0.8,
            "weightDecay": 0.01,
            "schedule": {"warmup": 0.2, "decay": "cosine"},
        }
    )
    results, workers = simulator.simulate(c)
    opt = workers[0].local.optimizer
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.8, 0.999)
    assert opt.state  # its moments exist, so state syncs and hand-offs carry them
    # The last round ran at step 59 of 60: lr = 0.01 x cosine factor there.
    expected = 0.01 * c.optimizer.schedule.factor(59 / 60)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected)
    assert results[0].averaged_accuracy > 0.85


def test_momentum_belongs_to_sgd_and_teleportation_needs_plain_sgd():
    with pytest.raises(ValidationError, match="momentum is sgd's"):
        OptimizerSpec(name="adamw", momentum=0.9)
    with pytest.raises(ValidationError, match=r"optimizer\.name sgd with momentum 0"):
        cfg(algorithm={"name": "teleportation", "activeNodes": 2}, optimizer={"name": "adamw"})
    base = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "x"}}
    spec = {"replicas": 2, "algorithm": {"name": "teleportation"}, "optimizer": {"name": "adamw"}}
    with pytest.raises(ValidationError, match=r"spec\.optimizer"):
        api.DecentralizedTrainingJob.from_body({**base, "spec": spec})


def test_gradients_are_clipped_to_the_norm_before_the_step():
    model = nn.Linear(4, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    local = Local(model, opt, None, 1, 1.0, nn.functional.mse_loss, clip_norm=0.5)  # type: ignore[arg-type]
    before = model.weight.detach().clone()
    model.weight.grad = torch.full_like(model.weight, 10.0)  # norm 20
    local.step()
    assert float((model.weight.detach() - before).norm()) == pytest.approx(0.5, rel=1e-5)


@dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class ObjectModel(nn.Module):
    """Returns an output object, as transformers models do; counts its modes."""

    def __init__(self, num_features: int, num_classes: int, wrap: bool = True) -> None:
        super().__init__()
        self.wrap = wrap
        self.net = nn.Sequential(
            nn.Linear(num_features, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, num_classes)
        )
        self.modes: list[bool] = []
        self.dtypes: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor) -> Output | torch.Tensor:
        self.modes.append(self.training)
        logits = self.net(x.flatten(1))
        self.dtypes.add(logits.dtype)
        return Output(logits) if self.wrap else logits


def object_model(num_features: int, num_classes: int) -> nn.Module:
    return ObjectModel(num_features, num_classes)


def tensor_model(num_features: int, num_classes: int) -> nn.Module:
    return ObjectModel(num_features, num_classes, wrap=False)


CALLS = {"loss": 0}


def counting_loss() -> objective.LossFn:
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        CALLS["loss"] += 1
        return nn.functional.cross_entropy(logits, y)

    return loss


def test_a_model_returning_an_object_trains_on_a_user_loss_and_is_evaluated_in_eval_mode():
    CALLS["loss"] = 0
    c = cfg(training={"model": f"{__name__}:object_model", "loss": f"{__name__}:counting_loss"})
    results, workers = simulator.simulate(c)
    twin = cfg(training={"model": f"{__name__}:tensor_model"})  # logits as a tensor
    (twin_result, *_), _ = simulator.simulate(twin)
    model = workers[0].local.model
    assert isinstance(model, ObjectModel)
    assert CALLS["loss"] >= 4 * 60  # every worker's every step
    assert True in model.modes and False in model.modes  # trained in train, scored in eval
    assert model.training  # and back in train mode after scoring
    # The same training as the twin that returns its logits as a tensor.
    assert results[0].averaged_accuracy == twin_result.averaged_accuracy


def test_an_output_with_its_own_loss_is_trained_on_that_loss():
    logits = torch.zeros(2, 3, requires_grad=True)
    own = logits.sum() * 0 + 7.0
    targets = torch.zeros(2).long()
    assert objective.loss_of(Output(logits, own), targets, counting_loss()).detach().item() == 7
    with pytest.raises(TypeError, match="return a tensor of logits"):
        objective.logits_of({"logits": logits})


def test_bf16_autocast_trains_and_keeps_fp32_parameters():
    model = f"{__name__}:tensor_model"
    results, workers = simulator.simulate(cfg(training={"model": model, "precision": "bf16"}))
    (fp32, *_), _ = simulator.simulate(cfg(training={"model": model}))
    trained = workers[0].local.model
    assert isinstance(trained, ObjectModel)
    assert torch.bfloat16 in trained.dtypes  # the forward ran under autocast
    assert all(p.dtype == torch.float32 for p in trained.parameters())
    assert abs(results[0].averaged_accuracy - fp32.averaged_accuracy) <= 0.03


@pytest.mark.parametrize("algorithm", ["dpsgd", "allreduce"])
def test_a_run_resumed_from_its_checkpoint_trains_exactly_as_an_uninterrupted_one(
    tmp_path, algorithm
):
    """Checkpoints are read back: 60 steps, stop, resume to 120 gives the same models,
    to the bit, as 120 steps in one go: model, optimizer (momentum, adamw's moments)
    and each worker's place in its data all came back."""

    def job(steps: int, path: Any = None, split: str = "iid") -> TrainerConfig:
        return cfg(
            algorithm={"name": algorithm},
            optimizer={"name": "adamw", "lr": 0.01}
            if algorithm == "dpsgd"
            else {"lr": 0.05, "momentum": 0.9},
            training={
                "steps": steps,
                "dataSplit": {"kind": split},
                **({"checkpoint": {"path": str(path), "everySteps": 40}} if path else {}),
            },
        )

    first, _ = simulator.simulate(job(60, tmp_path))
    assert first[0].steps == 60
    reports: list[Any] = []
    resumed, workers = simulator.simulate(job(120, tmp_path), report=reports.append)
    assert min(r.step for r in reports) == 80  # it went on from step 60 ...
    assert max(r.rounds for r in reports) == 60  # ... and trained only the 60 left
    straight, reference = simulator.simulate(job(120))
    for w, ref in zip(workers, reference, strict=True):
        assert torch.equal(w.local.params(), ref.local.params())
    assert resumed[0].averaged_accuracy == straight[0].averaged_accuracy
    state = torch.load(tmp_path / "worker-0.pt", weights_only=True)  # loadable, safely
    assert state["step"] == 120 and state["optimizer"]["state"]

    # With the data ledger the chunks go to whoever asks first, so which worker trains
    # what is the coroutines' order, not bitwise repeatable; the ledger itself resumes
    # mid-epoch: one step after the resume every worker holds what it would have held.
    ledgered = tmp_path / "ledger"
    simulator.simulate(job(60, ledgered, "ledger"))
    _, resumed_workers = simulator.simulate(job(61, ledgered, "ledger"))
    _, straight_workers = simulator.simulate(job(61, split="ledger"))
    held = [w.local.sampler.reader.held for w in resumed_workers]  # type: ignore[attr-defined]
    assert held == [w.local.sampler.reader.held for w in straight_workers]  # type: ignore[attr-defined]
    assert held[0][0][0] > 0  # several epochs in, and mid-chunk
