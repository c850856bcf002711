"""One YAML file -> typed, validated run configuration.

Every stage owns a ``@dataclass(kw_only=True)`` section. ``load_config`` parses YAML,
applies ``--set key.path=value`` overrides, rejects unknown keys and wrong types, and
validates values, always raising :class:`ConfigError` with the offending key path
(``recover.alpha: must be in [0, 1], got 1.5``) before any work starts.

The package's modules, from the bottom: ``checks`` (the error, shared value checks),
``inputs`` (data, teachers), ``stages`` (one section per stage), ``run`` (execution,
storage, the whole run), ``presets`` (a preset or a file; the ``CONFIG`` argument),
``loader`` (YAML, ``--set`` overrides, types and unknown keys).
"""

from __future__ import annotations

from fadrm.config.checks import ConfigError
from fadrm.config.inputs import DataConfig, TeacherConfig
from fadrm.config.loader import apply_overrides, config_from_dict, config_to_dict, load_config
from fadrm.config.presets import (add_config_argument, list_presets, preset_path,
                                  preset_purpose, resolve_config)
from fadrm.config.run import ExecutionConfig, RunConfig, StorageConfig
from fadrm.config.stages import (EvaluateConfig, RecoverConfig, RelabelConfig, SelectConfig,
                                 SqueezeConfig, StudentConfig)

# The names imported here but not in __all__ are the package's API as well (the
# library's own modules import them from here).

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvaluateConfig",
    "TeacherConfig",
    "SqueezeConfig",
    "SelectConfig",
    "RecoverConfig",
    "RelabelConfig",
    "StudentConfig",
    "ExecutionConfig",
    "StorageConfig",
    "RunConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "list_presets",
    "preset_path",
    "preset_purpose",
    "resolve_config",
]
