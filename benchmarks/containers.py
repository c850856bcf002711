"""Container engine helpers of the image benchmarks (benchmarks/image_check.py,
benchmarks/container_cluster.py): docker or podman with the flags this machine needs, the
host's pip configuration staged for a build, the stand-in base image, a target's build.

Standard library only: `make image` runs it with the system python3.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STANDIN = "localhost/fadrm-standin-python:3.11-bookworm"
# Podman on machines whose sandbox cannot raise limits: the lower limits are explicit.
ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


class CheckError(RuntimeError):
    """A build or an in-image check failed (the message says which and why)."""


# --------------------------------------------------------------------------- engine


@dataclass
class Engine:
    """docker or podman, with the global flags this machine needs."""

    name: str
    argv: list[str]

    def __call__(self, *args: str, timeout: float = 3600, check: bool = True,
                 capture: bool = True, input: bytes | None = None
                 ) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.argv, *args], capture_output=capture, timeout=timeout,
                              input=input)
        if check and proc.returncode != 0:
            err = (proc.stderr or b"").decode(errors="replace")[-3000:] if capture else ""
            raise CheckError(f"{self.name} {' '.join(args[:3])} ... exited "
                             f"{proc.returncode}\n{err}")
        return proc

    def text(self, *args: str, timeout: float = 600) -> str:
        return self(*args, timeout=timeout).stdout.decode().strip()

    def exists(self, image: str) -> bool:
        return self("image", "inspect", image, check=False).returncode == 0

    def size(self, image: str) -> int:
        return int(self.text("image", "inspect", "--format", "{{.Size}}", image))

    @property
    def run_flags(self) -> list[str]:
        return ULIMITS if self.name == "podman" else []


def find_engine(name: str | None = None) -> Engine | None:
    """docker when its daemon answers, else podman; None when neither is usable.

    A docker client without a daemon (common in sandboxes) does not count. Podman gets
    `--runtime runc --cgroup-manager cgroupfs` when runc is installed (crun refuses hybrid
    cgroup hierarchies); FADRM_PODMAN_FLAGS replaces these flags."""
    name = name or os.environ.get("FADRM_CONTAINER_ENGINE") or None
    if name in (None, "docker") and shutil.which("docker"):
        ok = subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0
        if ok:
            return Engine("docker", ["docker"])
    if name in (None, "podman") and shutil.which("podman"):
        flags = os.environ.get("FADRM_PODMAN_FLAGS")
        if flags is None:
            flags = "--runtime runc --cgroup-manager cgroupfs" if shutil.which("runc") else ""
        return Engine("podman", ["podman", *flags.split()])
    return None


# --------------------------------------------------------------------------- host pip


_PIP_LINE = re.compile(r"^(?P<key>[:\w.-]+)='(?P<value>.*)'$")
_PATH_KEYS = {"cert", "client-cert", "constraint", "requirement"}
_LINK_KEYS = {"find-links", "index-url", "extra-index-url"}


def pip_config(python: str = sys.executable) -> dict[str, dict[str, str]]:
    """The host's effective pip configuration: {section: {key: value}}. `pip config list`
    prints the files' values already merged (site over user over global) and the PIP_*
    environment separately (`:env:.key`), which wins, as in pip."""
    proc = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True,
                          text=True, timeout=120)
    return parse_pip_config(proc.stdout) if proc.returncode == 0 else {}


def parse_pip_config(text: str) -> dict[str, dict[str, str]]:
    """``pip config list`` output -> {section: {key: value}} (see pip_config)."""
    ranked: dict[tuple[str, str], tuple[int, str]] = {}
    for line in text.splitlines():
        m = _PIP_LINE.match(line.strip())
        if not m:
            continue
        variant_section, _, key = m["key"].rpartition(".")
        if variant_section == ":env:":
            section, rank = "global", 1
        else:
            section, rank = variant_section, 0
        if (section, key) not in ranked or rank >= ranked[(section, key)][0]:
            ranked[(section, key)] = (rank, m["value"])
    merged: dict[str, dict[str, str]] = {}
    for (section, key), (_, value) in ranked.items():
        merged.setdefault(section, {})[key] = value
    return merged


@dataclass
class StagedPip:
    """A pip configuration for /root/.config/pip/pip.conf inside a build, and its mounts."""

    root: Path
    mounts: list[tuple[Path, str]] = field(default_factory=list)
    """(host folder, container path) pairs, read-only, below /root."""

    def volume_args(self) -> list[str]:
        args = ["-v", f"{self.root}:/root:ro"]
        for src, dst in self.mounts:
            args += ["-v", f"{src}:{dst}:ro"]
        return args


def stage_pip_config(config: dict[str, dict[str, str]], stage: Path) -> StagedPip:
    """Rewrite ``config`` for a build container whose /root is ``stage`` (mounted read-only).

    Local files it names (cert, constraint, ...) are copied under the stage; local folders
    (find-links, file:// indexes: for a `.../simple` index its parent, where the wheel files
    are) are bind-mounted at /root/.config/pip/dirs/N. URLs stay as they are."""
    pip_dir = stage / ".config" / "pip"
    (pip_dir / "files").mkdir(parents=True, exist_ok=True)
    staged = StagedPip(stage)
    folders: dict[Path, str] = {}

    def folder(path: Path) -> str:
        if path not in folders:
            dst = f"/root/.config/pip/dirs/{len(folders)}"
            (stage / dst.removeprefix("/root/")).mkdir(parents=True, exist_ok=True)
            folders[path] = dst
            staged.mounts.append((path, dst))
        return folders[path]

    def remap_path(value: str) -> str:
        path = Path(value)
        if not path.is_absolute() or not path.exists():
            return value
        if path.is_dir():
            return folder(path)
        name = f"{len(list((pip_dir / 'files').iterdir()))}-{path.name}"
        shutil.copyfile(path, pip_dir / "files" / name)
        return f"/root/.config/pip/files/{name}"

    def remap_link(value: str) -> str:
        if value.startswith("file://"):
            path = Path(urllib.parse.urlparse(value).path)
            if path.name == "simple" and path.parent.is_dir():
                return "file://" + folder(path.parent) + "/simple"
            return "file://" + remap_path(str(path))
        return remap_path(value)

    lines: list[str] = []
    for section, values in sorted(config.items()):
        lines.append(f"[{section}]")
        for key, value in sorted(values.items()):
            if key in _PATH_KEYS:
                value = " ".join(remap_path(v) for v in value.split())
            elif key in _LINK_KEYS:
                value = " ".join(remap_link(v) for v in value.split())
            lines.append(f"{key} = {value}")
    (pip_dir / "pip.conf").write_text("\n".join(lines) + "\n")
    os.chmod(stage, 0o755)
    return staged


# --------------------------------------------------------------------------- builds


def apt_mirror() -> str:
    """This machine's Debian mirror (deb822 or one-line sources), else deb.debian.org."""
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for src in sources:
        try:
            text = src.read_text()
        except OSError:
            continue
        m = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or re.search(
            r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s+bookworm\b", text, re.M)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def build_standin(engine: Engine, tag: str = STANDIN) -> float:
    """debootstrap a bookworm minbase with Python 3.11 and import it as ``tag``."""
    if not shutil.which("debootstrap"):
        raise CheckError("debootstrap is not installed (apt-get install debootstrap)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fadrm-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase",
             "--include=python3,python3-venv,python3-pip,ca-certificates",
             "bookworm", str(rootfs), apt_mirror()], capture_output=True, timeout=1800)
        if proc.returncode != 0:
            raise CheckError("debootstrap failed:\n" + proc.stdout.decode()[-2000:]
                             + proc.stderr.decode()[-2000:])
        # What python:3.11-slim has and Debian's python3 lacks.
        (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
        (rootfs / "usr/local/bin/python").symlink_to("/usr/bin/python3")
        pip = rootfs / "usr/local/bin/pip"
        pip.write_text('#!/bin/sh\nexec /usr/bin/python3 -m pip "$@"\n')
        pip.chmod(0o755)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (rootfs / junk).glob("*"):
                if f.is_file():
                    f.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(
            [*engine.argv, "import",
             "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', "-", tag],
            stdin=tar.stdout, capture_output=True, timeout=1800)
        tar.wait()
        if imp.returncode != 0 or tar.returncode != 0:
            raise CheckError("import of the stand-in failed: " + imp.stderr.decode()[-2000:])
    return time.perf_counter() - start


def build_target(engine: Engine, target: str, tag: str, build_args: dict[str, str],
                 staged: StagedPip | None, log: Path | None = None,
                 no_cache: bool = False) -> float:
    """Build one Dockerfile target; returns wall seconds (cached layers count as done)."""
    args = ["build", "--target", target, "-t", tag, "-f", str(REPO / "Dockerfile")]
    if no_cache:
        args.append("--no-cache")
    for key, value in build_args.items():
        args += ["--build-arg", f"{key}={value}"]
    if engine.name == "podman":
        args += ["--pull=never", "--network=host", *ULIMITS]
        if staged is not None:
            args += staged.volume_args()
    start = time.perf_counter()
    with open(log or os.devnull, "ab") as out:
        proc = subprocess.run([*engine.argv, *args, str(REPO)], stdout=out,
                              stderr=subprocess.STDOUT, timeout=7200)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        raise CheckError(f"building target {target} failed (exit {proc.returncode})\n{tail}")
    return time.perf_counter() - start
