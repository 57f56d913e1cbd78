"""Built-in models, and user models from an importable factory."""

from __future__ import annotations

from torch import nn

from .registry import load_factory


def mlp(num_features: int, num_classes: int) -> nn.Module:
    """A small two-layer perceptron: enough for 97% on digits in seconds on a CPU."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(num_features, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def logreg(num_features: int, num_classes: int) -> nn.Module:
    """Multinomial logistic regression (a convex sanity check)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(num_features, num_classes))


BUILTIN = {"mlp": mlp, "logreg": logreg}


def build(name: str, *, num_features: int, num_classes: int) -> nn.Module:
    """A built-in model by name, or `module:function(num_features=, num_classes=)`."""
    factory = BUILTIN.get(name) or load_factory(name, what="model", builtin=sorted(BUILTIN))
    model = factory(num_features=num_features, num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {name!r} must return a torch.nn.Module")
    return model
