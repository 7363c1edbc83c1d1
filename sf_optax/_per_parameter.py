"""Per-parameter static values, and the one spelling of a parameter's path.

A per-parameter setting (a weight-decay mask, learning-rate multipliers, μP's
scales) is given in one of three forms, matched the same way everywhere:

* a single value, for every parameter;
* a tree whose leaves are values: the params' tree, or a prefix of it (a value
  at ``block_0`` holds for every parameter under ``block_0``);
* a function of params returning either of the above, e.g. a lookup of each
  parameter's path in a table.

Values are matched to parameters by path, so a plain dict serves params held in
a ``FrozenDict`` or an ``nnx.State``, and a tree built for the whole model also
serves the subset a wrapper such as ``optax.masked`` hands its inner
transformation (entries that match no parameter are ignored). Every parameter
must get exactly one value: a missing one is an error naming its path.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax


def _key_name(key: Any) -> str:
  """The plain name of one pytree key: dict key, attribute, sequence index."""
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def parameter_path_name(path: Any) -> str:
  """Spells a pytree path the way every error of sf_optax and mup_flax does.

  Args:
    path: a sequence of pytree keys, as ``jax.tree_util.tree_flatten_with_path``
      returns them (``DictKey``, ``GetAttrKey``, ``SequenceKey``,
      ``FlattenedIndexKey``; ``FrozenDict`` and ``nnx.State`` give
      ``DictKey``), or of plain names.

  Returns:
    The keys' names joined by ``/``, e.g. ``"block_0/attn/kernel"``;
    ``"<root>"`` for the empty path (params that are a single array).

  Example:
    >>> import jax, jax.numpy as jnp, sf_optax
    >>> params = {"block_0": {"attn": {"kernel": jnp.ones(2)}}, "scales": [jnp.ones(1)]}
    >>> [sf_optax.parameter_path_name(path)
    ...  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    ['block_0/attn/kernel', 'scales/0']
    >>> sf_optax.parameter_path_name(())
    '<root>'
  """
  names = [_key_name(key) for key in path]
  return "/".join(names) if names else "<root>"


def _path_names(path: Any) -> tuple[str, ...]:
  return tuple(_key_name(key) for key in path)


def per_parameter_values(
    value: Any,
    params: Any,
    *,
    name: str,
    convert: Optional[Callable[[Any], Any]] = None,
    is_leaf: Optional[Callable[[Any], bool]] = None,
) -> Any:
  """Expands a per-parameter setting to one value per parameter.

  Runs in Python (at trace time inside ``jit``): the values are static.

  Args:
    value: a single value, a tree of values matching ``params`` or a prefix of
      it (matched by path), or a function of ``params`` returning either.
    params: the parameters (arrays, or ``jax.ShapeDtypeStruct``; any pytree).
    name: the argument's name, as the user wrote it, for errors.
    convert: applied to each parameter's value (e.g. ``float``); a
      ``TypeError`` or ``ValueError`` it raises is raised again naming ``name``
      and the parameter's path.
    is_leaf: what counts as one parameter inside ``params`` (e.g. an
      ``nnx.Variable`` or a Linen metadata box), as in ``jax.tree.map``.

  Returns:
    A tree with the structure of ``params`` (down to ``is_leaf``) holding each
    parameter's converted value.

  Raises:
    ValueError: naming ``name`` and the path of the first parameter that gets
      no value.

  Example:
    >>> import jax.numpy as jnp, sf_optax
    >>> params = {"embed": jnp.ones(3), "block_0": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}
    >>> sf_optax.per_parameter_values({"embed": 0.5, "block_0": 2.0}, params, name="lr_scales")
    {'block_0': {'bias': 2.0, 'kernel': 2.0}, 'embed': 0.5}
    >>> sf_optax.per_parameter_values(lambda p: {k: k != "embed" for k in p}, params, name="mask")
    {'block_0': {'bias': True, 'kernel': True}, 'embed': False}
  """
  if callable(value):
    value = value(params)
  entries = {
      _path_names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]
  }
  lengths = sorted({len(path) for path in entries})

  def one(path, parameter):
    del parameter
    names = _path_names(path)
    for length in lengths:
      if length > len(names):
        break
      if names[:length] in entries:
        found = entries[names[:length]]
        break
    else:
      given = ", ".join(parameter_path_name(p) for p in list(entries)[:5]) or "nothing"
      raise ValueError(
          f"{name} gives no value for parameter {parameter_path_name(path)}: pass a"
          " single value, a tree matching params (or a prefix of it), or a function"
          f" of params returning one (it gives values for: {given})."
      )
    if convert is None:
      return found
    try:
      return convert(found)
    except (TypeError, ValueError) as error:
      raise type(error)(
          f"{name} for parameter {parameter_path_name(path)}: {error}"
      ) from None

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_leaf)
