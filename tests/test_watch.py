"""`fadrm watch`: the decision, the RayJob it would create, and a real local Ray head.

The Kubernetes target is tested through the exact object it hands to the API (validated
against the KubeRay RayJob schema), against an in-process API server spoken to with the
official ``kubernetes`` client (tests/kube_fake.py: it enforces AlreadyExists and the RBAC
of k8s/base); there is no cluster here and the test does not pretend otherwise. The run
lifecycle (back-off, idempotent names, obsolete runs, KubeRay states) is tested in
tests/test_watch_lifecycle.py. The Ray Jobs target runs against a real ``ray start --head``
with token authentication on.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from fadrm import watch as w
from ray_jobs import watch_targets as targets
from tests.ray_head import private_ray_head

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SCHEMAS = SHARED / "k8s-schemas"
TEMPLATE = REPO / "k8s" / "base" / "run-template.yaml"
RBAC = REPO / "k8s" / "base" / "rbac.watch.yaml"
NS = "fadrm"


# --------------------------------------------------------------------------- helpers


@dataclass
class Stage:
    name: str
    state: str
    reason: str = ""


@dataclass
class Status:
    """Duck-typed stand-in for fadrm.lineage.RunStatus."""

    stages: list[Stage]
    fingerprints: dict[str, str] = field(
        default_factory=lambda: {"config": "c0ffee0123456789", "teachers": "7eac4e5000000001"}
    )

    @property
    def up_to_date(self) -> bool:
        return all(s.state == "done" for s in self.stages)


def stale(teachers: str = "7eac4e5000000002", config: str = "c0ffee0123456789") -> Status:
    return Status(
        [
            Stage("select", "done"),
            Stage("recover", "stale", "teachers[0].weights: 7eac4e5000000001 -> " + teachers),
            Stage("relabel", "stale", "upstream recover changed"),
            Stage("evaluate", "missing"),
        ],
        {"config": config, "teachers": teachers},
    )


def up_to_date() -> Status:
    return Status([Stage(n, "done") for n in ("select", "recover", "relabel", "evaluate")])


def labels_of(status: Status) -> dict[str, str]:
    return {
        w.LABEL_RUN: "cifar100-ipc10",
        w.LABEL_CONFIG: status.fingerprints["config"],
        w.LABEL_TEACHERS: status.fingerprints["teachers"],
    }


def rayjob_validator():
    if not (SCHEMAS / "rayjob-v1.json").exists():
        pytest.skip(f"KubeRay schemas not found at {SCHEMAS} (shared/ checkout absent)")
    import jsonschema

    return jsonschema.Draft7Validator(json.loads((SCHEMAS / "rayjob-v1.json").read_text()))


def schema_errors(validator, doc) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def watch_role_rules() -> list[dict]:
    role = next(d for d in yaml.safe_load_all(RBAC.read_text()) if d and d["kind"] == "Role")
    return role["rules"]


@pytest.fixture()
def kube():
    """An API server enforcing k8s/base's Role for the watch, with the template deployed."""
    from tests.kube_fake import FakeKubeAPI

    with FakeKubeAPI(NS, watch_role_rules()) as fake:
        fake.put("ray.io", "raycronjobs", yaml.safe_load(TEMPLATE.read_text()))
        yield fake


def k8s_target(fake, **kw) -> targets.KubernetesTarget:
    api, core = fake.client()
    return targets.KubernetesTarget(None, namespace=NS, api=api, core_api=core, **kw)


def rayjob_item(labels: dict[str, str], deployment_status: str, name: str = "fadrm-x",
                job_status: str = "") -> dict:
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": name, "labels": labels},
        "status": {"jobDeploymentStatus": deployment_status, "jobStatus": job_status},
    }


