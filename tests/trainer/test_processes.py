"""Real worker processes over torch.distributed (gloo on 127.0.0.1)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from dtj_operator import cli
from dtj_trainer import checkpoint, launcher, simulator
from dtj_trainer.config import TrainerConfig

pytestmark = pytest.mark.procs


# Per-method settings that reach the demo's accuracy target on digits.
SETTINGS = {
    "allreduce": {"optimizer": {"lr": 0.1, "momentum": 0.9}},
    "dpsgd": {"optimizer": {"lr": 0.1, "momentum": 0.9}},
    # every gradient, own or received, goes through momentum, scaled by 1/n (the default)
    "dasgd": {"optimizer": {"lr": 0.1, "momentum": 0.9}},
    "gosgd": {"optimizer": {"lr": 0.1}},
    # slot models travel without the worker's momentum buffer
    "teleportation": {"optimizer": {"lr": 0.1}, "algorithm": {"activeNodes": 2}},
}


def config(algorithm: str, **training) -> TrainerConfig:
    extra = SETTINGS[algorithm]
    return TrainerConfig.model_validate(
        {
            "job": f"t-{algorithm}",
            "replicas": 4,
            "algorithm": {"name": algorithm, "topology": "ring", **extra.get("algorithm", {})},
            "optimizer": extra["optimizer"],
            "training": {"steps": 300, "evalEvery": 100, **training},
        }
    )


@pytest.mark.parametrize("algorithm", list(SETTINGS))
def test_four_processes_reach_the_demo_accuracy(algorithm):
    out = io.StringIO()
    result = launcher.run(config(algorithm), out=out)
    assert result.averaged_accuracy >= 0.90, out.getvalue()
    assert "step   300/300" in out.getvalue()
    if algorithm == "allreduce":
        assert result.consensus_distance < 1e-8, "all-reduce keeps the models identical"
    elif algorithm != "teleportation":  # k=2 slots on a 2-ring agree after every round
        assert result.consensus_distance > 0.0, "gossip leaves the models apart"


@pytest.mark.parametrize("algorithm", ["allreduce", "dpsgd", "teleportation"])
def test_simulator_and_torch_distributed_agree(algorithm, tmp_path):
    """Same seed, same synchronous method: the same parameters, to float tolerance. Fixed
    shards: the data ledger gives chunks to whoever asks first, an order real processes
    do not repeat."""
    cfg = config(
        algorithm,
        steps=40,
        checkpoint={"path": str(tmp_path), "everySteps": 40},
        dataSplit={"kind": "iid"},
    )
    launcher.run(cfg, out=io.StringIO())
    # The simulator from scratch (with the same checkpoint path it would resume at 40).
    fresh = cfg.training.model_copy(update={"checkpoint": None})
    _, workers = simulator.simulate(cfg.model_copy(update={"training": fresh}))
    for w in workers:
        real = checkpoint.load(tmp_path, w.transport.rank)
        assert real["step"] == 40
        assert torch.allclose(real["params"], w.local.params(), atol=1e-4), w.transport.rank


@pytest.mark.parametrize("algorithm", ["dasgd", "teleportation"])
def test_every_method_trains_with_its_defaults_on_real_processes(algorithm):
    """Finding 0 of issue 18: teleportation's default (activeNodes auto) crashed every
    real worker; dasgd's default diverged with the quickstart's optimizer. Only the
    method is set here (and momentum 0 where teleportation requires it)."""
    optimizer = {"lr": 0.1, "momentum": 0.0 if algorithm == "teleportation" else 0.9}
    cfg = TrainerConfig.model_validate(
        {
            "job": f"defaults-{algorithm}",
            "replicas": 4,
            "algorithm": {"name": algorithm},
            "optimizer": optimizer,
            "training": {"steps": 150, "evalEvery": 50},
        }
    )
    out = io.StringIO()
    result = launcher.run(cfg, out=out)
    assert result.averaged_accuracy >= 0.90, out.getvalue()


def test_a_failing_worker_fails_the_run_with_its_rank():
    bad = config("dpsgd", model="no_such_module:build")
    with pytest.raises(RuntimeError, match=r"worker \d exited with code"):
        launcher.run(bad, out=io.StringIO())


def test_dtj_local_runs_the_quickstart_manifest():
    proc = subprocess.run(
        [sys.executable, "-m", "dtj_operator.cli", "local", "examples/quickstart.yaml"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("Result: test accuracy")
    accuracy = float(last.split("test accuracy ")[1].split("%")[0])
    assert accuracy >= 90.0


def test_dtj_local_rejects_an_invalid_manifest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: training.dtj.io/v1alpha1\nkind: DecentralizedTrainingJob\n"
        "metadata: {name: bad}\nspec: {replicas: -1}\n"
    )
    with pytest.raises(
        SystemExit, match=r"field spec\.replicas: Input should be greater than or equal to 1"
    ):
        cli.main(["local", str(bad)])
