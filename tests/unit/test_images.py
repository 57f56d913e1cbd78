"""The image recipes keep their promises (no Docker engine here to build them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.builders import ROOT

IMAGES = sorted((ROOT / "images").glob("*.Dockerfile"))


def _stages(text: str) -> dict[str, list[str]]:
    """Each stage's instructions (continuation lines joined), by name or index."""
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in (ln.strip() for ln in lines):
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            words = line.split()
            name = words[3] if len(words) > 3 and words[2].upper() == "AS" else str(len(stages))
            current = stages.setdefault(name, [])
        current.append(line)
    return stages


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.name)
def test_images_run_as_non_root_from_a_pinned_base(path: Path):
    text = path.read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", base.group(1))
    assert ":latest" not in base.group(1)
    assert "PIP_NO_CACHE_DIR=1" in text, "no pip cache in the image"
    stages = _stages(text)
    final = [s for s in stages.values() if any(i.startswith("CMD") for i in s)]
    assert final, "no runnable stage"
    for stage in final:
        assert stage[0].split()[1] == "${BASE}", stage[0]
        users = [i.split()[1] for i in stage if i.startswith("USER ")]
        # Numeric, so the kubelet can check runAsNonRoot; the uid the operator's pods use.
        assert users and users[-1] == "1000:1000", (path.name, users)


def test_the_trainer_has_a_cpu_and_a_cuda_variant_with_the_pinned_torch():
    stages = _stages((ROOT / "images" / "trainer.Dockerfile").read_text())
    assert {"cpu", "cuda"} <= stages.keys()
    pinned = re.search(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned
    assert f"torch=={pinned.group(1)}" in " ".join(stages["cpu"])
    assert "download.pytorch.org/whl/cpu" in " ".join(stages["cpu"])


def test_the_build_context_holds_only_what_the_images_copy():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*", "ignore everything, then allow what the images copy"
    copied = {
        src
        for path in IMAGES
        for line in path.read_text().splitlines()
        if line.startswith("COPY ") and "--from" not in line
        for src in line.split()[1:-1]
    }
    for src in copied:
        assert f"!{src.rstrip('/')}" in {r.rstrip("/") for r in rules}, src
