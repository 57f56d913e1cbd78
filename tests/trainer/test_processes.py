"""Real worker processes over torch.distributed (gloo on 127.0.0.1)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from dtj_operator import cli
from dtj_trainer import launcher
from dtj_trainer.config import TrainerConfig

pytestmark = pytest.mark.procs


def config(algorithm: str, **training) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": f"t-{algorithm}",
            "replicas": 4,
            "algorithm": {"name": algorithm, "topology": "ring"},
            "optimizer": {"lr": 0.1, "momentum": 0.9},
            "training": {"steps": 200, "evalEvery": 100, **training},
        }
    )


@pytest.mark.parametrize("algorithm", ["dpsgd", "allreduce"])
def test_four_processes_reach_the_demo_accuracy(algorithm):
    out = io.StringIO()
    result = launcher.run(config(algorithm), out=out)
    assert result.averaged_accuracy >= 0.90
    assert min(result.worker_accuracies) >= 0.85
    assert "step   200/200" in out.getvalue()
    if algorithm == "allreduce":
        assert result.consensus_distance < 1e-8, "all-reduce keeps the models identical"
    else:
        assert result.consensus_distance > 0.0


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
