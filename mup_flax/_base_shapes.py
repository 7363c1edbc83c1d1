"""Base shapes: which dims of every parameter scale with width, and their base sizes.

Everything about base shapes lives here: making them from a base and a delta
model (:func:`make_base_shapes`), saving and loading them, flattening them to
``{path: InfShape}``, and the target model's InfShapes derived from them
(:func:`target_infshapes`, computed once per annotation) or read back from an
annotated model (:func:`get_infshapes`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import yaml
from flax import linen as nn
from flax import nnx

from mup_flax import _metadata
from mup_flax._infshape import InfDim
from mup_flax._infshape import InfShape
from mup_flax._metadata import Path
from sf_optax import parameter_path_name

__all__ = ["get_infshapes", "load_base_shapes", "make_base_shapes", "save_base_shapes"]

FORMAT = "mup_flax.base_shapes"
VERSION = 1

FanAxes = tuple[Any, Any]


def parameter_tree(model: Any, args: tuple, kwargs: dict, collection: str = "params") -> Any:
  """A model's parameters, abstract where the model must be built (never allocated).

  ``model`` is a Linen module (initialized under ``jax.eval_shape`` with the
  example inputs: one trace of its ``init``), an ``nnx.Module`` (its
  ``nnx.Param`` state), a zero-argument callable returning an ``nnx.Module``
  (run under ``nnx.eval_shape``), or a pytree of arrays / ``jax.ShapeDtypeStruct``.
  """
  if isinstance(model, nn.Module):
    if not args and not kwargs:
      raise ValueError(
          f"{type(model).__name__} is a Linen module: pass example inputs, e.g. "
          "make_base_shapes(base, delta, x).")
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
    if collection not in variables:
      raise ValueError(f"{type(model).__name__} has no {collection!r} collection.")
    return variables[collection]
  if callable(model) and not isinstance(model, (nnx.Module, Mapping)):
    model = nnx.eval_shape(lambda: model(*args, **kwargs))
  if isinstance(model, nnx.Module):
    return nnx.state(model, nnx.Param)
  return model


def _shapes_and_fan_axes(tree: Any) -> dict[Path, tuple[tuple[int, ...], FanAxes | None]]:
  """``{path: (shape, declared fan axes)}`` of every parameter of a tree."""
  out = {}
  for path, parameter in _metadata.parameters(tree)[0]:
    shape = _metadata.shape_of(parameter)
    if shape is None:
      raise ValueError(
          f"parameter {parameter_path_name(path)} is {type(parameter).__name__}, not an array, "
          "jax.ShapeDtypeStruct or nnx.Variable.")
    out[path] = (shape, _metadata.declarations_of(parameter).get(_metadata.FAN_AXES))
  return out


def nest(flat: Mapping[Path, Any]) -> dict:
  """``{('a', 'b'): x}`` -> ``{'a': {'b': x}}``."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
      if not isinstance(node, dict):
        raise ValueError(f"parameter path {parameter_path_name(path)} runs through a parameter.")
    if path[-1] in node:
      raise ValueError(f"parameter path {parameter_path_name(path)} appears twice.")
    node[path[-1]] = value
  return out


def flatten_base_shapes(base_shapes: Any) -> dict[Path, InfShape]:
  """``{path: InfShape}`` of a base-shapes tree (any container type)."""
  flat = {}
  for path, leaf in _metadata.parameters(base_shapes)[0]:
    if not isinstance(leaf, InfShape):
      raise ValueError(
          f"base shapes entry {parameter_path_name(path)} is {type(leaf).__name__}, not an "
          "InfShape; build base shapes with mup_flax.make_base_shapes or "
          "mup_flax.load_base_shapes.")
    flat[path] = leaf
  return flat


