"""Annotating parameters with their InfShape (and μP init), and reading annotations back."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from flax.core import meta

import math
from dataclasses import dataclass

import jax.numpy as jnp

from mup_flax import _box
from mup_flax import _init
from mup_flax import _paths
from mup_flax._infshape import InfShape

__all__ = ["get_infshapes", "set_base_shapes"]

NNX_METADATA_KEY = _box.INFSHAPE


def flatten_base_shapes(base_shapes: Any) -> dict[_paths.Path, InfShape]:
  """``{path: InfShape}`` of a base-shapes tree (any container type)."""
  leaves = jax.tree_util.tree_flatten_with_path(
      base_shapes, is_leaf=lambda x: isinstance(x, InfShape))[0]
  flat = {}
  for path, leaf in leaves:
    if not isinstance(leaf, InfShape):
      raise ValueError(
          f"base shapes entry {_paths.path_str(_paths.normalize(path))} is "
          f"{type(leaf).__name__}, not an InfShape; build base shapes with "
          "mup_flax.make_base_shapes or mup_flax.load_base_shapes.")
    flat[_paths.normalize(path)] = leaf
  return flat


def target_infshape(path: _paths.Path, base: InfShape | None, shape: Any) -> InfShape:
  """The InfShape of the parameter at ``path`` of ``shape`` from its base InfShape."""
  if base is None:
    raise ValueError(
        f"parameter {_paths.path_str(path)} (shape {tuple(shape)}) is not in the base "
        "shapes: the base shapes were made for another model.")
  try:
    return base.with_shape(shape)
  except ValueError as e:
    raise ValueError(
        f"parameter {_paths.path_str(path)}: base shape {base.base_shape} "
        f"(infinite axes {[i for i, d in enumerate(base.dims) if d.is_infinite()]}) "
        f"does not match target shape {tuple(shape)}: {e}") from None


def check_no_extra(flat_base: dict, seen: set, what: str = "model") -> None:
  extra = sorted(set(flat_base) - seen)
  if extra:
    raise ValueError(
        f"the base shapes have parameters the {what} lacks: "
        f"{', '.join(_paths.path_str(p) for p in extra[:5])}"
        f"{' ...' if len(extra) > 5 else ''}; they were made for another model.")


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _nnx_infshapes(state: Any, base_shapes: Any) -> Any:
  flat_base = None if base_shapes is None else flatten_base_shapes(base_shapes)
  seen = set()

  def one(path, variable):
    if not _is_variable(variable):
      raise ValueError(
          f"{_paths.path_str(_paths.normalize(path))} is not an nnx.Variable.")
    path = _paths.normalize(path)
    seen.add(path)
    if flat_base is not None:
      return target_infshape(path, flat_base.get(path), variable.shape)
    infshape = variable.get_metadata(NNX_METADATA_KEY, None)
    if infshape is None:
      raise ValueError(
          f"nnx parameter {_paths.path_str(path)} has no infshape metadata: "
          "annotate the model with mup_flax.nnx.set_base_shapes(model, base_shapes) "
          "(or pass base_shapes to get_infshapes).")
    return infshape

  out = jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)
  if flat_base is not None:
    check_no_extra(flat_base, seen)
  return out


def get_infshapes(params: Any, base_shapes: Any = None) -> Any:
  """The static tree of :class:`InfShape` of annotated parameters.

  The result has the tree structure of the *unboxed* parameters (what Optax
  sees): ``nn.meta.unbox(params)`` for Linen, ``nnx.as_pure(nnx.state(model,
  nnx.Param))`` for NNX, or ``params`` itself for plain arrays. It is built
  once, outside ``jit``, and handed to the μP optimizers.

  Args:
    params: Linen parameters annotated by :func:`mup_flax.set_base_shapes` or
      :class:`mup_flax.MuP` (``InfShapeBox`` leaves, possibly nested with
      ``nn.Partitioned``); an ``nnx.Module`` or ``nnx.State`` annotated by
      :func:`mup_flax.nnx.set_base_shapes`; or plain arrays /
      ``jax.ShapeDtypeStruct`` together with ``base_shapes``.
    base_shapes: a base-shapes tree from :func:`mup_flax.make_base_shapes` or
      :func:`mup_flax.load_base_shapes`. When given, the annotations already
      on ``params`` are ignored and every InfShape is computed from it.

  Returns:
    A pytree of :class:`InfShape`, one per parameter.

  >>> import jax, jax.numpy as jnp
  >>> import mup_flax
  >>> base = {"w": jnp.zeros((8, 3))}
  >>> delta = {"w": jnp.zeros((16, 3))}
  >>> base_shapes = mup_flax.make_base_shapes(base, delta)
  >>> mup_flax.get_infshapes({"w": jnp.zeros((64, 3))}, base_shapes)
  {'w': InfShape((InfDim(8, 64), FinDim(3)))}
  """
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  if any(_is_variable(x) for x in jax.tree.leaves(params, is_leaf=_is_variable)):
    return _nnx_infshapes(params, base_shapes)

  flat_base = None if base_shapes is None else flatten_base_shapes(base_shapes)
  seen = set()

  def one(path, leaf):
    path = _paths.normalize(path)
    seen.add(path)
    if flat_base is not None:
      return target_infshape(path, flat_base.get(path), _box.unbox_shape(leaf))
    box = _box.find_box(leaf)
    if box is None or box.infshape is None:
      raise ValueError(
          f"parameter {_paths.path_str(path)} carries no InfShape: initialize "
          "with mup_flax.MuP(...).init or annotate with "
          "mup_flax.set_base_shapes(params, base_shapes) (or pass base_shapes "
          "to get_infshapes).")
    return box.infshape

  out = jax.tree_util.tree_map_with_path(one, params, is_leaf=meta.is_axis_metadata)
  if flat_base is not None:
    check_no_extra(flat_base, seen)
  return out


@dataclass(frozen=True)
class ParamFacts:
  """What annotation needs to know about one parameter, whatever carries it."""

  shape: tuple[int, ...]
  declarations: dict
  annotated: bool  # already carries an InfShape: never rescale again


def plan(facts: dict[_paths.Path, ParamFacts], base_shapes: Any, rescale_params: bool
         ) -> dict[_paths.Path, tuple[InfShape, float]]:
  """``{path: (InfShape, init std multiplier)}``: the one place the μP init rules live.

  Rules for parameters that do not declare an initializer (``mup_flax.init``),
  written for Flax's defaults:

  - a readout kernel (``MuReadout``) and its bias: ``* sqrt(width_mult)``, which
    with the readout's ``1/width_mult`` forward multiplier keeps the logits'
    scale (the reference's MuReadout rescale);
  - another ``bias`` next to a ``kernel`` (Dense, Conv, DenseGeneral):
    ``* sqrt(fan_in_mult)`` of that kernel (zero for Flax's zero init);
  - an ``embedding`` table (``nn.Embed``/``nnx.Embed``): Flax's default std
    ``1/sqrt(features)`` becomes ``1/sqrt(base_features)``;
  - everything else (hidden kernels: ``lecun_normal`` is already μP; input
    kernels; norm scales): unchanged.
  """
  flat_base = flatten_base_shapes(base_shapes)
  infshapes = {path: target_infshape(path, flat_base.get(path), f.shape)
               for path, f in facts.items()}
  check_no_extra(flat_base, set(facts))

  for path, infshape in infshapes.items():
    role = facts[path].declarations.get(_box.ROLE)
    if path[-1] != "kernel" or infshape.ndim < 2 or role == _box.READOUT:
      continue
    fan_in, fan_out = infshape.fanin_fanout()
    if fan_in.is_infinite() and not fan_out.is_infinite():
      raise ValueError(
          f"parameter {_paths.path_str(path)} {infshape} maps a width-sized input to a "
          "fixed-size output but is not a readout: make this layer a "
          "mup_flax.MuReadout (Linen) / mup_flax.nnx.MuReadout (NNX), whose forward "
          "pass divides by width_mult, or make its output dimension scale with width "
          "too. (If its fan axes are not (-2, -1), declare them with "
          "mup_flax.with_fan_axes. Parameters restored as plain arrays have lost the "
          "MuReadout marker: annotate them with MuP(...).annotate(params, x) or restore "
          "into the annotated abstract tree jax.eval_shape(MuP(...).init, key, x).)")

  out = {}
  for path, infshape in infshapes.items():
    f = facts[path]
    mult = 1.0
    if rescale_params and not f.annotated:
      name = _paths.path_str(path)
      rule = f.declarations.get(_box.INIT_RULE)
      role = f.declarations.get(_box.ROLE)
      kernel = infshapes.get(path[:-1] + ("kernel",))
      if rule is not None:
        mult = rule.std_mult(infshape, name)
      elif role == _box.READOUT and path[-1] == "bias" and kernel is not None:
        mult = math.sqrt(kernel.width_mult())
      elif role == _box.READOUT:
        mult = math.sqrt(infshape.width_mult())
      elif path[-1] == "bias" and kernel is not None and kernel.ndim >= 2:
        mult = math.sqrt(kernel.fanin_fanout()[0].width_mult())
      elif path[-1] == "embedding":
        mult = _init.FLAX_EMBED.std_mult(infshape, name)
    out[path] = (infshape, mult)
  return out


def scale(array: Any, mult: float) -> Any:
  """``array * mult`` in ``array``'s dtype; the identity when ``mult == 1``."""
  if mult == 1.0 or isinstance(array, jax.ShapeDtypeStruct):
    return array
  return (array * jnp.asarray(mult, array.dtype)).astype(array.dtype)


def set_base_shapes(params: Any, base_shapes: Any, *, rescale_params: bool = True) -> Any:
  """Annotates Linen (or plain) parameters with their InfShape and applies μP init.

  The functional core behind :class:`mup_flax.MuP`. Each parameter comes back
  in an :class:`InfShapeBox` (outermost; an ``nn.Partitioned`` box stays
  inside it). With ``rescale_params=True``, parameters that were *not* yet
  annotated are multiplied by their μP init correction (see the rules below);
  parameters that already carry an InfShape are only re-annotated, so calling
  this twice never rescales twice. Parameters restored from a checkpoint as
  plain arrays must be annotated with ``rescale_params=False``.

  Init rules (for parameters whose initializer is not from
  :mod:`mup_flax.init`, which declares its own rule): a ``MuReadout`` kernel
  and bias ``* sqrt(width_mult)``; another ``bias`` beside a ``kernel``
  ``* sqrt(fan_in_mult)``; an ``embedding`` table (Flax's default init, std
  ``1/sqrt(features)``) ``* sqrt(width_mult)``, giving std
  ``1/sqrt(base_features)``; everything else unchanged (Flax's
  ``lecun_normal`` is already μP for hidden kernels). With base shapes equal to
  the parameters' shapes every multiplier is 1: standard parametrization.
  These rules assume Flax's default initializers (as the reference assumes
  PyTorch's): a readout or ``nn.Embed`` given another ``jax.nn.initializers``
  initializer, say ``normal(0.02)``, would be rescaled as if it were the
  default. Give such layers the :mod:`mup_flax.init` version instead
  (``mup_flax.init.normal(0.02)``), which declares its own rule.

  Args:
    params: the ``"params"`` collection of a Linen model (arrays, boxes or
      ``jax.ShapeDtypeStruct``), not an ``nnx.Module`` (use
      :func:`mup_flax.nnx.set_base_shapes`).
    base_shapes: from :func:`make_base_shapes` or :func:`load_base_shapes`.
    rescale_params: apply the μP init corrections to not-yet-annotated
      parameters.

  Returns:
    The annotated parameters, same tree structure with boxes at the leaves.

  Raises:
    ValueError: a parameter missing from the base shapes (or vice versa), a
      finite dim that changed size, a rank change (naming the path and both
      shapes); a kernel with infinite fan-in and finite fan-out that is not a
      ``MuReadout``.

  >>> import jax, jax.numpy as jnp
  >>> import mup_flax
  >>> shapes = mup_flax.make_base_shapes(
  ...     {"kernel": jnp.zeros((3, 8))}, {"kernel": jnp.zeros((3, 16))})
  >>> params = set_base_shapes({"kernel": jnp.ones((3, 64))}, shapes)
  >>> params["kernel"].infshape
  InfShape((FinDim(3), InfDim(8, 64)))
  """
  if isinstance(params, nnx.Module):
    raise TypeError(
        "set_base_shapes takes Linen/plain parameter trees; annotate an nnx.Module "
        "in place with mup_flax.nnx.set_base_shapes(model, base_shapes).")
  return annotate_tree(params, base_shapes, rescale_params)


def declarations_of(params: Any) -> dict[_paths.Path, dict]:
  """``{path: μP declarations}`` of a (boxed, possibly abstract) Linen parameter tree."""
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=meta.is_axis_metadata)[0]
  return {_paths.normalize(p): _box.declarations(leaf) for p, leaf in leaves}


def annotate_tree(params: Any, base_shapes: Any, rescale_params: bool,
                  known_declarations: dict[_paths.Path, dict] | None = None) -> Any:
  """set_base_shapes, with declarations (e.g. readout roles) for leaves that lost theirs.

  Parameters restored as plain arrays carry no boxes; :class:`mup_flax.MuP`
  knows the model and supplies what its layers declared.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=meta.is_axis_metadata)
  paths = [_paths.normalize(p) for p, _ in leaves]
  facts = {
      path: ParamFacts(
          shape=_box.unbox_shape(leaf),
          declarations={**(known_declarations or {}).get(path, {}),
                        **_box.declarations(leaf)},
          annotated=_box.find_box(leaf) is not None)
      for path, (_, leaf) in zip(paths, leaves)
  }
  for path, f in facts.items():
    if f.shape is None:
      raise ValueError(f"parameter {_paths.path_str(path)} is not an array.")
  decided = plan(facts, base_shapes, rescale_params)
  new_leaves = []
  for path, (_, leaf) in zip(paths, leaves):
    infshape, mult = decided[path]
    role = facts[path].declarations.get(_box.ROLE)
    new_leaves.append(_box.rebox(leaf, scale(_box.strip(leaf), mult), infshape, role))
  return jax.tree_util.tree_unflatten(treedef, new_leaves)
