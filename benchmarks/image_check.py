"""The images, built and run: both Dockerfile targets, checked from the inside.

    python3 -m benchmarks.image_check build   # `make image`: both targets, Dockerfile defaults
    python3 -m benchmarks.image_check check   # `make image-check`: the check below

`check` builds a stand-in for the base image (Debian bookworm minbase + Python 3.11 from
debootstrap, adjusted like the official slim image: python and pip in /usr/local/bin, no
EXTERNALLY-MANAGED marker), because a machine without a registry cannot pull
`python:3.11.7-slim-bookworm`; then both targets from the unchanged Dockerfile, and inside
each image, as the image's own user (uid 1000, no `--user`): `fadrm --help`, `pip check`,
the login shell's PATH (KubeRay runs pod commands with `bash -c`/`bash -lc`), a tiny
`fadrm run --executor local` writing to a mounted volume (ray image), and
`fadrm watch --dry-run` without Ray (watch image). It records build seconds and image sizes
beside the README's estimates in benchmarks/results/image_check.json.

pip inside the build reaches the same package sources as the host's pip: the host's
effective pip configuration (`pip config list`) is staged into a temporary folder that is
mounted read-only over /root for the build only, with each local file it names copied there
and each local folder (find-links, file:// indexes) bind-mounted below it. /root exists in
every base, so no mount point, host path or credential ends up in a layer or in the image
history (the check verifies both). With docker (no build-time volumes) the build uses the
network as any user's build does.

Standard library only: `make image` runs it with the system python3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks.containers import (STANDIN, CheckError, Engine, build_standin, build_target,
                                   find_engine, pip_config, stage_pip_config)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CHECK_TAGS = {"ray": "localhost/fadrm-check:ray", "watch": "localhost/fadrm-check:watch"}
# k8s/README.md, "Build and push the images": estimated on-disk sizes (GiB).
README_ESTIMATE_GIB = {"ray": 6.3, "watch": 1.3}
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def cpu_torch_args(pip_python: str = sys.executable) -> tuple[dict[str, str], str]:
    """Build arguments for the watch image's CPU torch: the Dockerfile's defaults when their
    index has the pinned wheel; else (no route to download.pytorch.org) the newest
    `torch-*+cpu` wheel in the host's local pip folders, with the matching torchvision."""
    text = (REPO / "Dockerfile").read_text()
    index = re.search(r"^ARG TORCH_CPU_INDEX=(\S+)", text, re.M).group(1)
    pins = re.search(r'^ARG TORCH_CPU="([^"]+)"', text, re.M).group(1)
    torch_version = re.search(r"torch==(\S+)", pins).group(1)
    try:
        with urllib.request.urlopen(f"{index.rstrip('/')}/torch/", timeout=20) as resp:
            page = urllib.parse.unquote(resp.read().decode(errors="replace"))
        if f"torch-{torch_version}-" in page:
            return {}, f"Dockerfile default: {pins} from {index}"
    except OSError:
        pass
    folders = []
    for values in pip_config(pip_python).values():
        for v in values.get("find-links", "").split():
            folders.append(Path(v))
    wheels = sorted((w for d in folders if d.is_dir() for w in d.glob("torch-*+cpu-cp311-*.whl")),
                    key=lambda w: [int(x) for x in re.findall(r"\d+", w.name.split("-")[1])[:3]])
    if not wheels:
        raise CheckError(f"{pins} is not reachable from {index} and the host's pip has no "
                         "local CPU torch wheel: pass --torch-cpu and --torch-cpu-index")
    version = wheels[-1].name.split("-")[1]
    major, minor = (int(x) for x in version.split(".")[:2])
    vision = f"0.{minor + 15}.*" if major == 2 else "*"
    spec = f"torch=={version} torchvision=={vision}"
    return ({"TORCH_CPU": spec, "TORCH_CPU_INDEX": "https://pypi.org/simple"},
            f"substitute: {spec} ({pins} is not reachable from {index} here)")


# --------------------------------------------------------------------------- checks


