"""Typed configuration: frozen dataclasses loaded from YAML with `key=value` overrides.

`schema` holds the generic YAML <-> dataclass plumbing; `model` the model and mesh configs;
`data` the data-pipeline configs; `recipe` the training recipe and its stages.
"""

from lwm_jax.config.data import PACKING_MODES, DataConfig, PrepareConfig, load_data_config
from lwm_jax.config.model import (
                                  ATTENTION_IMPLS,
                                  ATTENTION_KERNELS,
                                  DTYPES,
                                  EMBED_LOOKUPS,
                                  MESH_AXES,
                                  REMAT_POLICIES,
                                  RUN_FIELDS,
                                  MeshConfig,
                                  ModelConfig,
                                  RopeScaling,
                                  load_model_config,
)
from lwm_jax.config.recipe import (
                                  SCHEDULES,
                                  THETA_RULES,
                                  OptimizerConfig,
                                  RecipeConfig,
                                  StageConfig,
                                  ThetaSweepConfig,
                                  load_recipe,
                                  recipe_dict,
)
from lwm_jax.config.schema import apply_overrides, check, from_dict, load_yaml, to_dict

__all__ = [
    "ATTENTION_IMPLS", "ATTENTION_KERNELS", "DTYPES", "EMBED_LOOKUPS", "MESH_AXES", "PACKING_MODES",
    "REMAT_POLICIES", "RUN_FIELDS", "SCHEDULES", "THETA_RULES", "DataConfig", "MeshConfig", "ModelConfig",
    "OptimizerConfig", "PrepareConfig", "RecipeConfig", "RopeScaling", "StageConfig", "ThetaSweepConfig",
    "apply_overrides", "check", "from_dict", "load_data_config", "load_model_config", "load_recipe", "load_yaml",
    "recipe_dict", "to_dict"
]