@pytest.fixture()
def run_config(tmp_path) -> Path:
    """A valid run config whose name matches the k8s manifests."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cifar100-ipc10", "output": str(tmp_path / "out"),
        "data": {"root": str(tmp_path / "data")},
    }))
    return path


# --------------------------------------------------------------------------- decision


def test_stale_submits():
    d = w.decide(stale(), [])
    assert d.action == "submit" and d.should_submit
    assert "recover: stale" in d.reason and "evaluate: missing" in d.reason
    assert d.labels == {w.LABEL_CONFIG: "c0ffee0123456789", w.LABEL_TEACHERS: "7eac4e5000000002"}
    assert d.attempt == 1 and d.exit_code == 0


def test_up_to_date_skips():
    d = w.decide(up_to_date(), [])
    assert d.action == "skip-up-to-date" and not d.should_submit


def test_already_running_same_fingerprints_skips():
    status = stale()
    d = w.decide(status, [labels_of(status)])
    assert d.action == "skip-already-running"


def test_running_with_other_fingerprints_and_stale_submits():
    # The active run (not made by the watch) uses the old teacher: it does not produce what
    # is stale now, so it does not block a new one; and the watch leaves it alone.
    old = labels_of(stale(teachers="7eac4e5000000001"))
    d = w.decide(stale(teachers="7eac4e5000000002"), [old])
    assert d.action == "submit" and d.stop == ()
    assert "1 active run(s) have other fingerprints" in d.reason


def test_unlabelled_active_run_of_same_name_skips():
    # e.g. a RayJob applied by hand from the template: no fingerprints, same run.
    d = w.decide(stale(), [{w.LABEL_RUN: "cifar100-ipc10"}])
    assert d.action == "skip-already-running"


def test_fingerprints_must_be_label_values():
    bad = stale()
    bad.fingerprints = {"config": "x" * 64, "teachers": "abc"}
    with pytest.raises(ValueError, match="config fingerprint"):
        w.decide(bad, [])
    with pytest.raises(ValueError, match="'teachers' fingerprint"):
        w.decide(Status([], {"config": "abc"}), [])


def test_names_and_label_values():
    labels = w.fingerprint_labels(stale())
    name = w.rayjob_name("cifar100-ipc10", labels, 1)
    assert name.startswith("fadrm-cifar100-ipc10-") and name.endswith("-1")
    # Deterministic: same fingerprints and attempt, same name; anything else, another.
    assert name == w.rayjob_name("cifar100-ipc10", dict(labels), 1)
    assert name != w.rayjob_name("cifar100-ipc10", labels, 2)
    assert name != w.rayjob_name("cifar100-ipc10", w.fingerprint_labels(stale("7eac")), 1)
    long = w.rayjob_name("My_Very Long Run Name " * 5, labels, 999)
    assert len(long) <= 47 and long[0].isalpha()  # KubeRay's limit, DNS-1035
    assert set(long) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert w.label_value("run/with spaces!") == "run-with-spaces"


# --------------------------------------------------------------------------- rendering


def test_render_rayjob_from_the_k8s_template_is_valid_and_labelled():
    validator = rayjob_validator()
    template = yaml.safe_load(TEMPLATE.read_text())
    status = stale()
    obj = w.render_rayjob(template, status, "cifar100-ipc10", attempt=2)

    assert schema_errors(validator, obj) == []
    assert w.lifecycle_problems(obj) == []
    meta = obj["metadata"]
    assert meta["name"] == w.rayjob_name("cifar100-ipc10", w.fingerprint_labels(status), 2)
    assert "namespace" not in meta and "generateName" not in meta
    assert meta["labels"][w.LABEL_CONFIG] == "c0ffee0123456789"
    assert meta["labels"][w.LABEL_TEACHERS] == "7eac4e5000000002"
    assert meta["labels"][w.LABEL_RUN] == "cifar100-ipc10"
    assert meta["labels"][w.LABEL_ATTEMPT] == "2"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "fadrm-watch"
    assert meta["labels"]["app.kubernetes.io/component"] == "distill"
    assert "teachers[0].weights" in meta["annotations"][w.ANNOTATION_REASON]
    assert not [k for k in meta["annotations"] if k.startswith("fadrm.io/template")]
    # The spec is the template's jobTemplate, untouched; the template itself is unchanged.
    assert obj["spec"] == template["spec"]["jobTemplate"]
    assert template["metadata"]["name"] == "fadrm-run-template"
    assert w.LABEL_CONFIG not in template["metadata"]["labels"]


def test_render_rejects_other_kinds():
    with pytest.raises(ValueError, match="RayJob"):
        w.render_rayjob({"apiVersion": "ray.io/v1", "kind": "RayCluster"}, stale(), "r")


def test_template_file_may_be_kustomize_output(tmp_path):
    docs = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}},
            yaml.safe_load(TEMPLATE.read_text())]
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    template = w.load_template_file(path)
    assert template["kind"] == "RayJob"
    assert template["spec"] == docs[1]["spec"]["jobTemplate"]


def test_kubernetes_target_creates_exactly_the_rendered_object(kube):
    validator = rayjob_validator()
    target = k8s_target(kube)
    status = stale()
    name = target.submit(status, "cifar100-ipc10", "/config/run.yaml", attempt=1)

    assert name == w.rayjob_name("cifar100-ipc10", w.fingerprint_labels(status), 1)
    stored = kube.items("ray.io", "rayjobs")[name]
    body = target.build(status, "cifar100-ipc10", attempt=1)
    for key in ("apiVersion", "kind", "spec"):
        assert stored[key] == body[key]
    assert {k: v for k, v in stored["metadata"].items()
            if k in body["metadata"]} == body["metadata"]
    assert schema_errors(validator, body) == []
    assert kube.denied == []  # within the Role of k8s/base
    # The template came from the API (the deployed RayCronJob), by name.
    assert ("get", "ray.io", "raycronjobs", "fadrm-run-template") in kube.requests


def test_kubernetes_target_classifies_rayjob_states(kube):
    running = labels_of(stale())
    for i, (deploy, job) in enumerate([
        ("Running", "RUNNING"), ("Complete", "SUCCEEDED"), ("Failed", "FAILED"),
        ("Suspended", ""), ("", ""), ("ValidationFailed", ""), ("Complete", "STOPPED"),
        ("Retrying", ""),
    ]):
        kube.put("ray.io", "rayjobs", rayjob_item({**running, w.LABEL_CONFIG: f"c{i}"},
                                                  deploy, name=f"job-{i}", job_status=job))
    kube.put("ray.io", "rayjobs", rayjob_item({w.LABEL_RUN: "other-run"}, "Running", "else"))
    target = k8s_target(kube)
    records = {r.labels[w.LABEL_CONFIG]: r for r in target.runs("cifar100-ipc10")}
    states = {k: r.state for k, r in records.items()}
    assert states == {"c0": "active", "c1": "succeeded", "c2": "failed", "c3": "active",
                      "c4": "active", "c5": "failed", "c6": "stopped", "c7": "active"}
    assert records["c3"].suspended and not records["c0"].suspended
    assert [a[w.LABEL_CONFIG] for a in target.active_fingerprints("cifar100-ipc10")] == [
        "c0", "c3", "c4", "c7"]
    assert ("list", "ray.io", "rayjobs", "") in kube.requests


def test_watch_with_kubernetes_target(run_config, kube):
    target = k8s_target(kube)
    jobs = kube.items("ray.io", "rayjobs")

    d = w.watch(run_config, target, status_fn=lambda cfg: stale())
    assert d.action == "submit" and d.submitted.startswith("fadrm-cifar100-ipc10-")
    assert list(jobs) == [d.submitted]

    # The RayJob just created is running: the next tick does nothing.
    jobs[d.submitted]["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    d2 = w.watch(run_config, target, status_fn=lambda cfg: stale())
    assert d2.action == "skip-already-running" and d2.submitted is None
    assert len(jobs) == 1

    # It finished; everything is done now (no cluster call at all).
    jobs[d.submitted]["status"] = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    before = len(kube.requests)
    d3 = w.watch(run_config, target, status_fn=lambda cfg: up_to_date())
    assert d3.action == "skip-up-to-date" and len(kube.requests) == before

    # A new teacher checkpoint: stale again with a new teacher fingerprint -> a new RayJob,
    # and the finished one of the old fingerprint is tidied away.
    d4 = w.watch(run_config, target, status_fn=lambda cfg: stale(teachers="7eac4e5000000003"))
    assert d4.action == "submit" and d4.stopped == (d.submitted,)
    assert list(jobs) == [d4.submitted]
    assert jobs[d4.submitted]["metadata"]["labels"][w.LABEL_TEACHERS] == "7eac4e5000000003"
    assert kube.denied == []


def test_run_watch_cli_dry_run(run_config, monkeypatch, capsys, kube):
    api, core = kube.client()
    monkeypatch.setattr(targets.KubernetesTarget, "api", property(lambda self: api))
    monkeypatch.setattr("fadrm.watch.command._lineage_run_status", lambda cfg: stale())
    parser = w.add_watch_arguments(argparse.ArgumentParser(prog="fadrm watch"))
    args = parser.parse_args([
        "--config", str(run_config), "--target", "kubernetes",
        "--template", str(TEMPLATE), "--namespace", NS, "--dry-run",
    ])
    assert w.run_watch(args) == 0
    assert kube.items("ray.io", "rayjobs") == {}  # dry run: nothing created
    out = capsys.readouterr().out
    rendered = yaml.safe_load(out.split("submit:")[0])
    assert rendered["metadata"]["name"].startswith("fadrm-cifar100-ipc10-")
    assert "submit: " in out


def test_run_watch_bad_config_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nipc: 0\ndata: {root: /d}\n")
    args = w.add_watch_arguments(argparse.ArgumentParser()).parse_args(
        ["--config", str(bad), "--target", "ray", "--address", "http://127.0.0.1:9"])
    assert w.run_watch(args) == 2


# --------------------------------------------------------------------------- real Ray head


@pytest.fixture(scope="module")
def ray_head():
    with private_ray_head(num_cpus=1) as head:
        yield head


def _wait_for(client, job_id: str, states: set[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = client.get_job_status(job_id).value
        if state in states:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {state}: {client.get_job_logs(job_id)}")
        time.sleep(0.5)


def _release_gate(gate: Path, timeout: float = 60) -> None:
    """Write to the FIFO once the job has it open for reading, then close (-> EOF)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader exists
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        os.write(fd, b"open\n")
    finally:
        os.close(fd)


