"""The fault-injection suite (bench/faults.py --quick) against real processes: every row at target.

Two gateway processes behind nginx, PostgreSQL, Redis, FastChat's controller and demo workers;
each fault (worker killed or stalled, controller, PostgreSQL or Redis down, SIGTERM and SIGKILL
of a gateway process, clients leaving at random points) must leave 0 plain 500s, 0 parallel
slots taken, the workers' queues empty and a usage row per request (SIGKILL: rows lost within
the documented bound). docs/reliability.md has the full-duration table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.procs import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(330)]  # the first test waits for the whole run
SERVICES_MISSING = 3  # bench/faults.py's exit status when nginx, PostgreSQL or Redis is missing


@pytest.fixture(scope="module")
def fault_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "rows.json"
    result = subprocess.run(
        [sys.executable, "bench/faults.py", "--quick", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=290,
    )
    if result.returncode == SERVICES_MISSING:
        message = f"the fault suite's services are missing: {result.stderr.strip()[-300:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    assert out.exists(), result.stderr[-3000:]
    data = json.loads(out.read_text())
    data["report"] = result.stdout
    return data


FAULTS = ["worker_killed", "worker_stalls", "controller_down", "postgres_down", "redis_down",
          "sigterm", "sigkill", "disconnects"]


def test_every_fault_has_a_row(fault_rows):
    assert len(fault_rows["rows"]) == len(FAULTS), fault_rows["report"]
    assert all(row["sent"] > 0 for row in fault_rows["rows"])


@pytest.mark.parametrize("index", range(len(FAULTS)), ids=FAULTS)
def test_the_fault_leaves_no_damage(fault_rows, index):
    row = fault_rows["rows"][index]
    summary = f"{row['fault']}: {row}\n\n{fault_rows['report']}"
    assert row["plain_500"] == 0, summary
    assert row["slots_left"] == 0, summary
    assert row["worker_queue"] == 0, summary
    if row["rows_bound"] is None:
        assert row["rows"] == row["expected_rows"], summary
    else:
        assert row["expected_rows"] - row["rows_bound"] <= row["rows"] <= row["expected_rows"], summary
