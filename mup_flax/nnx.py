"""μP for Flax NNX: in-place annotation and the NNX readout layers."""

from mup_flax._nnx import MuReadout
from mup_flax._nnx import MuSharedReadout
from mup_flax._nnx import set_base_shapes

__all__ = (
    "MuReadout",
    "MuSharedReadout",
    "set_base_shapes",
)
