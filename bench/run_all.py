"""Runs every benchmark, then writes BENCHMARKS.md (the one documented benchmark command).

    .venv/bin/python bench/run_all.py                 # everything, ~15 minutes on 2 cores
    .venv/bin/python bench/run_all.py --only engine   # one benchmark (others read as found)
    .venv/bin/python bench/run_all.py --report-only   # rewrite BENCHMARKS.md from bench/results/

Each benchmark is a script in bench/ run as a subprocess with its own time budget; it writes
bench/results/<name>.json. Cheap benchmarks are repeated (while the total budget allows) and the
report shows median [min–max] over the repeats. A benchmark that fails or runs out of time is
reported as such, with the tail of its log (bench/results/logs/<name>.log); if an earlier result
file exists it is shown, marked stale. Peers (kronfluence, dattri) and the PNG export (kaleido)
come from bench/requirements-bench.txt:

    .venv/bin/pip install --no-deps -r bench/requirements-bench.txt
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import merge_repeats, write_report  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
LOGS = RESULTS / "logs"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark script and how run_all treats it.

    Attributes:
        name: Result name: the script writes bench/results/<name>.json.
        script: Path relative to the repo root.
        budget_s: Wall-clock limit for one run (capped by what is left of the total budget).
        repeat_under_s: Repeat the run while one run takes less than this (0: never repeat).
        max_repeats: At most this many runs.
        args: Extra command-line arguments.
    """

    name: str
    script: str
    budget_s: float
    repeat_under_s: float = 0.0
    max_repeats: int = 1
    args: tuple[str, ...] = ()


# Order and sizes keep the whole run near 15 minutes on 2 cores: the paper-fidelity and peer
# comparisons first, demo benchmarks on their cached small demos, gradients and memory in their
# --quick sizes last (their full sizes: run the scripts on their own).
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("gpu", "bench/bench_gpu.py", 120),
    Benchmark("engine", "bench/bench_engine.py", 180, repeat_under_s=40, max_repeats=2),
    Benchmark("fidelity", "bench/bench_fidelity.py", 270),
    Benchmark("peers", "bench/bench_peers.py", 420),
    Benchmark(
        "text_demo",
        "bench/bench_text_demo.py",
        240,
        args=("--size", "600", "--seeds", "0", "--skip-retrain"),
    ),
    Benchmark(
        "identification",
        "bench/bench_identification.py",
        240,
        args=(
            "--task",
            "generation",
            "--seeds",
            "0",
            "--loss-tokens",
            "prompt",
            "--train-per-class",
            "10",
            "--test-per-class",
            "3",
            "--epochs",
            "1",
            "--tag=-small",
        ),
    ),
    Benchmark("gradients", "bench/bench_gradients.py", 150, args=("--quick",)),
    Benchmark("memory", "bench/bench_memory.py", 150, args=("--quick",)),
    Benchmark("scaleout", "bench/bench_scaleout.py", 240),
    Benchmark("review_load", "bench/bench_review_load.py", 240, args=("--actions", "3")),
)


@dataclass
class Outcome:
    """What run_all saw of one benchmark (saved to bench/results/run_all.json)."""

    status: str = "not run"  # ok | failed | timeout | missing | skipped | not run
    seconds: list[float] = field(default_factory=list)
    repeats: int = 0
    returncodes: list[int] = field(default_factory=list)
    error_tail: str = ""
    stale: bool = False
    result_time: str = ""
    log: str = ""
    load_before: float | None = None  # 1-minute load average when the benchmark started


def choose_threads(requested: int | None) -> int | None:
    """Threads for the benchmarks: as requested, else 1 on a busy machine, else torch's default.

    On a CPU shared with other work (1-minute load above the core count), two OpenMP threads
    per process wait on each other at every barrier and run several times slower than one.
    """
    if requested is not None:
        return requested
    cores = os.cpu_count() or 1
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > cores:
        return 1
    return None