def target_infshapes(shapes: Mapping[Path, tuple[int, ...]], base_shapes: Any
                     ) -> dict[Path, InfShape]:
  """``{path: InfShape}`` of the target model's parameters of these ``shapes``.

  Raises a ``ValueError`` naming the parameter when it is missing from the base
  shapes, when its rank or a finite dim differs from its base shape, and when
  the base shapes hold parameters the model lacks.
  """
  flat_base = flatten_base_shapes(base_shapes)
  out = {}
  for path, shape in shapes.items():
    base = flat_base.get(path)
    if base is None:
      raise ValueError(
          f"parameter {parameter_path_name(path)} (shape {tuple(shape)}) is not in the base "
          "shapes: the base shapes were made for another model.")
    try:
      out[path] = base.with_shape(shape)
    except ValueError as e:
      raise ValueError(
          f"parameter {parameter_path_name(path)}: base shape {base.base_shape} (infinite axes "
          f"{[i for i, d in enumerate(base.dims) if d.is_infinite()]}) does not match "
          f"target shape {tuple(shape)}: {e}") from None
  extra = sorted(set(flat_base) - set(shapes))
  if extra:
    raise ValueError(
        "the base shapes have parameters the model lacks: "
        f"{', '.join(parameter_path_name(p) for p in extra[:5])}{' ...' if len(extra) > 5 else ''}; "
        "they were made for another model.")
  return out


