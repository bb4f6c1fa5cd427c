"""Benchmark our gateway against FastChat's openai_api_server in front of the same fake worker.

    . .venv/bin/activate && python bench/run.py [--quick] [--duration S] [--concurrency 1,32]
        [--scenarios chat,chat_stream,embeddings] [--targets fastchat,gateway] [--json out.json]
    python bench/run.py --targets gateway --scenarios chat,responses,chat_stream,responses_stream
    python bench/run.py --scaling     # one process against two behind nginx (wrk, 3 rounds)
    python bench/run.py --preset openai   # an OpenAI-compatible upstream: the gateway against LiteLLM's proxy
    python bench/run.py --base-tree /tmp/bench-base --baseline gateway-base   # before/after in one run

Starts the FastChat controller, ONE fake worker (bench/fast_worker.py) and every target, then
runs each scenario at each concurrency against each target in turn (targets interleaved, so
drift hits all alike), each time in a fresh load-generator process (bench/loadgen.py, or wrk
through bench/wrkgen.py). Prints a Markdown table and stops every process it started, also on
Ctrl-C or failure. Logs and JSON go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loadgen import SCENARIOS, machine_busy_seconds
from targets import (
    BACKENDS,
    REPLY_WORDS,
    TARGETS,
    WORKER_PROGRAMS,
    Backend,
    Target,
    peak_memory_mb,
    start_backend,
    stop_backend,
)

BENCH_DIR = Path(__file__).resolve().parent
LOAD_GENERATORS = {"python": BENCH_DIR / "loadgen.py", "wrk": BENCH_DIR / "wrkgen.py"}


def run_cell(
    target: Target, backend: Backend, scenario: str, concurrency: int, options: argparse.Namespace
) -> dict[str, Any]:
    """Run one load-generator process against one target; return its JSON result."""
    args = [
        sys.executable, str(LOAD_GENERATORS[options.loadgen]), "--base-url", target.base_url,
        "--scenario", scenario, "--concurrency", str(concurrency),
        "--warmup", str(options.warmup), "--duration", str(options.duration),
        "--watch", "gateway", "+".join(map(str, target.pids)),
        "--watch", "backend", "+".join(map(str, backend.pids)),
    ]  # fmt: skip
    if target.service_pids:
        args += ["--watch", "services", "+".join(map(str, target.service_pids))]
    if target.api_key:
        args += ["--api-key", target.api_key]
    limit = options.warmup + options.duration + 60
    result = subprocess.run(args, capture_output=True, text=True, timeout=limit)
    if result.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{result.stderr}")
    cell = json.loads(result.stdout.strip().splitlines()[-1])
    return {"target": target.name, "scenario": scenario, "concurrency": concurrency, **cell}


def wait_for_quiet(budget: float, busy_limit: float = 0.25, step: float = 0.5) -> float:
    """Wait (at most ``budget`` s) until the machine idles, as our servers do between cells.

    The machine may be shared; a cell measured while something else burns CPU is pessimistic.
    Return the seconds waited.
    """
    began = time.monotonic()
    while True:
        before = machine_busy_seconds()
        time.sleep(step)
        if (machine_busy_seconds() - before) / step <= busy_limit:
            return time.monotonic() - began
        if time.monotonic() - began >= budget:
            return time.monotonic() - began


def check_alive(targets: list[Target], backend: Backend, workdir: Path) -> None:
    """Stop the run as soon as any process it started has died; its log says why."""
    procs = [(name, proc) for name, proc in backend.procs.items()]
    procs += [(t.name, proc) for t in targets for proc in t.procs]
    for name, proc in procs:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see the logs in {workdir}")


def skipped(targets: list[Target], scenarios: list[str]) -> list[str]:
    """One line per target that does not serve some of the scenarios: which, and why."""
    lines = []
    for target in targets:
        for path, why in target.unsupported.items():
            names = [name for name in scenarios if SCENARIOS[name].path == path]
            if names:
                lines.append(f"{target.name} skipped for {', '.join(names)}: {why}")
    return lines


def run_all(targets: list[Target], backend: Backend, options: argparse.Namespace, rows: list[dict]) -> None:
    """Every scenario x concurrency x round x target, targets innermost; append a row for each.
    A target skips the scenarios whose path it does not serve (Target.unsupported)."""
    quiet_budget = options.quiet_wait
    options.skipped = skipped(targets, options.scenarios)
    for line in options.skipped:
        print(f"  {line}", file=sys.stderr, flush=True)
    options.planned = options.rounds * len(options.concurrency) * sum(
        SCENARIOS[scenario].path not in target.unsupported for scenario in options.scenarios for target in targets)
    for scenario in options.scenarios:
        for concurrency in options.concurrency:
            for round_number in range(1, options.rounds + 1):
                for target in targets:
                    if SCENARIOS[scenario].path in target.unsupported:
                        continue
                    quiet_budget -= wait_for_quiet(max(0.0, quiet_budget))
                    check_alive(targets, backend, options.workdir)
                    row = run_cell(target, backend, scenario, concurrency, options)
                    row["round"] = round_number
                    rows.append(row)
                    print(progress_line(row), file=sys.stderr, flush=True)


def median_rows(rows: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """One row per target, scenario and concurrency: the round with the median req/s.

    Its "versus" is the median over rounds of req/s divided by the baseline's req/s of the same
    round: the targets of one round ran back to back, so the machine's drift (this shared
    2-core VM runs up to 20% faster or slower from one minute to the next) cancels out.
    """
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["target"], r["scenario"], r["concurrency"]), []).append(r)
    summary = []
    for (target, scenario, concurrency), rounds in cells.items():
        ordered = sorted(rounds, key=lambda r: r["rps"])
        row = dict(ordered[(len(ordered) - 1) // 2])
        row["round_rps"] = [r["rps"] for r in rounds]
        base = {r.get("round"): r["rps"] for r in cells.get((baseline, scenario, concurrency), [])}
        ratios = sorted(r["rps"] / base[r.get("round")] for r in rounds if base.get(r.get("round")))
        row["versus"] = statistics.median(ratios) if ratios and target != baseline else None
        summary.append(row)
    return summary


# Report -----------------------------------------------------------------------------------


def progress_line(row: dict[str, Any]) -> str:
    errors = row["failures"] + row["warmup_failures"]
    return (
        f"  {row['target']:>9} {row['scenario']:<16} c={row['concurrency']:<3} {row['rps']:>8} req/s"
        f"  p50 {row['p50_ms']} ms  gateway CPU {row['cpu_ms_per_request']['gateway']} ms/req"
        f"  cores: {' '.join(f'{name} {value:.2f}' for name, value in row['cpu_cores'].items())}"
        + (f"  ERRORS: {errors}" if errors else "")
    )


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def ratio(ours: float | None, theirs: float | None) -> str:
    return "–" if not ours or not theirs else f"{ours / theirs:.2f}x"


def errors_cell(row: dict[str, Any]) -> str:
    text = str(row["failures"])
    if row["warmup_failures"]:
        text += f" (+{row['warmup_failures']} in warm-up)"
    return f"**{text}**" if text != "0" else text


def results_table(rows: list[dict[str, Any]], baseline: str) -> str:
    """One row per target, scenario and concurrency, compared to the baseline's row.

    "other load" is CPU that processes outside the benchmark used meanwhile (a shared machine).
    """
    lines = [
        "| target | scenario | conc. | req/s | p50 ms | p90 ms | p99 ms | TTFT p50 ms "
        "| gateway CPU ms/req | PostgreSQL+Redis CPU ms/req | backend CPU ms/req | load generator CPU ms/req "
        f"| errors | req/s vs {baseline} | other load (cores) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        cpu = r["cpu_ms_per_request"]
        backend_cpu = cpu.get("backend")
        services_cpu = cpu.get("services")
        versus = fmt_ratio(r.get("versus"))
        lines.append(
            f"| {r['target']} | {r['scenario']} | {r['concurrency']} | {fmt(r['rps'])} "
            f"| {fmt(r['p50_ms'])} | {fmt(r['p90_ms'])} | {fmt(r['p99_ms'])} "
            f"| {fmt(r['ttft_p50_ms'])} | {fmt(cpu['gateway'], 2)} | {fmt(services_cpu, 2)} | {fmt(backend_cpu, 2)} "
            f"| {fmt(cpu['loadgen'], 2)} "
            f"| {errors_cell(r)} | {versus} | {fmt(r['cpu_cores']['other'], 2)} |"
        )
    return "\n".join(lines)


def comparison_table(rows: list[dict[str, Any]], baseline: str) -> str:
    """Each other target divided by the baseline: throughput, p50 latency, gateway CPU/request."""
    base = {(r["scenario"], r["concurrency"]): r for r in rows if r["target"] == baseline}
    lines = [
        f"| target / {baseline} | scenario | conc. | req/s | p50 latency | TTFT p50 | gateway CPU/req |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        other = base.get((r["scenario"], r["concurrency"]))
        if r["target"] == baseline or other is None:
            continue
        cpu, other_cpu = r["cpu_ms_per_request"]["gateway"], other["cpu_ms_per_request"]["gateway"]
        lines.append(
            f"| {r['target']} | {r['scenario']} | {r['concurrency']} | {fmt_ratio(r['versus'])} "
            f"| {ratio(r['p50_ms'], other['p50_ms'])} | {ratio(r['ttft_p50_ms'], other['ttft_p50_ms'])} "
            f"| {ratio(cpu, other_cpu)} |"
        )
    return "\n".join(lines)


def before_after_table(
    summary: list[dict[str, Any]], rounds: list[dict[str, Any]], before: str = "gateway-base", after: str = "gateway"
) -> str:
    """Gateway CPU per request of this commit against another commit's (`--base-tree`), per cell:
    the median rows' figures, and the median over rounds of the ratio within each round (the two
    ran back to back, so the machine's drift cancels out)."""
    per_round: dict[tuple, dict[str, float]] = {}
    for r in rounds:
        per_round.setdefault((r["scenario"], r["concurrency"], r.get("round")), {})[r["target"]] = (
            r["cpu_ms_per_request"]["gateway"]
        )
    ratios: dict[tuple, list[float]] = {}
    for (scenario, concurrency, _), cpu in per_round.items():
        if cpu.get(before) and cpu.get(after):
            ratios.setdefault((scenario, concurrency), []).append(cpu[after] / cpu[before])
    base = {(r["scenario"], r["concurrency"]): r for r in summary if r["target"] == before}
    lines = [
        f"| scenario | conc. | {before} CPU ms/req | {after} CPU ms/req | change (median of rounds) "
        f"| each round | {before} req/s | {after} req/s |",
        "|---|--:|--:|--:|--:|---|--:|--:|",
    ]
    for r in summary:
        old = base.get((r["scenario"], r["concurrency"]))
        if r["target"] != after or old is None:
            continue
        cpu, old_cpu = r["cpu_ms_per_request"]["gateway"], old["cpu_ms_per_request"]["gateway"]
        found = ratios.get((r["scenario"], r["concurrency"]), [])
        change = f"{(statistics.median(found) - 1) * 100:+.1f}%" if found else "–"
        each = ", ".join(f"{(x - 1) * 100:+.0f}%" for x in found)
        lines.append(
            f"| {r['scenario']} | {r['concurrency']} | {fmt(old_cpu, 2)} | {fmt(cpu, 2)} | {change} | {each} "
            f"| {fmt(old['rps'])} | {fmt(r['rps'])} |"
        )
    return "\n".join(lines)


