"""A Ray cluster of our own containers, a worker killed mid-stage, the same bytes.

    python -m benchmarks.container_cluster [--image localhost/fadrm-check:ray]

Run with a Python that has Ray (the `ray` CLI submits the job), after `make image-check`
(which builds the image). A head and two workers are started from the `ray` image with the
command, arguments and environment that KubeRay 1.7 gives the pods of the `gpu` overlay's
RayJob template (`kubectl kustomize k8s/overlays/gpu`; the rules are KubeRay's BuildPod:
`/bin/bash -lc -- "ulimit -n ...; ray start ..."` with rayStartParams, the resource limits
turned into --num-cpus/--memory, --block, --dashboard-host, --no-monitor for in-tree
autoscaling, and KubeRay's environment, RAY_AUTH_MODE=token and RAY_AUTH_TOKEN included).
CPU only here: the workers' `nvidia.com/gpu` limit is dropped and their CPU/memory limits
are scaled to this machine (1 CPU, 4 GiB each), so that each Ray Train worker gets a node
of its own, as each gets a GPU pod in production. The pods' own network is a container
network with the head reachable as <cluster>-head-svc.<namespace>.svc.cluster.local.

A tiny config is submitted twice from the host with `ray job submit` (token in the client's
environment only; the status is read with Ray's job SDK, the token in its Authorization
header): undisturbed, then with one worker container killed (SIGKILL) as soon as the first
recover unit of that run is on the volume that all three containers mount at the same path.
Both jobs must succeed and every shard of the two output trees must have the same sha256
(evaluate's metrics.json compared without its wall time, `student_train_seconds`). Writes
benchmarks/results/container_cluster.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from benchmarks.containers import CheckError, Engine, find_engine
from benchmarks.image_check import FASHION_MNIST, tiny_config

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
CLUSTER, NAMESPACE = "fadrm-check", "fadrm"
HEAD_FQDN = f"{CLUSTER}-head-svc.{NAMESPACE}.svc.cluster.local"
# CPU-only stand-in for the GPU worker's limits (the machine has 2 cores).
WORKER_LIMITS = {"cpu": "1", "memory": "4Gi"}


# --------------------------------------------------------------------------- KubeRay's pods


def cluster_spec(overlay: str = "gpu") -> dict:
    """The rayClusterSpec of the overlay's RayJob template, as kustomize renders it."""
    proc = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s" / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise CheckError(f"kubectl kustomize k8s/overlays/{overlay}: {proc.stderr[-2000:]}")
    for doc in yaml.safe_load_all(proc.stdout):
        if doc and doc.get("kind") == "RayCronJob":
            return doc["spec"]["jobTemplate"]["rayClusterSpec"]
    raise CheckError(f"k8s/overlays/{overlay} renders no RayCronJob")


def _quantity(value: str) -> int:
    """A Kubernetes quantity as an integer (KubeRay's resource.Value(): rounded up)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
             "G": 10**9, "m": 0.001}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return -(-int(float(value[:-len(suffix)]) * factor * 1000) // 1000)
    return int(value)


def ray_start_command(node: str, params: dict[str, str], limits: dict[str, str],
                      autoscaling: bool) -> str:
    """KubeRay 1.7's generated `ray start` for a head or worker pod."""
    params = {k: str(v) for k, v in params.items()}
    if node == "worker":
        params.setdefault("address", f"{HEAD_FQDN}:6379")
    else:
        params.setdefault("dashboard-host", "0.0.0.0")
        if autoscaling:
            params["no-monitor"] = "true"
    params.setdefault("metrics-export-port", "8080")
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", "52365")
    if "num-cpus" not in params and "cpu" in limits:
        params["num-cpus"] = str(_quantity(limits["cpu"]))
    if "memory" not in params and "memory" in limits:
        params["memory"] = str(_quantity(limits["memory"]))
    if "num-gpus" not in params and _quantity(limits.get("nvidia.com/gpu", "0")):
        params["num-gpus"] = str(_quantity(limits["nvidia.com/gpu"]))
    flags = []
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in (
                "log-color", "include-dashboard", "include-log-monitor"):
            if value.lower() == "true":
                flags.append(f"--{key}")
        else:
            flags.append(f"--{key}={value}")
    return " ".join(["ray", "start", *(["--head"] if node == "head" else []), *flags])