def get_infshapes(params: Any, base_shapes: Any = None) -> Any:
  """The static tree of :class:`InfShape` of annotated parameters.

  The result has the tree structure of the *unboxed* parameters (what Optax
  sees): ``nn.meta.unbox(params)`` for Linen, ``nnx.as_pure(nnx.state(model,
  nnx.Param))`` for NNX, or ``params`` itself for plain arrays. It is built
  once, outside ``jit``, and handed to the μP optimizers.

  Args:
    params: Linen parameters annotated by :class:`mup_flax.MuP` or
      :func:`mup_flax.set_base_shapes` (``InfShapeBox`` leaves, possibly nested
      with ``nn.Partitioned``); an ``nnx.Module`` or ``nnx.State`` annotated by
      :func:`mup_flax.nnx.set_base_shapes`; a tree of :class:`InfShape`
      (returned as it is); or plain arrays / ``jax.ShapeDtypeStruct`` together
      with ``base_shapes``.
    base_shapes: a base-shapes tree from :func:`mup_flax.make_base_shapes` or
      :func:`mup_flax.load_base_shapes`. When given, the annotations already
      on ``params`` are ignored and every InfShape is computed from it.

  Returns:
    A pytree of :class:`InfShape`, one per parameter.

  Raises:
    ValueError: a parameter carries no InfShape (and no ``base_shapes`` are
      given), or does not match the base shapes; naming the parameter.

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
  leaves, treedef = _metadata.parameters(params)
  if base_shapes is not None:
    targets = target_infshapes(
        {path: _metadata.shape_of(leaf) for path, leaf in leaves}, base_shapes)
    return treedef.unflatten([targets[path] for path, _ in leaves])
  infshapes = []
  for path, leaf in leaves:
    infshape = _metadata.infshape_of(leaf)
    if infshape is None:
      raise ValueError(
          f"parameter {parameter_path_name(path)} carries no InfShape: annotate the parameters "
          "first (Linen: mup_flax.MuP(...).init, or mup_flax.set_base_shapes(params, "
          "base_shapes, rescale_params=...); NNX: mup_flax.nnx.set_base_shapes(model, "
          "...)), or pass base_shapes to get_infshapes.")
    infshapes.append(infshape)
  return treedef.unflatten(infshapes)


def _lookup_fan_axes(fan_axes: Any, path: Path, shape) -> FanAxes | None:
  if fan_axes is None:
    return None
  if callable(fan_axes):
    return fan_axes(parameter_path_name(path), shape)
  return fan_axes.get(parameter_path_name(path))


def make_base_shapes(
    base: Any,
    delta: Any,
    *example_args: Any,
    fan_axes: Mapping[str, FanAxes] | Callable[[str, tuple], FanAxes | None] | None = None,
    collection: str = "params",
    **example_kwargs: Any,
) -> dict:
  """Base shapes from a base model and a delta model that differ only in width.

  A dim is infinite iff it differs between ``base`` and ``delta``; its base
  size is the base model's. Shapes come from ``jax.eval_shape`` /
  ``nnx.eval_shape``: no model is allocated.

  Args:
    base: the base model: a Linen module (with ``example_args``), an
      ``nnx.Module``, a zero-argument callable building an ``nnx.Module``
      (``lambda: MLP(64, rngs=nnx.Rngs(0))``), or a pytree of arrays /
      ``jax.ShapeDtypeStruct``.
    delta: the same model at another width (the same kind of object).
    *example_args: example inputs of a Linen module's ``__call__`` (only their
      shapes matter); for a callable, its arguments.
    fan_axes: for kernels with an ambiguous layout that are not declared with
      :func:`mup_flax.with_fan_axes` in the model: ``{"Dense_0/kernel":
      (fan_in_axes, fan_out_axes)}`` or a function ``(path, shape) ->
      (fan_in_axes, fan_out_axes) | None``.
    collection: the Linen variable collection holding the parameters.
    **example_kwargs: keyword example inputs.

  Returns:
    A nested dict (mirroring the parameters) of :class:`InfShape` at the base
    size, to pass to :func:`set_base_shapes`, :class:`MuP` or
    :func:`save_base_shapes`.

  Raises:
    ValueError: base and delta have different parameters, or ranks, naming
      the parameter path and both shapes; or a parameter has more than two
      infinite dims.

  >>> import jax.numpy as jnp
  >>> import flax.linen as nn
  >>> x = jnp.ones((1, 3))
  >>> shapes = make_base_shapes(nn.Dense(8), nn.Dense(16), x)
  >>> shapes["kernel"], shapes["bias"]
  (InfShape((FinDim(3), InfDim(8, 8))), InfShape((InfDim(8, 8),)))
  """
  base_flat = _shapes_and_fan_axes(
      parameter_tree(base, example_args, example_kwargs, collection))
  delta_flat = _shapes_and_fan_axes(
      parameter_tree(delta, example_args, example_kwargs, collection))
  for path in base_flat:
    if path not in delta_flat:
      raise ValueError(
          f"parameter {parameter_path_name(path)} (shape {base_flat[path][0]}) is in "
          "the base model but not in the delta model.")
  for path in delta_flat:
    if path not in base_flat:
      raise ValueError(
          f"parameter {parameter_path_name(path)} (shape {delta_flat[path][0]}) is in "
          "the delta model but not in the base model.")
  out = {}
  for path, (base_shape, declared) in base_flat.items():
    delta_shape = delta_flat[path][0]
    if len(base_shape) != len(delta_shape):
      raise ValueError(
          f"parameter {parameter_path_name(path)}: base shape {base_shape} and delta "
          f"shape {delta_shape} differ in rank.")
    axes = _lookup_fan_axes(fan_axes, path, base_shape) or declared
    axes_kwargs = {} if axes is None else dict(fan_in_axis=axes[0], fan_out_axis=axes[1])
    try:
      out[path] = InfShape.from_sizes(base_shape, delta_shape, **axes_kwargs)
    except ValueError as e:
      raise ValueError(
          f"parameter {parameter_path_name(path)} (base shape {base_shape}, delta shape "
          f"{delta_shape}): {e}") from None
  return nest(out)


def _encode(path: Path, infshape: InfShape) -> dict:
  entry = {
      "path": list(path),
      "shape": list(infshape.base_shape),
      "infinite": [d.is_infinite() for d in infshape.dims],
  }
  if infshape.fan_in_axes is not None and (
      infshape.fan_in_axes != (infshape.ndim - 2,)
      or infshape.fan_out_axes != (infshape.ndim - 1,)):
    entry["fan_in_axes"] = list(infshape.fan_in_axes)
    entry["fan_out_axes"] = list(infshape.fan_out_axes)
  return entry


def _decode(entry: Any, where: str) -> tuple[Path, InfShape]:
  if not isinstance(entry, dict):
    raise ValueError(f"{where}: entry is {type(entry).__name__}, expected a mapping.")
  required = {"path", "shape", "infinite"}
  allowed = required | {"fan_in_axes", "fan_out_axes"}
  if not required <= set(entry) or set(entry) - allowed:
    raise ValueError(
        f"{where}: entry keys {sorted(entry)} are not {sorted(required)} "
        "(+ optional fan_in_axes, fan_out_axes).")
  path, shape, infinite = entry["path"], entry["shape"], entry["infinite"]
  if (not isinstance(path, list) or not path
      or not all(isinstance(k, str) for k in path)):
    raise ValueError(f"{where}: 'path' must be a non-empty list of strings, got {path!r}.")
  if (not isinstance(shape, list) or not isinstance(infinite, list)
      or len(shape) != len(infinite)
      or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
      or not all(isinstance(f, bool) for f in infinite)):
    raise ValueError(
        f"{where} ({parameter_path_name(path)}): 'shape' must be positive ints and "
        f"'infinite' booleans of the same length, got {shape!r} and {infinite!r}.")
  dims = [InfDim(s if inf else None, s) for s, inf in zip(shape, infinite)]
  axes = {}
  if ("fan_in_axes" in entry) != ("fan_out_axes" in entry):
    raise ValueError(f"{where}: fan_in_axes and fan_out_axes come together.")
  if "fan_in_axes" in entry:
    axes = dict(fan_in_axis=tuple(entry["fan_in_axes"]),
                fan_out_axis=tuple(entry["fan_out_axes"]))
  try:
    return tuple(path), InfShape(dims, **axes)
  except ValueError as e:
    raise ValueError(f"{where} ({parameter_path_name(path)}): {e}") from None


def _format_of(path: str | os.PathLike) -> str:
  ext = os.path.splitext(os.fspath(path))[1].lower()
  if ext == ".json":
    return "json"
  if ext in (".yaml", ".yml"):
    return "yaml"
  raise ValueError(f"base shapes file {os.fspath(path)!r}: use a .json, .yaml or .yml name.")


def save_base_shapes(base_shapes: Any, path: str | os.PathLike) -> None:
  """Writes base shapes to a human-readable JSON (``.json``) or YAML (``.yaml``) file.

  One entry per parameter: its path, base shape, which dims are infinite and
  (when not the default ``(-2, -1)``) its fan axes. :func:`load_base_shapes`
  reads it back exactly.

  >>> import os, tempfile
  >>> import jax.numpy as jnp
  >>> shapes = make_base_shapes({"w": jnp.zeros((8, 3))}, {"w": jnp.zeros((16, 3))})
  >>> path = os.path.join(tempfile.mkdtemp(), "mlp.json")
  >>> save_base_shapes(shapes, path)
  >>> load_base_shapes(path) == shapes
  True
  """
  kind = _format_of(path)
  flat = flatten_base_shapes(base_shapes)
  document = {
      "format": FORMAT,
      "version": VERSION,
      "parameters": [_encode(p, s) for p, s in flat.items()],
  }
  with open(path, "w") as f:
    if kind == "json":
      json.dump(document, f, indent=1)
      f.write("\n")
    else:
      yaml.safe_dump(document, f, sort_keys=False, default_flow_style=None)


def load_base_shapes(path: str | os.PathLike) -> dict:
  """Reads base shapes written by :func:`save_base_shapes`.

  Raises:
    ValueError: the file is not valid JSON/YAML or not a mup_flax base-shapes
      file, naming what is wrong. A file made for another model is caught when
      the base shapes are applied (:func:`set_base_shapes` names the parameter).

  >>> import os, tempfile
  >>> path = os.path.join(tempfile.mkdtemp(), "bad.json")
  >>> with open(path, "w") as f:
  ...   _ = f.write('{"format": "mup_flax.base_shapes", "version": 1')
  >>> load_base_shapes(path)
  Traceback (most recent call last):
  ...
  ValueError: base shapes file '...bad.json' is corrupt: ...
  """
  kind = _format_of(path)
  with open(path) as f:
    text = f.read()
  try:
    document = json.loads(text) if kind == "json" else yaml.safe_load(text)
  except (json.JSONDecodeError, yaml.YAMLError) as e:
    raise ValueError(f"base shapes file {os.fspath(path)!r} is corrupt: {e}") from None
  where = f"base shapes file {os.fspath(path)!r}"
  if not isinstance(document, dict) or document.get("format") != FORMAT:
    raise ValueError(f"{where} is not a {FORMAT} file (no 'format: {FORMAT}').")
  if document.get("version") != VERSION:
    raise ValueError(f"{where} has version {document.get('version')!r}; expected {VERSION}.")
  entries = document.get("parameters")
  if not isinstance(entries, list):
    raise ValueError(f"{where}: 'parameters' must be a list.")
  flat = {}
  for i, entry in enumerate(entries):
    key, infshape = _decode(entry, f"{where}, parameter {i}")
    if key in flat:
      raise ValueError(f"{where}: parameter {parameter_path_name(key)} appears twice.")
    flat[key] = infshape
  return nest(flat)
