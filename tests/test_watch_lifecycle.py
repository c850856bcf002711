"""The run lifecycle of `fadrm watch`, against a Kubernetes API that behaves like one.

Every test drives the real ``KubernetesTarget`` with the official ``kubernetes`` client
against tests/kube_fake.py, an in-process API server that answers ``AlreadyExists``,
``NotFound`` and ``Forbidden`` like a real one and enforces the Role of
k8s/base/rbac.watch.yaml. Tests play KubeRay by setting ``status`` on the stored RayJobs.
Each case here would fail on the watch as it was before (a failed RayJob counted as
inactive, so the same failing run was resubmitted every tick; generated names, so racing
watches created two runs; old-fingerprint runs kept running beside new ones).
"""

from __future__ import annotations

import argparse
import threading
import time

import pytest
import yaml

from fadrm import watch as w
from ray_jobs import watch_targets as targets
from tests.kube_fake import FakeKubeAPI
from tests.test_watch import (NS, TEMPLATE, k8s_target, kube, run_config, stale,  # noqa: F401
                              up_to_date, watch_role_rules)

RUN = "cifar100-ipc10"


def jobs_of(fake) -> dict[str, dict]:
    return fake.items("ray.io", "rayjobs")


def set_state(fake, name: str, deployment: str, job: str = "", **extra) -> None:
    jobs_of(fake)[name]["status"] = {"jobDeploymentStatus": deployment, "jobStatus": job,
                                     **extra}


def tick(run_config, target, status, **kw) -> w.Decision:
    return w.watch(run_config, target, status_fn=lambda cfg: status, **kw)


# --------------------------------------------------------------------------- 1. back-off


def test_failed_runs_back_off_with_an_event_and_exit_3(run_config, kube):
    target = k8s_target(kube)
    first = tick(run_config, target, stale())
    set_state(kube, first.submitted, "Failed", "FAILED", reason="AppFailed",
              message="Job entrypoint command failed with exit code 1")

    # One failure: a second attempt, under another deterministic name.
    second = tick(run_config, target, stale())
    assert second.action == "submit" and second.attempt == 2
    assert second.submitted != first.submitted and second.submitted.endswith("-2")
    set_state(kube, second.submitted, "Failed", "", reason="DeadlineExceeded")

    # Two failures for the same fingerprints: back-off. Nothing new, a Warning Event.
    before = set(jobs_of(kube))
    third = tick(run_config, target, stale())
    assert third.action == "backoff" and third.exit_code == w.EXIT_BACKOFF == 3
    assert third.submitted is None and set(jobs_of(kube)) == before
    assert [r.name for r in third.failures] == [first.submitted, second.submitted] or \
        {r.name for r in third.failures} == {first.submitted, second.submitted}
    (event,) = kube.items("", "events").values()
    from tests.test_k8s import k8s_validate

    k8s_validate({k: v for k, v in event.items()})  # a valid core/v1 Event, strictly
    assert event["type"] == "Warning" and event["reason"] == "RedistillationBackOff"
    assert event["involvedObject"]["kind"] == "RayJob"
    assert event["involvedObject"]["name"] in (first.submitted, second.submitted)
    assert event["involvedObject"]["uid"]
    assert f"kubectl -n {NS} delete rayjobs -l fadrm.io/run={RUN}" in event["message"]
    assert "DeadlineExceeded" in event["message"] or "AppFailed" in event["message"]
    # It stays in back-off tick after tick (the failed RayJobs are the record).
    assert tick(run_config, target, stale()).action == "backoff"
    assert set(jobs_of(kube)) == before
    assert kube.denied == []


def test_a_new_fingerprint_lifts_the_back_off_and_tidies_the_failures(run_config, kube):
    target = k8s_target(kube)
    for _ in range(2):
        d = tick(run_config, target, stale())
        set_state(kube, d.submitted, "Failed", "FAILED")
    assert tick(run_config, target, stale()).action == "backoff"
    failed = set(jobs_of(kube))

    d = tick(run_config, target, stale(teachers="7eac4e5000000009"))
    assert d.action == "submit" and d.attempt == 1
    assert set(d.stopped) == failed  # the old fingerprints' back-off records are deleted
    assert set(jobs_of(kube)) == {d.submitted}


