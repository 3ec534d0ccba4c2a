"""The run config: one typed, validated YAML file is the single source of truth.

* `schema`: the sections and `RunConfig` (typed, validated, frozen once loaded).
* `loading`: `read_config` (YAML, `--set` overrides, the HF shape of `model.init_from_hf`) and `apply_overrides`.

A run loads its config with `training.stages.plan.load_config`: `read_config`, then the stage hooks' argument
defaults and transition checks (the hooks live above this package).

The DeepSpeed JSON is generated from it in `training/engine/ds_config.py`.
"""
from training.config.loading import apply_overrides, read_config  # noqa: F401
from training.config.schema import (DataSection, DeepSpeedSection, DistSection, LayerDropSection,  # noqa: F401
                                    LocalityBiasSection, ModelConfig, OptimizerSection, RunConfig, RunSection,
                                    StageSection, TrainSection)
