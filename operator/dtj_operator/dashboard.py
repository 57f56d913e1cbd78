"""The Grafana dashboard shipped in the chart, built with grafana-foundation-sdk.

    python -m dtj_operator.dashboard --write     # make crds regenerates it too

Dashboards as code, like the CRD: this module is the source, the JSON in
helm/dtj-operator/dashboards/ is generated and a test fails when it drifts.
Every query reads the workers' metrics (dtj_trainer.metrics.METRIC_NAMES) or
the operator's (dtj_operator.metrics), filtered by the namespace and job
template variables. A dev-time tool: the operator image does not import it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from dtj_trainer.metrics import METRIC_NAMES
from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as gm

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "helm" / "dtj-operator" / "dashboards" / "dtj-training.json"
UID = "dtj-training"
DATASOURCE = gm.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every worker series of the selected jobs (the scrape adds `namespace`).
SEL = '{namespace=~"$namespace", job_name=~"$job"}'
RATE = "[$__rate_interval]"


def _m(key: str) -> str:
    return METRIC_NAMES[key]


def _query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)
    return q.datasource(DATASOURCE)


def _series(
    title: str, description: str, unit: str, *queries: tuple[str, str], width: int = 12
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(8)
        .span(width)
    )
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, "ABCDEFGH"[i]))
    return panel


def _stat(title: str, description: str, unit: str, expr: str) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(4)
        .span(6)
        .with_target(_query(expr, "{{job_name}}"))
    )


def _choice(name: str, label: str, query: str) -> gd.QueryVariable:
    return (
        gd.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(gm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
    )


def _variables(board: gd.Dashboard) -> gd.Dashboard:
    source = gd.DatasourceVariable("datasource").label("Data source").type("prometheus")
    steps = _m("steps")
    namespace = _choice("namespace", "Namespace", f"label_values({steps}, namespace)")
    job = _choice("job", "Job", f'label_values({steps}{{namespace=~"$namespace"}}, job_name)')
    return board.with_variable(source).with_variable(namespace).with_variable(job)


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    board = (
        gd.Dashboard("Decentralized training jobs")
        .uid(UID)
        .description("Gossip training: throughput, batch shares, consensus, traffic, membership.")
        .tags(["dtj", "training"])
        .refresh("30s")
        .time("now-1h", "now")
    )
    board = _variables(board)
    board = (
        board.with_row(gd.Row("Job overview"))
        .with_panel(
            _stat(
                "Workers training",
                "Members of the current membership generation.",
                "none",
                f"max by (job_name) ({_m('members')}{SEL})",
            )
        )
        .with_panel(
            _stat(
                "Samples per second",
                "All workers together (rate of dtj_worker_samples_total).",
                "none",
                f"sum by (job_name) (rate({_m('samples')}{SEL}{RATE}))",
            )
        )
        .with_panel(
            _stat(
                "Training loss",
                "Mean over the workers of their last report's loss.",
                "none",
                f"avg by (job_name) ({_m('loss')}{SEL})",
            )
        )
        .with_panel(
            _stat(
                "Rounds per second",
                "Rounds of the fastest worker (asynchronous methods do not wait for the others).",
                "none",
                f"max by (job_name) (rate({_m('steps')}{SEL}{RATE}))",
            )
        )
        .with_panel(
            _series(
                "Loss",
                "Mean training loss per job.",
                "none",
                (f"avg by (job_name) ({_m('loss')}{SEL})", "{{job_name}}"),
            )
        )
        .with_panel(
            _series(
                "Consensus distance",
                "(1/n) sum ||x_i - x_bar||^2: how far the workers' models are apart.",
                "none",
                (f"avg by (job_name) ({_m('consensus_distance')}{SEL})", "{{job_name}}"),
            )
        )
        .with_row(gd.Row("Workers"))
        .with_panel(
            _series(
                "Throughput per worker",
                "Samples per second each worker trains on.",
                "none",
                (f"rate({_m('samples')}{SEL}{RATE})", "{{job_name}} #{{rank}}"),
                width=8,
            )
        )
        .with_panel(
            _series(
                "Batch share",
                "Each worker's share of the round's samples (dynamic batching moves it).",
                "percentunit",
                (
                    f"{_m('batch')}{SEL} / on (namespace, job_name) group_left "
                    f"sum by (namespace, job_name) ({_m('batch')}{SEL})",
                    "{{job_name}} #{{rank}}",
                ),
                width=8,
            )
        )
        .with_panel(
            _series(
                "Measured compute speed",
                "Samples per second of compute, waiting excluded: what the batch plan follows.",
                "none",
                (f"{_m('compute_samples_per_second')}{SEL}", "{{job_name}} #{{rank}}"),
                width=8,
            )
        )
        .with_row(gd.Row("Gossip"))
        .with_panel(
            _series(
                "Gossip traffic",
                "Bytes per second each worker sends to its peers.",
                "Bps",
                (f"rate({_m('bytes_sent')}{SEL}{RATE})", "{{job_name}} #{{rank}} sent"),
                width=8,
            )
        )
        .with_panel(
            _series(
                "Time waiting for peers",
                "Fraction of wall time each worker is blocked on communication.",
                "percentunit",
                (f"rate({_m('comm_wait_seconds')}{SEL}{RATE})", "{{job_name}} #{{rank}}"),
                width=8,
            )
        )
        .with_panel(
            _series(
                "Staleness (dasgd)",
                "Staleness of received gradients, in updates: median and 90th percentile; "
                "dropped: gradients beyond stalenessBound per second.",
                "none",
                (
                    f"histogram_quantile(0.5, sum by (job_name, le) "
                    f"(rate({_m('staleness')}_bucket{SEL}{RATE})))",
                    "{{job_name}} p50",
                ),
                (
                    f"histogram_quantile(0.9, sum by (job_name, le) "
                    f"(rate({_m('staleness')}_bucket{SEL}{RATE})))",
                    "{{job_name}} p90",
                ),
                (
                    f"sum by (job_name) (rate({_m('dropped')}{SEL}{RATE}))",
                    "{{job_name}} dropped/s",
                ),
                width=8,
            )
        )
        .with_row(gd.Row("Membership and preemptions"))
        .with_panel(
            _series(
                "Membership",
                "Generation (it moves when workers join or leave) and members per job.",
                "none",
                (f"max by (job_name) ({_m('generation')}{SEL})", "{{job_name}} generation"),
                (f"max by (job_name) ({_m('members')}{SEL})", "{{job_name}} members"),
            )
        )
        .with_panel(
            _series(
                "Workers lost (all jobs)",
                "The operator's count of lost workers by kind: preemption or failure.",
                "none",
                (
                    f"sum by (kind) (increase(dtj_operator_worker_losses_total{RATE}))",
                    "{{kind}}",
                ),
            )
        )
    )
    encoded: dict[str, Any] = json.loads(
        JSONEncoder(sort_keys=True, indent=2).encode(board.build())
    )
    return encoded


def expand(expr: str, variables: dict[str, str]) -> str:
    """The query with Grafana's template variables (`$namespace`, ...) replaced."""
    return re.sub(r"\$\w+", lambda m: variables.get(m.group(0)[1:], m.group(0)), expr)


