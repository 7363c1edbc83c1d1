"""sf_optax: Schedule-Free optimizers as Optax gradient transformations."""

from sf_optax._adan import AdanState
from sf_optax._adan import schedule_free_adan
from sf_optax._batch_norm import recompute_batch_stats
from sf_optax._batch_norm import recompute_batch_stats_nnx
from sf_optax._checkpoint import restore_checkpoint
from sf_optax._checkpoint import save_checkpoint
from sf_optax._eval_params import eval_params
from sf_optax._optimizers import schedule_free_adamw
from sf_optax._optimizers import schedule_free_adamw_paper
from sf_optax._optimizers import schedule_free_radam
from sf_optax._optimizers import schedule_free_sgd
from sf_optax._optimizers import SecondMomentState
from sf_optax._per_parameter import parameter_path_name
from sf_optax._per_parameter import per_parameter_values
from sf_optax._schedule_free import schedule_free
from sf_optax._schedule_free import ScheduleFreeState

__version__ = "0.1.0"

__all__ = (
    "AdanState",
    "ScheduleFreeState",
    "SecondMomentState",
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
