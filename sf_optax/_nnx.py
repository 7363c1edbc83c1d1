"""eval_model: a Flax NNX model at x, the point Schedule-Free evaluates.

Flax is imported inside the function, so that ``import sf_optax`` stays free of
it; ``sf_optax.eval_model`` reaches this module lazily.
"""

from __future__ import annotations

from typing import Any, TypeVar

import jax
import optax

from sf_optax._eval_params import eval_params
from sf_optax._eval_params import find_schedule_free_states
from sf_optax._per_parameter import parameter_path_name

__all__ = ("eval_model",)

Model = TypeVar("Model")



def _paths(tree: Any) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda node: isinstance(node, optax.MaskedNode))[0]
  return {parameter_path_name(path): leaf for path, leaf in leaves}


def _listed(names) -> str:
  names = sorted(names)
  return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _check_matches(params: Any, opt_state: Any, wrt: Any) -> None:
  """Each Schedule-Free state covers the params' paths with their shapes.

  Otherwise the optimizer was built for another model (eval_params alone would
  take x of the wrong shapes, with store_x=True).
  """
  hint = (f" Is `optimizer` the nnx.Optimizer of this model, built with"
          f" wrt={getattr(wrt, '__name__', wrt)}?")
  model_leaves = _paths(params)
  for state in find_schedule_free_states(opt_state):
    state_leaves = _paths(state.z)
    if set(state_leaves) != set(model_leaves):
      only_model = set(model_leaves) - set(state_leaves)
      only_state = set(state_leaves) - set(model_leaves)
      raise ValueError(
          "eval_model: the model's trained Variables and the optimizer state differ:"
          + (f" only in the model: {_listed(only_model)};" if only_model else "")
          + (f" only in the optimizer state: {_listed(only_state)};" if only_state else "")
          + hint
      )
    wrong = [
        f"{name}: {tuple(leaf.shape)} in the optimizer state,"
        f" {tuple(model_leaves[name].shape)} in the model"
        for name, leaf in sorted(state_leaves.items())
        if not isinstance(leaf, optax.MaskedNode)
        and tuple(leaf.shape) != tuple(model_leaves[name].shape)
    ]
    if wrong:
      raise ValueError(
          "eval_model: the optimizer state does not match the model's shapes ("
          + "; ".join(wrong[:5]) + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else "")
          + ")." + hint
      )


def _has_sharding_metadata(variable: Any) -> bool:
  return bool(variable.get_metadata().get("out_sharding"))


def eval_model(model: Model, optimizer: Any) -> Model:
  """Returns a copy of an NNX model holding x; ``model`` itself stays at y.

  The NNX counterpart of :func:`eval_params`. ``nnx.Optimizer.update`` leaves
  the training params y in ``model``; the point to evaluate, export and
  checkpoint for inference is x. This returns a new model, built by
  ``nnx.clone``: new Modules and new Variables (updating the copy never writes
  into ``model``), the same graph and metadata (``infshape`` from
  ``mup_flax.nnx.set_base_shapes``, ``out_sharding`` from
  ``nnx.with_partitioning``), and the Variables the optimizer trains set to x.
  Every other Variable (BatchNorm statistics, RNG state, frozen params) keeps
  its value, so ``sf_optax.recompute_batch_stats_nnx(eval_model(...), ...)``
  then fits the copy's BatchNorm statistics to x.

  It works eagerly and under ``nnx.jit``, for ``store_x`` either way, and
  wherever :func:`eval_params` finds the Schedule-Free state (``optax.chain``,
  ``inject_hyperparams``, ``masked``, ``MultiSteps``, ...). Shardings are kept:
  x leaves computed from sharded y and z arrays keep their layout; under a
  mesh, inside a trace, a Variable with ``out_sharding`` metadata is also
  constrained to it (as after a training step), so that XLA cannot pick
  another layout.

  Arrays are immutable, so the copy may share buffers with the training state
  where the values are equal (the Variables the optimizer does not train; x
  itself with ``store_x=True``, eagerly). Keeping the copy while donating the
  training state to a jitted step would invalidate those buffers: take
  ``nnx.clone(eval_model(model, optimizer), arrays=True)`` then.

  Args:
    model: the ``nnx.Module`` trained by ``optimizer``, holding y.
    optimizer: its ``nnx.Optimizer``, built with a Schedule-Free optimizer
      (possibly inside wrappers).

  Returns:
    A new model of the same type, at x.

  Raises:
    TypeError: if ``model`` is not an ``nnx.Module`` or ``optimizer`` not an
      ``nnx.Optimizer``.
    ValueError: if the optimizer holds no Schedule-Free state, or its state does
      not match the model's Variables that it trains (another model).

  Example:
    >>> import jax.numpy as jnp, sf_optax
    >>> from flax import nnx
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, sf_optax.schedule_free_sgd(0.1), wrt=nnx.Param)
    >>> grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)))))(model)
    >>> _ = optimizer.update(model, grads)
    >>> _ = optimizer.update(model, grads)
    >>> model_x = sf_optax.eval_model(model, optimizer)
    >>> print(f"y: {float(model.bias[0]):.3f}, x: {float(model_x.bias[0]):.3f}")
    y: -0.155, x: -0.150
  """
  from flax import nnx

  if not isinstance(model, nnx.Module):
    raise TypeError(
        f"eval_model: model must be an nnx.Module, got {type(model).__name__}."
        " For a Linen or pytree model use sf_optax.eval_params(opt_state, params)."
    )
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
        f"eval_model: optimizer must be an nnx.Optimizer, got {type(optimizer).__name__}."
        " For a plain optax state use sf_optax.eval_params(opt_state, params)."
    )
  graph = getattr(optimizer, "graph", None)
  # The pure trees nnx.Optimizer.update hands optax: the optimizer state was
  # initialised on exactly this tree.
  trained = nnx.state(model, optimizer.wrt, graph=graph)
  params = nnx.as_pure(trained)
  opt_state = nnx.as_pure(optimizer.opt_state)
  if not find_schedule_free_states(opt_state):
    raise ValueError(
        "eval_model: the optimizer state holds no Schedule-Free state"
        " (sf_optax.ScheduleFreeState): build the nnx.Optimizer with an sf_optax"
        " optimizer (possibly inside optax wrappers)."
    )
  _check_matches(params, opt_state, optimizer.wrt)
  x = eval_params(opt_state, params)

  if not jax.sharding.get_abstract_mesh().empty:
    is_variable = lambda v: isinstance(v, nnx.Variable)
    variables = jax.tree.leaves(trained, is_leaf=is_variable)
    specs = jax.tree.leaves(nnx.as_pure(nnx.get_partition_spec(trained)),
                            is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    leaves, treedef = jax.tree.flatten(x)
    leaves = [
        jax.lax.with_sharding_constraint(leaf, spec)
        if isinstance(leaf, jax.core.Tracer) and _has_sharding_metadata(variable) else leaf
        for leaf, variable, spec in zip(leaves, variables, specs, strict=True)
    ]
    x = treedef.unflatten(leaves)

  model_x = nnx.clone(model, graph=graph)
  nnx.update(model_x, x)
  return model_x
