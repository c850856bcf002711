"""Check a run's inputs before any stage starts: seconds, not GPU-hours.

Everything a stage would otherwise find out on a worker, after earlier stages have spent
their time, is checked here on the driver, in this order (cheapest and most often wrong
first): the output location, the data, the teachers. Each problem raises an
:class:`~fadrm.errors.InputError` whose message starts with the config key path and says
how to fix it; soft problems come back as warnings.

``fadrm run`` / ``ray_jobs.distill`` (through :func:`fadrm.runner.run_pipeline`, which builds
the plan between :func:`check_inputs` and :func:`check_plan`), ``fadrm status`` and ``fadrm
watch`` (through :func:`preflight`, both steps at once) check; none of the checks start Ray.
What a method asks of its inputs (images per class, BatchNorm teachers) is the method's
(:mod:`fadrm.methods`).
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fadrm import storage
from fadrm.config import ConfigError, RunConfig
from fadrm.data import DataError, DataSummary
from fadrm.errors import InputError

if TYPE_CHECKING:
    from fadrm.datasource import DataSource
    from fadrm.plan import RunPlan

__all__ = ["Preflight", "Inputs", "preflight", "check_inputs", "check_plan", "check_output",
           "check_data", "check_teachers", "check_submittable", "running_as_ray_job", "StorageUnreachable"]

log = logging.getLogger("fadrm.preflight")

# Placeholders the shipped presets use for the user's bucket.
_PLACEHOLDERS = ("YOUR-BUCKET", "your-bucket")


@dataclass
class Preflight:
    """What the checks found: the run's plan (stage keys) and the warnings."""

    plan: "RunPlan"
    summary: DataSummary
    warnings: list[str] = field(default_factory=list)


@dataclass
class Inputs:
    """What :func:`check_inputs` found: the data (listed once, for the plan) and warnings."""

    source: "DataSource"
    summary: DataSummary
    warnings: list[str] = field(default_factory=list)


def check_inputs(cfg: RunConfig, *, write_probe: bool = True) -> Inputs:
    """The checks that need no plan: the output location, the data, the given weights
    exist. ``write_probe``: prove the output location writable with a small atomic write
    (runs); without it only its reachability is checked (``status`` reads only)."""
    from fadrm.datasource import DataSource

    warnings: list[str] = []
    check_output(cfg, write_probe=write_probe, warnings=warnings)
    source = DataSource(cfg.data)
    summary = check_data(cfg, warnings, source)
    _check_weights_exist(cfg)
    return Inputs(source, summary, warnings)


def check_plan(plan: "RunPlan", inputs: Inputs, *, read_weights: bool = True) -> Preflight:
    """The checks of the planned teachers (:func:`check_teachers`); logs every warning.
    ``read_weights`` False (the hourly watch): given weights are fit-checked only when
    planning read them anyway (their metadata changed), so an unchanged checkpoint is never
    downloaded."""
    warnings = list(inputs.warnings)
    check_teachers(plan.cfg, plan, warnings, read_weights=read_weights)
    for w in warnings:
        log.warning("%s", w)
    return Preflight(plan, inputs.summary, warnings)


def preflight(cfg: RunConfig, *, write_probe: bool = True,
              read_weights: bool = True) -> Preflight:
    """Check ``cfg``'s inputs, plan the run on the checked data, check the plan's teachers
    (see :func:`check_inputs` and :func:`check_plan` for the arguments); returns the plan."""
    from fadrm.plan import RunPlan

    inputs = check_inputs(cfg, write_probe=write_probe)
    return check_plan(RunPlan(cfg, inputs.source), inputs, read_weights=read_weights)


# --------------------------------------------------------------------------- storage


def _reject_placeholder(key: str, uri: str | None) -> None:
    """A preset's placeholder bucket is an error before any storage is asked: an endpoint
    that answers (MinIO, moto) would otherwise just say the bucket is missing."""
    if uri and any(p in uri for p in _PLACEHOLDERS):
        raise ConfigError(key, f"{uri!r} still holds the preset's placeholder bucket; set it "
                          f"to your storage, e.g. --set {key}=s3://my-bucket/fadrm (or an "
                          f"absolute local path)")


class StorageUnreachable(ConfigError):
    """A remote location of the config (output, data, weights) did not answer. Still bad
    input for a run; a ``fadrm watch --dry-run`` goes on without it (offline)."""


