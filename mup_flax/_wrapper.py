"""The module wrapper: a Linen model whose init gives annotated, μP-initialized params."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
from flax import linen as nn
from flax.core import meta

from mup_flax import _annotate
from mup_flax import _box
from mup_flax import _base_shapes
from mup_flax import _context

__all__ = ["MuP"]


class MuP:
  """Wraps a Linen model so that ``init`` returns μP-annotated, μP-initialized parameters.

  Give either the base and delta models (the same architecture at two widths;
  base shapes are computed with ``jax.eval_shape`` at the first ``init`` or
  ``apply``, from its inputs) or ready ``base_shapes`` (a tree from
  :func:`mup_flax.make_base_shapes` or a path for
  :func:`mup_flax.load_base_shapes`).

  - ``init(rngs, *args, **kwargs)``: the model's variables, with every
    parameter in an :class:`InfShapeBox` and μP's init corrections applied
    (:func:`mup_flax.set_base_shapes`). Readouts see their width multiplier
    during ``init`` already.
  - ``apply(variables, *args, **kwargs)``: the model's ``apply``; parameters
    are (re-)annotated first, without rescaling, so plain arrays (e.g. after
    ``nn.unbox`` or from a checkpoint) work too.
  - ``annotate(params)``: annotation without rescaling, for parameters
    restored from a checkpoint.

  Args:
    module: the target Linen model.
    base: the base model (same class, base width).
    delta: the delta model (same class, another width; only decides which
      dims are infinite).
    base_shapes: instead of ``base``/``delta``: a base-shapes tree or file path.
    fan_axes: passed to :func:`mup_flax.make_base_shapes`.
    collection: the variable collection holding the parameters.

  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import mup_flax
  >>> class MLP(nn.Module):
  ...   width: int
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     x = nn.relu(nn.Dense(self.width)(x))
  ...     x = nn.relu(nn.Dense(self.width)(x))
  ...     return mup_flax.MuReadout(10)(x)
  >>> model = mup_flax.MuP(MLP(1024), base=MLP(64), delta=MLP(128))
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 784)))
  >>> variables["params"]["Dense_1"]["kernel"].infshape.ninf()
  2
  >>> model.apply(variables, jnp.ones((1, 784))).shape
  (1, 10)
  """

  def __init__(
      self,
      module: nn.Module,
      *,
      base: nn.Module | None = None,
      delta: nn.Module | None = None,
      base_shapes: Any = None,
      fan_axes: Any = None,
      collection: str = "params",
  ):
    if not isinstance(module, nn.Module):
      raise TypeError(
          f"MuP wraps a Linen module, got {type(module).__name__}; for NNX use "
          "mup_flax.nnx.set_base_shapes(model, base_shapes).")
    if base_shapes is not None:
      if base is not None or delta is not None:
        raise ValueError("give either base and delta, or base_shapes, not both.")
      if isinstance(base_shapes, (str, os.PathLike)):
        base_shapes = _base_shapes.load_base_shapes(base_shapes)
    elif base is None or delta is None:
      raise ValueError(
          "MuP needs base and delta models (MuP(model, base=..., delta=...)) or "
          "base_shapes=...")
    self.module = module
    self.base = base
    self.delta = delta
    self.fan_axes = fan_axes
    self.collection = collection
    self._base_shapes = base_shapes
    self._declarations = None

  def base_shapes(self, *example_args: Any, **example_kwargs: Any) -> Any:
    """The base shapes (computed once from base and delta with these example inputs)."""
    if self._base_shapes is None:
      self._base_shapes = _base_shapes.make_base_shapes(
          self.base, self.delta, *example_args, fan_axes=self.fan_axes,
          collection=self.collection, **example_kwargs)
    return self._base_shapes

  def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any:
    """The model's ``init``, with annotated, μP-initialized parameters."""
    base_shapes = self.base_shapes(*args, **kwargs)
    with _context.shape_only():
      abstract = jax.eval_shape(lambda: self.module.init(rngs, *args, **kwargs))
    if self.collection not in abstract:
      raise ValueError(f"{type(self.module).__name__} has no {self.collection!r} collection.")
    self._declarations = _annotate.declarations_of(abstract[self.collection])
    infshapes = _annotate.get_infshapes(abstract[self.collection], base_shapes)
    with _context.init_infshapes(_annotate.flatten_base_shapes(infshapes)):
      variables = self.module.init(rngs, *args, **kwargs)
    params = _annotate.set_base_shapes(
        variables[self.collection], base_shapes, rescale_params=True)
    return _replace_collection(variables, self.collection, params)

  def annotate(self, variables: Any, *example_args: Any, **example_kwargs: Any) -> Any:
    """Annotates without rescaling (e.g. after restoring plain arrays from a checkpoint).

    Accepts the variables dict or the parameters alone. Example inputs are
    needed before this wrapper's first ``init`` when base shapes must be
    computed from ``base``/``delta``, or when ``variables`` holds plain
    arrays (their boxes lost, so the layers' declarations, such as which
    kernel is a readout, are read from the model with ``jax.eval_shape``).
    """
    base_shapes = self.base_shapes(*example_args, **example_kwargs)
    is_variables = isinstance(variables, Mapping) and self.collection in variables
    params = variables[self.collection] if is_variables else variables
    declarations = None
    if not all(_box.find_box(leaf) is not None for leaf in jax.tree.leaves(
        params, is_leaf=meta.is_axis_metadata)):
      # Plain arrays lost what the layers declared (e.g. which kernel is a readout).
      declarations = self._declared(*example_args, **example_kwargs)
    params = _annotate.annotate_tree(params, base_shapes, False, declarations)
    return _replace_collection(variables, self.collection, params) if is_variables else params

  def _declared(self, *example_args: Any, **example_kwargs: Any) -> dict:
    """What the model's layers declare about their parameters (readout roles, fan axes)."""
    if self._declarations is None:
      if not example_args and not example_kwargs:
        raise ValueError(
            "annotating plain arrays before MuP.init needs the model's example inputs, "
            "to learn what its layers declare (which kernels are readouts): "
            "model.annotate(params, x).")
      with _context.shape_only():
        abstract = jax.eval_shape(lambda: self.module.init(
            jax.random.key(0), *example_args, **example_kwargs))
      self._declarations = _annotate.declarations_of(abstract[self.collection])
    return self._declarations

  def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
    """The model's ``apply`` on (re-)annotated variables (never rescaled)."""
    variables = self.annotate(variables, *args, **_call_kwargs(kwargs))
    return self.module.apply(variables, *args, **kwargs)

  def __repr__(self) -> str:
    return f"MuP({self.module!r})"


_APPLY_KWARGS = ("rngs", "method", "mutable", "capture_intermediates")


def _call_kwargs(kwargs: dict) -> dict:
  """The keyword arguments of ``apply`` that are the model's own inputs."""
  return {k: v for k, v in kwargs.items() if k not in _APPLY_KWARGS}


def _replace_collection(variables: Any, collection: str, params: Any) -> Any:
  if isinstance(variables, meta.AxisMetadata):  # pragma: no cover - defensive
    raise TypeError("variables must be a mapping of collections.")
  new = dict(variables)
  new[collection] = params
  return type(variables)(new) if not isinstance(variables, dict) else new
