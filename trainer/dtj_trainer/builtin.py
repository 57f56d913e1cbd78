"""The built-in trainer (training.model, dataset, loss, optimizer): a script on the
public API, like a user's. What a worker pod runs without a command of its own
(`python -m dtj_trainer`), and what `dtj local` and the quickstart train."""

from __future__ import annotations

import torch

from . import objective, task
from .api import init
from .entrypoint import ConfigError


def main() -> None:
    job = init()
    cfg = job.config
    try:
        spec = task.load(cfg)
        model = spec.model()
    except (ValueError, TypeError) as e:  # an unknown name, a factory that fails
        raise ConfigError(e) from e
    opt = job.wrap(
        model,
        objective.build_optimizer(cfg.optimizer, model.parameters()),
        clip_grad_norm=cfg.optimizer.grad_clip_norm,
    )
    x, y = spec.train
    batches = job.batches(
        range(len(y)),  # sample indices: a batch is one slice of the in-memory tensors
        collate=lambda idx: (x[torch.tensor(idx)], y[torch.tensor(idx)]),
        labels=y.tolist(),
        evaluate=spec.scores(model),
    )
    for xb, yb in batches:
        objective.set_lr(opt, cfg.optimizer, job.progress)
        with objective.autocast(model, cfg.training.precision):
            loss = objective.loss_of(model(xb), yb, spec.loss_fn)
        loss.backward()
        job.report(loss=loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    job.finish()
