"""Width-correct (μP) initializers, equal to Flax's at base shape."""

from mup_flax._init_rules import InitRule
from mup_flax._init_rules import glorot_normal
from mup_flax._init_rules import glorot_uniform
from mup_flax._init_rules import he_normal
from mup_flax._init_rules import he_uniform
from mup_flax._init_rules import kaiming_normal
from mup_flax._init_rules import kaiming_uniform
from mup_flax._init_rules import lecun_normal
from mup_flax._init_rules import lecun_uniform
from mup_flax._init_rules import normal
from mup_flax._init_rules import truncated_normal
from mup_flax._init_rules import uniform
from mup_flax._init_rules import variance_scaling
from mup_flax._init_rules import xavier_normal
from mup_flax._init_rules import xavier_uniform

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
