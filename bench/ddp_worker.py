"""What users run today: torch DistributedDataParallel (bucketed all-reduce) on gloo.

One process per worker, started by bench/heterogeneity.py like torchrun would
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Same data, shards, model, seed,
batch and modelled compute as the project's workers (dtj_trainer's own data
and model code), so the comparison is of the training method only. Every
round each worker computes a batch of its shard, DDP averages the gradients
(all workers wait for the slowest), and the optimizer steps.

Prints one JSON line per evaluation ({"step", "time", "test_accuracy", ...})
and a final {"result": ...} line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from dtj_trainer import data, models
from dtj_trainer.config import DataSplitSpec
from dtj_trainer.emulation import Emulation
from torch import nn
from torch.nn.parallel import DistributedDataParallel

VALIDATION_FRACTION = 0.1  # as dtj_trainer.task: the same training rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="mlp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--samples", type=int, required=True, help="job-wide sample budget")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--sample-seconds", type=float, default=0.0, help="modelled compute")
    p.add_argument("--slowdown", type=float, default=1.0, help="this worker's factor")
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0,
        timeout=timedelta(seconds=60),
    )
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)

    ds = data.load(args.dataset, args.seed)
    n_val = int(VALIDATION_FRACTION * len(ds.y_train))
    x_train, y_train = ds.x_train[n_val:], ds.y_train[n_val:]
    shards = data.split(y_train.numpy(), world, DataSplitSpec(), args.seed)
    mine = torch.from_numpy(shards[rank])
    sampler = data.Sampler(x_train[mine], y_train[mine], seed=args.seed * 100_003 + rank)
    torch.manual_seed(args.seed)
    model = models.build(args.model, num_features=ds.num_features, num_classes=ds.num_classes)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=args.momentum)
    loss_fn = nn.CrossEntropyLoss()
    rounds = max(1, args.samples // (args.batch * world))

    dist.barrier()
    start = time.time()
    for step in range(1, rounds + 1):
        t0 = time.perf_counter()
        x, y = sampler.next(args.batch)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ddp(x), y)
        compute = time.perf_counter() - t0
        # Modelled compute before the gradients are reduced, like a slower GPU.
        extra = Emulation(args.sample_seconds, args.slowdown).extra_seconds(compute, args.batch)
        time.sleep(extra)
        loss.backward()  # DDP all-reduces the gradient buckets here
        opt.step()
        if step % args.eval_every == 0 or step == rounds:
            with torch.no_grad():
                acc = float((model(ds.x_test).argmax(1) == ds.y_test).float().mean())
            record = {
                "rank": rank,
                "step": step,
                "time": time.time(),
                "loss": loss.item(),
                "test_accuracy": acc,
                "samples": step * args.batch * world,
            }
            print(json.dumps(record), flush=True)
    wall = time.time() - start
    with torch.no_grad():
        acc = float((model(ds.x_test).argmax(1) == ds.y_test).float().mean())
    result = {"accuracy": acc, "seconds": wall, "samples": rounds * args.batch * world}
    print(json.dumps({"result": result, "rank": rank, "start": start}), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
