"""BatchNorm running statistics at x, the point Schedule-Free evaluates.

A BatchNorm layer accumulates its running mean and variance during training,
at the training params y. Schedule-Free evaluates at x (:func:`eval_params`),
whose activations have other statistics: the stale running averages can cost a
lot of accuracy. The helpers here recompute them at x, over N training
batches, with the layers in batch-statistics mode and everything else as the
caller runs it (evaluation mode, say: no dropout).

The statistics are the population statistics of the N batches ("precise BN",
Wu & Johnson, 2021): the mean of the batch means, and the mean of the batch
variances plus the variance of the batch means, which is the (biased) variance
of the activations over all N batches when they have equal sizes. Each batch is
one jitted forward pass; the forward is compiled once per distinct ``forward``
function and batch shape, so define it once rather than as a new lambda per
call.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp

__all__ = ("recompute_batch_stats", "recompute_batch_stats_nnx")


# ---------------------------------------------------------------------------
# Accumulation: Welford over batch means, running mean of batch variances.
# ---------------------------------------------------------------------------


def _moments_init(moments):
  return jax.tree.map(lambda m: (jnp.zeros_like(m[0]), jnp.zeros_like(m[0]),
                                 jnp.zeros_like(m[1])), moments,
                      is_leaf=lambda x: isinstance(x, tuple))


@jax.jit
def _accumulate(acc, moments, count):
  """One batch: acc holds (mean of means, sum of squared deviations of means, mean of vars)."""

  def update(a, m):
    mean, m2, var = a
    batch_mean, batch_var = m
    n = (count + 1).astype(mean.dtype)
    delta = batch_mean - mean
    mean = mean + delta / n
    m2 = m2 + delta * (batch_mean - mean)
    var = var + (batch_var - var) / n
    return mean, m2, var

  return jax.tree.map(update, acc, moments, is_leaf=lambda x: isinstance(x, tuple))


def _finish(acc, count):
  """Population mean and variance of the batches seen (both terms are >= 0)."""
  return jax.tree.map(
      lambda a: (a[0], (a[2] + a[1] / count).astype(a[2].dtype)),
      acc,
      is_leaf=lambda x: isinstance(x, tuple),
  )


def _batches(batches: Iterable, num_batches: Optional[int]):
  if num_batches is not None:
    if num_batches < 1:
      raise ValueError(f"num_batches must be at least 1, got {num_batches}.")
    batches = itertools.islice(batches, num_batches)
  return batches


def _run(moments_fn, batches, num_batches):
  acc, count = None, 0
  for batch in _batches(batches, num_batches):
    moments = moments_fn(batch)
    if acc is None:
      acc = _moments_init(moments)
    acc = _accumulate(acc, moments, jnp.asarray(count, jnp.int32))
    count += 1
  if count == 0:
    raise ValueError("recompute_batch_stats needs at least one batch; got none.")
  return _finish(acc, count), count


# ---------------------------------------------------------------------------
# Linen.
# ---------------------------------------------------------------------------


def _path_key(path) -> str:
  return "/".join(str(p) for p in path)


class _LinenRecorder:
  """Records, during tracing, every nn.BatchNorm call: its path and momentum."""

  def __init__(self):
    self.momentum = {}

  def __call__(self, next_fun, args, kwargs, context):
    from flax import linen as nn

    module = context.module
    if not isinstance(module, nn.BatchNorm) or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    # Lifted transforms (nn.scan, nn.remat) may trace a call more than once: a
    # path is recorded once. A BatchNorm *shared* by two calls in one forward
    # updates its statistics twice, which cannot be undone: not supported.
    key = _path_key(module.scope.path)
    call_arg = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    use_running_average = (
        module.use_running_average if module.use_running_average is not None else call_arg
    )
    if use_running_average:
      raise ValueError(
          f"recompute_batch_stats: the BatchNorm at '{key}' ran with"
          " use_running_average=True. The forward must run the model in training"
          " mode (e.g. model.apply(variables, x, train=True, mutable=['batch_stats']))."
      )
    momentum = float(module.momentum)
    if momentum >= 1.0:
      raise ValueError(
          f"recompute_batch_stats: the BatchNorm at '{key}' has momentum {momentum}:"
          " its running statistics never change."
      )
    self.momentum[key] = momentum
    return next_fun(*args, **kwargs)


def _subtree(tree, key: str):
  node = tree
  for part in key.split("/") if key else ():
    node = node[part]
  return node


@functools.partial(jax.jit, static_argnums=0)
def _linen_moments(forward, variables, batch):
  """Per BatchNorm path: (batch mean, batch variance) of this batch, at these variables."""
  from flax import linen as nn

  stats = variables["batch_stats"]
  # Zero running statistics: after the forward they hold (1 - momentum) * batch moments.
  zeroed = {**variables, "batch_stats": jax.tree.map(jnp.zeros_like, stats)}
  recorder = _LinenRecorder()
  with nn.intercept_methods(recorder):
    result = forward(zeroed, batch)
  if not (isinstance(result, tuple) and len(result) == 2 and hasattr(result[1], "keys")
          and "batch_stats" in result[1]):
    raise ValueError(
        "recompute_batch_stats: forward(variables, batch) must return what"
        " model.apply(variables, ..., mutable=['batch_stats']) returns: (output,"
        " mutated_variables) with a 'batch_stats' collection."
    )
  if not recorder.momentum:
    raise ValueError(
        "recompute_batch_stats: the forward called no flax.linen.BatchNorm layer."
    )
  mutated = result[1]["batch_stats"]
  moments = {}
  for key, momentum in recorder.momentum.items():
    node = _subtree(mutated, key)
    scale = 1.0 - momentum
    moments[key] = (node["mean"] / scale, node["var"] / scale)
  return moments


def recompute_batch_stats(
    forward: Callable[[Any, Any], tuple[Any, Any]],
    variables: Any,
    batches: Iterable[Any],
    *,
    num_batches: Optional[int] = None,
) -> Any:
  """Recomputes a Linen model's BatchNorm statistics at the given params.

  Typical use, evaluating a Schedule-Free model at x::

    def forward(variables, batch):  # define once: one compilation
      return model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])

    x = sf_optax.eval_params(state.opt_state, state.params)
    batch_stats = sf_optax.recompute_batch_stats(
        forward, {"params": x, "batch_stats": state.batch_stats}, train_batches,
        num_batches=50)
    logits = model.apply({"params": x, "batch_stats": batch_stats}, images, train=False)

  Every ``flax.linen.BatchNorm`` that ``forward`` calls gets the population
  statistics of the activations over the batches (see the module docstring),
  whatever its momentum; other entries of ``batch_stats`` are returned as they
  were. Run ``forward`` with the BatchNorm layers in training mode (batch
  statistics) and, preferably, dropout off. Batches should have equal sizes.

  Args:
    forward: ``forward(variables, batch) -> (output, mutated)``, i.e. a call of
      ``model.apply(variables, ..., mutable=["batch_stats"])`` in training mode.
      Jitted here and compiled once per function object.
    variables: the model's variables with the params to evaluate at (x) and the
      current ``"batch_stats"`` (their values are not used, only their tree).
    batches: an iterable of batches, each passed to ``forward`` as is.
    num_batches: use only the first ``num_batches`` batches.

  Returns:
    The new ``batch_stats``: same tree, shapes and dtypes as the old one.

  Raises:
    ValueError: if there is no batch, if ``forward`` runs a BatchNorm with
      running averages, calls none, or does not return the
      mutated ``batch_stats``.
  """
  if not hasattr(variables, "keys") or "batch_stats" not in variables:
    raise ValueError(
        "recompute_batch_stats: variables must be a dict with a 'batch_stats'"
        f" collection, got {type(variables).__name__} with keys"
        f" {list(variables.keys()) if hasattr(variables, 'keys') else None}."
    )
  stats = variables["batch_stats"]
  moments, _ = _run(functools.partial(_linen_moments, forward, variables), batches, num_batches)

  # Write the new statistics into a copy of the old tree, in the old dtypes.
  from flax import traverse_util
  from flax.core import frozen_dict

  flat = traverse_util.flatten_dict(frozen_dict.unfreeze(stats))
  for key, value in flat.items():
    moment = moments.get(_path_key(key[:-1]))
    if moment is not None and key[-1] in ("mean", "var"):
      flat[key] = moment[0 if key[-1] == "mean" else 1].astype(value.dtype)
  new_stats = traverse_util.unflatten_dict(flat)
  return frozen_dict.freeze(new_stats) if isinstance(stats, frozen_dict.FrozenDict) else new_stats


# ---------------------------------------------------------------------------
# NNX.
# ---------------------------------------------------------------------------


def _nnx_batch_norms(model):
  from flax import nnx

  return [(path, node) for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.BatchNorm)]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _nnx_moments(graphdef, forward, state, batch):
  from flax import nnx

  model = nnx.merge(graphdef, state)
  for _, bn in _nnx_batch_norms(model):
    # A variance no batch takes: a layer that still holds it afterwards computed
    # no batch statistics.
    bn.var[...] = jnp.full_like(bn.var[...], -1)
  forward(model, batch)
  return [(bn.mean[...], bn.var[...]) for _, bn in _nnx_batch_norms(model)]


def _default_forward(model, batch):
  return model(batch)


def recompute_batch_stats_nnx(
    model: Any,
    batches: Iterable[Any],
    *,
    forward: Optional[Callable[[Any, Any], Any]] = None,
    num_batches: Optional[int] = None,
) -> None:
  """Recomputes, in place, the statistics of every ``nnx.BatchNorm`` in ``model``.

  Typical use, with the params of an evaluation copy set to x::

    eval_model = sf_optax.eval_model(model, optimizer)  # a copy at x: new Variables
    eval_model.eval()                                   # dropout off, running stats
    sf_optax.recompute_batch_stats_nnx(eval_model, train_images, num_batches=50)
    logits = eval_model(test_images)

  The BatchNorm layers are switched to batch statistics for the N forward passes
  (their ``use_running_average`` attribute, on a private copy of the model);
  every other module runs as ``model`` is set up, so put it in evaluation mode
  first. If the model passes ``use_running_average`` to its BatchNorm calls
  itself, ``forward`` must select training mode for them. The attributes of
  ``model`` are not changed; only the BatchStat values ``mean`` and ``var`` are.

  Args:
    model: an ``nnx.Module`` holding the params to evaluate at (x).
    batches: an iterable of batches.
    forward: ``forward(model, batch)``; defaults to ``model(batch)``. Jitted
      here and compiled once per function object and batch shape.
    num_batches: use only the first ``num_batches`` batches.

  Raises:
    ValueError: if there is no batch, the model has no ``nnx.BatchNorm``, or a
      BatchNorm computed no batch statistics (it was not called, or ran with
      running averages).
  """
  from flax import nnx

  forward = _default_forward if forward is None else forward
  originals = _nnx_batch_norms(model)
  if not originals:
    raise ValueError("recompute_batch_stats_nnx: the model has no nnx.BatchNorm layer.")
  # A private copy (nnx.clone: new Modules and Variables over the same arrays; a
  # plain merge(*split(model)) would share the Variables): its BatchNorms use
  # batch statistics and momentum 0, so after a forward their mean and var are
  # exactly the batch's.
  work = nnx.clone(model)
  for _, bn in _nnx_batch_norms(work):
    bn.use_running_average = False
    bn.momentum = 0.0
  graphdef, state = nnx.split(work)

  moments, _ = _run(
      lambda batch: _nnx_moments(graphdef, forward, state, batch), batches, num_batches
  )
  missing = [
      "/".join(map(str, path))
      for (path, _), (_, var) in zip(originals, moments)
      if bool(jnp.any(var < 0))
  ]
  if missing:
    raise ValueError(
        "recompute_batch_stats_nnx: these BatchNorm layers computed no batch"
        f" statistics in forward (not called, or called with use_running_average=True):"
        f" {missing}."
    )
  for (_, bn), (mean, var) in zip(originals, moments):
    bn.mean[...] = mean.astype(bn.mean[...].dtype)
    bn.var[...] = var.astype(bn.var[...].dtype)
