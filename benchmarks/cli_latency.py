"""How long `fadrm` takes to answer: `--help`, `presets`, `status` (wall time of a fresh
process each, median of ``--repeats``; issue 27 item 11).

    python -m benchmarks.cli_latency                    # label "current", 5 repeats
    python -m benchmarks.cli_latency --label before     # e.g. measured on an older commit

Each command runs as a new process (the `fadrm` console script beside this Python when there
is one, else ``python -m fadrm.cli``) with this checkout first on ``PYTHONPATH``, after one
unmeasured warm-up run (so the page cache holds the interpreter and the packages, as it does
for a user's second command). `status` runs on a tiny Fashion-MNIST config with an output
that has never run (it reads the data's listing and plans every stage; nothing is computed).

Writes benchmarks/results/cli_latency.json: one entry per ``--label`` (entries of other
labels already in the file are kept), each with the median and every time in seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import common

NAME = "cli_latency"


def fadrm_command() -> list[str]:
    """How a user starts `fadrm` with this Python."""
    script = Path(sys.executable).with_name("fadrm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fadrm.cli"]


def tiny_config(folder: Path) -> Path:
    """A Fashion-MNIST config whose output has never been run (status: work to do)."""
    cfg = {"name": "latency", "output": str(folder / "out"), "ipc": 1,
           "data": {"kind": "idx", "root": str(common.FASHION_MNIST), "resolution": 28,
                    "channels": 1, "mean": [0.286], "std": [0.353]},
           "teachers": [{"model": "convnet"}], "student": {"model": "convnet"},
           "execution": {"device": "cpu"}}
    path = folder / "latency.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def wall_seconds(argv: list[str], env: dict[str, str], ok: tuple[int, ...]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    if proc.returncode not in ok:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return seconds


def measure(repeats: int) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(common.REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    base = fadrm_command()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = str(tiny_config(Path(tmp)))
        commands = {"fadrm --help": (["--help"], (0,)),
                    "fadrm presets": (["presets"], (0,)),
                    "fadrm status": (["status", config], (0, 1))}  # 1: work to do
        for name, (args, ok) in commands.items():
            wall_seconds([*base, *args], env, ok)  # warm-up
            times = [wall_seconds([*base, *args], env, ok) for _ in range(repeats)]
            out[name] = {"median_s": round(common.median(times), 3),
                         "seconds": [round(t, 3) for t in times]}
            print(f"{name:<16} median {out[name]['median_s']:.2f} s  "
                  f"({', '.join(f'{t:.2f}' for t in times)})", flush=True)
    return out


def git_commit() -> str | None:
    proc = subprocess.run(["git", "-C", str(common.REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="current", help="name of this measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default=None, help="results folder "
                        "(default benchmarks/results)")
    args = parser.parse_args(argv)
    results = Path(args.results) if args.results else common.RESULTS
    load = round(os.getloadavg()[0], 2)
    timings = measure(args.repeats)
    data = common.read_json(NAME, results) or {}
    runs = data.get("runs", {})
    runs[args.label] = {"commit": git_commit(), "repeats": args.repeats,
                        "load_average_1min": load, "commands": timings}
    common.write_json(NAME, {"machine": common.machine_line(common.machine_info()),
                             "command": " ".join(fadrm_command()), "runs": runs}, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
