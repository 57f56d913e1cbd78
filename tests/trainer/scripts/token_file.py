"""A user's script on a memory-mapped token file (sources.TokenFile), as a
language model trains on nanoGPT's train.bin: the file is read where the
ledger's chunks say, never loaded whole."""

import os

import dtj_trainer
import torch
from dtj_trainer.sources import TokenFile
from torch import nn

data = TokenFile(os.environ["TOKENS"], block=int(os.environ.get("BLOCK", "2048")))
job = dtj_trainer.init()
model = nn.Sequential(nn.EmbeddingBag(65536, 8), nn.Linear(8, 16))
opt = job.wrap(model, torch.optim.SGD(model.parameters(), lr=0.01))
for x, y in job.batches(data):
    loss = nn.functional.cross_entropy(model(x), y[:, -1] % 16)
    loss.backward()
    opt.step()
    opt.zero_grad()
    job.report(loss=loss.item())
job.finish()
