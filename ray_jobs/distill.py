"""Ray entrypoint: ``python -m ray_jobs.distill --config FILE [--set key=value ...]``.

Connects to the Ray cluster named by ``execution.address`` (or ``RAY_ADDRESS``, as set by
``ray job submit``), or starts an embedded local Ray instance, and runs the pipeline.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from fadrm.config import add_config_argument, load_config


def connect(address: str | None, threads: int, max_workers: int) -> None:
    import ray

    from ray_jobs.ray_logs import hide_known_noise
    hide_known_noise()  # Ray Train's harmless PreemptionWatcher ERROR line, once per stage
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Embedded instance: enough CPUs for the worker range even on a small machine
        # (workers are mostly single-threaded; oversubscribing 2 cores is fine).
        cpus = max(os.cpu_count() or 1, threads * max_workers + 1)
        # Ray's helpers (Ray Train's PlacementGroupCleaner, the state API) find "their"
        # cluster by RAY_ADDRESS, else by scanning the machine, which fails with "Found
        # multiple active Ray instances" while another run is going. So this instance gets
        # a port chosen here, and its workers get RAY_ADDRESS naming it: two runs on one
        # machine share nothing.
        port = _free_port()
        gcs_address = f"127.0.0.1:{port}"
        saved = os.environ.get("RAY_GCS_SERVER_PORT")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        try:
            # The dashboard serves Ray's state API, which Ray Train uses to clean up after
            # its controller; it listens on 127.0.0.1 only and Ray's token auth stays on.
            ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1",
                     runtime_env={"env_vars": {"RAY_ADDRESS": gcs_address}},
                     log_to_driver=True, configure_logging=True, logging_level=logging.WARNING)
        finally:
            if saved is None:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)
            else:
                os.environ["RAY_GCS_SERVER_PORT"] = saved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg, show_progress: bool = True) -> dict:
    from fadrm.pipeline import run_pipeline
    from ray_jobs.executor import RayTrainExecutor

    return run_pipeline(cfg, RayTrainExecutor(cfg), show_progress=show_progress)


def main(argv: list[str] | None = None) -> int:
    """Exit codes as ``fadrm run``: 0 done, 2 bad input (nothing ran), 3 the run failed."""
    from fadrm.cli import print_summary, report_error
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
        cfg = load_config(source, args.overrides)
        if running_as_ray_job():
            check_submittable(cfg, "a job submitted to the Ray Jobs API")
        metrics = run(cfg, show_progress=sys.stderr.isatty())
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - one line per failure
        return report_error(exc, verbose=args.verbose)
    print_summary(cfg, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
