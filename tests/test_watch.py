"""`fadrm watch`: the decision, the RayJob it would create, and a real local Ray head.

The Kubernetes target is tested through the exact object it hands to the API (validated
against the KubeRay RayJob schema) with a recording stand-in for ``CustomObjectsApi``: there
is no cluster here and the test does not pretend otherwise. The Ray Jobs target runs against
a real ``ray start --head`` with token authentication on.
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
from tests.ray_head import private_ray_head

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SCHEMAS = SHARED / "k8s-schemas"
TEMPLATE = REPO / "k8s" / "ray-job.distill.yaml"


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


def stale(teachers: str = "7eac4e5000000002") -> Status:
    return Status(
        [
            Stage("select", "done"),
            Stage("recover", "stale", "teachers[0].weights: 7eac4e5000000001 -> " + teachers),
            Stage("relabel", "stale", "upstream recover changed"),
            Stage("evaluate", "missing"),
        ],
        {"config": "c0ffee0123456789", "teachers": teachers},
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


class FakeCustomObjectsApi:
    """Records what the Kubernetes target sends; answers list with given RayJobs."""

    def __init__(self, items=()):
        self.items = list(items)
        self.created: list[dict] = []
        self.list_calls: list[dict] = []

    def list_namespaced_custom_object(self, group, version, namespace, plural, **kw):
        self.list_calls.append(dict(group=group, version=version, namespace=namespace,
                                    plural=plural, **kw))
        return {"items": self.items}

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("ray.io", "v1", "rayjobs")
        self.created.append(body)
        name = body["metadata"]["generateName"] + "x7k2q"
        return {**body, "metadata": {**body["metadata"], "name": name, "namespace": namespace}}


def rayjob_item(labels: dict[str, str], deployment_status: str) -> dict:
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": "fadrm-x", "labels": labels},
        "status": {"jobDeploymentStatus": deployment_status},
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


def test_up_to_date_skips():
    d = w.decide(up_to_date(), [])
    assert d.action == "skip-up-to-date" and not d.should_submit


def test_already_running_same_fingerprints_skips():
    status = stale()
    d = w.decide(status, [labels_of(status)])
    assert d.action == "skip-already-running"


def test_running_with_other_fingerprints_and_stale_submits():
    # The active run uses the old teacher: it does not produce what is stale now.
    old = labels_of(stale(teachers="7eac4e5000000001"))
    d = w.decide(stale(teachers="7eac4e5000000002"), [old])
    assert d.action == "submit"
    assert "1 active run(s) have other fingerprints" in d.reason


def test_unlabelled_active_run_of_same_name_skips():
    # e.g. the RayJob applied with `kubectl apply -k k8s/`: no fingerprints, same run.
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
    assert w.rayjob_name_prefix("cifar100-ipc10") == "fadrm-cifar100-ipc10-"
    long = w.rayjob_name_prefix("My_Very Long Run Name " * 5)
    # generateName + 5 random characters must fit KubeRay's 47, as a DNS-1035 label.
    assert len(long) + 5 <= 47 and long.endswith("-") and long[0].isalpha()
    assert set(long) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert w.label_value("run/with spaces!") == "run-with-spaces"


# --------------------------------------------------------------------------- rendering


def test_render_rayjob_from_the_k8s_template_is_valid_and_labelled():
    validator = rayjob_validator()
    template = yaml.safe_load(TEMPLATE.read_text())
    status = stale()
    obj = w.render_rayjob(template, status, "cifar100-ipc10")

    assert schema_errors(validator, obj) == []
    meta = obj["metadata"]
    assert "name" not in meta and "namespace" not in meta
    assert meta["generateName"] == "fadrm-cifar100-ipc10-"
    assert meta["labels"][w.LABEL_CONFIG] == "c0ffee0123456789"
    assert meta["labels"][w.LABEL_TEACHERS] == "7eac4e5000000002"
    assert meta["labels"][w.LABEL_RUN] == "cifar100-ipc10"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "fadrm-watch"
    assert "teachers[0].weights" in meta["annotations"][w.ANNOTATION_REASON]
    # The spec is the template's, untouched; the template itself is not modified.
    assert obj["spec"] == template["spec"]
    assert template["metadata"]["name"] == "fadrm-distill"
    assert w.LABEL_CONFIG not in template["metadata"]["labels"]


def test_render_rejects_other_kinds():
    with pytest.raises(ValueError, match="RayJob"):
        w.render_rayjob({"apiVersion": "ray.io/v1", "kind": "RayCluster"}, stale(), "r")


def test_kubernetes_target_creates_exactly_the_rendered_object():
    validator = rayjob_validator()
    api = FakeCustomObjectsApi()
    target = w.KubernetesTarget.from_file(TEMPLATE, namespace="fadrm", api=api)
    status = stale()
    name = target.submit(status, "cifar100-ipc10", "/config/run.yaml")

    assert name.startswith("fadrm-cifar100-ipc10-")
    (body,) = api.created
    assert body == target.build(status, "cifar100-ipc10")
    assert schema_errors(validator, body) == []
    assert body["metadata"]["labels"][w.LABEL_TEACHERS] == "7eac4e5000000002"


def test_kubernetes_target_counts_only_unfinished_rayjobs():
    running = labels_of(stale())
    api = FakeCustomObjectsApi([
        rayjob_item(running, "Running"),
        rayjob_item({**running, w.LABEL_CONFIG: "old"}, "Complete"),
        rayjob_item({**running, w.LABEL_CONFIG: "failed"}, "Failed"),
        rayjob_item({**running, w.LABEL_CONFIG: "queued"}, "Suspended"),
        rayjob_item({**running, w.LABEL_CONFIG: "new"}, ""),
    ])
    target = w.KubernetesTarget({}, namespace="fadrm", api=api)
    active = target.active_fingerprints("cifar100-ipc10")
    assert [a[w.LABEL_CONFIG] for a in active] == ["c0ffee0123456789", "queued", "new"]
    assert api.list_calls[0]["label_selector"] == "fadrm.io/run=cifar100-ipc10"
    assert api.list_calls[0]["namespace"] == "fadrm"


def test_watch_with_kubernetes_target(run_config):
    api = FakeCustomObjectsApi()
    target = w.KubernetesTarget.from_file(TEMPLATE, namespace="fadrm", api=api)

    d = w.watch(run_config, target, status_fn=lambda cfg: stale())
    assert d.action == "submit" and d.submitted.startswith("fadrm-cifar100-ipc10-")
    assert len(api.created) == 1

    # The RayJob just created is now listed as running: the next tick does nothing.
    api.items = [rayjob_item(api.created[0]["metadata"]["labels"], "Running")]
    d = w.watch(run_config, target, status_fn=lambda cfg: stale())
    assert d.action == "skip-already-running" and d.submitted is None
    assert len(api.created) == 1

    # It finished; everything is done now.
    api.items[0]["status"]["jobDeploymentStatus"] = "Complete"
    d = w.watch(run_config, target, status_fn=lambda cfg: up_to_date())
    assert d.action == "skip-up-to-date" and len(api.created) == 1

    # A new teacher checkpoint: stale again with new teacher fingerprint -> a new RayJob.
    d = w.watch(run_config, target, status_fn=lambda cfg: stale(teachers="7eac4e5000000003"))
    assert d.action == "submit" and len(api.created) == 2
    assert api.created[1]["metadata"]["labels"][w.LABEL_TEACHERS] == "7eac4e5000000003"


def test_run_watch_cli_dry_run(run_config, monkeypatch, capsys):
    api = FakeCustomObjectsApi()
    monkeypatch.setattr(w.KubernetesTarget, "api", property(lambda self: api))
    monkeypatch.setattr(w, "_lineage_run_status", lambda cfg: stale())
    parser = w.add_watch_arguments(argparse.ArgumentParser(prog="fadrm watch"))
    args = parser.parse_args([
        "--config", str(run_config), "--target", "kubernetes",
        "--template", str(TEMPLATE), "--namespace", "fadrm", "--dry-run",
    ])
    assert w.run_watch(args) == 0
    assert api.created == []  # dry run: nothing created
    out = capsys.readouterr().out
    rendered = yaml.safe_load(out.split("submit:")[0])
    assert rendered["metadata"]["generateName"] == "fadrm-cifar100-ipc10-"
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
    target = w.RayJobsTarget(ray_head.address, entrypoint=entrypoint, token=ray_head.token)
    client = target.client
    try:
        # 1. stale, nothing running -> exactly one job submitted.
        d = w.watch(run_config, target, status_fn=lambda cfg: stale())
        assert d.action == "submit" and d.submitted
        jobs = [j for j in client.list_jobs() if j.submission_id == d.submitted]
        assert len(client.list_jobs()) == 1 and len(jobs) == 1
        assert jobs[0].metadata[w.LABEL_TEACHERS] == "7eac4e5000000002"
        assert jobs[0].metadata[w.LABEL_RUN] == "cifar100-ipc10"
        _wait_for(client, d.submitted, {"RUNNING"})

        # 2. still stale, but that job (same fingerprints) is active -> nothing submitted.
        d2 = w.watch(run_config, target, status_fn=lambda cfg: stale())
        assert d2.action == "skip-already-running" and d2.submitted is None
        assert len(client.list_jobs()) == 1

        # Release the job; it reads the shipped config and the gate.
        _release_gate(gate)
        assert _wait_for(client, d.submitted, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED"
        logs = client.get_job_logs(d.submitted)
        assert "config name: cifar100-ipc10" in logs
        assert "gate open" in logs

        # 3. up to date (the finished job is no longer active) -> nothing submitted.
        d3 = w.watch(run_config, target, status_fn=lambda cfg: up_to_date())
        assert d3.action == "skip-up-to-date" and d3.submitted is None
        assert len(client.list_jobs()) == 1
    finally:
        for job in client.list_jobs():
            if not job.status.is_terminal():
                client.stop_job(job.submission_id)
