"""Shared fixtures."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.builders import ROOT


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the test ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `pytest -n 2 --dist loadgroup` (make test) the end-to-end tests share one
    control plane and run in one worker, the trainer-process tests in the other: most
    of an e2e test is waiting for Kubernetes, so the two overlap well on two cores."""
    for item in items:
        kind = item.path.parent.name
        if kind in ("e2e", "trainer"):
            item.add_marker(pytest.mark.xdist_group(kind))


class GroupCheck:
    """Fail at once, not with two clashing control planes, if xdist stops grouping."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]):
        if not getattr(config.option, "loadgroup", False):
            return
        lost = [i.nodeid for i in items if i.get_closest_marker("xdist_group")]
        lost = [n for n in lost if "@" not in n]
        if lost:
            raise pytest.UsageError(
                f"pytest-xdist did not group {lost[0]} (and {len(lost) - 1} more): this "
                "pytest and pytest-xdist pair breaks --dist loadgroup; run `make install`"
            )


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(GroupCheck(), "dtj-group-check")


@pytest.fixture
def quickstart() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())


MATRIX_TOTALS = {"scenarios": 0, "checks": 0}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Add up the elastic invariant matrix's checks (reported by every xdist worker)."""
    if report.when != "call" or not report.passed:
        return
    for key, value in report.user_properties:
        if key == "elastic_invariant_checks":
            MATRIX_TOTALS["scenarios"] += 1
            MATRIX_TOTALS["checks"] += int(value)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if MATRIX_TOTALS["scenarios"]:
        terminalreporter.write_line(
            f"elastic invariant matrix: {MATRIX_TOTALS['scenarios']} (method x event) "
            f"scenarios passed, {MATRIX_TOTALS['checks']} invariant checks"
        )