def queries() -> list[tuple[str, str, str]]:
    """(panel title, PromQL, legend format) of every query, in the dashboard's order."""
    return [
        (panel["title"], target["expr"], target.get("legendFormat", ""))
        for panel in build()["panels"]
        for target in panel.get("targets", [])
    ]


def legend_of(legend: str, labels: dict[str, str]) -> str:
    """Grafana's legend format (`{{job_name}} #{{rank}}`) filled from a series' labels."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), legend)


def _get(url: str, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(params)}", timeout=30) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise RuntimeError(f"query {params['query']!r} failed: {body}")
    return list(body["data"]["result"])


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    """A range query over the Prometheus HTTP API."""
    return _get(
        url, "/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step}
    )


def snapshot(
    url: str, variables: dict[str, str], start: float, end: float, path: Path, step: float = 2.0
) -> dict[str, int]:
    """Draw every panel from the same queries over [start, end] into a PNG (matplotlib).

    For readers without a Grafana: what the dashboard shows for one run.
    Returns the number of series each panel drew.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = list(dict.fromkeys(title for title, _, _ in queries()))
    cols = 3
    fig, axes = plt.subplots(
        math.ceil(len(titles) / cols), cols, figsize=(15, 3 * math.ceil(len(titles) / cols))
    )
    drawn = dict.fromkeys(titles, 0)
    for ax, title in zip(axes.flat, titles, strict=False):
        ax.set_title(title, fontsize=10)
        for t, expr, legend in queries():
            if t != title:
                continue
            for series in query_range(url, expand(expr, variables), start, end, step):
                xs = [float(ts) - start for ts, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                label = legend_of(legend, series["metric"])
                ax.plot(xs, ys, label=label, linewidth=1.2)
                drawn[title] += 1
        if drawn[title]:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(titles) :]:
        ax.axis("off")
    fig.suptitle(f"{build()['title']}: {variables.get('job', '')}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return drawn


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {TARGET.relative_to(ROOT)}")
    args = parser.parse_args()
    if args.write:
        TARGET.parent.mkdir(parents=True, exist_ok=True)
        TARGET.write_text(render())
        print(f"wrote {TARGET.relative_to(ROOT)}")
    else:
        print(render(), end="")


if __name__ == "__main__":
    main()
