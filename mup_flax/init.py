"""Width-correct (μP) initializers, equal to Flax's at base shape."""

from mup_flax._init import InitRule
from mup_flax._init import glorot_normal
from mup_flax._init import glorot_uniform
from mup_flax._init import he_normal
from mup_flax._init import he_uniform
from mup_flax._init import kaiming_normal
from mup_flax._init import kaiming_uniform
from mup_flax._init import lecun_normal
from mup_flax._init import lecun_uniform
from mup_flax._init import normal
from mup_flax._init import truncated_normal
from mup_flax._init import uniform
from mup_flax._init import variance_scaling
from mup_flax._init import xavier_normal
from mup_flax._init import xavier_uniform

__all__ = (
    "InitRule",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "he_uniform",
    "kaiming_normal",
    "kaiming_uniform",
    "lecun_normal",
    "lecun_uniform",
    "normal",
    "truncated_normal",
    "uniform",
    "variance_scaling",
    "xavier_normal",
    "xavier_uniform",
)
