"""sf_optax: Schedule-Free optimizers as Optax gradient transformations.

The checkpoint (Orbax), BatchNorm and NNX (Flax) helpers are loaded on first use
(PEP 562 module ``__getattr__``): ``import sf_optax`` imports neither Orbax,
TensorStore nor Flax, so an Optax-only user never pays for them.
"""

import importlib

from sf_optax._adan import schedule_free_adan
from sf_optax._eval_params import eval_params
from sf_optax._optimizers import schedule_free_adamw
from sf_optax._optimizers import schedule_free_adamw_paper
from sf_optax._optimizers import schedule_free_radam
from sf_optax._optimizers import schedule_free_sgd
from sf_optax._per_parameter import parameter_path_name
from sf_optax._per_parameter import per_parameter_values
from sf_optax._schedule_free import ScheduleFreeState
from sf_optax._wrapper import schedule_free
from sf_optax._z_steps import AdanState
from sf_optax._z_steps import SecondMomentState

__version__ = "0.1.0"

# Public name -> the private module that defines it, imported on first access.
_LAZY = {
    "CheckpointError": "sf_optax._checkpoint",
    "CheckpointManager": "sf_optax._checkpoint",
    "eval_model": "sf_optax._nnx",
    "recompute_batch_stats": "sf_optax._batch_norm",
    "recompute_batch_stats_nnx": "sf_optax._batch_norm",
    "restore_checkpoint": "sf_optax._checkpoint",
    "save_checkpoint": "sf_optax._checkpoint",
}


def __getattr__(name):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value
  raise AttributeError(f"module 'sf_optax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))


__all__ = (
    "AdanState",
    "CheckpointError",
    "CheckpointManager",
    "ScheduleFreeState",
    "SecondMomentState",
    "eval_model",
    "eval_params",
    "parameter_path_name",
    "per_parameter_values",
    "recompute_batch_stats",
    "recompute_batch_stats_nnx",
    "restore_checkpoint",
    "save_checkpoint",
    "schedule_free",
    "schedule_free_adan",
    "schedule_free_adamw",
    "schedule_free_adamw_paper",
    "schedule_free_radam",
    "schedule_free_sgd",
)
