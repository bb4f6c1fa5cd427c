"""The same measurement as loadgen.py, with wrk as the client; JSON on stdout in loadgen's shape.

wrk (C, one thread here) spends a few microseconds of CPU per request where the Python load
generator spends about half a millisecond, which on a small machine is CPU taken from the
servers under test. Use it where that matters: the scaling cells (N processes behind nginx).
A Lua script checks every answer (HTTP 200, a body with one of the scenario's markers and none
of its failure markers: see `markers`), so failures are counted as in loadgen.py; time to first
token is not measured.

    apt-get install wrk
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadgen import SCENARIOS, cpu_report, snapshot

# Every response goes through response() (wrk then hands Lua the body); done() sums the
# per-thread failure counts and prints one machine-readable line.
SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{auth}
local good, bad, threads = {good}, {bad}, {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) failed = 0; sample = "" end
local function has_any(body, markers)
  for _, marker in ipairs(markers) do
    if string.find(body, marker, 1, true) then return true end
  end
  return false
end
function response(status, headers, body)
  if status ~= 200 or not has_any(body, good) or has_any(body, bad) then
    failed = failed + 1
    if sample == "" then sample = status .. " " .. string.sub(body, 1, 300) end
  end
end
function done(summary, latency, requests)
  local failed, sample = 0, ""
  for _, thread in ipairs(threads) do
    failed = failed + thread:get("failed")
    if sample == "" then sample = thread:get("sample") end
  end
  local e = summary.errors
  io.write(string.format("WRK %d %d %d %d %d %d %d %d %d\\n", summary.requests, summary.duration, failed,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
  io.write("SAMPLE " .. sample .. "\\n")
end
"""


def lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal for this text


def lua_list(items: tuple[str, ...]) -> str:
    return "{" + ", ".join(map(lua_string, items)) + "}"


def markers(scenario: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What a good answer of ``scenario`` contains (one of), and what no good answer contains."""
    spec = SCENARIOS[scenario]
    if spec.api == "responses":  # a Response always has an `"error":null` field
        if spec.stream:
            return ("event: response.completed", "event: response.incomplete"), (
                "event: response.failed", "event: error")
        return ('"object":"response"',), ('"status":"failed"',)
    good = "[DONE]" if spec.stream else ('"data"' if spec.api == "embeddings" else '"choices"')
    return (good,), ('"error"',)


def write_script(directory: Path, scenario: str, api_key: str | None) -> Path:
    spec = SCENARIOS[scenario]
    good, bad = markers(scenario)
    auth = f'wrk.headers["Authorization"] = {lua_string("Bearer " + api_key)}' if api_key else ""
    path = directory / "scenario.lua"
    path.write_text(SCRIPT.format(body=lua_string(json.dumps(spec.body)), auth=auth, good=lua_list(good),
                                  bad=lua_list(bad)))
    return path


def run_wrk(url: str, script: Path, concurrency: int, seconds: float, timeout: float) -> dict[str, Any]:
    args = [
        "wrk", "--threads", "1", "--connections", str(concurrency), "--duration", f"{max(1, round(seconds))}s",
        "--timeout", f"{round(timeout)}s", "--script", str(script), url,
    ]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, timeout=seconds + timeout + 30)
    line = next((x for x in result.stdout.splitlines() if x.startswith("WRK ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    requests, duration_us, failed, socket_errors, bad_status, p50, p90, p99, worst = map(int, line.split()[1:])
    sample = next((x[7:] for x in result.stdout.splitlines() if x.startswith("SAMPLE ")), "")
    return {
        "requests": requests, "seconds": duration_us / 1e6, "failed": failed, "socket_errors": socket_errors,
        "non_2xx": bad_status, "p50_us": p50, "p90_us": p90, "p99_us": p99, "max_us": worst, "sample": sample,
    }  # fmt: skip


def children_cpu_seconds() -> float:
    """CPU time of this process's finished children: the wrk runs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(options: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then one measured wrk run with the watched processes' CPU read around it."""
    url = options.base_url.rstrip("/") + SCENARIOS[options.scenario].path
    watch = {name: [int(pid) for pid in pids.split("+")] for name, pids in options.watch}
    with tempfile.TemporaryDirectory(prefix="wrkgen-") as directory:
        script = write_script(Path(directory), options.scenario, options.api_key)
        warm = run_wrk(url, script, options.concurrency, options.warmup, options.request_timeout)
        before, started = snapshot(watch), time.perf_counter()
        before["loadgen"] = children_cpu_seconds()
        run = run_wrk(url, script, options.concurrency, options.duration, options.request_timeout)
        after, elapsed = snapshot(watch), time.perf_counter() - started
        after["loadgen"] = children_cpu_seconds()
    done = run["requests"] - run["failed"]
    failures = run["failed"] + run["socket_errors"]
    result = cpu_report(before, after, elapsed, done)
    ms = lambda us: round(us / 1000, 2)  # noqa: E731
    return {
        "requests": done,
        "failures": failures,
        "warmup_failures": warm["failed"] + warm["socket_errors"],
        "error_samples": [run["sample"] or warm["sample"]] if failures or warm["failed"] else [],
        "seconds": round(run["seconds"], 3),
        "warmup_requests": warm["requests"],
        "rps": round(done / run["seconds"], 1),
        "p50_ms": ms(run["p50_us"]),
        "p90_ms": ms(run["p90_us"]),
        "p99_ms": ms(run["p99_us"]),
        "ttft_p50_ms": None,
        "events_per_request": None,
        **result,
    }


def main(argv: list[str] | None = None) -> None:
    from loadgen import parse_args

    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    json.dump(measure(parse_args(argv)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
