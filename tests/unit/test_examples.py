"""Every example manifest is a valid job, and says what its comments promise."""

from __future__ import annotations

import pytest
import yaml
from dtj_operator import api, render

from tests.builders import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("**/*.yaml"))


def _job(path):
    body = yaml.safe_load(path.read_text())
    body["metadata"] |= {"namespace": "ns", "uid": "u"}
    return api.DecentralizedTrainingJob.from_body(body), body


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_a_valid_job(path):
    job, body = _job(path)
    assert job.name and render.desired_children(job, body)


def test_the_quickstart_asks_for_no_gpu_so_it_fits_kind():
    job, _ = _job(ROOT / "examples" / "quickstart.yaml")
    assert "nvidia.com/gpu" not in str(job.spec.template.resources)
    assert render.trainer_config(job).backend == "gloo"
    gpu, _ = _job(ROOT / "examples" / "gpu.yaml")
    assert render.trainer_config(gpu).backend == "nccl"


def test_the_spot_example_fills_on_demand_first_and_counts_spot_losses_as_preemptions():
    job, body = _job(ROOT / "examples" / "spot.yaml")
    pools = render.assign_pools(job)
    assert [p.name for p in pools if p] == ["on-demand"] * 2 + ["spot"] * 6
    assert [p.preemptible for p in job.spec.node_pools] == [False, True]
    coordinator = render.coordinator_pod(job, render.owner_reference(body))
    assert coordinator["spec"]["nodeSelector"] == {"karpenter.sh/capacity-type": "on-demand"}


def _readme_specs() -> list[dict]:
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    docs = [d for b in blocks for d in yaml.safe_load_all(b)]
    return [d["spec"] for d in docs if isinstance(d, dict) and set(d) == {"spec"}]


@pytest.mark.parametrize("spec", _readme_specs(), ids=lambda s: ",".join(s))
def test_every_spec_fragment_in_the_readme_is_valid(spec):
    """The README's `spec:` snippets (algorithms, batching, optimizer, ...) validate."""
    body = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "r"}}
    job = api.DecentralizedTrainingJob.from_body({**body, "spec": spec})
    assert render.trainer_config(job, store_host="127.0.0.1")


def test_dtj_local_runs_the_templates_command_with_this_python_in_its_working_dir():
    import sys

    from dtj_operator.cli import local_command

    lm = ROOT / "examples" / "lm" / "job.yaml"
    job, _ = _job(lm)
    assert local_command(job, lm) == ([sys.executable, "examples/lm/train.py"], None)
    template = job.spec.template.model_copy(
        update={"command": ["torchrun-like"], "args": ["--x"], "working_dir": "sub"}
    )
    moved = job.model_copy(update={"spec": job.spec.model_copy(update={"template": template})})
    assert local_command(moved, lm) == (["torchrun-like", "--x"], lm.parent / "sub")
    builtin, _ = _job(ROOT / "examples" / "quickstart.yaml")
    assert local_command(builtin, lm) == (None, None)
