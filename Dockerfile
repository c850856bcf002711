# syntax=docker/dockerfile:1
#
# FADRM distillation image: the official Ray GPU image + this package and its runtime
# dependencies. The same image runs the Ray head, the GPU workers, the RayJob submitter and
# the `fadrm watch` CronJob (see k8s/).
#
#   docker build -t REGISTRY/fadrm:0.1.0 .
#
# Base image: pinned to the Ray version this package pins (`ray[train,default]==2.60.0` in
# pyproject.toml); `rayVersion` in k8s/*.yaml must be the same (tests/test_k8s.py checks all
# three). The CUDA 13.0 variant matches the torch 2.14.1 wheels on PyPI, which are CUDA 13.0
# builds (they bundle their CUDA runtime, so the node only needs an NVIDIA driver >= 580).
FROM rayproject/ray:2.60.0-py311-cu130

# Non-root: the base image's `ray` user (uid 1000, group `users` gid 100) owns the Python
# environment under /home/ray, so pip needs no root. Numeric so that Kubernetes
# `runAsNonRoot` can verify it.
USER 1000:100
WORKDIR /home/ray/fadrm-src

# No pip cache in the layers; unbuffered logs so `kubectl logs` / Ray job logs stream.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Layer 1, the largest and the least often changed: torch + torchvision, pinned to the
# versions the package is tested with (PyPI's default wheels are the CUDA 13.0 builds).
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1

# Layer 2: the runtime dependencies listed in pyproject.toml: [project].dependencies plus
# the `k8s` extra (the Kubernetes client of the `fadrm watch` CronJob), no test extras;
# read with tomllib. Rebuilt only when pyproject.toml changes.
COPY --chown=1000:100 pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = p['dependencies'] + p['optional-dependencies']['k8s']; open('/tmp/fadrm-requirements.txt', 'w').write(chr(10).join(deps))" \
    && pip install --no-cache-dir -r /tmp/fadrm-requirements.txt \
    && rm /tmp/fadrm-requirements.txt

# Layer 3, changes most often: the package itself (fadrm/ and the ray_jobs/ entrypoints).
# --no-deps: everything it needs is already installed above. The import check fails the
# build early if the RayJob entrypoint module is missing.
COPY --chown=1000:100 README.md ./
COPY --chown=1000:100 fadrm ./fadrm
COPY --chown=1000:100 ray_jobs ./ray_jobs
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import importlib.util as u; import fadrm; assert u.find_spec('ray_jobs.distill')"

WORKDIR /home/ray
# No ENTRYPOINT/CMD: KubeRay sets the Ray start command of head and worker pods, and the
# CronJob sets `fadrm watch ...`. No credentials are baked in: S3 keys and the Ray auth
# token come from Kubernetes Secrets at run time.
