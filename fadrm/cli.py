"""`fadrm` command line: run, demo, status, export, presets.

Imports here stay light (no torch, pyarrow or Ray at module level): `fadrm --help` and
`fadrm presets` answer in a fraction of a second; each command imports what it runs.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import traceback

from fadrm import __version__
from fadrm.config import (RunConfig, add_config_argument, list_presets, load_config,
                          preset_path, preset_purpose, resolve_config)
from fadrm.errors import (EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_RUN_FAILED,
                          EXIT_TERMINATED, EXIT_WORK_TO_DO, InputError, Terminated,
                          stop_on_sigterm)
from fadrm.methods import list_methods

# fadrm.runner.EXECUTORS (a test keeps them equal): importing fadrm.runner loads torch.
EXECUTORS = ("ray", "local")


def _load(args) -> RunConfig:
    if not args.config:
        raise InputError(f"fadrm {args.command}: a config is required (CONFIG or "
                         f"--config CONFIG; presets: fadrm presets)")
    _, used = resolve_config(args.config)
    print(f"config: {used}", file=sys.stderr, flush=True)  # a file, or which preset
    return load_config(args.config, args.overrides)


def cmd_run(args) -> int:
    from fadrm.runner import print_summary, run_config

    cfg = _load(args)
    metrics = run_config(cfg, args.executor, show_progress=not args.no_progress)
    print_summary(cfg, metrics)
    return EXIT_OK


def cmd_status(args) -> int:
    from fadrm.preflight import preflight

    cfg = _load(args)
    plan = preflight(cfg, write_probe=False).plan
    # execution.verify_outputs: the config asks for every byte to be checked; so does status.
    status = plan.status(verify=args.verify or cfg.execution.verify_outputs)
    report = plan.run_dir if status.report != "missing" else None
    if args.json:
        print(json.dumps({"up_to_date": status.up_to_date, "fingerprints": status.fingerprints,
                          "report": report, "report_state": status.report,
                          "report_reason": status.report_reason,
                          "stages": [s.__dict__ for s in status.stages]}, indent=2))
    else:
        for s in status.stages:
            units = f"{s.done_units}/{s.total_units} units"
            print(f"{s.name:<12} {s.state:<8} {units:<14} {s.reason}")
        if status.report == "current":
            where = f"report {report}/"
        elif all(s.state == "done" for s in status.stages):
            # Every stage done but no report of them: `fadrm run` writes only the report.
            where = f"report {status.report}: {status.report_reason}; `fadrm run` writes it"
        else:
            where = (f"report {report}/ (of other stage keys)" if report else
                     f"no report of this config yet (it would be {plan.run_dir}/)")
        print(("up to date" if status.up_to_date else "work to do") + f"; {where}")
    return EXIT_OK if status.up_to_date else EXIT_WORK_TO_DO


def cmd_presets(args) -> int:
    names = list_presets()
    if args.presets_command == "show":
        if args.name not in names:
            import difflib

            close = difflib.get_close_matches(args.name, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise InputError(f"no preset {args.name!r} ({hint}presets: {', '.join(names)})")
        sys.stdout.write(preset_path(args.name).read_text())
        return EXIT_OK
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {preset_purpose(name)}")
    print("\nstart from one: fadrm presets show NAME > my-run.yaml (then edit data.root, "
          "output)", file=sys.stderr)
    return EXIT_OK


def cmd_demo(args) -> int:
    from fadrm.demo import run_demo

    return run_demo(output=args.output, overrides=args.overrides,
                    show_progress=not args.no_progress, executor=args.executor)


def cmd_export(args) -> int:
    from fadrm.export import export_run

    cfg = _load(args)
    result = export_run(cfg, args.to, args.format)
    if result.written:
        print(f"exported {cfg.name} ({result.num_images} images, {result.epochs} epochs of "
              f"soft labels) to {result.dest}/ as {result.format}; see its README.md")
    else:
        print(f"{result.dest}/ already holds this export ({result.export_id}); nothing to do")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fadrm",
        description="FADRM dataset distillation: distil a labelled image set into a few "
                    "images per class plus soft labels, on an embedded or remote Ray cluster.",
    )
    parser.add_argument("--version", action="version", version=f"fadrm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        add_config_argument(p)
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a config key, e.g. recover.alpha=0.4;"
                       " list items by index: teachers.0.model=resnet50 or "
                       "'teachers[0].model=resnet50' (repeatable)")
        return p

    def with_executor(p):
        p.add_argument("--executor", choices=EXECUTORS, default="ray",
                       help="ray (default): Ray Train on an embedded local Ray instance, or "
                            "on execution.address; local: every unit in this process on "
                            "execution.device, without Ray")
        return p

    p = with_executor(with_config(sub.add_parser("run", help="run the whole pipeline for a "
                                                 "config")))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = with_config(sub.add_parser("status", help="show each stage as done/partial/stale; "
                                   "exit 1 when anything is left to do"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verify", action="store_true",
                   help="read every byte of every finished output and check its sha256 "
                        "(else sizes only); damaged outputs make the exit code 1")
    p.set_defaults(func=cmd_status)

    methods = ", ".join(list_methods())
    p = sub.add_parser("demo", help="Fashion-MNIST IPC10: FADRM (or any method: --set "
                       f"recover.method=NAME, NAME one of {methods}) vs random-real, "
                       "one table")
    p.add_argument("--output", default="runs/demo", help="output root (default runs/demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the demo config")
    p.add_argument("--no-progress", action="store_true")
    with_executor(p)
    p.set_defaults(func=cmd_demo)

    p = with_config(sub.add_parser("export", help="write a finished run's distilled set "
                                   "as an image folder of PNGs (or its Arrow shards) with "
                                   "its soft labels, config and a dataset card"))
    p.add_argument("--to", required=True, metavar="DEST",
                   help="a new (or empty) local folder or s3://bucket/prefix")
    p.add_argument("--format", choices=("imagefolder", "arrow"), default="imagefolder",
                   help="imagefolder (default): <class>/<id>.png + soft_labels.parquet; "
                        "arrow: the run's shards byte for byte")
    p.set_defaults(func=cmd_export)

    from fadrm.watch import add_watch_arguments, run_watch

    p = sub.add_parser("watch", help="submit a re-distillation job when any stage is stale "
                       "(teacher, data or config changed); for schedulers")
    add_watch_arguments(p)
    p.set_defaults(func=run_watch)

    p = sub.add_parser("presets", help="list the shipped config presets, each with its "
                       "purpose; `presets show NAME` prints one (YAML with comments)")
    presets_sub = p.add_subparsers(dest="presets_command")
    show = presets_sub.add_parser("show", help="print a preset's YAML (with its comments), "
                                  "e.g. fadrm presets show demo > my-run.yaml")
    show.add_argument("name", metavar="NAME", help="a name from `fadrm presets`")
    p.set_defaults(func=cmd_presets)
    return parser


RESUME_HINT = "finished units are kept; run the same command again to resume"


def report_error(exc: BaseException, verbose: bool = False, file=None) -> int:
    """Print ``exc`` as one ``error: ...`` line (``verbose``: with the traceback first) and
    return the exit code: 2 for bad input, 130 for Ctrl-C, 143 for SIGTERM, 3 for a run
    that failed."""
    file = file or sys.stderr
    if verbose and not isinstance(exc, KeyboardInterrupt):
        traceback.print_exception(exc, file=file)
    if isinstance(exc, Terminated):
        print(f"terminated (SIGTERM): {RESUME_HINT}", file=file)
        return EXIT_TERMINATED
    if isinstance(exc, KeyboardInterrupt):
        print(f"interrupted: {RESUME_HINT}", file=file)
        return EXIT_INTERRUPTED
    if isinstance(exc, (InputError, FileNotFoundError, IsADirectoryError)):
        print(f"error: {exc}", file=file)
        return EXIT_BAD_INPUT
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # Which disk is full, and that the fix is space, not a retry as it stands.
        print(f"error: run failed: {exc.strerror}: {exc.filename or '(path unknown)'}\n"
              f"(free some space there; {RESUME_HINT})", file=file)
        return EXIT_RUN_FAILED
    print(f"error: run failed: {type(exc).__name__}: {exc}\n({RESUME_HINT}; -v shows the "
          f"traceback)", file=file)
    return EXIT_RUN_FAILED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with stop_on_sigterm():  # Kubernetes stops a pod with SIGTERM: stop as Ctrl-C does
            return args.func(args)
    except BrokenPipeError:
        # The reader went away (`fadrm presets | head`): not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not fail again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - one line per failure
        return report_error(exc, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
