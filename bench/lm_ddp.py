"""examples/lm/train.py with the project's lines swapped for plain torch: the baseline.

Started like torchrun starts a script (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
the same corpus, model, AdamW, warmup + cosine (over the steps), clipping and
batch as the example, with DistributedDataParallel for WORLD_SIZE > 1 (every
round waits for the slowest worker) and no wrapper at all for 1 (the API's
overhead is measured against this). Modelled compute as the project's workers'
DTJ_SIMULATE_* knobs: slept before the gradients are reduced, like a slower GPU.
Prints a JSON line per evaluation and a final {"result": ...} line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from dtj_trainer.emulation import Emulation
from torch import nn
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lm", ROOT / "examples" / "lm" / "train.py")
assert spec and spec.loader
lm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lm)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--sample-seconds", type=float, default=0.0)
    p.add_argument("--slowdown", type=float, default=1.0)
    args = p.parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
            is_master=rank == 0, timeout=timedelta(seconds=60),
        )  # fmt: skip
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    torch.manual_seed(0)
    tokens = lm.corpus()
    train, val = lm.Windows(tokens[len(tokens) // 20 :]), lm.Windows(tokens[: len(tokens) // 20])
    model = lm.GPT()
    net = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)

    def warmup_cosine(step: int) -> float:
        f = step / args.steps
        return min(1.0, 20 * f) * (0.55 + 0.45 * math.cos(math.pi * f))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    mine = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[rank::world]
    order = mine[torch.randperm(len(mine), generator=torch.Generator().manual_seed(rank))]
    if world > 1:
        dist.barrier()
    start = time.time()
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        at = (step - 1) * args.batch % max(1, len(order) - args.batch)
        x, y = torch.utils.data.default_collate(
            [train[int(i)] for i in order[at : at + args.batch]]
        )
        loss = nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten())
        real = time.perf_counter() - t0
        time.sleep(Emulation(args.sample_seconds, args.slowdown).extra_seconds(real, args.batch))
        loss.backward()  # DDP all-reduces the gradient buckets here
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            v = lm.evaluate(model, val)
            print(json.dumps({"rank": rank, "step": step, "time": time.time(), "val_loss": v}))
    wall = time.time() - start
    samples = args.steps * args.batch * world
    result = {"seconds": wall, "samples": samples, "val_loss": lm.evaluate(model, val)}
    print(json.dumps({"result": result, "rank": rank, "start": start}), flush=True)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