def pod(spec: dict, node: str, name: str, token: str) -> dict:
    """Command, args, environment, /dev/shm size and mounts of one Ray pod's container."""
    group = spec["headGroupSpec"] if node == "head" else spec["workerGroupSpecs"][0]
    container = group["template"]["spec"]["containers"][0]
    limits = dict(container.get("resources", {}).get("limits", {}))
    if node == "worker":  # CPU only here (module docstring)
        limits.pop("nvidia.com/gpu", None)
        limits.update(WORKER_LIMITS)
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    start = ray_start_command(node, group.get("rayStartParams") or {}, limits, autoscaling)
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        # valueFrom secretKeyRef optional: the Secret `fadrm-s3` does not exist here.
    env.update({
        "RAY_CLUSTER_NAME": CLUSTER, "RAY_CLUSTER_NAMESPACE": NAMESPACE,
        "RAY_CLOUD_INSTANCE_ID": name,
        "RAY_NODE_TYPE_NAME": "headgroup" if node == "head" else group["groupName"],
        "KUBERAY_GEN_RAY_START_CMD": start, "RAY_PORT": "6379",
        "RAY_ADDRESS": f"{'127.0.0.1' if node == 'head' else HEAD_FQDN}:6379",
        "RAY_USAGE_STATS_KUBERAY_IN_USE": "1", "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE": "1",
    })
    if node == "worker":
        env.update({"FQ_RAY_IP": HEAD_FQDN, "RAY_IP": HEAD_FQDN.split(".")[0]})
    else:
        env["RAY_USAGE_STATS_EXTRA_TAGS"] = "kuberay_version=v1.7.0;kuberay_crd=RayJob"
        if autoscaling:
            env["RAY_enable_autoscaler_v2"] = "false"
    auth = spec.get("authOptions") or {}
    if auth.get("mode") != "token":
        raise CheckError("the template's authOptions.mode is not token: refusing to start "
                         "a cluster without authentication")
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
    shm = volumes.get("dshm", {}).get("emptyDir", {}).get("sizeLimit", "64Mi")
    mounts = [m["mountPath"] for m in container.get("volumeMounts", [])
              if m["mountPath"] != "/dev/shm"]
    return {"command": ["/bin/bash", "-lc", "--"],
            "args": [f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {start}"],
            "env": env, "shm": shm, "mounts": mounts}


# --------------------------------------------------------------------------- the cluster


def poll(what: str, probe, timeout: float, every: float = 1.0):
    """``probe()`` until it returns something truthy; CheckError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)  # poll interval, not a synchronisation


class Cluster(contextlib.AbstractContextManager):
    """Head + workers as containers on a private container network."""

    def __init__(self, engine: Engine, image: str, shared: Path, config_dir: Path,
                 workers: int = 2):
        self.engine, self.image, self.shared, self.config_dir = engine, image, shared, config_dir
        self.token = secrets.token_hex(32)
        self.network = f"{CLUSTER}-{os.getpid()}"
        self.names = [f"{CLUSTER}-head"] + [f"{CLUSTER}-worker-gpu-{i}" for i in range(workers)]
        self.spec = cluster_spec()
        self.started: list[str] = []
        self._jobs = None  # the job SDK client, made on first use

    def _run(self, node: str, name: str) -> None:
        p = pod(self.spec, node, name, self.token)
        args = ["run", "-d", "--name", name, "--hostname", name, "--network", self.network,
                *self.engine.run_flags, "--user", "1000:100", "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges", "--shm-size",
                p["shm"].replace("Gi", "g").replace("Mi", "m"),
                "-e", "RAY_START_ULIMIT_OPEN_FILES=4096",  # this sandbox's hard limit
                "-v", f"{self.shared}:{self.shared}", "-v", f"{FASHION_MNIST}:{FASHION_MNIST}:ro"]
        if node == "head":
            args += ["--network-alias", HEAD_FQDN]
        if "/config" in p["mounts"]:
            args += ["-v", f"{self.config_dir}:/config:ro"]
        for key, value in p["env"].items():
            args += ["-e", f"{key}={value}"]
        args += ["--entrypoint", p["command"][0], self.image, *p["command"][1:], *p["args"]]
        self.engine(*args, timeout=300)
        self.started.append(name)

    def start(self) -> None:
        self.engine("network", "create", self.network, timeout=120)
        self._run("head", self.names[0])
        self.head_ip = self.engine.text(
            "inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{self.network}")'
            '.IPAddress}}', self.names[0])
        self.dashboard = f"http://{self.head_ip}:8265"
        poll("the head's GCS (/api/gcs_healthz)", lambda: self._healthy(), 180)
        for name in self.names[1:]:
            # KubeRay's wait-gcs-ready init container: `ray health-check` until the GCS answers.
            poll("ray health-check from the worker's network", lambda: self.engine(
                "run", "--rm", "--network", self.network, *self.engine.run_flags,
                "-e", "RAY_AUTH_MODE=token", "-e", f"RAY_AUTH_TOKEN={self.token}", self.image,
                "ray", "health-check", "--address", f"{HEAD_FQDN}:6379", check=False,
                timeout=120).returncode == 0, 240, every=2.0)
            self._run("worker", name)
        poll("3 alive Ray nodes", lambda: len(self.alive_nodes()) == len(self.names), 300)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard}/api/gcs_healthz", timeout=5) as r:
                return r.status == 200
        except urllib.error.HTTPError as exc:
            return exc.code in (401, 403)  # up, and asking for the token
        except OSError:
            return False

    def client_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        return env

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        ray_bin = Path(sys.executable).with_name("ray")
        return subprocess.run([str(ray_bin), *args], env=self.client_env(),
                              capture_output=True, text=True, timeout=timeout)

    def alive_nodes(self) -> list[dict]:
        proc = self.ray("list", "nodes", "--address", self.dashboard, "--format", "json",
                        "--filter", "state=ALIVE")
        return json.loads(proc.stdout) if proc.returncode == 0 else []

    def submit(self, config: str, job_id: str) -> None:
        proc = self.ray("job", "submit", "--address", self.dashboard, "--submission-id",
                        job_id, "--no-wait", "--", "python", "-m", "ray_jobs.distill",
                        "--config", config)
        if proc.returncode != 0:
            raise CheckError(f"ray job submit: {proc.stderr[-2000:]}")

    def job_status(self, job_id: str) -> str:
        """The job's JobStatus name, from Ray's job SDK. (`ray job status` prints "Status
        for job" only while a job runs, and a banner once it has succeeded.) The token goes
        in the request's own Authorization header: this process's environment stays as is."""
        return self.jobs().get_job_status(job_id).value

    def logs(self, job_id: str) -> str:
        return self.jobs().get_job_logs(job_id)

    def jobs(self):
        """Ray's JobSubmissionClient for the head, made on first use."""
        from ray.job_submission import JobSubmissionClient

        if self._jobs is None:
            self._jobs = JobSubmissionClient(
                self.dashboard, headers={"Authorization": f"Bearer {self.token}"})
        return self._jobs

    def __exit__(self, *exc) -> None:
        for name in reversed(self.started):
            self.engine("rm", "-f", "-t", "5", name, check=False, timeout=120)
        self.engine("network", "rm", "-f", self.network, check=False, timeout=120)


# --------------------------------------------------------------------------- the runs


# evaluate's metrics.json records a wall time (docs/OUTPUTS.md): compared without it.
TIMED_KEYS = ("student_train_seconds",)


def shard_digests(out: Path) -> dict[str, str]:
    """sha256 of every stage output file, run reports and timing.json excluded; evaluate's
    metrics JSON hashed without its TIMED_KEYS, and its checksum sidecar (the sha256 of the
    timed bytes) left out."""
    digests = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if not path.is_file() or rel.parts[0] == "runs" or path.name == "timing.json":
            continue
        data = path.read_bytes()
        if rel.parts[0] == "evaluate" and path.name.startswith("metrics"):
            if path.name.endswith(".sha256.json"):
                continue
            metrics = json.loads(data)
            data = json.dumps({k: v for k, v in metrics.items() if k not in TIMED_KEYS},
                              sort_keys=True).encode()
        digests[str(rel)] = hashlib.sha256(data).hexdigest()
    return digests


def recover_units_on_volume(out: Path) -> list[Path]:
    """The recover units finished so far (each unit's shard is written before its sidecar)."""
    return sorted((out / "recover").glob("*/images-*.arrow.json")) if (
        out / "recover").exists() else []


def pipeline_lines(log: str) -> list[str]:
    """The driver's own log lines (stage starts and ends, workers started) and Ray's word
    that a node was lost, shortened."""
    return [re.sub(r"\x1b\[[0-9;]*m", "", ln)[:200] for ln in log.splitlines()
            if re.search(r" (fadrm\.pipeline|ray_jobs\.executor): |has been marked dead", ln)]


def run_job(cluster: Cluster, name: str, config: str, out: Path, kill: str | None,
            timeout: float) -> dict:
    start = time.perf_counter()
    cluster.submit(config, name)
    killed_at = None
    if kill is not None:
        first = poll("the first recover unit on the volume",
                     lambda: recover_units_on_volume(out), timeout, every=0.2)[0]
        cluster.engine("kill", "--signal", "KILL", kill, timeout=120)
        # Counted once the container is gone: what the killed run had finished by then.
        killed_at = {"seconds": round(time.perf_counter() - start, 1),
                     "after_unit": first.name,
                     "recover_units_done": len(recover_units_on_volume(out))}
    status = poll(f"job {name} to finish",
                  lambda: (s := cluster.job_status(name)) in ("SUCCEEDED", "FAILED", "STOPPED")
                  and s, timeout, every=2.0)
    result = {"status": status, "seconds": round(time.perf_counter() - start, 1),
              "killed": kill, "killed_at": killed_at}
    log = cluster.logs(name)
    result["driver_log"] = pipeline_lines(log)
    if status != "SUCCEEDED":
        result["log_tail"] = log[-3000:]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="localhost/fadrm-check:ray")
    parser.add_argument("--timeout", type=float, default=900, help="per job, seconds")
    parser.add_argument("--results", default=str(RESULTS / "container_cluster.json"))
    args = parser.parse_args(argv)
    engine = find_engine()
    if engine is None:
        print("SKIP: no container engine (a docker daemon or podman)", file=sys.stderr)
        return 2
    if not engine.exists(args.image):
        print(f"{args.image} is missing: run `make image-check` first", file=sys.stderr)
        return 2
    if shutil.which("kubectl") is None:
        print("kubectl is needed to render k8s/overlays/gpu", file=sys.stderr)
        return 2
    result: dict = {"image": args.image, "engine": engine.name, "cluster": {}}
    with tempfile.TemporaryDirectory(prefix="fadrm-cluster-", dir="/var/tmp") as tmp:
        shared, config_dir = Path(tmp) / "shared", Path(tmp) / "config"
        for d in (shared, config_dir):
            d.mkdir()
        os.chown(shared, 1000, 100)  # the pods' fsGroup 100: the non-root user writes here
        for run in ("undisturbed", "worker-killed"):
            cfg = tiny_config(str(shared / run))
            # Recover long enough (20 units of 1200 iterations, ~30 s on the two 1-CPU
            # workers) to be killed in the middle.
            cfg["ipc"] = 2
            cfg["recover"].update(class_block_size=1, stage_iterations=[600, 600])
            (config_dir / f"{run}.yaml").write_text(json.dumps(cfg, indent=1))
        start = time.perf_counter()
        with Cluster(engine, args.image, shared, config_dir) as cluster:
            cluster.start()
            result["cluster"] = {
                "start_seconds": round(time.perf_counter() - start, 1),
                "nodes": len(cluster.names),
                "head_command": pod(cluster.spec, "head", cluster.names[0], "-")["args"][0],
                "worker_command": pod(cluster.spec, "worker", cluster.names[1], "-")["args"][0],
                "auth": "token (RAY_AUTH_MODE=token in every container; `ray job submit` gets "
                        "RAY_AUTH_TOKEN, the job SDK an Authorization header)"}
            print(json.dumps(result["cluster"], indent=1), flush=True)
            with_token = cluster.ray("job", "list", "--address", cluster.dashboard)
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
            no_token = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "list",
                                       "--address", cluster.dashboard], env=env,
                                      capture_output=True, text=True, timeout=120)
            result["cluster"]["job_list_with_token_ok"] = with_token.returncode == 0
            result["cluster"]["job_list_without_token_refused"] = no_token.returncode != 0
            runs = {}
            for run, kill in (("undisturbed", None), ("worker-killed", cluster.names[-1])):
                print(f"job {run} ...", flush=True)
                runs[run] = run_job(cluster, run, f"/config/{run}.yaml", shared / run, kill,
                                    args.timeout)
                print("  " + json.dumps({k: v for k, v in runs[run].items()
                                         if k != "driver_log"}), flush=True)
        a, b = (shard_digests(shared / run) for run in ("undisturbed", "worker-killed"))
    result["runs"] = runs
    result["shards"] = len(a)
    result["same_bytes"] = bool(a) and a == b
    units = len([k for k in a if k.startswith("recover/") and k.endswith(".arrow")])
    killed_at = runs["worker-killed"]["killed_at"] or {}
    result["recover_units"] = units
    result["killed_mid_stage"] = 0 < killed_at.get("recover_units_done", units) < units
    result["node_loss_seen_by_ray"] = any("has been marked dead" in ln
                                          for ln in runs["worker-killed"]["driver_log"])
    result["compared_without"] = {"evaluate/*/metrics*.json": list(TIMED_KEYS)}
    result["differing"] = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))[:20]
    result["node_loss_cost_seconds"] = round(
        runs["worker-killed"]["seconds"] - runs["undisturbed"]["seconds"], 1)
    result["machine"] = {"cores": os.cpu_count(),
                         "load_average_1min": round(os.getloadavg()[0], 2)}
    result["ok"] = (result["same_bytes"] and result["killed_mid_stage"]
                    and result["node_loss_seen_by_ray"]
                    and all(r["status"] == "SUCCEEDED" for r in runs.values())
                    and result["cluster"]["job_list_without_token_refused"])
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("runs", "shards", "same_bytes", "ok")}, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
