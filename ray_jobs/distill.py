"""Ray entrypoint: ``python -m ray_jobs.distill --config FILE [--set key=value ...]``.

Connects to the Ray cluster named by ``execution.address`` (or ``RAY_ADDRESS``, as set by
``ray job submit``), or starts an embedded local Ray instance, and runs the pipeline.
"""

from __future__ import annotations

import argparse
import logging
import sys

from fadrm.config import add_config_argument, load_config
from fadrm.errors import stop_on_sigterm


def run(cfg, show_progress: bool = True) -> dict:
    """Run ``cfg`` through Ray Train (the ``ray`` executor); returns its metrics."""
    from fadrm.runner import run_pipeline
    from ray_jobs.executor import RayTrainExecutor

    return run_pipeline(cfg, RayTrainExecutor(cfg), show_progress=show_progress)


def main(argv: list[str] | None = None) -> int:
    """Exit codes as ``fadrm run``: 0 done, 2 bad input (nothing ran), 3 the run failed,
    130 Ctrl-C, 143 SIGTERM."""
    from fadrm.cli import report_error
    from fadrm.runner import print_summary
    from fadrm.preflight import check_submittable, running_as_ray_job

    parser = argparse.ArgumentParser(prog="python -m ray_jobs.distill", description=__doc__)
    add_config_argument(parser)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key, e.g. recover.alpha=0.4")
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    args = parser.parse_args(argv)
    source = args.config
    if not source:
        parser.error("a config is required (CONFIG or --config CONFIG)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        with stop_on_sigterm():  # `ray job stop`, a deleted RayJob: stop as Ctrl-C does
            cfg = load_config(source, args.overrides)
            if running_as_ray_job():
                check_submittable(cfg, "a job submitted to the Ray Jobs API")
            # Progress always: a bar on a terminal, else (a pod's log, a Ray job) a line
            # per 5 %.
            metrics = run(cfg, show_progress=True)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - one line per failure
        return report_error(exc, verbose=args.verbose)
    print_summary(cfg, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
