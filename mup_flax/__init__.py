"""μP (Tensor Programs V) for Flax, Linen and NNX."""

from mup_flax import coord_check
from mup_flax import init
from mup_flax import nnx
from mup_flax._attention import attention_scale
from mup_flax._base_shapes import get_infshapes
from mup_flax._base_shapes import load_base_shapes
from mup_flax._base_shapes import make_base_shapes
from mup_flax._base_shapes import save_base_shapes
from mup_flax._depth import DepthScales
from mup_flax._depth import depth_multiplier
from mup_flax._depth import depth_scaled
from mup_flax._depth import depth_scales
from mup_flax._depth import multiply_scales
from mup_flax._depth import scale_eps
from mup_flax._infshape import InfDim
from mup_flax._infshape import InfShape
from mup_flax._linen import MuP
from mup_flax._linen import MuReadout
from mup_flax._linen import MuSharedReadout
from mup_flax._linen import set_base_shapes
from mup_flax._metadata import InfShapeBox
from mup_flax._metadata import with_fan_axes
from mup_flax._optimizers import mu_adam
from mup_flax._optimizers import mu_adamw
from mup_flax._optimizers import mu_sgd
from mup_flax._optimizers import scale_by_mup
from mup_flax._optimizers import schedule_free_scales

__all__ = (
    "DepthScales",
    "InfDim",
    "InfShape",
    "InfShapeBox",
    "MuP",
    "MuReadout",
    "MuSharedReadout",
    "attention_scale",
    "coord_check",
    "depth_multiplier",
    "depth_scaled",
    "depth_scales",
    "get_infshapes",
    "init",
    "load_base_shapes",
    "make_base_shapes",
    "mu_adam",
    "mu_adamw",
    "mu_sgd",
    "multiply_scales",
    "nnx",
    "save_base_shapes",
    "scale_by_mup",
    "scale_eps",
    "schedule_free_scales",
    "set_base_shapes",
    "with_fan_axes",
)
