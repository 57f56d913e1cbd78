"""The worked example of a user's own model and data set trains (in the simulator)."""

from __future__ import annotations

import sys

import yaml
from dtj_operator import api, render
from dtj_trainer import simulator

from tests.builders import ROOT


def test_custom_model_example_trains(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "custom_model"))
    manifest = yaml.safe_load((ROOT / "examples" / "custom-model.yaml").read_text())
    job = api.DecentralizedTrainingJob.from_body(manifest)
    cfg = render.trainer_config(job, store_host="127.0.0.1")
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"steps": 150})})
    results, workers = simulator.simulate(cfg)
    model = workers[0].local.model
    assert type(model[1]).__name__ == "Conv2d"
    bn = model[2]
    assert type(bn).__name__ == "BatchNorm2d"
    assert int(bn.num_batches_tracked) == 150  # trained in train() mode: statistics moved
    assert model.training  # and left in it after evaluation (which ran in eval())
    assert results[0].averaged_accuracy > 0.8
    sys.modules.pop("digits_cnn", None)


def test_sync_methods_report_a_live_consensus_distance():
    from dtj_trainer.config import TrainerConfig

    cfg = TrainerConfig.model_validate(
        {"job": "c", "replicas": 4, "training": {"steps": 20, "evalEvery": 10, "model": "logreg"}}
    )
    reports = []
    simulator.simulate(cfg, report=reports.append)
    distances = [p.consensus_distance for p in reports]
    assert all(d is not None and d > 0 for d in distances)
