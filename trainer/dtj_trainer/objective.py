"""What a step minimises and how a model is scored: the user's model output (logits,
or an object with .logits and .loss, as transformers models return), the job's
loss, the optimizer with its schedule, and evaluation in eval mode."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .config import OptimizerSpec
from .registry import load_factory

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BUILTIN_LOSSES: dict[str, LossFn] = {"cross_entropy": nn.functional.cross_entropy}


def build_loss(name: str) -> LossFn:
    """A built-in loss by name, or the callable an importable factory returns."""
    if name in BUILTIN_LOSSES:
        return BUILTIN_LOSSES[name]
    loss = load_factory(name, what="loss", builtin=sorted(BUILTIN_LOSSES))()
    if not callable(loss):
        raise TypeError(f"loss factory {name!r} must return a callable (logits, targets) -> loss")
    return loss


def logits_of(out: Any) -> torch.Tensor:
    """The predictions in a model's output: the tensor itself, `.logits`, or the first
    element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"the model returned {type(out).__name__}: return a tensor of logits, or an object "
        "with .logits (and optionally .loss)"
    )


def loss_of(out: Any, targets: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """The output's own `.loss` when it has one, else the job's loss on its logits."""
    own = getattr(out, "loss", None)
    if isinstance(own, torch.Tensor):
        return own
    return loss_fn(logits_of(out), targets)


def autocast(model: nn.Module, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16: autocast on the model's device; fp32: nothing."""
    if precision != "bf16":
        return contextlib.nullcontext()
    device = next(iter(model.parameters()), torch.zeros(0)).device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off, BatchNorm on its running statistics) and no autograd;
    the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def build_optimizer(spec: OptimizerSpec, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if spec.name == "adamw":
        return torch.optim.AdamW(
            params,
            lr=spec.lr,
            betas=(spec.beta1, spec.beta2),
            eps=spec.eps,
            weight_decay=spec.weight_decay,
        )
    return torch.optim.SGD(
        params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )


def set_lr(optimizer: torch.optim.Optimizer, spec: OptimizerSpec, progress: float) -> float:
    """The scheduled step size at `progress` (0-1) of training, set on every group."""
    lr = spec.lr * spec.schedule.factor(progress)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def loss_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> float:
    with evaluating(model):
        return float(loss_of(model(x), y, loss_fn).item())
