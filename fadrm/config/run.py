"""Where the stages run, object storage, and the whole run's config."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from fadrm.config.checks import ConfigError, _positive
from fadrm.config.inputs import DataConfig, TeacherConfig
from fadrm.config.stages import (EvaluateConfig, RecoverConfig, RelabelConfig, SelectConfig,
                                 SqueezeConfig, StudentConfig)


@dataclass(kw_only=True)
class ExecutionConfig:
    """Where and how the stages run."""

    address: str | None = None
    """Ray address; None -> start an embedded local Ray instance."""
    min_workers: int = 1
    max_workers: int = 2
    """Ray Train worker range (elastic): ScalingConfig(num_workers=(min, max))."""
    use_gpu: bool | None = None
    """None -> use GPUs when the cluster has them; true -> required (where none can come,
    on the embedded Ray or with the local executor, the run is refused before any work);
    false -> the CPU."""
    threads_per_worker: int = 1
    """torch intra-op threads (and CPUs reserved) per worker."""
    train_workers: int = 1
    """Ranks that train a teacher (squeeze) and the student (evaluate) together, as DDP.
    Their bytes depend on it (each rank's BatchNorm batch, the gradient all-reduce), so it
    is part of those stages' keys when above 1; a Ray Train worker group that runs these
    stages has exactly this many workers (1: rank 0 trains alone, the others wait). The
    local executor trains on one rank and refuses more."""
    max_failures: int = 3
    """Ray Train FailureConfig(max_failures=...)."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda' for in-process work."""
    worker_start_timeout_s: float | None = None
    """Seconds Ray Train waits for a worker group before retrying smaller (elastic); None ->
    Ray's default (60). Lower it to recover faster from a node loss on a fixed cluster;
    keep it above your autoscaler's node start time."""
    resource_wait_s: float | None = 1800.0
    """Seconds a stage may wait for its first worker group (workers or GPUs the cluster
    does not have yet; the driver says once a minute what it waits for) before the run
    fails; None -> wait forever. Keep it above your autoscaler's GPU node start time."""
    worker_group: str = "shared"
    """'shared': one Ray Train worker group runs every stage that has work, one after the
    other (workers start once; teachers stay loaded between the stages that use them);
    'per_stage': a new worker group for each stage (each stage's own retries and size)."""
    verify_outputs: bool = False
    """Before a run, every complete output is checked against its sidecar: size always,
    sha256 of every byte only when true (slow at scale). Either way each shard's sha256 is
    verified when a stage reads it, so a damaged shard is never used; damaged outputs are
    discarded and regenerated."""
    precision: str = "bf16"
    """Autocast dtype of recover, relabel and the student: 'bf16' (no scaler; the default),
    'fp16' (+ GradScaler on CUDA: the paper's setting) or 'fp32'. The CPU runs bf16 for
    both 'bf16' and 'fp16'. Part of those stages' keys when it is not 'bf16'. A loop's own
    mixed_precision: false (SRe2L's recover, student.mixed_precision) still means fp32."""

    def validate(self, p: str) -> None:
        _positive(self.min_workers, f"{p}.min_workers")
        if self.max_workers < self.min_workers:
            raise ConfigError(
                f"{p}.max_workers",
                f"must be >= min_workers ({self.min_workers}), got {self.max_workers}",
            )
        _positive(self.threads_per_worker, f"{p}.threads_per_worker")
        _positive(self.train_workers, f"{p}.train_workers")
        if self.max_failures < -1:
            raise ConfigError(f"{p}.max_failures", "must be >= -1 (-1 = retry forever)")
        if self.worker_start_timeout_s is not None:
            _positive(self.worker_start_timeout_s, f"{p}.worker_start_timeout_s")
        if self.resource_wait_s is not None:
            _positive(self.resource_wait_s, f"{p}.resource_wait_s")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"{p}.device", "must be 'auto', 'cpu' or 'cuda'")
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"{p}.precision",
                              f"must be 'bf16', 'fp16' or 'fp32', got {self.precision!r}")
        if self.worker_group not in ("shared", "per_stage"):
            raise ConfigError(f"{p}.worker_group",
                              f"must be 'shared' or 'per_stage', got {self.worker_group!r}")


@dataclass(kw_only=True)
class StorageConfig:
    """Object storage settings for s3:// paths (credentials come from the environment)."""

    endpoint_url: str | None = None
    """S3 API endpoint, e.g. http://minio.minio:9000; None -> AWS_ENDPOINT_URL(_S3) or AWS."""
    region: str | None = None
    """None -> AWS_REGION / AWS_DEFAULT_REGION."""

    def validate(self, p: str) -> None:
        if self.endpoint_url and "://" not in self.endpoint_url:
            raise ConfigError(f"{p}.endpoint_url",
                              f"must be a URL such as http://host:9000, got {self.endpoint_url!r}")


@dataclass(kw_only=True)
class RunConfig:
    """A whole distillation run."""

    name: str = "run"
    """Run name: the run's report lives under <output>/runs/<name>/."""
    output: str = "runs/out"
    """Output root (local path; s3:// arrives with cluster execution)."""
    seed: int = 0
    ipc: int = 10
    """Distilled images per class."""
    data: DataConfig = field(default_factory=DataConfig)
    teachers: list[TeacherConfig] = field(default_factory=lambda: [TeacherConfig()])
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    relabel: RelabelConfig = field(default_factory=RelabelConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    # Not a field (never in config.yaml or a stage key): key paths of the local paths that
    # were given relative to the working directory, set by config_from_dict.
    relative_paths: typing.ClassVar[list[str]] = []

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError("name", f"must be a non-empty name without '/', got {self.name!r}")
        if not self.output:
            raise ConfigError("output", "is required")
        _positive(self.ipc, "ipc")
        self.data.validate("data")
        if not self.teachers:
            raise ConfigError("teachers", "needs at least one teacher")
        for i, t in enumerate(self.teachers):
            t.validate(f"teachers[{i}]")
        if not any(t.recover for t in self.teachers):
            raise ConfigError("teachers", "at least one teacher needs recover: true")
        if not any(t.relabel for t in self.teachers):
            raise ConfigError("teachers", "at least one teacher needs relabel: true")
        self.squeeze.validate("squeeze")
        self.select.validate("select")
        if self.select.teacher >= len(self.teachers) or self.select.teacher < 0:
            raise ConfigError(
                "select.teacher", f"index {self.select.teacher} but there are "
                f"{len(self.teachers)} teachers",
            )
        self.recover.validate("recover")
        if self.recover.ipc_per_forward > self.ipc:
            raise ConfigError("recover.ipc_per_forward",
                              f"must be <= ipc ({self.ipc}), got {self.recover.ipc_per_forward}")
        self.relabel.validate("relabel")
        self.student.validate("student")
        self.evaluate.validate("evaluate")
        self.execution.validate("execution")
        k, w = self.student.batches_per_step, self.execution.train_workers
        if k > 1 and k % w:
            raise ConfigError("student.batches_per_step",
                              f"must be a multiple of execution.train_workers ({w}): each "
                              f"rank takes the same number of stored batches; got {k}")
        self.storage.validate("storage")

    @property
    def recover_teachers(self) -> list[int]:
        """Indices of the teachers recover uses (only the first unless FADRM+)."""
        idx = [i for i, t in enumerate(self.teachers) if t.recover]
        return idx if self.recover.spec.multi_teacher else idx[:1]

    @property
    def relabel_teachers(self) -> list[int]:
        return [i for i, t in enumerate(self.teachers) if t.relabel]
