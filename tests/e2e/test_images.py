"""The operator image, built here from images/operator.Dockerfile by buildah
(daemonless; hack/images/build.sh), runs the operator against the real control
plane: a job reconciled by the process inside the image trains to Succeeded.

The trainer images are built by `make images` (torch makes them several GB, too
heavy for every test run); the Dockerfiles' invariants are checked for both in
tests/unit/test_images.py and by hadolint.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.jobs import manifest, succeeded
from tests.e2e.kube import ROOT, Kube, new_namespace

pytestmark = pytest.mark.e2e
BUILDAH = ["bash", str(ROOT / "hack" / "images" / "buildah.sh")]


@pytest.fixture(scope="module")
def operator_image() -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "images" / "build.sh"), "operator"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()[-1]


@pytest.fixture
def container(operator_image: str) -> Iterator[str]:
    name = subprocess.run(
        [*BUILDAH, "from", "--quiet", operator_image], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield name
    finally:
        subprocess.run([*BUILDAH, "rm", name], capture_output=True, check=False)


def test_the_operator_image_runs_as_uid_1000_without_the_build_context(
    operator_image: str, container: str
):
    config = json.loads(
        subprocess.run(
            [*BUILDAH, "inspect", "--type", "image", operator_image],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )["OCIv1"]["config"]
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"] == ["dtj"] and config["Cmd"] == ["operator"]
    probe = (
        "id -u; id -un; test ! -e /src && echo no-source; "
        "python3 -c 'import dtj_operator, kopf' && echo operator; "
        "python3 -c 'import torch' 2>/dev/null || echo no-torch"
    )
    out = subprocess.run(
        [*BUILDAH, "run", "--isolation", "chroot", container, "--", "sh", "-c", probe],
        capture_output=True,
        text=True,
    )
    assert out.stdout.split() == ["1000", "dtj", "no-source", "operator", "no-torch"], out


def test_the_operator_image_reconciles_a_job_to_succeeded(
    crds: Kube, local, container: str, tmp_path: Path
):
    kube = crds
    ns = new_namespace(kube, "image")  # not e2e-*: the session's operator stays out
    kubeconfig = tmp_path / "kubeconfig"
    shutil.copy(kube.kubeconfig, kubeconfig)
    kubeconfig.chmod(0o644)  # read by uid 1000 inside the container
    log = tmp_path / "operator.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                *BUILDAH,
                "run",
                "--isolation",
                "chroot",
                "-v",
                f"{kubeconfig}:/kube/config:ro",
                "--env",
                "KUBECONFIG=/kube/config",
                container,
                "--",
                "dtj",
                "operator",
                f"--namespace={ns}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        kube.run(
            "apply", "-n", ns, "-f", "-", input=manifest("img", replicas=2, training={"steps": 60})
        )

        def alive() -> None:
            if proc.poll() is not None:
                raise RuntimeError(f"the operator exited: {log.read_text()[-3000:]}")

        succeeded(kube, ns, "img", timeout=240, check=alive)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        kube.run("delete", "namespace", ns, "--wait=false", check=False)
    assert "Forbidden" not in log.read_text()
