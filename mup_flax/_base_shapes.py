"""Base shapes: which dims of every parameter scale with width, and their base sizes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import yaml
from flax import linen as nn
from flax import nnx
from flax.core import meta

from mup_flax import _box
from mup_flax import _context
from mup_flax import _paths
from mup_flax._annotate import flatten_base_shapes
from mup_flax._infshape import InfDim
from mup_flax._infshape import InfShape

__all__ = ["load_base_shapes", "make_base_shapes", "save_base_shapes"]

FORMAT = "mup_flax.base_shapes"
VERSION = 1

FanAxes = tuple[Any, Any]


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _leaf_info(leaf: Any) -> tuple[tuple[int, ...], FanAxes | None]:
  """Shape and declared fan axes of one parameter leaf (array, box or nnx.Variable)."""
  if _is_variable(leaf):
    fan_axes = leaf.get_metadata("mup_fan_axes", None)
    infshape = leaf.get_metadata("infshape", None)
    if fan_axes is None and infshape is not None and infshape.fan_in_axes is not None:
      fan_axes = (infshape.fan_in_axes, infshape.fan_out_axes)
    return tuple(leaf.shape), fan_axes
  shape = _box.unbox_shape(leaf)
  if shape is None:
    raise ValueError(f"{leaf!r} is not an array, jax.ShapeDtypeStruct or nnx.Variable.")
  return shape, _box.declared_fan_axes(leaf)


def param_shapes(model: Any, args: tuple, kwargs: dict, collection: str = "params"
                 ) -> dict[_paths.Path, tuple[tuple[int, ...], FanAxes | None]]:
  """``{path: (shape, declared fan axes)}`` of a model's parameters, never allocating them.

  ``model`` is a Linen module (initialized under ``jax.eval_shape`` with the
  example inputs), an ``nnx.Module`` (its ``nnx.Param`` state), a
  zero-argument callable returning an ``nnx.Module`` (run under
  ``nnx.eval_shape``), or a pytree of arrays / ``jax.ShapeDtypeStruct``.
  """
  if isinstance(model, nn.Module):
    if not args and not kwargs:
      raise ValueError(
          f"{type(model).__name__} is a Linen module: pass example inputs, e.g. "
          "make_base_shapes(base, delta, x).")
    with _context.shape_only():
      variables = jax.eval_shape(
          lambda: model.init(jax.random.key(0), *args, **kwargs))
    if collection not in variables:
      raise ValueError(f"{type(model).__name__} has no {collection!r} collection.")
    tree = variables[collection]
  else:
    if callable(model) and not isinstance(model, nnx.Module) and not isinstance(
        model, Mapping):
      with _context.shape_only():
        model = nnx.eval_shape(lambda: model(*args, **kwargs))
    if isinstance(model, nnx.Module):
      tree = nnx.state(model, nnx.Param)
    else:
      tree = model
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: meta.is_axis_metadata(x) or _is_variable(x))[0]
  return {_paths.normalize(path): _leaf_info(leaf) for path, leaf in leaves}


def nest(flat: Mapping[_paths.Path, Any]) -> dict:
  """``{('a', 'b'): x}`` -> ``{'a': {'b': x}}``."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
      if not isinstance(node, dict):
        raise ValueError(f"parameter path {_paths.path_str(path)} runs through a parameter.")
    if path[-1] in node:
      raise ValueError(f"parameter path {_paths.path_str(path)} appears twice.")
    node[path[-1]] = value
  return out


def _lookup_fan_axes(fan_axes: Any, path: _paths.Path, shape) -> FanAxes | None:
  if fan_axes is None:
    return None
  if callable(fan_axes):
    return fan_axes(_paths.path_str(path), shape)
  return fan_axes.get(_paths.path_str(path))


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
  base_flat = param_shapes(base, example_args, example_kwargs, collection)
  delta_flat = param_shapes(delta, example_args, example_kwargs, collection)
  for path in base_flat:
    if path not in delta_flat:
      raise ValueError(
          f"parameter {_paths.path_str(path)} (shape {base_flat[path][0]}) is in "
          "the base model but not in the delta model.")
  for path in delta_flat:
    if path not in base_flat:
      raise ValueError(
          f"parameter {_paths.path_str(path)} (shape {delta_flat[path][0]}) is in "
          "the delta model but not in the base model.")
  out = {}
  for path, (base_shape, declared) in base_flat.items():
    delta_shape = delta_flat[path][0]
    if len(base_shape) != len(delta_shape):
      raise ValueError(
          f"parameter {_paths.path_str(path)}: base shape {base_shape} and delta "
          f"shape {delta_shape} differ in rank.")
    axes = _lookup_fan_axes(fan_axes, path, base_shape) or declared
    axes_kwargs = {} if axes is None else dict(fan_in_axis=axes[0], fan_out_axis=axes[1])
    try:
      out[path] = InfShape.from_sizes(base_shape, delta_shape, **axes_kwargs)
    except ValueError as e:
      raise ValueError(
          f"parameter {_paths.path_str(path)} (base shape {base_shape}, delta shape "
          f"{delta_shape}): {e}") from None
  return nest(out)


def _encode(path: _paths.Path, infshape: InfShape) -> dict:
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


def _decode(entry: Any, where: str) -> tuple[_paths.Path, InfShape]:
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
        f"{where} ({'/'.join(map(str, path))}): 'shape' must be positive ints and "
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
    raise ValueError(f"{where} ({'/'.join(path)}): {e}") from None


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
      raise ValueError(f"{where}: parameter {'/'.join(key)} appears twice.")
    flat[key] = infshape
  return nest(flat)
