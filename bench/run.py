"""Benchmark bulkpool against the hand-written alternatives; print a markdown table.

    python bench/run.py --database sqlite|postgres|mysql [--items 10000]
        [--workload trivial|setup2ms|hash2ms] [--repeat N] [--methods loop,...]
        [--url URL] [--output FILE]

Every method runs in a fresh subprocess (``bench/child.py``) against the same emptied
``auth_user`` table, so the peak RSS of each is its own. With ``--repeat N`` the methods
run in turn N times (interleaved, so drift in the machine's load hits all of them alike)
and the table shows the median rate. Only the standard library is imported here.
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from subprocess import PIPE
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URLS = {
    "postgres": "postgres://postgres@127.0.0.1:5432/test",
    "mysql": "mysql://root@127.0.0.1:3306/test",
}
METHODS = [
    "loop",
    "loop_atomic500",
    "ppe_script",
    "pool_atomic500",
    "bulkpool_serial",
    "bulkpool_thread",
    "bulkpool_process",
    "bulkpool_process_500",
    "bulkpool_serial_prepare",
    "bulkpool_process_prepare",
    "bulk_create",
]
# Run only when named in --methods: the celery backend beside the process backend with the
# journal it always has; it needs a broker (Redis, see bench/celery_app.py).
OPTIONAL_METHODS = ["bulkpool_process_journaled", "bulkpool_celery"]
WORKLOADS = ["trivial", "setup2ms", "hash2ms", "io5ms"]


def main() -> int:
    args = _parse()
    with tempfile.TemporaryDirectory(prefix="bulkpool-bench-") as tmp:
        env = _child_env(args, tmp)
        prepared = run_child(env, ["prepare"], args.timeout)
        env.update({k: str(v) for k, v in prepared.items() if k.startswith("BENCH_")})
        results = _run_methods(args, env)
    text = render(args, prepared, results)
    print(text)
    if args.output:
        with open(args.output, "a") as out:
            out.write(text + "\n")
    return 0 if all(not r.get("problems") for rs in results.values() for r in rs) else 1


def _run_methods(args: argparse.Namespace, env: dict[str, str]) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in args.methods}
    for _ in range(args.repeat):
        for name in args.methods:
            step = ["method", name, "--workload", args.workload, "--items", str(args.items)]
            result = run_child(env, step, args.timeout)
            results[name].append(result)
            print(f"  {name:<17} {_summary(result)}", file=sys.stderr, flush=True)
    return results


def run_child(env: dict[str, str], step: list[str], timeout: float) -> dict[str, Any]:
    """Run one step in a fresh interpreter; its last stdout line is its JSON result.

    The child leads a session of its own, so a timeout kills its pool's workers with it:
    left running, they would go on writing rows while the next method is measured.
    """
    command = [sys.executable, "-m", "bench.child", *step]
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=PIPE, stderr=PIPE, text=True, start_new_session=True
    ) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            return {"problems": [f"timed out after {timeout:g} s"], "items": 0, "timed_out": timeout}
    lines = stdout.strip().splitlines()
    if child.returncode != 0 or not lines:
        if step[0] == "prepare":
            sys.exit(f"bench: {' '.join(step)} failed:\n{stderr}")
        tail = stderr.strip().splitlines()[-1:] or [f"exit status {child.returncode}"]
        return {"problems": [f"crashed: {tail[0]}"], "items": 0}
    return json.loads(lines[-1])


def _child_env(args: argparse.Namespace, tmp: str) -> dict[str, str]:
    return child_env(args.url or DEFAULT_URLS.get(args.database) or f"sqlite:///{tmp}/bench.sqlite3")


def child_env(url: str) -> dict[str, str]:
    """The environment of every child: the bench project on the database at ``url``."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "bench.settings",
        "DATABASE_URL": url,
        "PYTHONPATH": path,  # so workers started by spawn or forkserver find bench/
    }


