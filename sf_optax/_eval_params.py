"""eval_params: the evaluation point x, found anywhere inside an optimizer state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sf_optax import _averaging
from sf_optax._per_parameter import parameter_path_name
from sf_optax._schedule_free import ScheduleFreeState


def _is_schedule_free_state(node: Any) -> bool:
  return isinstance(node, ScheduleFreeState)


def find_schedule_free_states(opt_state: optax.OptState) -> list[ScheduleFreeState]:
  """Every :class:`ScheduleFreeState` inside ``opt_state``, in tree order.

  Works through any nesting of NamedTuples, tuples, lists and dicts, which is how
  ``optax.chain``, ``inject_hyperparams``, ``masked``, ``partition``,
  ``MultiSteps`` and ``apply_if_finite`` store their inner states.
  """
  leaves = jax.tree.leaves(opt_state, is_leaf=_is_schedule_free_state)
  return [leaf for leaf in leaves if _is_schedule_free_state(leaf)]


def _x_from_y_and_z(y: jax.Array, z: jax.Array, b1: jax.Array) -> jax.Array:
  compute = _averaging.float32_or_wider(y.dtype, z.dtype)
  b1 = b1.astype(compute)
  x = (y.astype(compute) - (1 - b1) * z.astype(compute)) / b1
  # b1 = 0 (refused when concrete; reachable traced through inject_hyperparams)
  # makes y = z: x is lost, and NaN says so rather than inf or a wrong number.
  return jnp.where(b1 > 0, x, jnp.nan).astype(y.dtype)


def eval_params(opt_state: optax.OptState, params: optax.Params) -> optax.Params:
  """Returns x, the point to evaluate and checkpoint, given the training params y.

  This replaces the reference's ``optimizer.eval()``: nothing is switched and
  nothing is modified. The Schedule-Free state may sit anywhere inside
  ``opt_state`` (under ``optax.chain``, ``inject_hyperparams``, ``masked``,
  ``partition``, ``MultiSteps``, ``apply_if_finite``). Parameters that no
  Schedule-Free state covers (masked out, or in another partition) are returned
  as they are. With ``store_x=True`` x is read from the state (no arithmetic);
  with ``store_x=False`` it is reconstructed as (y - (1 - b1) z) / b1, one
  elementwise pass. A b1 of 0 (refused by every factory, but reachable as a
  traced value through ``optax.inject_hyperparams``) makes y = z: with
  ``store_x=False`` x is then lost and comes back as NaN.

  Args:
    opt_state: the optimizer state.
    params: the training params y, the tree the optimizer was initialised with.

  Returns:
    A tree like ``params``, in the params' dtypes.

  Raises:
    ValueError: if ``opt_state`` contains no Schedule-Free state, or its trees
      or shapes do not match ``params`` (naming the parameter's path).

  Example:
    >>> import jax.numpy as jnp, optax, sf_optax
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), sf_optax.schedule_free_sgd(0.5))
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.ones(2), state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> print(params, sf_optax.eval_params(state, params))
    [-0.35355338 -0.35355338] [-0.35355338 -0.35355338]
  """
  states = find_schedule_free_states(opt_state)
  if not states:
    raise ValueError(
        "eval_params found no Schedule-Free state (sf_optax.ScheduleFreeState) in"
        f" the optimizer state of type {type(opt_state).__name__}: was it built by"
        " an sf_optax optimizer?"
    )
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path for path, _ in leaves_with_paths]
  leaves_y = [jnp.asarray(leaf) for _, leaf in leaves_with_paths]
  result = list(leaves_y)
  covered = [False] * len(leaves_y)
  for state in states:
    try:
      leaves_z = treedef.flatten_up_to(state.z)
      leaves_x = treedef.flatten_up_to(state.x) if state.x is not None else None
    except ValueError as error:
      raise ValueError(
          f"eval_params: params do not match the optimizer state's tree: {error}"
      ) from None
    for i, z in enumerate(leaves_z):
      if isinstance(z, optax.MaskedNode):
        continue
      if covered[i]:
        raise ValueError(
            "eval_params: a parameter is covered by two Schedule-Free states;"
            " x is ambiguous."
        )
      covered[i] = True
      if jnp.shape(z) != leaves_y[i].shape:
        raise ValueError(
            f"eval_params: params at {parameter_path_name(paths[i])} has shape"
            f" {leaves_y[i].shape}, but the optimizer state holds shape {jnp.shape(z)}"
            " there: pass the params the optimizer is training."
        )
      if leaves_x is not None:
        result[i] = leaves_x[i].astype(leaves_y[i].dtype)
      else:
        result[i] = _x_from_y_and_z(leaves_y[i], z, state.b1)
  return treedef.unflatten(result)
