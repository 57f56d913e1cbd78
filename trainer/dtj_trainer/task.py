"""The built-in task, from the spec: training.dataset, model, loss and how it is scored.

One source for both users of it: the built-in trainer's script (builtin.py, on
the public API) and the simulator's virtual workers (`Worker.build`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import data, models, objective
from .config import TrainerConfig

VALIDATION_FRACTION = 0.1  # of the training set, held out: teleportation's k search
Scores = Callable[[], dict[str, float]]


@dataclass(frozen=True)
class Task:
    """The data set split into training, validation and test; the model and loss."""

    cfg: TrainerConfig
    data: data.Dataset
    loss_fn: objective.LossFn

    @property
    def n_val(self) -> int:
        return int(VALIDATION_FRACTION * len(self.data.y_train))

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.x_train[self.n_val :], self.data.y_train[self.n_val :]

    @property
    def val(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.x_train[: self.n_val], self.data.y_train[: self.n_val]

    def model(self) -> nn.Module:
        """The model at x0: seeded with training.seed, so identical on every worker."""
        torch.manual_seed(self.cfg.training.seed)
        ds = self.data
        return models.build(
            self.cfg.training.model, num_features=ds.num_features, num_classes=ds.num_classes
        )

    def scores(self, model: nn.Module) -> Scores:
        """What the job reports of `model`: its test accuracy, and for teleportation's
        activeNodes: auto the validation loss the k search ranks candidates by."""
        algorithm = self.cfg.algorithm
        ranks_k = algorithm.name == "teleportation" and algorithm.active_nodes == "auto"

        def evaluate() -> dict[str, float]:
            out = {"test_accuracy": accuracy(model, self.data.x_test, self.data.y_test)}
            if ranks_k:
                out["val_loss"] = objective.loss_on(model, *self.val, self.loss_fn)
            return out

        return evaluate


def load(cfg: TrainerConfig) -> Task:
    """The spec's task; ValueError or TypeError when the spec names one that cannot be
    built (an unknown data set, model or loss, a factory that does not import)."""
    return Task(
        cfg,
        data.load(cfg.training.dataset, cfg.training.seed),
        objective.build_loss(cfg.training.loss),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with objective.evaluating(model):
        return float((objective.logits_of(model(x)).argmax(dim=1) == y).float().mean().item())
