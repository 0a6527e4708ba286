"""The memory and time planner: `analytic` (what a recipe needs per stage and device, on paper),
`aot` (what XLA compiles it to on simulated devices), `report` (the two side by side for a recipe) and
`traffic` (the bytes sequence-parallel attention moves per device, per scheme and axis).
"""

from lwm_jax.planner.analytic import (
                                   GIB,
                                   host_bytes_per_device,
                                   layer_param_count,
                                   length_unit,
                                   longest_fitting,
                                   memory_per_device,
                                   param_bytes_per_device,
                                   plan_recipe,
                                   plan_stage,
                                   step_seconds,
)
from lwm_jax.planner.aot import aot_compare, aot_memory, aot_worker
from lwm_jax.planner.report import plan_report, resolve_hardware
from lwm_jax.planner.traffic import attention_bytes_per_device, axis_link

__all__ = ["GIB", "aot_compare", "attention_bytes_per_device", "axis_link",
           "aot_memory", "aot_worker", "host_bytes_per_device",
           "layer_param_count",
           "length_unit", "longest_fitting", "memory_per_device", "param_bytes_per_device", "plan_recipe",
           "plan_report", "plan_stage", "resolve_hardware", "step_seconds"]
