"""The process runtime's kubelet rules, as pure functions (dtj_devcluster.podspec)."""

from __future__ import annotations

import pytest
from dtj_devcluster import podspec
from dtj_devcluster.sandbox import inside
from dtj_operator import api, render


def rendered_worker() -> dict:
    job = api.DecentralizedTrainingJob.model_validate(
        {"metadata": {"name": "j", "namespace": "ns"}, "spec": {"replicas": 2}}
    )
    owner = {"apiVersion": "v1", "kind": "X", "name": "j", "uid": "u", "controller": True}
    pod = render.worker_pod(job, owner, 1)
    pod["metadata"]["uid"] = "pod-uid"
    pod["spec"]["nodeName"] = "process-0"
    return pod


def test_the_env_of_a_rendered_worker_resolves_downward_api_and_keeps_order():
    pod = rendered_worker()
    container = pod["spec"]["containers"][0]
    env = podspec.container_env(
        pod,
        container,
        base={"PATH": "/bin"},
        pod_ip="127.100.0.7",
        host_ip="127.0.0.1",
        lookup=lambda kind, name: None,
    )
    assert env["DTJ_RANK"] == "1"
    assert env["DTJ_POD_NAME"] == "j-worker-1"
    assert env["DTJ_POD_IP"] == "127.100.0.7"
    assert env["DTJ_CONFIG"] == "/etc/dtj/config.json"
    assert podspec.argv(container, env) == ["python", "-m", "dtj_trainer"]


def test_env_from_config_maps_and_secrets_and_var_expansion():
    pod = rendered_worker()
    container = {
        "name": "c",
        "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
        "env": [
            {"name": "A", "value": "x"},
            {"name": "B", "value": "$(A)-$(CM_K)-$$(A)-$(MISSING)"},
            {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            {
                "name": "O",
                "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": True}},
            },
        ],
    }
    data = {("configMapRef", "cm"): {"K": "v"}, ("secretKeyRef", "s"): {"k": "secret"}}
    env = podspec.container_env(
        pod, container, base={}, pod_ip="", host_ip="", lookup=lambda k, n: data.get((k, n))
    )
    assert env["CM_K"] == "v"
    assert env["B"] == "x-v-$(A)-$(MISSING)"
    assert env["S"] == "secret"
    assert "O" not in env


def test_a_missing_config_map_waits_and_an_unknown_field_fails():
    pod = rendered_worker()
    with pytest.raises(podspec.NotReadyYet):
        podspec.container_env(
            pod,
            {
                "name": "c",
                "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "m", "key": "k"}}}],
            },
            base={},
            pod_ip="",
            host_ip="",
            lookup=lambda k, n: None,
        )
    with pytest.raises(podspec.Unsupported, match="fieldRef"):
        podspec.field_value(pod, "status.phase", "", "")
    with pytest.raises(podspec.Unsupported, match="no command"):
        podspec.argv({"name": "c"}, {})


def test_the_rendered_security_context_is_who_the_process_runs_as():
    pod = rendered_worker()
    u = podspec.user(pod, pod["spec"]["containers"][0])
    assert u == podspec.User(render.RUN_AS_USER, render.RUN_AS_USER, [render.RUN_AS_USER])
    assert podspec.user({"spec": {}}, {"name": "c"}) is None


def test_hosts_file_names_the_job_peers_like_a_headless_service():
    me = podspec.Peer("ns", "worker-0", "j", "127.100.0.2")
    coord = podspec.Peer("ns", "coordinator", "j", "127.101.0.2")
    other_ns = podspec.Peer("other", "worker-0", "j", "127.100.0.3")
    hosts = podspec.hosts_file(me, [me, coord, other_ns])
    lines = hosts.splitlines()
    assert lines[1].startswith("127.100.0.2\tworker-0.j.ns.svc.cluster.local")
    assert (
        "127.101.0.2\tcoordinator.j.ns.svc.cluster.local coordinator.j.ns.svc coordinator.j"
        in lines
    )
    # Other namespaces resolve by full name only.
    assert "127.100.0.3\tworker-0.j.other.svc.cluster.local worker-0.j.other.svc" in lines


def test_termination_message_falls_back_to_the_log_only_on_error():
    tail = "line\n" * 100 + "dtj-trainer: error: unknown model 'x'\n"
    msg = podspec.termination_message(tail, "FallbackToLogsOnError", 2)
    assert msg.endswith("unknown model 'x'")
    assert len(msg.splitlines()) == podspec.TERMINATION_MESSAGE_LINES
    assert podspec.termination_message(tail, "FallbackToLogsOnError", 0) == ""
    assert podspec.termination_message(tail, "File", 2) == ""


def test_pod_phase_follows_exit_codes():
    pod = rendered_worker()
    ok = podspec.Exit(0, "t0", "t1", "")
    bad = podspec.Exit(2, "t0", "t1", "boom")
    assert podspec.terminated_status(pod, {"worker": ok})["phase"] == "Succeeded"
    status = podspec.terminated_status(pod, {"worker": bad})
    assert status["phase"] == "Failed"
    term = status["containerStatuses"][0]["state"]["terminated"]
    assert term == {
        "exitCode": 2,
        "reason": "Error",
        "startedAt": "t0",
        "finishedAt": "t1",
        "message": "boom",
    }
    running = podspec.running_status(pod, "127.100.0.2", "127.0.0.1", {"worker": "t0"}, {})
    assert running["podIP"] == "127.100.0.2" and running["phase"] == "Running"


def test_paths_inside_the_pod_root_follow_symlinks_within_it(tmp_path):
    root = tmp_path / "root"
    (root / "var").mkdir(parents=True)
    (root / "run").mkdir()
    (root / "var" / "run").symlink_to("/run")
    (root / "var" / "rel").symlink_to("../run")
    assert inside(root, "/var/run/secrets/token") == root / "run" / "secrets" / "token"
    assert inside(root, "/var/rel/x") == root / "run" / "x"
    assert inside(root, "/etc/dtj") == root / "etc" / "dtj"


def test_local_clusters_claim_pod_cidrs_no_other_live_cluster_holds(tmp_path, monkeypatch):
    """Issue 18, finding 12: every cluster gave its nodes 127.100/24 and 127.101/24."""
    from dtj_devcluster import controlplane

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    one, two, gone = tmp_path / "one", tmp_path / "two", tmp_path / "gone"
    for d in (one, two, gone):
        d.mkdir()
    first = controlplane.claim_pod_cidrs(one, 2)
    second = controlplane.claim_pod_cidrs(two, 2)
    assert len(set(first + second)) == 4, (first, second)
    assert controlplane.claim_pod_cidrs(gone, 1)[0] not in first + second
    gone.rmdir()  # a cluster whose directory is gone holds nothing
    controlplane.release_pod_cidrs(two)
    again = controlplane.claim_pod_cidrs(tmp_path / "three", 3)
    assert not set(again) & set(first), "a live cluster's CIDRs are never handed out"
