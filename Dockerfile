# syntax=docker/dockerfile:1
#
# Two images from one file (k8s/README.md, "Build and push the images"):
#
#   docker build --target ray   -t REGISTRY/fadrm:0.1.0 .        # Ray head, GPU workers, submitter
#   docker build --target watch -t REGISTRY/fadrm-watch:0.1.0 .  # the hourly `fadrm watch`
#
# Lean on purpose: the base is Debian's slim Python runtime, no CUDA toolkit and no second
# CUDA. The only CUDA in `ray` is the runtime that the torch wheels bring as pip packages
# (nvidia-*, CUDA 13.0: the node needs just the NVIDIA driver >= 580 and the container
# toolkit). `watch` has no CUDA and no Ray at all (CPU-only torch), so the CPU-only CronJob
# pulls a fraction of the GPU image every hour. Every Python package is pinned
# (k8s/image/*.txt, installed with --no-deps and verified with `pip check`), so a rebuild
# installs exactly the tested versions. Expected sizes and how they were estimated:
# k8s/README.md. KubeRay needs bash (its pod commands are `bash -lc`) and, since the probes
# of Ray >= 2.53 are HTTP, nothing else from the image; everything is installed into the
# system Python under /usr/local, which a login shell keeps on PATH.
#
# The Ray version (k8s/image/runtime.txt) = pyproject.toml's pin = `rayVersion` in k8s/
# (tests/test_k8s.py checks all three).

# Build arguments; their defaults are what every user builds. Override them only to build
# from a mirror (a registry copy of the same base, a package index proxy):
#   BASE_IMAGE       the Python runtime image (Debian bookworm, Python 3.11, python and pip
#                    in /usr/local/bin, no EXTERNALLY-MANAGED marker)
#   PIP_INDEX_URL    the package index of every pip install (pip's own default: PyPI)
#   TORCH_CPU_INDEX  the index of the watch image's CPU-only torch wheels
#   TORCH_CPU        those wheels, pinned (= the ray image's torch/torchvision, CPU builds)
# Never put credentials in a build argument: argument values are recorded in the image
# history. An index that needs credentials gets them from a pip configuration mounted at
# build time (`podman build -v`, a BuildKit secret), as benchmarks/image_check.py does
# with the host's pip configuration.
ARG BASE_IMAGE=python:3.11.7-slim-bookworm
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_CPU="torch==2.14.1+cpu torchvision==0.29.1+cpu"

FROM ${BASE_IMAGE} AS base

# No pip cache in the layers; unbuffered logs so `kubectl logs` / Ray job logs stream.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Non-root at run time: user `ray` (uid 1000, group `users` gid 100, as in Ray's images).
# Numeric, so that Kubernetes `runAsNonRoot` can verify it.
RUN useradd --uid 1000 --gid 100 --create-home --home-dir /home/ray --shell /bin/bash ray

WORKDIR /src


# --------------------------------------------------------------------------- watch
FROM base AS watch
ARG PIP_INDEX_URL
ARG TORCH_CPU_INDEX
ARG TORCH_CPU

# CPU-only torch + torchvision (no CUDA, ~6x smaller than the CUDA build), same versions as
# the `ray` image (TORCH_CPU, from TORCH_CPU_INDEX: download.pytorch.org/whl/cpu).
# The pins are in TORCH_CPU (word-split on purpose), which hadolint cannot see.
# hadolint ignore=SC2086,DL3013
RUN pip install --no-cache-dir --no-deps --index-url "${TORCH_CPU_INDEX}" ${TORCH_CPU}

# What `fadrm watch` imports: config, lineage, preflight, storage, the Kubernetes client.
COPY k8s/image/watch.txt /tmp/req/
RUN pip install --no-cache-dir --no-deps -r /tmp/req/watch.txt \
    && pip check \
    && rm -rf /tmp/req

COPY pyproject.toml README.md ./
COPY fadrm ./fadrm
COPY ray_jobs ./ray_jobs
# --no-deps: Ray (a declared dependency of the package) is deliberately absent here; the
# checks below prove the watch imports without it and finds its targets (entry points of
# `fadrm.watch_targets`, in ray_jobs/) without importing Ray.
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && python -c "import fadrm.watch, fadrm.preflight, fadrm.pipeline, kubernetes" \
    && python -c "import sys; from importlib.metadata import entry_points as e; t = {p.name: p.load() for p in e(group='fadrm.watch_targets')}; assert {'kubernetes', 'ray'} <= set(t) and 'ray' not in sys.modules, t" \
    && rm -rf /src/build /src/*.egg-info

USER 1000:100
WORKDIR /home/ray
ENTRYPOINT ["fadrm"]
CMD ["watch", "--help"]


# Last, so that a plain `docker build .` builds the main (Ray) image.
# --------------------------------------------------------------------------- ray
FROM base AS ray
ARG PIP_INDEX_URL

# Layer 1, the largest and the least often changed: torch + torchvision (PyPI's default
# wheels are the CUDA 13.0 builds) with their pinned CUDA runtime packages.
COPY k8s/image/torch-cu130.txt /tmp/req/
RUN pip install --no-cache-dir --no-deps -r /tmp/req/torch-cu130.txt

# Layer 2: Ray and the other runtime dependencies (pyproject.toml [project].dependencies +
# the `k8s` extra), exact versions; `pip check` proves the set complete and consistent.
COPY k8s/image/runtime.txt /tmp/req/
RUN pip install --no-cache-dir --no-deps -r /tmp/req/runtime.txt \
    && pip check \
    && rm -rf /tmp/req

# Layer 3, changes most often: the package itself (fadrm/ and the ray_jobs/ entrypoints).
# --no-deps: everything it needs is installed above; --no-build-isolation: built with the
# pinned setuptools, nothing fetched. The import check fails the build early if the RayJob
# entrypoint module is missing.
COPY pyproject.toml README.md ./
COPY fadrm ./fadrm
COPY ray_jobs ./ray_jobs
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && python -c "import importlib.util as u, fadrm, ray; assert u.find_spec('ray_jobs.distill')" \
    && rm -rf /src/build /src/*.egg-info

USER 1000:100
WORKDIR /home/ray
# No ENTRYPOINT/CMD: KubeRay sets the Ray start command of head and worker pods and the
# submitter's `ray job submit`. No credentials are baked in: S3 keys (or cloud identity)
# and the Ray auth token come from Kubernetes at run time.