def _run_once(
    bench: Benchmark, limit_s: float, log_path: Path, threads: int | None = None
) -> tuple[str, float, int, str]:
    """Runs the script once in its own process group; returns (status, seconds, rc, tail)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(REPO / bench.script), *bench.args]
    start = time.perf_counter()
    with log_path.open("a") as log:
        log.write(
            f"\n=== {dt.datetime.now(dt.UTC):%H:%M:%S} {' '.join(cmd)} (limit {limit_s:.0f} s)\n"
        )
        log.flush()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=limit_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, status = -1, "timeout"
    seconds = time.perf_counter() - start
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
    return status, seconds, rc, tail


def run_benchmark(bench: Benchmark, deadline: float, threads: int | None = None) -> Outcome:
    """Runs one benchmark (repeating it when cheap) and merges the JSON of its repeats."""
    outcome = Outcome(log=str(LOGS / f"{bench.name}.log"))
    if hasattr(os, "getloadavg"):
        outcome.load_before = round(os.getloadavg()[0], 2)
    script = REPO / bench.script
    result = RESULTS / f"{bench.name}.json"
    if not script.exists():
        outcome.status = "missing"
        outcome.error_tail = f"{bench.script} does not exist in this checkout"
    runs: list[Any] = []
    while script.exists() and outcome.repeats < bench.max_repeats:
        left = deadline - time.time()
        if left < 20:
            if outcome.repeats == 0:
                outcome.status = "skipped"
                outcome.error_tail = "the total time budget was spent before this benchmark"
            break
        started = time.time()
        status, seconds, rc, tail = _run_once(
            bench, min(bench.budget_s, left), Path(outcome.log), threads
        )
        outcome.repeats += 1
        outcome.seconds.append(round(seconds, 1))
        outcome.returncodes.append(rc)
        fresh = result.exists() and result.stat().st_mtime >= started
        if status == "timeout" and fresh:  # a script that writes as it goes: keep what finished
            outcome.status = "timeout (partial result)"
            outcome.error_tail = tail
            runs.append(json.loads(result.read_text()))
            break
        if status != "ok" or not fresh:
            outcome.status = status if status != "ok" else "failed"
            outcome.error_tail = (
                tail if status != "ok" else f"exit 0 but no new {result.name}\n{tail}"
            )
            break
        outcome.status = "ok"
        runs.append(json.loads(result.read_text()))
        shutil.copy(result, RESULTS / f"{bench.name}.repeat{outcome.repeats}.json")
        if seconds >= bench.repeat_under_s or time.time() + seconds + 20 > deadline:
            break
    if runs:
        result.write_text(json.dumps(merge_repeats(runs), indent=1))
    elif result.exists():
        outcome.stale = True
        outcome.result_time = dt.datetime.fromtimestamp(result.stat().st_mtime, dt.UTC).strftime(
            "%Y-%m-%d %H:%M UTC"
        )
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="run only these benchmarks (names)")
    parser.add_argument("--skip", nargs="*", default=[], help="benchmarks not to run")
    parser.add_argument("--total-budget", type=float, default=870.0, help="seconds for all runs")
    parser.add_argument("--report-only", action="store_true", help="only rewrite BENCHMARKS.md")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--plots", type=Path, default=REPO / "docs" / "bench")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--extra",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "ARGS"),
        help='more arguments for one benchmark, e.g. --extra text_demo "--workdir /tmp/demos"',
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP/MKL threads per benchmark (default: 1 when the machine is busy, else torch's)",
    )
    args = parser.parse_args(argv)

    RESULTS.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    record_path = RESULTS / "run_all.json"
    outcomes: dict[str, dict[str, Any]] = {}
    if record_path.exists():
        outcomes = json.loads(record_path.read_text()).get("outcomes", {})
    names = [b.name for b in BENCHMARKS]
    unknown = [n for n in (args.only or []) + args.skip if n not in names]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(names)}")
    extras: dict[str, list[str]] = {}
    for name, extra in args.extra:
        if name not in names:
            parser.error(f"unknown benchmark {name!r} in --extra; choose from {', '.join(names)}")
        extras.setdefault(name, []).extend(shlex.split(extra))
    if not args.report_only:
        deadline = time.time() + args.total_budget
        threads = choose_threads(args.threads)
        print(f"run_all: threads per benchmark: {threads or 'torch default'}", flush=True)
        for bench in BENCHMARKS:
            if (args.only and bench.name not in args.only) or bench.name in args.skip:
                continue
            for stale in RESULTS.glob(f"{bench.name}.repeat*.json"):
                stale.unlink()
            (LOGS / f"{bench.name}.log").write_text("")
            print(f"run_all: {bench.name} ...", flush=True)
            if bench.name in extras:
                bench = replace(bench, args=(*bench.args, *extras[bench.name]))
            outcome = run_benchmark(bench, deadline, threads)
            outcomes[bench.name] = asdict(outcome)
            outcomes[bench.name]["threads"] = threads
            outcomes[bench.name]["command"] = " ".join([bench.script, *bench.args])
            times = ", ".join(f"{s:.0f} s" for s in outcome.seconds)
            print(f"run_all: {bench.name}: {outcome.status} ({times or '-'})", flush=True)
            record_path.write_text(json.dumps({"outcomes": outcomes}, indent=1))
    out = write_report(
        RESULTS,
        args.out,
        plots_dir=None if args.no_plots else args.plots,
        outcomes=outcomes,
        progress=lambda line: print(f"run_all: {line}", flush=True),
    )
    print(f"run_all: wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    failed = [n for n, o in outcomes.items() if o.get("status") not in ("ok", "missing")]
    if failed:
        print(f"run_all: not ok: {', '.join(failed)} (see bench/results/logs/)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
