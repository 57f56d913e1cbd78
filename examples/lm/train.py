"""A byte-level GPT on the Python standard library's own sources, trained by the job.

Plain torch (AdamW, warmup + cosine, clipping, autocast) with the job's lines
marked `# job`. Alone: `python examples/lm/train.py`; four local workers:
`dtj local examples/lm/job.yaml`; a cluster: `kubectl apply` the same manifest.
"""

import hashlib
import math
import os
import sysconfig
import tempfile
from pathlib import Path

import dtj_trainer
import torch
import torch.nn.functional as F
from dtj_trainer.sources import TokenFile
from torch import nn
from torch.utils.data import Dataset, default_collate

CONTEXT, DIM, LAYERS, HEADS = 64, int(os.environ.get("LM_DIM", 64)), 2, 4
BF16 = os.environ.get("LM_BF16") == "1"  # bfloat16 autocast (fast on recent GPUs)


def corpus(limit: int = 1_000_000) -> bytes:
    """The interpreter's own standard library as bytes: a corpus with no download."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return b"".join(f.read_bytes() for f in files)[:limit]


def token_file(data: bytes) -> Path:
    """The training tokens as a flat file (as nanoGPT's train.bin), written once: the
    workers read it memory-mapped, never whole."""
    path = Path(tempfile.gettempdir()) / f"dtj-lm-{hashlib.sha1(data).hexdigest()[:12]}.bin"
    if not path.exists():
        partial = path.with_suffix(f".{os.getpid()}.part")
        partial.write_bytes(data)
        partial.replace(path)  # atomic: another worker may be writing it too
    return path


class Windows(Dataset):
    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // CONTEXT

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.tokens[i * CONTEXT : (i + 1) * CONTEXT + 1]
        return chunk[:-1], chunk[1:]


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(256, DIM), nn.Parameter(torch.zeros(CONTEXT, DIM))
        block = nn.TransformerEncoderLayer(DIM, HEADS, 4 * DIM, 0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(block, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.blocks(self.embed(x) + self.pos, mask=mask, is_causal=True))


def loss_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", torch.bfloat16, enabled=BF16):
        return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())


@torch.no_grad()
def evaluate(model: nn.Module, val: Windows, n: int = 256) -> float:
    model.eval()
    x, y = default_collate([val[i] for i in range(min(n, len(val)))])
    loss = float(loss_on(model, x, y))
    model.train()
    return loss


def main() -> None:
    job = dtj_trainer.init()  # job: before the model, so every worker starts alike
    text = corpus()
    held_out = len(text) // 20
    train = TokenFile(token_file(text[held_out:]), CONTEXT, dtype="uint8")  # memory-mapped
    val = Windows(torch.frombuffer(bytearray(text[:held_out]), dtype=torch.uint8).long())
    model = GPT()
    opt = job.wrap(model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1))  # job

    def warmup_cosine(_: int) -> float:  # over the job's progress: its budget, not our steps
        return min(1.0, 20 * job.progress) * (0.55 + 0.45 * math.cos(math.pi * job.progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    job.track(schedule=schedule)  # job: the schedule moves with the worker too

    def scores() -> dict[str, float]:  # the job asks at each report and of the average
        v = evaluate(model, val)
        return {"val_loss": v, "perplexity": math.exp(v)}

    for x, y in job.batches(train, evaluate=scores):  # job: leased from the job's data ledger
        loss = loss_on(model, x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        job.report(loss=loss.item())  # job
        opt.step()
        opt.zero_grad()
        schedule.step()
    job.finish()  # job: the result, with scores() of the job's averaged model


if __name__ == "__main__":
    main()