def tiny_config(output: str, data_root: str = str(FASHION_MNIST)) -> dict:
    """A Fashion-MNIST run small enough for a check: about a minute on 2 cores."""
    return {
        "name": "image-check", "output": output, "seed": 0, "ipc": 1,
        "data": {"kind": "idx", "root": data_root, "resolution": 28, "channels": 1,
                 "mean": [0.286], "std": [0.353], "max_train_per_class": 60, "max_val": 200},
        "teachers": [{"model": "convnet"}],
        "squeeze": {"epochs": 1, "batch_size": 64, "lr": 0.05},
        "select": {"num_candidates": 4, "num_crops": 2, "crop_scale": [0.5, 1.0]},
        "recover": {"method": "fadrm", "resolutions": [28, 24], "stage_iterations": [2, 2],
                    "lr": 0.05},
        "relabel": {"epochs": 4, "batch_size": 10, "epochs_per_shard": 2},
        "student": {"model": "convnet", "accumulation_steps": 1, "eval_every": 0},
        "execution": {"min_workers": 1, "max_workers": 2, "device": "cpu",
                      "threads_per_worker": 1},
    }


@dataclass
class Check:
    image: str
    name: str
    ok: bool
    seconds: float
    detail: str


def run_in(engine: Engine, image: str, argv: list[str], volumes: list[str] = (),
           env: dict[str, str] | None = None, entrypoint: str | None = None,
           timeout: float = 900) -> subprocess.CompletedProcess:
    """`run --rm` as the image's own user (no --user), no network."""
    args = ["run", "--rm", "--network=none", *engine.run_flags]
    for v in volumes:
        args += ["-v", v]
    for k, v in (env or {}).items():
        args += ["-e", f"{k}={v}"]
    if entrypoint is not None:
        args += ["--entrypoint", entrypoint]
    return engine(*args, image, *argv, check=False, timeout=timeout)


def _checked(checks: list[Check], image: str, name: str, proc_fn, verify) -> None:
    start = time.perf_counter()
    try:
        proc = proc_fn()
        out = proc.stdout.decode(errors="replace")
        err = proc.stderr.decode(errors="replace")
        problem = verify(proc.returncode, out, err)
    except (subprocess.TimeoutExpired, CheckError) as exc:
        problem, out, err = str(exc), "", ""
    ok = problem is None
    detail = "ok" if ok else f"{problem}\n--- stdout\n{out[-1500:]}\n--- stderr\n{err[-1500:]}"
    checks.append(Check(image, name, ok, round(time.perf_counter() - start, 1), detail))
    print(f"  [{'ok' if ok else 'FAIL'}] {image}: {name} ({checks[-1].seconds:.1f} s)"
          + ("" if ok else "\n" + detail), flush=True)


def _expect(code: int = 0, stdout: str | None = None, stderr: str | None = None):
    def verify(rc: int, out: str, err: str) -> str | None:
        if rc != code:
            return f"exit {rc}, expected {code}"
        if stdout is not None and stdout not in out:
            return f"stdout lacks {stdout!r}"
        if stderr is not None and stderr not in err:
            return f"stderr lacks {stderr!r}"
        return None
    return verify


# The watch image installs the package with --no-deps: Ray and matplotlib (the report's
# plots) are declared dependencies that `fadrm watch` never imports.
WATCH_ABSENT = {"ray", "matplotlib"}


def _pip_check_watch(rc: int, out: str, err: str) -> str | None:
    missing = set(re.findall(r"^fadrm \S+ requires (\S+), which is not installed\.$", out, re.M))
    others = [ln for ln in out.splitlines() if ln.strip()
              and not re.match(r"^fadrm \S+ requires \S+, which is not installed\.$", ln)]
    if missing != WATCH_ABSENT or others:
        return f"pip check: missing {sorted(missing)}, other problems {others}"
    return None


