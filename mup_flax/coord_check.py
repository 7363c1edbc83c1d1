"""The coordinate check: do a model's activations stay the same size as it widens?"""

from mup_flax._coord_check import coord_slopes
from mup_flax._coord_check import get_coord_data
from mup_flax._coord_check import plot_coord_data

__all__ = (
    "coord_slopes",
    "get_coord_data",
    "plot_coord_data",
)
