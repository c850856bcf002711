"""The READMEs' shell blocks run as written, so they cannot drift from what works.

* README.md's `ray job submit` block runs verbatim (bash -euo pipefail) against a head it
  starts itself, in a private network + PID namespace (`unshare`): its own loopback, so the
  default ports are free, and its own process table, so the block's trailing `ray stop` sees
  only the namespace's Ray. HOME and TMPDIR are private too (the auth token in ~/.ray, Ray's
  session files and `ray_current_cluster`), so nothing on the machine is touched.
* k8s/README.md's commands that need no cluster (`kubectl kustomize`, the image `sed`) run
  as written; the kustomize output must equal what tests/test_k8s.py validates.
* Every block that talks to a Ray cluster with `ray job ...` sets RAY_AUTH_MODE=token first
  (Ray's CLI sends the token only in token mode), including the KubeRay ones that cannot run
  here: in README.md, k8s/README.md and every page of docs/.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_run_config

REPO = Path(__file__).resolve().parents[1]
READMES = [REPO / "README.md", REPO / "k8s" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def fenced_blocks(path: Path, lang: str = "bash") -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(), re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """The block's commands as shell words (continuations joined, comments dropped)."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def the_block(path: Path, *needles: str) -> str:
    hits = [b for b in fenced_blocks(path) if all(n in b for n in needles)]
    assert len(hits) == 1, f"{path.name}: expected one bash block with {needles}, found {len(hits)}"
    return hits[0]


def test_every_ray_job_command_runs_in_token_mode():
    checked = 0
    for path in READMES:
        for block in fenced_blocks(path):
            token_mode = False
            for words in commands(block):
                env = {}
                for w in words:
                    if w == "export":
                        continue
                    if not re.fullmatch(r"[A-Za-z_]\w*=.*", w):
                        break
                    env.update([w.split("=", 1)])
                rest = words[len(env) + (words[0] == "export"):]
                if rest[:2] == ["ray", "job"]:
                    checked += 1
                    assert token_mode or env.get("RAY_AUTH_MODE") == "token", (
                        f"{path.relative_to(REPO)}: `{' '.join(words)}` runs without "
                        "RAY_AUTH_MODE=token (Ray's CLI would not send the token)")
                elif words[0] == "export" and env.get("RAY_AUTH_MODE") is not None:
                    token_mode = env["RAY_AUTH_MODE"] == "token"
    assert checked >= 4  # README and docs/CLUSTER.md: a submit each; k8s/README: list + submit


# --- k8s/README.md ------------------------------------------------------------------------

def k8s_commands(program: str) -> list[list[str]]:
    return [w for b in fenced_blocks(REPO / "k8s" / "README.md") for w in commands(b)
            if w[0] == program]


