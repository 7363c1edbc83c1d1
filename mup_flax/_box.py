"""How μP metadata rides on parameters: the Linen box, and what layers declare before it."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import struct
from flax.core import meta
from flax.nnx import variablelib

from mup_flax._infshape import InfShape

__all__ = ["InfShapeBox", "with_fan_axes"]

# Parameter roles a layer declares so that set_base_shapes can tell a readout
# (infinite fan-in, finite fan-out, forward multiplier 1/width_mult) from a
# hidden layer that happens to have the same infinite/finite pattern.
READOUT = "readout"

# Keys of the μP metadata. On NNX they are Variable metadata; on Linen the
# annotated ones are fields of InfShapeBox.
INFSHAPE = "infshape"
ROLE = "mup_role"
INIT_RULE = "mup_init_rule"
FAN_AXES = "mup_fan_axes"
DECLARATION_KEYS = (ROLE, INIT_RULE, FAN_AXES)


def _add_axis(value: Any, index: int, params: dict[Any, Any]) -> Any:
  if isinstance(value, meta.AxisMetadata):
    return value.add_axis(index, params)
  return value


def _remove_axis(value: Any, index: int, params: dict[Any, Any]) -> Any:
  if isinstance(value, meta.AxisMetadata):
    return value.remove_axis(index, params)
  return value


class InfShapeBox(struct.PyTreeNode, meta.AxisMetadata):
  """Linen ``AxisMetadata`` box: a parameter and its μP :class:`InfShape`.

  ``infshape`` and ``role`` are static (pytree auxiliary data), so the box
  passes through ``jax.jit`` and ``jax.grad`` (gradients come back boxed);
  ``nn.scan``/``nn.vmap`` update ``infshape`` through ``add_axis``/
  ``remove_axis`` (and forward them to a nested box such as
  ``nn.Partitioned``, whose partition spec :meth:`get_partition_spec`
  reports). Layer code sees the unboxed array, as with any Linen
  ``AxisMetadata``.

  Attributes:
    value: the parameter (or a nested box, e.g. ``nn.Partitioned``).
    infshape: the parameter's :class:`InfShape`.
    role: ``"readout"`` for the parameters of :class:`mup_flax.MuReadout`,
      else ``None``.

  >>> import jax, jax.numpy as jnp
  >>> from mup_flax import InfDim, InfShape
  >>> box = InfShapeBox(jnp.zeros((4, 2)), InfShape([InfDim(2, 4), InfDim(None, 2)]))
  >>> grad = jax.grad(lambda b: b.value.sum())(box)
  >>> type(grad).__name__, grad.infshape.width_mult()
  ('InfShapeBox', 2.0)
  """

  value: Any
  infshape: InfShape = struct.field(pytree_node=False)
  role: str | None = struct.field(pytree_node=False, default=None)

  def unbox(self) -> Any:
    return self.value

  def replace_boxed(self, val: Any) -> InfShapeBox:
    return self.replace(value=val)

  def add_axis(self, index: int, params: dict[Any, Any]) -> InfShapeBox:
    value = _add_axis(self.value, index, params)
    shape = unbox_shape(value)
    if shape is None or len(shape) != self.infshape.ndim + 1:
      raise ValueError(
          f"InfShapeBox.add_axis: value of shape {shape} does not have one more "
          f"axis than {self.infshape}.")
    return self.replace(
        value=value, infshape=self.infshape.insert_axis(index, shape[index]))

  def remove_axis(self, index: int, params: dict[Any, Any]) -> InfShapeBox:
    return self.replace(
        value=_remove_axis(self.value, index, params),
        infshape=self.infshape.remove_axis(index))

  def get_partition_spec(self) -> jax.sharding.PartitionSpec:
    """The partition spec of a nested ``nn.Partitioned`` (replicated if none)."""
    inner = self.value
    if hasattr(inner, "get_partition_spec"):
      return inner.get_partition_spec()
    return jax.sharding.PartitionSpec()


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class Declared(variablelib.VariableMetadata, meta.AxisMetadata):
  """μP facts a layer or initializer declares before base shapes are known.

  One object serves both APIs: NNX's ``Variable`` constructor turns a
  ``VariableMetadata`` into Variable metadata, and Linen stores an
  ``AxisMetadata`` box that :func:`mup_flax.set_base_shapes` later replaces
  with an :class:`InfShapeBox`. ``metadata`` holds the keys in
  ``DECLARATION_KEYS``.
  """

  def tree_flatten(self):
    return (self.raw_value,), tuple(sorted(self.metadata.items()))

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], metadata=dict(aux))

  def unbox(self) -> Any:
    return self.raw_value

  def replace_boxed(self, val: Any) -> Declared:
    return Declared(val, metadata=dict(self.metadata))

  def add_axis(self, index: int, params: dict[Any, Any]) -> Declared:
    return self.replace_boxed(_add_axis(self.raw_value, index, params))

  def remove_axis(self, index: int, params: dict[Any, Any]) -> Declared:
    return self.replace_boxed(_remove_axis(self.raw_value, index, params))


def declare(init_fn: Callable[..., Any], **declarations: Any) -> Callable[..., Any]:
  """Wraps an initializer so its output carries μP declarations (merged, never nested)."""
  unknown = set(declarations) - set(DECLARATION_KEYS)
  assert not unknown, unknown

  @functools.wraps(init_fn)
  def wrapper(*args, **kwargs):
    value = init_fn(*args, **kwargs)
    if isinstance(value, variablelib.VariableMetadata):
      # An NNX VariableMetadata (ours or nnx.with_partitioning's): merge, since
      # NNX unwraps a single level only.
      value = _flatten_variable_metadata(value)
      merged = dict(value.metadata)
      for key, new in declarations.items():
        if key in merged and merged[key] != new:
          raise ValueError(f"conflicting μP declarations {key}: {merged[key]} vs {new}.")
        merged[key] = new
      return dataclasses.replace(value, metadata=merged)
    return Declared(value, metadata=dict(declarations))

  return wrapper


def _flatten_variable_metadata(value: variablelib.VariableMetadata) -> variablelib.VariableMetadata:
  """One VariableMetadata level from nested ones (``nnx.with_metadata(mup_flax.init...)``)."""
  while isinstance(value.raw_value, variablelib.VariableMetadata):
    inner = value.raw_value
    value = dataclasses.replace(inner, metadata={**inner.metadata, **value.metadata})
  return value


def unbox_shape(value: Any) -> tuple[int, ...] | None:
  """The shape of a possibly boxed array (``None`` if it has none)."""
  while isinstance(value, meta.AxisMetadata):
    value = value.unbox()
  shape = getattr(value, "shape", None)
  return None if shape is None else tuple(shape)


def find_box(value: Any) -> InfShapeBox | None:
  """The first :class:`InfShapeBox` in a chain of nested AxisMetadata boxes."""
  while isinstance(value, meta.AxisMetadata):
    if isinstance(value, InfShapeBox):
      return value
    value = value.unbox()
  return None


def declarations(value: Any) -> dict[str, Any]:
  """The μP declarations found along a chain of boxes (an InfShapeBox's role too)."""
  found: dict[str, Any] = {}
  while isinstance(value, meta.AxisMetadata):
    if isinstance(value, Declared):
      found.update(value.metadata)
    elif isinstance(value, InfShapeBox):
      if value.role is not None:
        found[ROLE] = value.role
      if value.infshape.fan_in_axes is not None:
        found.setdefault(FAN_AXES, (value.infshape.fan_in_axes, value.infshape.fan_out_axes))
    value = value.unbox()
  return found


def declared_fan_axes(value: Any):
  return declarations(value).get(FAN_AXES)


def rebox(value: Any, new_array: Any, infshape: InfShape, role: str | None) -> InfShapeBox:
  """``value``'s chain of boxes with Declared/InfShapeBox dropped, ``new_array`` inside,
  and one InfShapeBox outermost."""
  if isinstance(value, (Declared, InfShapeBox)):
    return rebox(value.unbox(), new_array, infshape, role)
  if isinstance(value, meta.AxisMetadata):
    inner = rebox(value.unbox(), new_array, infshape, role)
    return InfShapeBox(value.replace_boxed(inner.value), infshape, role)
  return InfShapeBox(new_array, infshape, role)


def strip(value: Any) -> Any:
  """The array inside any chain of boxes."""
  while isinstance(value, meta.AxisMetadata):
    value = value.unbox()
  return value


def with_fan_axes(init_fn: Callable[..., Any], fan_in_axis: int | tuple[int, ...],
                  fan_out_axis: int | tuple[int, ...]) -> Callable[..., Any]:
  """Declares which axes of a kernel are its fan-in and fan-out (Linen and NNX).

  Needed for kernels whose layout is not ``(..., in, out)``, e.g. a
  ``DenseGeneral``/``einsum`` kernel ``(d_model, heads, head_dim)`` whose
  outputs span the last two axes: ``with_fan_axes(init, 0, (1, 2))``. Fan
  groups count as one dim when counting infinite dims. With Linen's
  ``nn.with_partitioning`` either order works. NNX unwraps one metadata
  level only, so put ``with_fan_axes`` outside ``nnx.with_partitioning``, and
  give a :mod:`mup_flax.init` initializer's sharding through the layer's
  ``kernel_metadata`` rather than wrapping it in ``nnx.with_partitioning``.

  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import mup_flax
  >>> init = mup_flax.with_fan_axes(nn.initializers.lecun_normal(), 0, (1, 2))
  >>> layer = lambda d: nn.DenseGeneral((4, d // 4), kernel_init=init)
  >>> shapes = mup_flax.make_base_shapes(layer(16), layer(32), jnp.ones((1, 16)))
  >>> shapes["kernel"]
  InfShape((FinDim(16), FinDim(4), InfDim(4, 4)), fan_in_axis=(0,), fan_out_axis=(1, 2))
  """
  as_tuple = lambda a: (a,) if isinstance(a, int) else tuple(a)
  return declare(init_fn, **{FAN_AXES: (as_tuple(fan_in_axis), as_tuple(fan_out_axis))})
