"""A restarted operator neither duplicates nor orphans: it converges to the desired pods."""

from __future__ import annotations

import json
import signal

import pytest

from tests.e2e.kube import Kube, new_namespace, start_operator, wait_for

pytestmark = pytest.mark.e2e


def test_operator_killed_midway_converges_to_exactly_the_desired_pods(crds: Kube, tmp_path):
    kube = crds
    ns = new_namespace(kube, "restart")
    body = {
        "apiVersion": "training.dtj.io/v1alpha1",
        "kind": "DecentralizedTrainingJob",
        "metadata": {"name": "big", "namespace": ns},
        "spec": {"replicas": 24},
    }
    kube.run("apply", "-f", "-", input=json.dumps(body))
    with open(tmp_path / "operator.log", "wb") as log:
        first = start_operator(kube, ns, log)

        def some_pods():
            names = kube.run("get", "pods", "-n", ns, "-o", "name").stdout.split()
            return names if names else None

        seen = wait_for("the first pods", some_pods, every=0.05)
        first.send_signal(signal.SIGKILL)  # no graceful shutdown: mid-creation
        first.wait()
        assert len(seen) < 25, "killed before the job was complete"
        second = start_operator(kube, ns, log)
        try:

            def converged():
                pods = kube.json("get", "pods", "-n", ns)["items"]
                names = sorted(p["metadata"]["name"] for p in pods)
                return names if len(names) == 25 else None

            names = wait_for("25 pods", converged)
            expected = sorted(["big-coordinator"] + [f"big-worker-{i}" for i in range(24)])
            assert names == expected
            wait_for(
                "24 ready",
                lambda: (
                    kube.json("get", "dtj", "big", "-n", ns).get("status", {}).get("readyReplicas")
                    == 24
                ),
            )
            pods = kube.json("get", "pods", "-n", ns)["items"]
            assert len(pods) == 25, "no duplicates appeared later"
            assert all(p["metadata"]["ownerReferences"][0]["name"] == "big" for p in pods)
        finally:
            second.terminate()
            second.wait(timeout=20)
    kube.run("delete", "namespace", ns, "--wait=false", check=False)