def check_images(engine: Engine, tags: dict[str, str], work: Path,
                 leak_markers: list[str], base: str) -> list[Check]:
    """Everything `check` runs inside the two images (see the module docstring)."""
    checks: list[Check] = []
    ray, watch = tags["ray"], tags["watch"]
    data = f"{FASHION_MNIST}:{FASHION_MNIST}:ro"
    # The volume: a host folder owned by the image's user, as fsGroup gives pods in k8s.
    work.mkdir(parents=True, exist_ok=True)
    os.chown(work, 1000, 100)
    (work / "run.yaml").write_text(json.dumps(tiny_config("/work/out"), indent=1))
    (work / "watch.yaml").write_text(json.dumps(tiny_config("/work/watch-out"), indent=1))
    vol = f"{work}:/work"

    for image in (ray, watch):
        _checked(checks, image, "runs as uid 1000, gid 100",
                 lambda: run_in(engine, image, ["-c", "id -u; id -g"], entrypoint="/bin/sh"),
                 lambda rc, out, err: None if rc == 0 and out.split() == ["1000", "100"]
                 else f"id -u; id -g = {out.split()} (rc {rc})")
        _checked(checks, image, "bash -lc finds fadrm in /usr/local/bin",
                 lambda: run_in(engine, image, ["-lc", "command -v fadrm python pip"],
                                entrypoint="/bin/bash"),
                 _expect(0, "/usr/local/bin/fadrm"))
        _checked(checks, image, "fadrm --help",
                 lambda: run_in(engine, image, ["--help"], entrypoint="fadrm"),
                 _expect(0, "usage: fadrm"))
        _checked(checks, image, "pip check" if image == ray else
                 "pip check: only fadrm's deliberately absent ray, matplotlib",
                 lambda: run_in(engine, image, ["check"], entrypoint="pip"),
                 _expect(0, "No broken requirements found.") if image == ray
                 else _pip_check_watch)

    _checked(checks, ray, "ray_jobs entrypoint and ray import",
             lambda: run_in(engine, ray, ["python", "-c", "import ray, ray_jobs.distill, torch; "
                                          "print(ray.__version__, torch.__version__)"]),
             _expect(0))
    _checked(checks, ray, "fadrm run --executor local (tiny) to a mounted volume",
             lambda: run_in(engine, ray, ["fadrm", "run", "/work/run.yaml", "--executor",
                                          "local", "--no-progress"], volumes=[vol, data],
                            timeout=1200),
             _expect(0, "student top-1"))
    manifest = work / "out" / "runs" / "image-check" / "latest" / "manifest.json"
    _checked(checks, ray, "outputs on the volume, owned by uid 1000",
             lambda: subprocess.CompletedProcess([], 0, b"", b""),
             lambda rc, out, err: None if manifest.exists() and manifest.stat().st_uid == 1000
             else f"{manifest} missing or not owned by 1000")
    _checked(checks, ray, "fadrm status: every stage done",
             lambda: run_in(engine, ray, ["fadrm", "status", "/work/run.yaml"],
                            volumes=[vol, data]),
             _expect(0))
    _checked(checks, watch, "no Ray in the watch image",
             lambda: run_in(engine, watch, ["-c", "import ray"], entrypoint="python"),
             _expect(1, stderr="No module named 'ray'"))
    _checked(checks, watch, "fadrm watch --dry-run (kubernetes target, no cluster)",
             lambda: run_in(engine, watch, [
                 "watch", "/work/watch.yaml", "--target", "kubernetes", "--template",
                 "/tpl/run-template.yaml", "--namespace", "fadrm", "--dry-run"],
                 volumes=[vol, data, f"{REPO / 'k8s/base/run-template.yaml'}:"
                          "/tpl/run-template.yaml:ro"],
                 env={"KUBECONFIG": "/nonexistent"}),
             _expect(0, "kind: RayJob", "dry run: the cluster is not reachable"))
    for image in (ray, watch):
        _checked(checks, image, "no build-time mount or host path in its layers or history",
                 lambda: subprocess.CompletedProcess([], 0, b"", b""),
                 lambda rc, out, err: leaks(engine, image, base, leak_markers))
    return checks