def test_k8s_readme_kustomize_builds_what_the_tests_validate():
    from tests.test_k8s import kustomize_build

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    builds = [w for w in k8s_commands("kubectl") if w[1:2] == ["kustomize"]]
    assert builds, "k8s/README.md shows no `kubectl kustomize` preview"
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    for words in builds:
        proc = subprocess.run(words, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        built = sorted((d for d in yaml.safe_load_all(proc.stdout) if d), key=key)
        expected = sorted(kustomize_build(Path(words[2]).relative_to("k8s")), key=key)
        assert built == expected, f"`{' '.join(words)}` differs from tests/test_k8s.py's build"


def test_k8s_readme_registry_edit_repoints_every_image(tmp_path):
    """The README's one `sed` points an overlay's `images:` at another registry; the build
    then names no example image anywhere, the run template's containers included."""
    from tests.test_k8s import containers, find, rendered_rayjob

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    [sed] = k8s_commands("sed")
    target = Path(sed[-1])
    assert target.parts[:2] == ("k8s", "overlays") and target.name == "kustomization.yaml"
    shutil.copytree(REPO / "k8s", tmp_path / "k8s")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", shlex.join(sed)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(["kubectl", "kustomize", str(tmp_path / target.parent)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ghcr.io/example" not in proc.stdout
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    images = {c["image"] for c in containers(rendered_rayjob(docs))}
    images |= {c["image"] for c in containers(find(docs, "CronJob"))}
    assert images == {"REGISTRY/fadrm:0.1.0", "REGISTRY/fadrm-watch:0.1.0"}


# --- README.md: start a head, submit a job, stop the head ----------------------------------

def _namespaces_or_skip() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for `unshare --net --pid` (a private loopback and process "
                    "table, so `ray start`/`ray stop` cannot touch anybody else's Ray)")
    for tool in ("unshare", "ip", "bash"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not installed")
    probe = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash",
                            "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare does not work here: {probe.stderr.strip()}")


@pytest.mark.slow
def test_readme_ray_job_submit_block_runs_as_written(fmnist_root):
    _namespaces_or_skip()
    block = the_block(REPO / "README.md", "ray start --head", "ray job submit")
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").exists() or not (venv / "bin" / "ray").exists():
        pytest.skip("tests do not run from a venv with the `ray` CLI (make setup)")
    root = Path(tempfile.mkdtemp(prefix="frd", dir="/tmp"))  # short: Ray's unix sockets
    try:
        work, home, tmp, out = (root / d for d in ("work", "home", "tmp", "out"))
        for d in (home, tmp):
            d.mkdir()
        # A fresh checkout as the README assumes: the source, `.venv` (make setup), the config.
        work.mkdir()
        for name in ("fadrm", "ray_jobs"):
            shutil.copytree(REPO / name, work / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "pyproject.toml", work)
        (work / ".venv").symlink_to(venv)
        cfg = tiny_run_config(out, fmnist_root, ipc=1)  # output: absolute, as the README says
        cfg["name"] = "my-run"
        cfg["data"]["max_train_per_class"] = 100
        cfg["squeeze"]["epochs"] = 1
        cfg["relabel"].update(epochs=10, epochs_per_shard=10)
        cfg["student"]["eval_every"] = 5
        cfg["execution"].update(min_workers=1, max_workers=1)
        (work / "my-run.yaml").write_text(yaml.safe_dump(cfg))
        (root / "block.sh").write_text(block)

        env = {k: v for k, v in os.environ.items()
               if not k.startswith("RAY_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        env.update(HOME=str(home), TMPDIR=str(tmp),
                   PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}")
        script = shlex.quote(str(root / "block.sh"))
        cmd = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c",
               f"ip link set lo up && exec bash -euo pipefail {script}"]
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            # Our process group: the namespace's init dies, and the kernel ends the rest.
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            pytest.fail(f"the README block did not finish in 300 s:\n{log[-6000:]}")
        assert proc.returncode == 0, log[-6000:]
        assert re.search(r"Job 'raysubmit_\w+' succeeded", log), log[-6000:]
        assert re.search(r"Stopped all \d+ Ray processes", log), log[-3000:]  # `ray stop`
        assert "'PreemptionWatcher'" not in log  # ray_jobs/ray_logs.py works in a job too
        assert (home / ".ray" / "auth_token").exists()
        assert "student top-1" in log  # the job's own output (its summary), tailed by the CLI
        run_dir = out / "runs" / "my-run" / "latest"  # the newest report of my-run
        metrics = json.loads((run_dir / "metrics.json").read_text())
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert metrics["num_images"] == 10 and metrics["student_top1"] > 20  # chance: 10
        assert {s["stage"] for s in manifest["shards"]} == {"squeeze", "select", "recover",
                                                            "relabel", "evaluate"}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- links between the pages -----------------------------------------------------------------

def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_in_readme_and_docs_resolve():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked here
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.relative_to(REPO)}: link to missing {target}"
            if anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", linked.read_text(), re.M)
                assert anchor in {_anchor(h) for h in headings}, (
                    f"{page.relative_to(REPO)}: no heading for #{anchor} in {path or page.name}")
            checked += 1
    assert checked >= 20