def test_the_documented_manual_reset_lifts_the_back_off(run_config, kube):
    from fadrm.watch import LABEL_CONFIG, LABEL_RUN, LABEL_TEACHERS
    from tests.kube_fake import selector_matches

    target = k8s_target(kube)
    for _ in range(2):
        d = tick(run_config, target, stale())
        set_state(kube, d.submitted, "ValidationFailed", reason="ValidationFailed",
                  message="The RayJob spec is invalid")
    backoff = tick(run_config, target, stale())
    assert backoff.action == "backoff" and "ValidationFailed" in backoff.reason
    hint = target.reset_hint(RUN, backoff)
    # `kubectl -n fadrm delete rayjobs -l <selector>`: the selector names exactly them.
    selector = hint.split(" -l ", 1)[1]
    assert {LABEL_RUN, LABEL_CONFIG, LABEL_TEACHERS} <= {t.split("=")[0]
                                                       for t in selector.split(",")}
    doomed = [n for n, o in jobs_of(kube).items()
              if selector_matches(selector, o["metadata"]["labels"])]
    assert sorted(doomed) == sorted(jobs_of(kube))
    for name in doomed:
        del jobs_of(kube)[name]
    d = tick(run_config, target, stale())
    assert d.action == "submit" and d.attempt == 1


def test_max_failures_is_a_setting(run_config, kube):
    target = k8s_target(kube)
    d = tick(run_config, target, stale(), max_failures=1)
    set_state(kube, d.submitted, "Failed", "FAILED")
    assert tick(run_config, target, stale(), max_failures=1).action == "backoff"
    assert tick(run_config, target, stale(), max_failures=3).action == "submit"
    # 0: never back off.
    decision = w.decide(stale(), [w.RunRecord(f"r{i}", {**w.fingerprint_labels(stale()),
                                                       w.LABEL_MANAGED_BY: w.MANAGER,
                                                       w.LABEL_ATTEMPT: str(i)}, w.FAILED)
                                  for i in range(1, 6)], max_failures=0)
    assert decision.action == "submit" and decision.attempt == 6


def test_a_run_that_succeeded_without_making_the_run_up_to_date_counts(run_config, kube):
    target = k8s_target(kube)
    for _ in range(2):
        d = tick(run_config, target, stale())
        set_state(kube, d.submitted, "Complete", "SUCCEEDED")
    d = tick(run_config, target, stale())
    assert d.action == "backoff" and "still stale" in d.reason


def test_cli_exits_3_in_back_off_and_0_otherwise(run_config, kube, monkeypatch, capsys):
    api, core = kube.client()
    monkeypatch.setattr(targets.KubernetesTarget, "api", property(lambda self: api))
    monkeypatch.setattr(targets.KubernetesTarget, "core", property(lambda self: core))
    monkeypatch.setattr("fadrm.watch.command._lineage_run_status", lambda cfg: stale())
    monkeypatch.setenv("POD_NAMESPACE", NS)  # the downward API of the CronJob pod
    parser = w.add_watch_arguments(argparse.ArgumentParser(prog="fadrm watch"))
    args = parser.parse_args([str(run_config), "--max-failures", "1"])
    assert args.template == w.DEFAULT_TEMPLATE
    assert w.run_watch(args) == 0
    (name,) = jobs_of(kube)
    set_state(kube, name, "Failed", "FAILED")
    assert w.run_watch(args) == 3
    out = capsys.readouterr().out
    assert "backoff:" in out
    assert len(kube.items("", "events")) == 1
    assert kube.denied == []


# --------------------------------------------------------------------------- 2. idempotent


def test_racing_watches_create_one_rayjob(run_config, kube):
    """Two watches (the schedule and a `kubectl create job --from=cronjob/...`) list at the
    same moment, both see nothing, both create: one RayJob, and both succeed."""
    barrier = threading.Barrier(2, timeout=30)

    class Racing(targets.KubernetesTarget):
        def runs(self, run_name):
            listing = super().runs(run_name)
            barrier.wait()  # both have listed before either creates
            return listing

    results, errors = [], []

    def one():
        api, core = kube.client()
        target = Racing(None, namespace=NS, api=api, core_api=core)
        try:
            results.append(tick(run_config, target, stale()))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert [d.action for d in results] == ["submit", "submit"]
    assert results[0].submitted == results[1].submitted
    assert list(jobs_of(kube)) == [results[0].submitted]
    creates = [r for r in kube.requests if r[0] == "create" and r[2] == "rayjobs"]
    assert len(creates) == 2  # the loser got AlreadyExists and took it as success


