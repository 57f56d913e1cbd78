"""A user's script that records which samples it trained (the data ledger's test).

Each sample is (features, label, index); after each step the batch's indices
go to `$DTJ_RECORD/trained-<slot>-<pid>.jsonl`, one JSON list a line, flushed,
so a SIGKILL loses at most the line being written.
"""

import json
import os
from pathlib import Path

import dtj_trainer
import torch
from torch import nn

SIZE = int(os.environ.get("RECORD_SAMPLES", "60000"))
LOADERS = int(os.environ.get("RECORD_LOADER_WORKERS", "0"))  # DataLoader processes


class Indexed(torch.utils.data.Dataset):
    """Samples made from their index: no memory, the same on every worker."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.centres = torch.randn(10, 16, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        label = i % 10
        noise = torch.sin(torch.arange(16, dtype=torch.float32) * (i % 997 + 1))
        return self.centres[label] + noise, label, i


job = dtj_trainer.init()
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
opt = job.wrap(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
out = Path(os.environ["DTJ_RECORD"]) / f"trained-{job.rank}-{os.getpid()}.jsonl"
with out.open("a") as record:
    for x, y, idx in job.batches(Indexed(SIZE), num_workers=LOADERS):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        record.write(json.dumps(idx.tolist()) + "\n")
        record.flush()
        job.report(loss=loss.item())
job.finish()
