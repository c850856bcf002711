# One command each, on a fresh machine: `make demo`, `make test`.
# Both create .venv, install the package (CPU wheels where pip offers them) and the data.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data demo test test-fast gpu-check image image-check container-cluster clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package.
data:
	@if [ -f $(FMNIST) ]; then echo "Fashion-MNIST: $(FMNIST)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq || true) && apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then \
	  sudo apt-get update -qq; sudo apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST missing: install Debian's dataset-fashion-mnist, or put the four"; \
	  echo "IDX files (train/t10k images/labels .gz) in a folder and run"; \
	  echo "  $(BIN)/fadrm demo --set data.root=FOLDER"; exit 1; fi

demo: setup data
	$(BIN)/fadrm demo

test: setup data
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# GPU node check: correctness and speed in a few minutes, with the python on PATH (PY=...),
# no venv, no install, no Ray (a stock CUDA PyTorch image); see README "Checking a GPU node".
gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m benchmarks.gpu_check --out gpu-check-out

# The images (Dockerfile targets `ray` and `watch`) with docker, or podman when no docker
# daemon answers; tags fadrm:VERSION and fadrm-watch:VERSION, the Dockerfile's defaults
# (IMAGE_ARGS="--build-arg KEY=VALUE ..." to build from a mirror). Standard library only.
image:
	$(PY) -m benchmarks.image_check build $(IMAGE_ARGS)

# Builds a stand-in base (debootstrap; root), both targets, and checks them from the inside
# (benchmarks/image_check.py); results in benchmarks/results/image_check.json. About 20 min
# from nothing on 2 cores, ~3 min with cached layers; not part of `make test` (see k8s/README.md).
image-check:
	$(PY) -m benchmarks.image_check check $(IMAGE_CHECK_ARGS)

# A head and two workers from the `ray` image, run as KubeRay runs the `gpu` overlay's pods;
# one worker killed mid-stage; results in benchmarks/results/container_cluster.json.
container-cluster: setup
	$(BIN)/python -m benchmarks.container_cluster

clean:
	rm -rf runs/demo .pytest_cache