def test_already_exists_with_other_fingerprints_is_not_success(run_config, kube):
    target = k8s_target(kube)
    status = stale()
    name = w.rayjob_name(RUN, w.fingerprint_labels(status), 1)
    kube.put("ray.io", "rayjobs", {"apiVersion": "ray.io/v1", "kind": "RayJob",
                                   "metadata": {"name": name, "labels": {w.LABEL_RUN: "x"}}})
    with pytest.raises(RuntimeError, match="other fingerprints"):
        target.submit(status, RUN, name=name, attempt=1)


def test_suspended_is_active_and_warned_about_after_a_day(run_config, kube):
    target = k8s_target(kube)
    d = tick(run_config, target, stale())
    set_state(kube, d.submitted, "Suspended")  # e.g. queued by Kueue
    d2 = tick(run_config, target, stale())
    assert d2.action == "skip-already-running" and d2.warnings == ()
    jobs_of(kube)[d.submitted]["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00Z"
    d3 = tick(run_config, target, stale())
    assert d3.action == "skip-already-running" and len(jobs_of(kube)) == 1
    assert "suspended for" in d3.warnings[0]


def test_a_stopped_run_is_cleaned_up_and_not_counted(run_config, kube):
    target = k8s_target(kube)
    d = tick(run_config, target, stale())
    set_state(kube, d.submitted, "Complete", "STOPPED")  # `ray job stop`: its cluster stays
    d2 = tick(run_config, target, stale())
    assert d2.stopped == (d.submitted,)  # deleted: KubeRay then deletes its cluster
    assert d2.action == "submit" and d2.attempt == 2 and d2.failures == ()
    assert list(jobs_of(kube)) == [d2.submitted]


# --------------------------------------------------------------------------- 3. obsolete


def test_teacher_change_stops_the_obsolete_run(run_config, kube):
    target = k8s_target(kube)
    old = tick(run_config, target, stale(teachers="7eac4e5000000001"))
    set_state(kube, old.submitted, "Running", "RUNNING")
    # A RayJob someone made by hand with other fingerprints is never touched.
    kube.put("ray.io", "rayjobs", {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {
        "name": "by-hand", "labels": {w.LABEL_RUN: RUN, w.LABEL_CONFIG: "other",
                                      w.LABEL_TEACHERS: "other"}},
        "status": {"jobDeploymentStatus": "Running"}})

    new = tick(run_config, target, stale(teachers="7eac4e5000000002"))
    assert new.action == "submit" and new.stopped == (old.submitted,)
    assert set(jobs_of(kube)) == {new.submitted, "by-hand"}
    assert ("delete", "ray.io", "rayjobs", old.submitted) in kube.requests
    assert kube.denied == []


def test_dry_run_deletes_nothing(run_config, kube):
    target = k8s_target(kube)
    old = tick(run_config, target, stale(teachers="7eac4e5000000001"))
    d = tick(run_config, target, stale(teachers="7eac4e5000000002"), dry_run=True)
    assert [r.name for r in d.stop] == [old.submitted] and d.stopped == ()
    assert d.preview["metadata"]["name"] == d.name
    assert list(jobs_of(kube)) == [old.submitted]


def test_rbac_is_enforced_and_the_base_role_is_least_privilege(run_config):
    """Without `delete` (the Role as it was) stopping an obsolete run is Forbidden: the
    fake enforces RBAC; and with the Role of k8s/base the whole cycle needs nothing else."""
    old_rules = [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                  "verbs": ["get", "list", "create"]},
                 {"apiGroups": ["ray.io"], "resources": ["raycronjobs"], "verbs": ["get"]}]
    with FakeKubeAPI(NS, old_rules) as fake:
        fake.put("ray.io", "raycronjobs", yaml.safe_load(TEMPLATE.read_text()))
        target = k8s_target(fake)
        tick(run_config, target, stale(teachers="7eac4e5000000001"))
        with pytest.raises(Exception) as info:
            tick(run_config, target, stale(teachers="7eac4e5000000002"))
        assert getattr(info.value, "status", None) == 403
        assert fake.denied and fake.denied[0][0] == "delete"

    with FakeKubeAPI(NS, watch_role_rules()) as fake:
        fake.put("ray.io", "raycronjobs", yaml.safe_load(TEMPLATE.read_text()))
        target = k8s_target(fake)
        d = tick(run_config, target, stale(teachers="7eac4e5000000001"))
        set_state(fake, d.submitted, "Running")
        d = tick(run_config, target, stale(teachers="7eac4e5000000002"))  # stops the old one
        set_state(fake, d.submitted, "Failed", "FAILED")
        d = tick(run_config, target, stale(teachers="7eac4e5000000002"))
        set_state(fake, d.submitted, "Failed", "FAILED")
        assert tick(run_config, target, stale(teachers="7eac4e5000000002")).action == "backoff"
        verbs = {(v, p) for v, _, p, _ in fake.requests}
        assert verbs == {("get", "raycronjobs"), ("list", "rayjobs"), ("create", "rayjobs"),
                         ("delete", "rayjobs"), ("create", "events")}
        assert fake.denied == []
        # Another namespace is out of reach, and so is another RayCronJob.
        assert not fake.allowed("list", "ray.io", "rayjobs", "default", "")
        assert not fake.allowed("get", "ray.io", "raycronjobs", NS, "someone-elses")