# The goals of an OpenAI-compatible upstream (README, "Speed"): CPU per request and req/s vs LiteLLM.
OPENAI_GOALS = {"chat": 1.5, "chat_stream": 3.0}
OPENAI_RATIO = 15.0


def openai_goals_table(rows: list[dict[str, Any]], target: str = "gateway", baseline: str = "litellm") -> str:
    """Each goal of the `--preset openai` run with what was measured: met or not."""
    lines = ["| goal | scenario | conc. | measured | |", "|---|---|--:|--:|---|"]
    for r in rows:
        if r["target"] != target or r["scenario"] not in OPENAI_GOALS:
            continue
        cpu, limit = r["cpu_ms_per_request"]["gateway"], OPENAI_GOALS[r["scenario"]]
        met = cpu is not None and cpu <= limit
        lines.append(f"| gateway CPU ≤ {limit:g} ms/req | {r['scenario']} | {r['concurrency']} "
                     f"| {fmt(cpu, 2)} ms | {'met' if met else '**not met**'} |")
    for r in rows:
        if r["target"] != target or r["scenario"] not in OPENAI_GOALS or r["concurrency"] == 1:
            continue
        versus = r.get("versus")
        met = versus is not None and versus >= OPENAI_RATIO
        lines.append(f"| req/s ≥ {OPENAI_RATIO:g}x {baseline}'s | {r['scenario']} | {r['concurrency']} "
                     f"| {fmt_ratio(versus)} | {'met' if met else '**not met**'} |")
    return "\n".join(lines)


