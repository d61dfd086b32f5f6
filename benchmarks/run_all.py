"""Run every benchmark in its own process, keep each printed table in benchmarks/results/, then draw the plots.

Each script's standard output goes to the terminal and to ``results/NAME.txt``, its rows to
``results/NAME.json``; the plots go to docs/img/. Scripts run one after another, because timings
taken side by side on a small machine measure each other. ``nox -s bench`` runs this file.

    python benchmarks/run_all.py [--only runtime accuracy ...] [--quick]

``--quick`` shortens every script (fewer repeats, lengths and training steps) to check that they run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRIPTS = {  # name: (full arguments, --quick arguments)
    "planning": ([], ["--models", "gpt2", "gpt2-xl", "--repeats", "1", "--skip-memory"]),
    "conversions": ([], []),
    "runtime": ([], ["--seq-lens", "32", "--threads", "1", "--repeats", "2", "--no-pt2e"]),
    "accuracy": ([], ["--float-steps", "20", "--qat-steps", "5", "--eval-windows", "8", "--calibration-batches", "2"]),
}


def run(name: str, arguments: list[str]) -> float:
    """Run one script, echoing and saving its output; return its wall time in seconds."""
    command = [sys.executable, str(HERE / f"{name}.py"), *arguments, "--json", str(RESULTS / f"{name}.json")]
    print(f"$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process, \
            open(RESULTS / f"{name}.txt", "w", encoding="utf-8") as table:
        for line in process.stdout:
            sys.stdout.write(line)
            table.write(line)
    if process.returncode:
        raise SystemExit(f"{name}.py exited with {process.returncode}; its output so far is in {RESULTS / f'{name}.txt'}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS), help="run these scripts only")
    parser.add_argument("--quick", action="store_true", help="short runs that check the scripts work; the numbers mean little")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    times = {}
    for name in args.only:
        full, quick = SCRIPTS[name]
        times[name] = run(name, quick if args.quick else full)
    subprocess.run([sys.executable, str(HERE / "plots.py")], check=True)
    print("wall time: " + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in times.items())
          + f"; total {sum(times.values()) / 60:.1f} min")


if __name__ == "__main__":
    main()