def _unreachable(key: str, uri: str, exc: Exception) -> InputError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StorageUnreachable(key, f"{uri} is not reachable ({detail}); check the path, the "
                              f"storage section (endpoint_url, region) and the AWS_* "
                              f"credentials")


def check_output(cfg: RunConfig, *, write_probe: bool = True,
                 warnings: list[str] | None = None) -> None:
    """The output location resolves, is reachable and (``write_probe``) writable."""
    _reject_placeholder("output", cfg.output)
    storage.use(storage.Storage.from_config(cfg.storage))
    if warnings is not None and cfg.execution.address and not storage.is_remote(cfg.output):
        warnings.append(f"output {cfg.output} is a local path and execution.address is set: "
                        f"every node of the cluster must see the same path (a shared volume); "
                        f"otherwise use s3://...")
    probe = storage.join(cfg.output, f".fadrm-probe-{uuid.uuid4().hex[:8]}")
    try:
        if write_probe:
            storage.write_bytes_atomic(probe, b"fadrm preflight\n")
            storage.delete(probe)
        else:
            storage.exists(cfg.output)
    except PermissionError as exc:
        raise ConfigError("output", f"{cfg.output} is not writable ({exc}); choose a location "
                          f"this user may write to") from None
    except OSError as exc:
        if storage.is_remote(cfg.output):
            raise _unreachable("output", cfg.output, exc) from None
        raise _local_output_error(cfg.output, exc) from None


def _local_output_error(uri: str, exc: OSError) -> InputError:
    """A local output that cannot be written: why, in words about the disk (a local path
    has nothing to do with S3 settings or credentials)."""
    import errno

    fixes = {errno.EROFS: "it is on a read-only file system; choose a writable location",
             errno.ENOSPC: "no space left on the device; free some space or choose another "
                           "location",
             errno.EDQUOT: "the disk quota is exhausted; free some space or choose another "
                           "location",
             errno.EACCES: "permission denied; choose a location this user may write to"}
    why = fixes.get(exc.errno or 0)
    if why is None:
        why = f"{exc.strerror or exc}; check the path"
    return ConfigError("output", f"{uri} is not writable: {why}")