def test_auth_is_enforced_on_the_test_head(ray_head):
    # The head really runs with token auth: a client without the token is refused.
    import requests

    r = requests.get(f"{ray_head.address}/api/jobs/", timeout=10)
    assert r.status_code in (401, 403)


# ~15 s with the head's start-up (under the 60 s bar for @pytest.mark.slow).
def test_ray_jobs_target_against_a_real_head(ray_head, run_config):
    gate = ray_head.tmp / "gate.fifo"
    os.mkfifo(gate)
    # The job blocks in open(gate) until a writer appears (no sleep polling); the test
    # releases it by writing to the FIFO (_release_gate).
    job_script = ray_head.tmp / "job.py"
    job_script.write_text(
        "import pathlib\n"
        "# run.yaml is the config the watch shipped in the job's working_dir\n"
        "text = pathlib.Path('run.yaml').read_text()\n"
        "print('config', [l for l in text.splitlines() if l.startswith('name:')][0])\n"
        f"print('gate', open({str(gate)!r}).read().strip())\n"
    )
    entrypoint = f"{sys.executable} {job_script}"
    target = targets.RayJobsTarget(ray_head.address, entrypoint=entrypoint, token=ray_head.token)
    client = target.client
    try:
        # 1. stale, nothing running -> exactly one job, named from its fingerprints.
        d = w.watch(run_config, target, status_fn=lambda cfg: stale())
        assert d.action == "submit"
        assert d.submitted == w.rayjob_name("cifar100-ipc10", d.labels, 1)
        jobs = [j for j in client.list_jobs() if j.submission_id == d.submitted]
        assert len(client.list_jobs()) == 1 and len(jobs) == 1
        assert jobs[0].metadata[w.LABEL_TEACHERS] == "7eac4e5000000002"
        assert jobs[0].metadata[w.LABEL_RUN] == "cifar100-ipc10"
        _wait_for(client, d.submitted, {"RUNNING"})

        # 2. still stale, but that job (same fingerprints) is active -> nothing submitted.
        d2 = w.watch(run_config, target, status_fn=lambda cfg: stale())
        assert d2.action == "skip-already-running" and d2.submitted is None
        assert len(client.list_jobs()) == 1

        # 3. a racing second submission of the same run: Ray refuses the id, and that is
        #    success (nothing new).
        again = target.submit(stale(), "cifar100-ipc10", run_config, name=d.submitted)
        assert again == d.submitted and len(client.list_jobs()) == 1

        # Release the job; it reads the shipped config and the gate.
        _release_gate(gate)
        assert _wait_for(client, d.submitted, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED"
        logs = client.get_job_logs(d.submitted)
        assert "config name: cifar100-ipc10" in logs
        assert "gate open" in logs

        # 4. up to date (the finished job is no longer active) -> nothing submitted.
        d3 = w.watch(run_config, target, status_fn=lambda cfg: up_to_date())
        assert d3.action == "skip-up-to-date" and d3.submitted is None
        assert len(client.list_jobs()) == 1
    finally:
        for job in client.list_jobs():
            if not job.status.is_terminal():
                client.stop_job(job.submission_id)
