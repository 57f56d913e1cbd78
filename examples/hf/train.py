"""A Hugging Face transformers GPT-2, built from its config (no download), trained by the job.

The model is a library's: it returns an output object with `.loss`, has buffers
of its own (the causal masks) and dropout, and knows nothing of the job. The
job's lines are marked `# job`. Alone: `python examples/hf/train.py`; four
local workers: `dtj local examples/hf/job.yaml`. Needs `pip install transformers`.
"""

import math
import sysconfig
from pathlib import Path

import dtj_trainer
import torch
from torch.utils.data import Dataset, default_collate
from transformers import GPT2Config, GPT2LMHeadModel

CONTEXT = 64


def corpus(limit: int = 500_000) -> torch.Tensor:
    """The interpreter's own standard library as bytes: a corpus with no download."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    text = b"".join(f.read_bytes() for f in files)[:limit]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


class Windows(Dataset):
    """Batches as a transformers model takes them: dicts of input_ids."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens) // CONTEXT

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i * CONTEXT : (i + 1) * CONTEXT]}


def main() -> None:
    job = dtj_trainer.init()  # job: before the model, so every worker starts alike
    tokens = corpus()
    train, val = Windows(tokens[len(tokens) // 20 :]), Windows(tokens[: len(tokens) // 20])
    config = GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config)
    adamw = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    opt = job.wrap(model, adamw, clip_grad_norm=1.0)  # job: clips what the step applies
    held_out = default_collate([val[i] for i in range(128)])

    @torch.no_grad()
    def evaluate() -> dict[str, float]:  # the job calls it at each report and at the end
        model.eval()
        loss = float(model(**held_out, labels=held_out["input_ids"]).loss)
        model.train()
        return {"val_loss": loss, "perplexity": math.exp(loss)}

    for batch in job.batches(train, evaluate=evaluate):  # job
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        job.report(loss=loss.item())  # job
        opt.step()
        opt.zero_grad()
    job.finish()  # job: the result holds evaluate() of the averaged model


if __name__ == "__main__":
    main()