def memory_table(memory: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| target | peak RSS (VmHWM) MiB | RSS at end MiB |", "|---|--:|--:|"]
    for name, per_process in memory.items():
        peak = " + ".join(fmt(p["VmHWM"]) for p in per_process)
        now = " + ".join(fmt(p["VmRSS"]) for p in per_process)
        lines.append(f"| {name} | {peak} | {now} |")
    return "\n".join(lines)


def report_errors(rows: list[dict[str, Any]]) -> str:
    """Every failing cell with its sampled error messages (status and body)."""
    lines = []
    for r in rows:
        if r["failures"] or r["warmup_failures"]:
            lines.append(
                f"- {r['target']} {r['scenario']} c={r['concurrency']}: "
                f"{r['failures']} failed in the window, {r['warmup_failures']} in warm-up"
            )
            lines += [f"    - {sample}" for sample in r["error_samples"]]
    return "\n".join(lines)


def report_noise(rows: list[dict[str, Any]], limit: float = 0.25) -> str:
    """Cells during which processes outside the benchmark used noticeable CPU."""
    noisy = [r for r in rows if r["cpu_cores"]["other"] > limit]
    return "\n".join(
        f"- {r['target']} {r['scenario']} c={r['concurrency']}: "
        f"{r['cpu_cores']['other']:.2f} cores used by other processes"
        for r in noisy
    )


def gateway_commit() -> str:
    """The commit measured, marked "+dirty" when gateway code has uncommitted changes."""
    git = ["git", "-C", str(BENCH_DIR.parent)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(
        [*git, "status", "--porcelain", "--", "gateway_project", "openai_api", "keys", "upstreams", "requirements.txt"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return (commit or "unknown") + ("+dirty" if changed else "")


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare runs."""
    with open("/proc/cpuinfo") as cpuinfo:
        models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return {
        "gateway_commit": gateway_commit(),
        "cpu": models[0] if models else platform.machine(),
        "cores": len(models),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


# CLI --------------------------------------------------------------------------------------


def csv(kind: type) -> Any:
    return lambda text: [kind(item) for item in text.split(",") if item]


# What runs without --scenarios (the Responses API's scenarios run only when named).
DEFAULT_SCENARIOS = ("chat", "chat_stream", "embeddings")
DEFAULTS = {"targets": ["fastchat", "gateway"], "baseline": "fastchat", "loadgen": "python", "rounds": 1}
# The gateway with an OpenAI-compatible upstream against LiteLLM's proxy, both in front of
# bench/fast_openai.py: chat and 64-chunk streams.
OPENAI = {
    "targets": ["litellm", "gateway"], "baseline": "litellm", "backend": "openai",
    "concurrency": [1, 16, 64], "scenarios": ["chat", "chat_stream"], "loadgen": "python", "rounds": 1,
}  # fmt: skip
# Two processes need the CPU that the Python load generator (~0.5 ms per request) would take.
SCALING = {
    "targets": ["gateway", "gateway-nginx1", "gateway-nginx2"], "baseline": "gateway", "loadgen": "wrk",
    "rounds": 5, "concurrency": [16, 64], "duration": 6.0,
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="concurrency 1,32, 3 s per cell (about 80 s in all)")
    parser.add_argument(
        "--scaling", action="store_true",
        help="one process against two behind nginx: targets " + ",".join(SCALING["targets"])
        + f", baseline {SCALING['baseline']}, wrk, concurrency 16,64, {SCALING['rounds']} rounds (about 13 min)",
    )  # fmt: skip
    parser.add_argument(
        "--preset", choices=["fastchat", "openai"], default="fastchat",
        help="fastchat (default): FastChat's openai_api_server beside the gateway, both in front of FastChat's "
        "controller and bench/fast_worker.py; openai: LiteLLM's proxy beside the gateway, both in front of "
        "bench/fast_openai.py, scenarios chat,chat_stream at concurrency 1,16,64",
    )  # fmt: skip
    parser.add_argument(
        "--base-tree", type=Path,
        help="a work tree of another commit (git worktree add /tmp/bench-base COMMIT): adds target gateway-base, "
        "its gateway run by the same Python, to compare CPU per request before and after in one run",
    )  # fmt: skip
    parser.add_argument("--duration", type=float, help="measured seconds per cell (default 10, quick 3)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds per cell (default 1, quick 0.5)")
    parser.add_argument("--concurrency", type=csv(int), help="default 1,16,32,64 (quick 1,32)")
    parser.add_argument(
        "--scenarios", type=csv(str),
        help="default " + ",".join(DEFAULT_SCENARIOS) + "; known: " + ",".join(SCENARIOS)
        + " (the responses ones run on gateway targets only)",
    )  # fmt: skip
    parser.add_argument("--targets", type=csv(str), help="default fastchat,gateway; known: " + ",".join(TARGETS))
    parser.add_argument("--baseline", help="the target the ratios divide by (default fastchat)")
    parser.add_argument(
        "--loadgen", choices=sorted(LOAD_GENERATORS),
        help="python: bench/loadgen.py (aiohttp, checks every event, measures TTFT); "
        "wrk: bench/wrkgen.py (needs `apt-get install wrk`; a hundredth of the client CPU)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--worker", choices=sorted(WORKER_PROGRAMS), default="fast",
        help="fast: bench/fast_worker.py (default); demo: upstreams.fastchat.demo_worker, three times its CPU",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int,
        help="measure every cell this many times (targets interleaved each round); tables show medians",
    )  # fmt: skip
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds in all to wait for other processes to go idle between cells (default 30, quick 10)",
    )
    options = parser.parse_args(argv)
    preset = SCALING if options.scaling else OPENAI if options.preset == "openai" else DEFAULTS
    options.backend = preset.get("backend", "fastchat")
    if options.base_tree is not None:
        os.environ["BENCH_BASE_TREE"] = str(options.base_tree.resolve())
        if options.targets is None:
            options.targets = [*preset["targets"], "gateway-base"]
    for name, value in preset.items():
        if getattr(options, name) is None:
            setattr(options, name, value)
    quick = options.quick
    options.duration = options.duration or (3.0 if quick else 10.0)
    options.warmup = options.warmup if options.warmup is not None else (0.5 if quick else 1.0)
    if options.quiet_wait is None:
        options.quiet_wait = 10.0 if quick else 30.0
    options.scenarios = options.scenarios or list(DEFAULT_SCENARIOS)
    options.concurrency = options.concurrency or ([1, 32] if quick else [1, 16, 32, 64])
    for name, known in (("scenario", SCENARIOS), ("target", TARGETS)):
        unknown = set(getattr(options, name + "s")) - set(known)
        if unknown:
            parser.error(f"unknown {name} {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    # Turn SIGTERM into an exception, so that the finally clause below stops every process.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    began = time.monotonic()
    workdir = BENCH_DIR / "results" / time.strftime("run-%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True)
    options.workdir = workdir
    print(f"Logs in {workdir}", file=sys.stderr)
    backend, targets, rows, memory = None, [], [], {}
    try:
        try:
            if options.backend == "openai":
                backend = BACKENDS["openai"](workdir)
            else:
                backend = start_backend(workdir, options.worker)
            for name in options.targets:
                targets.append(TARGETS[name](backend, workdir))
            run_all(targets, backend, options, rows)
        finally:
            memory = collect_memory(targets)
            for target in reversed(targets):
                target.stop()
            if backend is not None:
                stop_backend(backend)
    finally:  # also print what was measured before an interruption or a failure
        if rows:
            print_report(rows, memory, options, time.monotonic() - began, workdir)
    return 1 if any(r["failures"] or r["warmup_failures"] for r in rows) else 0


def collect_memory(targets: list[Target]) -> dict[str, list[dict[str, float]]]:
    """Peak and current RSS of every process of every target that is still alive."""
    return {t.name: [peak_memory_mb(proc.pid) for proc in t.procs if proc.poll() is None] for t in targets}


def print_report(rows: list[dict], memory: dict, options: argparse.Namespace, elapsed: float, workdir: Path) -> None:
    facts = machine()
    planned = getattr(options, "planned", 0)
    if len(rows) < planned:
        print(f"\nPARTIAL RUN: {len(rows)} of {planned} cells measured", file=sys.stderr)
    print(
        f"\nGateway at {facts['gateway_commit']}; {facts['cores']} x {facts['cpu']}, Python {facts['python']}; "
        f"{options.duration:g} s measured after {options.warmup:g} s warm-up per cell; "
        f"worker reply {REPLY_WORDS} words; total run {elapsed:.0f} s\n"
    )
    summary = median_rows(rows, options.baseline)
    if options.rounds > 1:
        print(f"Median of {options.rounds} rounds per cell; req/s of each round in results.json (round_rps).\n")
    print(results_table(summary, options.baseline) + "\n")
    if len({r["target"] for r in rows}) > 1:
        print(comparison_table(summary, options.baseline) + "\n")
    targets = {r["target"] for r in rows}
    if {"gateway", "gateway-base"} <= targets:
        print("Gateway CPU per request against the base commit's (`--base-tree`):\n")
        print(before_after_table(summary, rows) + "\n")
    if options.backend == "openai" and {"gateway", "litellm"} <= targets:
        print("Goals with an OpenAI-compatible upstream:\n")
        print(openai_goals_table(summary) + "\n")
    print(memory_table(memory))
    if getattr(options, "skipped", None):
        print("\nNot measured:\n" + "\n".join(f"- {line}" for line in options.skipped))
    noise = report_noise(rows)
    if noise:
        print("\nOther processes competed for the CPU (numbers below are pessimistic):\n" + noise)
    errors = report_errors(rows)
    if errors:
        print("\n**FAILURES** (these numbers are not clean):\n" + errors)
    record = {
        "machine": facts,
        "options": {k: str(v) for k, v in vars(options).items()},
        "elapsed_s": round(elapsed, 1),
        "rows": summary,
        "rounds": rows,
        "memory_mib": memory,
    }
    for path in filter(None, [workdir / "results.json", options.json]):
        path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)  # every process is stopped and the partial table printed already
