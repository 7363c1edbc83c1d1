"""Checks of hyperparameters and trees that run in Python, before any tracing."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sf_optax._per_parameter import parameter_path_name


def is_concrete(value: Any) -> bool:
  """Whether ``value`` is a concrete number that Python may inspect.

  ``optax.inject_hyperparams`` hands traced arrays to the factory inside a jitted
  update: those are never compared in Python.
  """
  if callable(value) or isinstance(value, jax.core.Tracer):
    return False
  try:
    float(value)
  except (TypeError, ValueError):
    return False
  return np.ndim(value) == 0


def is_zero(value: Any) -> bool:
  """Whether ``value`` is known in Python to be 0 (a traced value never is)."""
  return is_concrete(value) and float(value) == 0.0


def check_scalar(
    name: str,
    value: Any,
    *,
    lower: float | None = None,
    upper: float | None = None,
    lower_open: bool = False,
    schedule: bool = False,
) -> None:
  """Raises ValueError naming ``name`` unless ``value`` is a finite number in range.

  Args:
    name: the argument's name, as the user wrote it.
    value: a Python number, a concrete scalar array, a tracer (never inspected:
      ``inject_hyperparams`` under ``jit``) or, with ``schedule``, a function
      of the step (never called here).
    lower: smallest allowed value.
    upper: largest allowed value (inclusive).
    lower_open: whether ``lower`` itself is excluded.
    schedule: whether a function of the step count is allowed.
  """
  if isinstance(value, jax.core.Tracer) or (schedule and callable(value)):
    return
  kind = "a number or an Optax schedule" if schedule else "a number"
  if isinstance(value, (str, bytes)) or not is_concrete(value):
    shape = f" of shape {np.shape(value)}" if _has_shape(value) else ""
    raise ValueError(f"{name} must be {kind}, got {value!r:.60} ({type(value).__name__}{shape}).")
  number = float(value)
  if not math.isfinite(number):
    raise ValueError(f"{name} must be a finite number, got {value!r}.")
  if lower is not None and (number < lower or (lower_open and number == lower)):
    interval = (
        f"({lower}, {upper if upper is not None else 'inf'}"
        if lower_open
        else f"[{lower}, {upper if upper is not None else 'inf'}"
    )
    raise ValueError(
        f"{name} must lie in {interval}{']' if upper is not None else ')'},"
        f" got {value!r}."
    )
  if upper is not None and number > upper:
    raise ValueError(f"{name} must be at most {upper}, got {value!r}.")


def _has_shape(value: Any) -> bool:
  return hasattr(value, "shape") or isinstance(value, (list, tuple))


def check_b1(value: Any) -> None:
  """The interpolation momentum must lie in (0, 1]: x is recovered as (y - (1-b1) z) / b1."""
  check_scalar("b1", value, lower=0.0, upper=1.0, lower_open=True)


def check_nonnegative(**values: Any) -> None:
  """Raises ValueError naming the first value that is not a finite number >= 0."""
  for name, value in values.items():
    check_scalar(name, value, lower=0.0)


# The averaging weights (k+1)**r * lr_max**weight_lr_power are tested (without
# under- or overflow, c within a few float32 ulps) up to these powers over 1e8 steps.
MAX_R = 10.0
MAX_WEIGHT_LR_POWER = 16.0


def check_decay(name: str, value: Any) -> None:
  """An exponential-average decay (b2, b3) must lie in [0, 1)."""
  check_scalar(name, value, lower=0.0, upper=1.0)
  if is_concrete(value) and float(value) == 1.0:
    raise ValueError(f"{name} must lie in [0, 1), got {value!r}.")


def check_adaptive(**values: Any) -> None:
  """Decays (``b2``, ``b3``) in [0, 1) and a positive ``eps`` of an adaptive z-step.

  eps divides: with eps = 0 a parameter whose gradients have all been 0 gets
  0 / 0 = NaN.
  """
  for name, value in values.items():
    if name == "eps":
      check_scalar("eps", value, lower=0.0, lower_open=True)
    else:
      check_decay(name, value)


def check_base_optimizer(base_optimizer: Any) -> None:
  """The wrapper's base must be an Optax transformation (an init and an update)."""
  if not (callable(getattr(base_optimizer, "init", None))
          and callable(getattr(base_optimizer, "update", None))):
    raise TypeError(
        "base_optimizer must be an Optax GradientTransformation (e.g. optax.adam(1e-3,"
        f" b1=0.0)), got {type(base_optimizer).__name__}: {base_optimizer!r:.80}."
    )


def check_learning_rate(learning_rate: Any) -> None:
  """A finite number >= 0, or an Optax schedule."""
  check_scalar("learning_rate", learning_rate, lower=0.0, schedule=True)


def check_weight_decay_at(weight_decay_at: Any) -> None:
  if weight_decay_at not in ("y", "z"):
    raise ValueError(f'weight_decay_at must be "y" or "z", got {weight_decay_at!r}.')


