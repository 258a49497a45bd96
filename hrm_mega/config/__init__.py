"""The run configuration: typed sections, YAML loading with overrides, and every check the config
decides, run once by `load_config` before any engine starts.

- schema.py: dicts -> dataclasses (coercion, unknown keys); ConfigError
- model.py: the model section per family (PuzzleModelConfig, LMModelConfig); shipped in HF exports
- sections.py: parallel, data, optim, train, log and rl sections
- layout.py: the 3D layout arithmetic (world size, tp splits, pipeline stages)
- checks.py: checks across sections, against the world size, the dataset manifest and for RL
- run.py: Config, load_config, save_resolved
"""

from hrm_mega.config.checks import BUILTIN_REWARDS, Command
from hrm_mega.config.layout import Layout, check_model_layout, pipeline_stage_blocks, resolve_layout
from hrm_mega.config.model import (
    MODEL_FAMILIES,
    LMModelConfig,
    PuzzleModelConfig,
    model_config_from_dict,
    swiglu_intermediate,
)
from hrm_mega.config.run import Config, config_from_dict, load_config, read_config, save_resolved
from hrm_mega.config.schema import ConfigError
from hrm_mega.config.sections import (
    DataConfig,
    DataSource,
    LogConfig,
    OptimConfig,
    ParallelConfig,
    RLConfig,
    TrainConfig,
)

__all__ = [
    "BUILTIN_REWARDS",
    "MODEL_FAMILIES",
    "Command",
    "Config",
    "ConfigError",
    "DataConfig",
    "DataSource",
    "LMModelConfig",
    "Layout",
    "LogConfig",
    "OptimConfig",
    "ParallelConfig",
    "PuzzleModelConfig",
    "RLConfig",
    "TrainConfig",
    "check_model_layout",
    "config_from_dict",
    "load_config",
    "model_config_from_dict",
    "pipeline_stage_blocks",
    "read_config",
    "resolve_layout",
    "save_resolved",
    "swiglu_intermediate",
]
