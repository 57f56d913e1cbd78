"""The chart's Grafana dashboard: generated from code, and it queries only real metrics."""

from __future__ import annotations

import json
import re

from dtj_operator import dashboard, metrics
from dtj_trainer.metrics import METRIC_NAMES
from prometheus_client import REGISTRY


def _exprs(board: dict) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def test_the_committed_dashboard_is_what_the_code_builds():
    assert dashboard.TARGET.read_text() == dashboard.render(), "run: make crds"


def test_every_query_reads_a_metric_that_exists():
    assert metrics.JOBS is not None  # the operator's metrics are registered on import
    operator_names = {
        s.name for family in REGISTRY.collect() for s in family.samples if s.name.startswith("dtj_")
    }
    known = set(METRIC_NAMES.values()) | operator_names
    for family in REGISTRY.collect():  # counters without samples yet still name a family
        if family.name.startswith("dtj_"):
            known |= {family.name, family.name + "_total"}
    board = dashboard.build()
    used = {m for e in _exprs(board) for m in re.findall(r"\bdtj_[a-z_]+", e)}
    assert used, "no queries"
    for name in used:
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        assert name in known or base in known, f"{name} is not exported by anyone"
    for key in ("samples", "batch", "consensus_distance", "bytes_sent", "staleness", "members"):
        assert any(METRIC_NAMES[key] in e for e in _exprs(board)), key


def test_queries_follow_the_namespace_and_job_variables():
    board = dashboard.build()
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "namespace", "job"]
    for expr in _exprs(board):
        if "dtj_worker_" in expr:
            assert "$namespace" in expr and "$job" in expr, expr
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    json.dumps(board)  # plain JSON, ready for a ConfigMap


def test_template_variables_and_legends_are_filled_like_grafana():
    expr = 'rate(x{namespace=~"$namespace", job_name=~"$job"}[$__rate_interval])'
    out = dashboard.expand(expr, {"namespace": "ns", "job": "j", "__rate_interval": "20s"})
    assert out == 'rate(x{namespace=~"ns", job_name=~"j"}[20s])'
    assert dashboard.expand("$unknown", {}) == "$unknown"
    assert dashboard.legend_of("{{job_name}} #{{ rank }}", {"job_name": "a", "rank": "2"}) == "a #2"
    assert all(expr and title for title, expr, _ in dashboard.queries())