def _summary(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    rate = f"{_rate(result):,.0f} items/s" if result.get("elapsed") else ""
    return f"{rate} {'; '.join(result.get('problems', [])) or 'ok'}".strip()


def _rate(result: dict[str, Any]) -> float:
    return result["items"] / result["elapsed"]


def render(args: argparse.Namespace, prepared: dict[str, Any], results: dict) -> str:
    """The markdown fragment: a heading, the machine, and one row per method."""
    baseline = _median_rate(results.get("loop", []))
    lines = [
        f"### {prepared['database']}, workload `{args.workload}`, {args.items:,} items",
        "",
        _machine(prepared, args, results),
        "",
        "| method | items/s | vs `loop` | CPU ms/item | peak RSS MB | rows | signalled | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [_row(name, runs, baseline) for name, runs in results.items()]
    return "\n".join(lines) + "\n"


def _row(name: str, runs: list[dict[str, Any]], baseline: float | None) -> str:
    if any("skipped" in r for r in runs):
        return f"| `{name}` | | | | | | | skipped: {runs[0]['skipped']} |"
    problems = sorted({p for r in runs for p in r.get("problems", [])})
    rate = _median_rate(runs)
    rates = [_rate(r) for r in runs if r.get("elapsed")]
    spread = f" ({min(rates):,.0f} to {max(rates):,.0f})" if len(rates) > 1 else ""
    ratio = f"{rate / baseline:.2f}" if rate and baseline else ""
    cpu = statistics.median(1000 * r["cpu"] / r["items"] for r in runs if r.get("items"))
    rss = max((r["rss_mb"] for r in runs if "rss_mb" in r), default=None)
    rows = "/".join(sorted({f"{r['rows']:,}" for r in runs if "rows" in r}))
    signalled = "/".join(sorted({f"{r['signalled']:,}" for r in runs if "signalled" in r}))
    status = "FAILED: " + "; ".join(problems) if problems else "ok"
    return (
        f"| `{name}` | {f'{rate:,.0f}' if rate else ''}{spread} | {ratio} | {cpu:.2f} "
        f"| {f'{rss:.0f}' if rss else ''} | {rows} | {signalled} | {status} |"
    )


def _median_rate(runs: list[dict[str, Any]]) -> float | None:
    rates = [_rate(r) for r in runs if r.get("elapsed") and not r.get("problems")]
    return statistics.median(rates) if rates else None


def _machine(prepared: dict[str, Any], args: argparse.Namespace, results: dict) -> str:
    loads = [r["load"] for runs in results.values() for r in runs if "load" in r] or [0.0]
    return (
        f"{time.strftime('%Y-%m-%d')}; {os.cpu_count()} cores ({cpu_model()}), "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}, "
        f"Django {prepared['django']}, django-bulkpool {prepared['bulkpool']} "
        f"(commit {commit()}), {prepared['database']}. "
        f"Per-item work: {_work(prepared, args.workload)}. "
        f"Median of {args.repeat} run(s); 1-minute load average {min(loads):.2f} to "
        f"{max(loads):.2f} as the methods started. "
        "`loop` is the baseline. CPU is that of the process that runs the method and of "
        "its workers (not the database's); RSS is the peak of the process that runs the method."
    )


def _work(prepared: dict[str, Any], workload: str) -> str:
    if workload == "setup2ms":
        return f"~2 ms pure-Python loop ({prepared['BENCH_SPIN_ITERATIONS']:,} iterations)"
    if workload == "hash2ms":
        return f"~2 ms pbkdf2_hmac, GIL released ({prepared['BENCH_HASH_ITERATIONS']:,} rounds)"
    return "none"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def commit() -> str:
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "none"
    changed = git("status", "--porcelain", "--", "src").stdout.strip()
    return head.stdout.strip() + (" + uncommitted src/ changes" if changed else "")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=["sqlite", "postgres", "mysql"], default="sqlite")
    parser.add_argument("--url", help="database URL instead of the default for --database")
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--workload", choices=WORKLOADS, default="trivial")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--methods", type=_method_list, default=METHODS)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per method")
    parser.add_argument("--output", help="append the markdown fragment to this file")
    return parser.parse_args()


def _method_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = set(names) - set(METHODS) - set(OPTIONAL_METHODS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown: {', '.join(sorted(unknown))}")
    return names


if __name__ == "__main__":
    sys.exit(main())
