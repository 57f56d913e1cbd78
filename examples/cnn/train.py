"""A small CNN with BatchNorm on scikit-learn's bundled 8x8 digit images, trained by
the job: plain torch (SGD with momentum, a cosine schedule, eval() for evaluation)
with the job's lines marked `# job`. BatchNorm's running statistics are buffers:
they move with warm starts and hand-offs and are averaged into the job's result.

Alone: `python examples/cnn/train.py`; four local workers:
`dtj local examples/cnn/job.yaml`; a cluster: `kubectl apply` the same manifest.
"""

import hashlib
import math

import dtj_trainer
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset


def images() -> tuple[TensorDataset, TensorDataset]:
    """1,797 images in 10 classes, the same 75/25 split on every worker."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.75 * len(y))
    train, test = order[:cut], order[cut:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
    )  # fmt: skip


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()  # BatchNorm normalises with its running statistics
    x, y = data.tensors
    correct = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return correct


def fingerprint(model: nn.Module) -> float:
    """A number that names the model's whole state (parameters and buffers)."""
    blob = b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values())
    return int(hashlib.sha256(blob).hexdigest()[:12], 16) / 2**48


def main() -> None:
    job = dtj_trainer.init()  # job: before the model, so every worker starts alike
    train, test = images()
    model = cnn()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt = job.wrap(model, sgd)  # job
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda _: 0.5 * (1 + math.cos(math.pi * job.progress)),  # the job's progress
    )
    job.track(schedule=schedule)  # job: the schedule moves with the worker too
    for i, (x, y) in enumerate(job.batches(train)):  # job: this worker's shard, the budget
        if i == 0:  # the model this worker starts from: the members' after a warm start
            job.report(start_accuracy=accuracy(model, test))  # job
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
        job.report(loss=loss.item())  # job
        if job.step % job.config.training.eval_every == 0:
            job.report(test_accuracy=accuracy(model, test))  # job
    bn = model[1]  # the first BatchNorm: its running variance is no longer the initial 1
    job.finish(  # job: the model is now the job's average, buffers included
        test_accuracy=accuracy(model, test),
        model_fingerprint=fingerprint(model),
        running_var_mean=float(bn.running_var.mean()),
    )


if __name__ == "__main__":
    main()
