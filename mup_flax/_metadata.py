"""How μP metadata rides on parameters, for Linen and NNX alike.

A parameter reaches mup_flax as a plain array (or ``jax.ShapeDtypeStruct``),
as a chain of Linen ``AxisMetadata`` boxes, or as an ``nnx.Variable``. This
module holds the metadata keys (spelled here only), the two carriers of μP
metadata (:class:`InfShapeBox` for Linen, Variable metadata for NNX; and
:class:`Declared`, what layers and initializers declare before base shapes are
known), and the readers that see through all of them: :func:`parameters`,
:func:`shape_of`, :func:`declarations_of`, :func:`infshape_of`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from flax import struct
from flax.core import meta
from flax.nnx import variablelib
from sf_optax import parameter_path_name

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

Path = tuple[str, ...]


def path_names(path: Any) -> Path:
  """The names of a pytree path's keys: ``("block_0", "attn", "kernel")``."""
  return tuple(parameter_path_name((key,)) for key in path)


def is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def is_parameter(x: Any) -> bool:
  """Whether ``x`` is one parameter with its wrappers: a Linen box or an ``nnx.Variable``.

  Plain arrays and :class:`InfShape` are pytree leaves already.
  """
  return is_variable(x) or meta.is_axis_metadata(x)


def parameters(tree: Any) -> tuple[list[tuple[Path, Any]], Any]:
  """``([(path, parameter)], treedef)``: each parameter of a tree, wrappers kept."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_parameter)
  return [(path_names(path), leaf) for path, leaf in leaves], treedef


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
    shape = shape_of(value)
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


def shape_of(parameter: Any) -> tuple[int, ...] | None:
  """The shape of a parameter (array, box chain or Variable); ``None`` if it has none."""
  value = strip(parameter)
  shape = getattr(value, "shape", None)
  return None if shape is None else tuple(shape)


def find_box(value: Any) -> InfShapeBox | None:
  """The first :class:`InfShapeBox` in a chain of nested AxisMetadata boxes."""
  while isinstance(value, meta.AxisMetadata):
    if isinstance(value, InfShapeBox):
      return value
    value = value.unbox()
  return None


def infshape_of(parameter: Any) -> InfShape | None:
  """The InfShape a parameter is annotated with (an InfShape is its own), else ``None``."""
  if isinstance(parameter, InfShape):
    return parameter
  if is_variable(parameter):
    return parameter.get_metadata(INFSHAPE, None)
  box = find_box(parameter)
  return None if box is None else box.infshape


def declarations_of(parameter: Any) -> dict[str, Any]:
  """The μP declarations of a parameter (``DECLARATION_KEYS``), whatever carries them.

  Linen: what :class:`Declared` boxes hold along the chain, and the role of an
  :class:`InfShapeBox`. NNX: the Variable's metadata. Fan axes come from the
  annotation when none are declared.
  """
  found: dict[str, Any] = {}
  if is_variable(parameter):
    found = {key: parameter.get_metadata(key) for key in DECLARATION_KEYS
             if parameter.get_metadata(key, None) is not None}
  value = parameter
  while isinstance(value, meta.AxisMetadata):
    if isinstance(value, Declared):
      found.update(value.metadata)
    elif isinstance(value, InfShapeBox) and value.role is not None:
      found[ROLE] = value.role
    value = value.unbox()
  infshape = infshape_of(parameter)
  if infshape is not None and infshape.fan_in_axes is not None:
    found.setdefault(FAN_AXES, (infshape.fan_in_axes, infshape.fan_out_axes))
  return found


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
  """The array inside any chain of boxes, or inside a Variable."""
  if is_variable(value):
    return value.get_value()
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