def running_as_ray_job() -> bool:
    """Whether this process is the driver of a job submitted to the Ray Jobs API."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def check_submittable(cfg: RunConfig, how: str) -> None:
    """A config submitted as a job (``how``) must not hold paths relative to the submitting
    machine's working directory: the job runs in a temporary copy of it on the cluster, so
    outputs would vanish with that copy and ``fadrm status`` would never see them."""
    relative = [k for k in getattr(cfg, "relative_paths", []) if k]
    if relative:
        key = relative[0]
        raise ConfigError(key, f"is a relative path, but {how} runs the config in a temporary "
                          f"copy of the working directory on the cluster; use shared storage "
                          f"(s3://bucket/prefix) or an absolute path on a volume every node "
                          f"mounts (relative: {', '.join(relative)})")


# --------------------------------------------------------------------------- data


def check_data(cfg: RunConfig, warnings: list[str] | None = None,
               source=None) -> DataSummary:
    """The data roots list, classes agree, and every class has the images the method needs."""
    from fadrm.datasource import DataSource

    d = cfg.data
    _reject_placeholder("data.root", d.root)
    _reject_placeholder("data.val_root", d.val_root)
    try:
        summary = (source or DataSource(d)).summary()
    except DataError as exc:
        raise DataError(f"data: {exc}") from None
    except FileNotFoundError as exc:
        raise ConfigError("data.root", f"{exc}") from None
    except OSError as exc:
        raise _unreachable("data.root", d.root, exc) from None
    method = cfg.recover.spec
    method.check_select(cfg)
    need, what = method.images_needed(cfg)
    short = [(c, n) for c, n in zip(summary.classes, summary.train_counts) if n < need]
    if short:
        name, n = short[0]
        more = f" ({len(short)} classes in all)" if len(short) > 1 else ""
        limit = (f" after data.max_train_per_class={d.max_train_per_class}"
                 if d.max_train_per_class else "")
        raise DataError(f"data: class {name!r} ({summary.place(name)}) has {n} training images"
                        f"{limit}, but {what} needs {need}{more}; lower ipc or select.factor, "
                        f"or add images")
    if warnings is not None and not any(summary.val_counts):
        warnings.append("data: no validation images (set data.val_root or data.val_per_class): "
                        "the student cannot be evaluated")
    return summary


# --------------------------------------------------------------------------- teachers


def _check_weights_exist(cfg: RunConfig) -> None:
    for i, t in enumerate(cfg.teachers):
        _reject_placeholder(f"teachers[{i}].weights", t.weights)
        if not t.weights or storage.is_url(t.weights):
            continue  # a URL is fetched (and checked against its pin) by the fit check
        try:
            found = storage.exists(t.weights)
        except OSError as exc:
            raise _unreachable(f"teachers[{i}].weights", t.weights, exc) from None
        if not found:
            raise ConfigError(f"teachers[{i}].weights", f"{t.weights} does not exist; give the "
                              f"path (or s3:// URI) of a state_dict for {t.model!r}, or remove "
                              f"the key to train the teacher (squeeze)")


def _shape_model(plan, index: int) -> torch.nn.Module:
    """Teacher ``index`` with its run's head and stem, without weights (meta device when the
    model allows: nothing allocated), for key, shape and layer checks."""
    from fadrm.models import create_model

    t, d = plan.cfg.teachers[index], plan.cfg.data
    build = lambda: create_model(t.model, plan.num_classes, in_chans=d.channels,  # noqa: E731
                                 image_size=d.resolution, small_stem=t.small_stem)
    try:
        with torch.device("meta"):
            return build()
    except Exception:  # noqa: BLE001 - some initialisers need real tensors
        return build()


def check_teachers(cfg: RunConfig, plan, warnings: list[str] | None = None, *,
                   read_weights: bool = True) -> None:
    """Given weights fit their models, pretrained weights are on this machine, and every
    recover teacher of a BN-matching method has BatchNorm statistics to match."""
    from fadrm.models import check_weights_fit, has_bn_statistics, pretrained_file

    bn_matching = cfg.recover.spec.bn_matching(cfg)
    for i, t in enumerate(cfg.teachers):
        key = f"teachers[{i}]"
        model = None
        if t.weights and (read_weights or plan.weights_read(i) is not None):
            model = _shape_model(plan, i)
            try:
                data = plan.teacher_bytes(i)
            except FileNotFoundError as exc:
                raise ConfigError(f"{key}.weights", str(exc)) from None
            except OSError as exc:
                raise _unreachable(f"{key}.weights", t.weights, exc) from None
            check_weights_fit(model, data, t.weights)
        elif t.pretrained:
            _check_pretrained(key, t.model, pretrained_file)
        if bn_matching and i in cfg.recover_teachers:
            model = model if model is not None else _shape_model(plan, i)
            if has_bn_statistics(model):
                continue
            problem = (f"{key}.model: {t.model!r} has no BatchNorm layers with running "
                       f"statistics, so recover.method {cfg.recover.method!r} has no BN "
                       f"statistics to match and would optimise cross-entropy alone")
            if cfg.recover.allow_no_bn:
                if warnings is not None:
                    warnings.append(problem + " (recover.allow_no_bn: true)")
                continue
            raise ConfigError("", problem + "; use a BatchNorm teacher for recover (e.g. "
                              "resnet18), a method without pixel optimisation (rded, "
                              "random-real), or set recover.allow_no_bn: true")


def _check_pretrained(key: str, name: str, pretrained_file) -> None:
    try:
        source = pretrained_file(name)
    except Exception as exc:  # noqa: BLE001 - a library without pretrained configs
        raise ConfigError(f"{key}.pretrained", f"no pretrained weights known for {name!r} "
                          f"({exc}); give teachers weights instead") from None
    if source is None:
        raise ConfigError(f"{key}.pretrained", f"{name!r} has no named pretrained weights; "
                          f"train it (remove pretrained) or give {key}.weights")
    if source.cached:
        return
    if source.url.startswith("hf://"):
        repo = source.url[len("hf://"):].rsplit("/", 1)[0]
        fetch = (f"on a machine with internet run `hf download {repo}` (huggingface_hub) and "
                 f"copy the cache folder to {source.path} on every node (or point HF_HOME at it)")
    else:
        fetch = (f"on a machine with internet download {source.url} and put it at "
                 f"{source.path} on every node (or point TORCH_HOME at a folder holding "
                 f"hub/checkpoints/{os.path.basename(source.path)})")
    raise ConfigError(f"{key}.pretrained", f"the pretrained weights of {name!r} are not on "
                      f"this machine and runs never download them mid-stage; {fetch}; or "
                      f"save them as a state_dict and set {key}.weights: PATH|s3://... "
                      f"(without pretrained)")