def check_settings(settings: Any) -> None:
  """Validates the settings every optimizer of the family shares (``_schedule_free.Settings``)."""
  check_learning_rate(settings.learning_rate)
  check_b1(settings.b1)
  check_nonnegative(weight_decay=settings.weight_decay)
  check_scalar("r", settings.r, lower=0.0, upper=MAX_R)
  check_scalar("weight_lr_power", settings.weight_lr_power, lower=0.0, upper=MAX_WEIGHT_LR_POWER)
  check_warmup_steps(settings.warmup_steps)
  check_weight_decay_at(settings.weight_decay_at)


def check_update_inputs(updates: Any, z: Any, params: Any) -> None:
  """The gradients and params of an update must be trees like the state's z."""
  if params is None:
    raise ValueError(
        "Schedule-Free optimizers need params (the point y where the gradient was"
        " taken): call update(grads, state, params)."
    )
  for name, tree in (("grads", updates), ("params", params)):
    check_same_structure(name, tree, "state.z", z)
    check_same_shapes(name, tree, "state.z", z)
  check_parameter_dtypes(params)


def check_parameter_dtypes(params: Any) -> None:
  """Raises TypeError naming the first parameter that is not real floating point.

  Integer params would truncate every step to 0 while z moves; complex params
  are not supported (the averaging and the adaptive directions are real).
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = np.dtype(jnp.result_type(leaf))
    if jnp.issubdtype(dtype, jnp.floating):
      continue
    where = f"parameter {parameter_path_name(path)} has dtype {dtype}"
    if jnp.issubdtype(dtype, jnp.complexfloating):
      raise TypeError(
          f"{where}: Schedule-Free optimizers of sf_optax take real floating-point params;"
          " store a complex parameter as its real and imaginary parts."
      )
    raise TypeError(
        f"{where}: Schedule-Free optimizers move params by fractional steps, which an"
        " integer or boolean parameter would truncate to 0. Cast it to a floating dtype,"
        " or leave it out of the optimizer (optax.masked / optax.partition)."
    )


def check_step_count(name: str, value: Any) -> None:
  """A number of steps must be a nonnegative integer."""
  if not is_concrete(value):
    return
  check_scalar(name, value, lower=0.0)
  if float(value) != int(float(value)):
    raise ValueError(f"{name} must be an integer, got {value!r}.")


def check_warmup_steps(warmup_steps: Any) -> None:
  check_scalar("warmup_steps", warmup_steps, lower=0.0)
  if not is_concrete(warmup_steps):
    return
  if float(warmup_steps) != int(float(warmup_steps)):
    raise ValueError(f"warmup_steps must be an integer, got {warmup_steps!r}.")


def static_float(value: Any) -> float:
  """A per-parameter number known in Python (not traced), as a float."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError("must hold Python numbers (static), got a traced value.")
  try:
    return float(value)
  except (TypeError, ValueError):
    raise TypeError(f"must hold numbers, got {value!r}.") from None


def static_bool(value: Any) -> float:
  """A per-parameter flag known in Python (not traced), as 1.0 or 0.0."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError("must hold Python booleans (static), got a traced value.")
  return 1.0 if bool(value) else 0.0


def _paths(tree: Any) -> set[str]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {parameter_path_name(path) for path, _ in leaves}


def check_same_structure(name: str, tree: Any, state_name: str, state_tree: Any) -> None:
  """Raises ValueError if ``tree`` and ``state_tree`` are not the same tree.

  The message names the paths present in one tree and not the other, so a user
  can see which parameter went missing or appeared.
  """
  if jax.tree.structure(tree) == jax.tree.structure(state_tree):
    return
  mine, theirs = _paths(tree), _paths(state_tree)
  only_mine = sorted(mine - theirs)[:5]
  only_theirs = sorted(theirs - mine)[:5]
  details = []
  if only_mine:
    details.append(f"paths in {name} but not in {state_name}: {', '.join(only_mine)}")
  if only_theirs:
    details.append(f"paths in {state_name} but not in {name}: {', '.join(only_theirs)}")
  if not details:
    details.append(
        f"{name} has structure {jax.tree.structure(tree)}, {state_name} has"
        f" {jax.tree.structure(state_tree)}"
    )
  raise ValueError(
      f"The tree of {name} does not match the optimizer state ({state_name}): "
      + "; ".join(details)
      + "."
  )


def check_same_shapes(name: str, tree: Any, state_name: str, state_tree: Any) -> None:
  """Raises ValueError naming the first leaf whose shape differs from the state's.

  Without it a (2,) gradient for a (3, 2) parameter would broadcast silently.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  state_leaves = jax.tree.leaves(state_tree)
  for (path, leaf), state_leaf in zip(leaves, state_leaves):
    if np.shape(leaf) != np.shape(state_leaf):
      raise ValueError(
          f"{name} at {parameter_path_name(path)} has shape {np.shape(leaf)}, but"
          f" {state_name} has shape {np.shape(state_leaf)} there."
      )
