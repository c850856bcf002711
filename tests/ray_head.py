"""A private `ray start --head` for tests: token auth on, own ports, own temp dir.

Only the processes started here are stopped (SIGTERM to `ray start --block`, which shuts
its node down, then SIGKILL to its own process group); `ray stop` is never used because it
would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Head:
    address: str
    """Dashboard / Jobs API address (http://127.0.0.1:PORT)."""
    token: str
    tmp: Path
    gcs_address: str

    def client_env(self) -> dict[str, str]:
        """Environment for a client process (`ray job submit`) of this head."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        return env


@contextlib.contextmanager
def private_ray_head(num_cpus: int = 1, object_store_mb: int = 80):
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("the `ray` CLI is not installed next to this Python")
    token = secrets.token_hex(32)
    tmp = Path(tempfile.mkdtemp(prefix="fw", dir="/tmp"))  # short: Ray's unix sockets
    (gcs, dash, client, agent, agent_grpc, rt_env, metrics, node_mgr, obj_mgr) = free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               PATH=f"{ray_bin.parent}{os.pathsep}{env.get('PATH', '')}")
    cmd = [
        str(ray_bin), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_env}",
        f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}",
        f"--num-cpus={num_cpus}", "--num-gpus=0",
        f"--object-store-memory={object_store_mb * 1024 * 1024}",
        f"--temp-dir={tmp / 'ray'}",
    ]
    log_path = tmp / "ray-start.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dash}", token, tmp, f"127.0.0.1:{gcs}")
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 150
        while True:  # readiness: the Jobs API answers (bounded wait)
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}:\n{log_path.read_text()}")
            try:
                JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {token}"})
                break
            except Exception:
                if time.monotonic() > deadline:
                    pytest.fail(f"Ray head not ready:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
        yield head
    finally:
        proc.terminate()  # `ray start --block` shuts its own node down on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of *our* process group only
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