# --------------------------------------------------------------------------- 6. template


def test_the_template_comes_from_the_deployed_overlay(run_config, tmp_path):
    """What an overlay changes (images:, patches) reaches the runs the watch creates,
    because the watch reads the kustomized RayCronJob from the API."""
    from tests.test_k8s import build_with, template_of

    docs = build_with(tmp_path, {
        "resources": ["overlays/gpu"], "components": ["components/priority-class"],
        "images": [{"name": "ghcr.io/example/fadrm", "newName": "registry.example/fadrm",
                    "newTag": "7.7"}],
    })
    template = template_of(docs)
    template["metadata"].pop("namespace")
    with FakeKubeAPI(NS, watch_role_rules()) as fake:
        fake.put("ray.io", "raycronjobs", template)
        d = tick(run_config, k8s_target(fake), stale())
        spec = jobs_of(fake)[d.submitted]["spec"]
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        assert head["containers"][0]["image"] == "registry.example/fadrm:7.7"
        assert head["priorityClassName"] == "fadrm-distill"
        assert spec["submitterPodTemplate"]["spec"]["containers"][0]["image"] == \
            "registry.example/fadrm:7.7"


def test_the_namespace_comes_from_the_pod(monkeypatch):
    monkeypatch.setenv("POD_NAMESPACE", "team-a")
    assert targets.KubernetesTarget(None, api=object()).namespace == "team-a"
    monkeypatch.delenv("POD_NAMESPACE")
    assert targets.KubernetesTarget(None, namespace="x", api=object()).namespace == "x"


def test_a_template_kuberay_would_refuse_is_bad_input(run_config, kube):
    from fadrm.errors import InputError

    bad = yaml.safe_load(TEMPLATE.read_text())
    bad["spec"]["jobTemplate"]["shutdownAfterJobFinishes"] = True  # + deletionRules
    kube.items("ray.io", "raycronjobs")["fadrm-run-template"] = bad
    with pytest.raises(InputError, match="mutually exclusive"):
        tick(run_config, k8s_target(kube), stale())
    assert jobs_of(kube) == {}


def test_up_to_date_costs_no_cluster_call(run_config, kube):
    target = k8s_target(kube)
    start = time.monotonic()
    d = tick(run_config, target, up_to_date())
    assert d.action == "skip-up-to-date" and kube.requests == []
    assert time.monotonic() - start < 5


def test_a_missing_template_is_bad_input(run_config):
    with FakeKubeAPI(NS, watch_role_rules()) as fake:  # nothing deployed
        api, core = fake.client()
        target = targets.KubernetesTarget(None, namespace=NS, api=api, core_api=core)
        from fadrm.errors import InputError

        with pytest.raises(InputError, match="fadrm-run-template.*apply an overlay"):
            tick(run_config, target, stale())