def leaks(engine: Engine, image: str, base: str, markers: list[str]) -> str | None:
    """None when no path added over ``base`` is below /root or a host folder given to the
    build, and no history line mentions one of ``markers``."""
    diff = engine.text("image", "diff", image, base, timeout=1200).splitlines()
    bad = [line for line in diff if line.split()[-1].startswith("/root")
           or any(line.split()[-1].startswith(m) for m in markers if m.startswith("/"))]
    history = engine.text("history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
    bad += [f"history: {m}" for m in markers if m in history]
    return None if not bad else "leaked: " + ", ".join(bad[:10])


# --------------------------------------------------------------------------- commands


def _gib(n: int) -> float:
    return round(n / 2**30, 2)


def cmd_build(args: argparse.Namespace) -> int:
    engine = find_engine(args.engine)
    if engine is None:
        print("no container engine: a docker daemon or podman is needed", file=sys.stderr)
        return 2
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(),
                        re.M).group(1)
    build_args = dict(a.split("=", 1) for a in args.build_arg)
    for target, tag in (("ray", f"{args.repo}:{version}"),
                        ("watch", f"{args.repo}-watch:{version}")):
        secs = build_target(engine, target, tag, build_args, None, None)
        print(f"{tag}: target {target}, {secs:.0f} s, {_gib(engine.size(tag))} GiB")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    engine = find_engine(args.engine)
    if engine is None:
        print("SKIP: no container engine (a docker daemon or podman)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result: dict = {"engine": engine.name,
                    "engine_version": engine.text("--version"),
                    "machine": {"cores": os.cpu_count(),
                                "load_average_1min": round(os.getloadavg()[0], 2)}}
    if args.rebuild_base or not engine.exists(STANDIN):
        print(f"stand-in base {STANDIN}: debootstrap bookworm ...", flush=True)
        result["base_seconds"] = round(build_standin(engine), 1)
        result["base_reused"] = False
    else:
        result["base_seconds"], result["base_reused"] = 0.0, True
    result["base"] = {"image": STANDIN, "size_bytes": engine.size(STANDIN),
                      "stands_in_for": "python:3.11.7-slim-bookworm"}
    build_args = {"BASE_IMAGE": STANDIN}
    torch_args, torch_note = cpu_torch_args()
    build_args.update(torch_args)
    result["watch_torch"] = torch_note
    with tempfile.TemporaryDirectory(prefix="fadrm-image-check-", dir="/var/tmp") as tmp:
        staged = None
        markers: list[str] = [tmp]
        if engine.name == "podman":
            staged = stage_pip_config(pip_config(), Path(tmp) / "pip-root")
            markers += [str(src) for src, _ in staged.mounts]
        log = RESULTS.parent / "work" / "image-build.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        result["images"] = {}
        for target in ("ray", "watch"):
            print(f"building target {target} (log: {log}) ...", flush=True)
            secs = build_target(engine, target, CHECK_TAGS[target], build_args, staged, log,
                                args.no_cache)
            size = engine.size(CHECK_TAGS[target])
            result["images"][target] = {
                "no_cache": args.no_cache,
                "tag": CHECK_TAGS[target], "build_seconds": round(secs, 1),
                "size_bytes": size, "size_gib": _gib(size),
                "readme_estimate_gib": README_ESTIMATE_GIB[target]}
            print(f"  {target}: {secs:.0f} s, {_gib(size)} GiB "
                  f"(README estimate {README_ESTIMATE_GIB[target]} GiB)", flush=True)
        result["build_args"] = build_args
        checks = check_images(engine, CHECK_TAGS, Path(tmp) / "volume", markers, STANDIN)
    result["checks"] = [c.__dict__ for c in checks]
    result["ok"] = all(c.ok for c in checks)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    if not args.no_record:
        out = Path(args.results)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("images", "ok", "total_seconds")}, indent=1))
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("docker", "podman"), default=None,
                        help="default: docker if its daemon answers, else podman")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build both targets with the Dockerfile's defaults")
    b.add_argument("--repo", default="fadrm", help="image name; the watch is REPO-watch")
    b.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE")
    c = sub.add_parser("check", help="stand-in base, both targets, checks inside them")
    c.add_argument("--rebuild-base", action="store_true", help="debootstrap the base again")
    c.add_argument("--no-cache", action="store_true",
                   help="build every layer again (default: reuse cached layers)")
    c.add_argument("--no-record", action="store_true", help="do not write the results JSON")
    c.add_argument("--results", default=str(RESULTS / "image_check.json"),
                   help="where the results JSON goes (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        return cmd_build(args) if args.cmd == "build" else cmd_check(args)
    except CheckError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
