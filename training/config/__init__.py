"""The run config: one typed, validated YAML file is the single source of truth.

* `schema`: the sections and `RunConfig` (typed, validated, frozen once loaded).
* `loading`: `load_config` (YAML, `--set` overrides, the HF shape of `model.init_from_hf`) and `apply_overrides`.

The DeepSpeed JSON is generated from it in `training/engine/ds_config.py`.
"""
from training.config.loading import apply_overrides, load_config  # noqa: F401
from training.config.schema import (DataSection, DeepSpeedSection, DistSection, LayerDropSection,  # noqa: F401
                                    LocalityBiasSection, ModelConfig, OptimizerSection, RunConfig, RunSection,
                                    StageSection, TrainSection)
