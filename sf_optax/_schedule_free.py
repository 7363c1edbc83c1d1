"""The Schedule-Free engine: one transformation behind every optimizer of the family.

Schedule-Free (Defazio et al., 2024) keeps three sequences: z, moved by a z-step
with the gradient taken at y; x, a weighted average of the z's; and
y = b1 * x + (1 - b1) * z, the point where the next gradient is taken. The
training loop's params are y; evaluation uses x (see :func:`eval_params`).

Per parameter leaf, with lr the learning rate of the step, s = lr_scale and
d = weight_decay * s * weight_decay_scale * mask::

    z' = z + step(g) - lr * d * w        (w = y, or z with weight_decay_at="z")
    x' = x + c * (z' - x)
    y' = b1 * x' + (1 - b1) * z'

The z-step sees z - lr * d * w as its params (the reference decays before the
base step). With ``store_x=False`` the update is computed from (y, z) alone:
y' - y = c (z' - y) + (1 - c) (1 - b1) (z' - z). Per leaf and per step this is a
single elementwise pass: it reads g, y, z (and x), writes z (and x) and the
update y' - y. The scalars of a step (lr, c, b1) come from ``_averaging``; the
z-steps from ``_z_steps``.

A z-step may change those scalars (ScheduleFree+ does, see ``ZStep``): a step
size computed from the gradient, the iterates and the loss (``value``), which
then replaces lr, with global sums over the leaves, so one reduction pass
precedes the per-leaf pass; a decay lr**2 * d' * w (d' with s squared); a b1
per step; c = 1 for the first steps.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sf_optax import _averaging
from sf_optax import _validation
from sf_optax._per_parameter import per_parameter_values
from sf_optax._z_steps import ZStep


class ScheduleFreeState(NamedTuple):
  """State of a Schedule-Free optimizer."""

  count: jax.Array  # int32 []: steps taken
  z: optax.Params  # like params, in state_dtype: the base iterate
  x: Optional[optax.Params]  # like z: the average; None when store_x=False
  weight_sum: jax.Array  # [] float32 or float64: sum of the averaging weights
  weight_sum_compensation: jax.Array  # [] like weight_sum: its Kahan compensation
  lr_max: jax.Array  # [] like weight_sum: largest learning rate so far
  b1: jax.Array  # [] like weight_sum: the interpolation b1 of the last step
  base_state: optax.OptState  # the z-step's own state


class Settings(NamedTuple):
  """The settings every optimizer of the family shares (validated by ``_family``)."""

  learning_rate: optax.ScalarOrSchedule
  b1: Any = 0.9
  weight_decay: Any = 0.0
  weight_decay_at: str = "y"
  mask: Any = None
  lr_scales: Any = None
  weight_decay_scales: Any = None
  warmup_steps: Any = 0
  r: Any = 0.0
  weight_lr_power: Any = 2.0
  state_dtype: Any = None
  store_x: bool = True


class _Scalars(NamedTuple):
  """The scalars of one step, in the bookkeeping dtype."""

  learning_rate: jax.Array  # the learning rate of step k (after warmup and the z-step's factor)
  step_size: Optional[jax.Array]  # multiplies lr_scale * u; None: 1
  decay_rate: jax.Array  # lr * weight_decay
  b1: jax.Array
  averaging: _averaging.Averaging


def _step_scalars(
    z_step: ZStep, settings: Settings, state: ScheduleFreeState, step_size_of=None
) -> tuple[_Scalars, optax.OptState]:
  """The scalars of step k, and the z-step's state (updated by its step-size rule, if any).

  ``step_size_of(lr, b1) -> (step size, base_state)`` is the z-step's rule
  bound to this step's gradient and iterates.
  """
  dtype = state.weight_sum.dtype
  count = state.count
  lr = _averaging.learning_rate_at(
      settings.learning_rate, count, dtype, warmup_steps=settings.warmup_steps,
      factor=z_step.learning_rate_factor,
  )
  if z_step.b1_schedule is None:
    b1 = jnp.asarray(settings.b1, dtype)
  else:
    b1 = z_step.b1_schedule(count, dtype)
  base_state = state.base_state
  if step_size_of is not None:
    lr, base_state = step_size_of(lr, b1)
  if not z_step.applies_learning_rate:
    step_size = -lr
  elif _validation.is_zero(settings.warmup_steps):
    step_size = None
  else:
    step_size = _averaging.warmup_factor(count, settings.warmup_steps, dtype)
  averaging = _averaging.averaging_step(
      count, lr, state.lr_max, state.weight_sum, state.weight_sum_compensation,
      r=settings.r, weight_lr_power=settings.weight_lr_power,
  )
  if not _validation.is_zero(z_step.c_warmup):
    # x follows z (c = 1) and no weight is accumulated; lr_max still grows.
    warm = count < jnp.asarray(z_step.c_warmup, count.dtype)
    averaging = averaging._replace(
        c=jnp.where(warm, jnp.ones([], dtype), averaging.c),
        weight_sum=jnp.where(warm, state.weight_sum, averaging.weight_sum),
        weight_sum_compensation=jnp.where(
            warm, state.weight_sum_compensation, averaging.weight_sum_compensation),
    )
  decay_rate = lr if z_step.decay_power == 1 else lr ** z_step.decay_power
  scalars = _Scalars(
      learning_rate=lr,
      step_size=step_size,
      decay_rate=decay_rate * jnp.asarray(settings.weight_decay, dtype),
      b1=b1,
      averaging=averaging,
  )
  return scalars, base_state


def _per_leaf(value: Any, params: optax.Params, name: str, convert) -> Optional[list[float]]:
  """One static number per parameter leaf, or None when the setting is not given."""
  if value is None:
    return None
  return jax.tree.leaves(per_parameter_values(value, params, name=name, convert=convert))


def _decay_factors(
    settings: Settings, params: optax.Params, n_leaves: int, decay_power: int = 1
) -> list[float]:
  """mask * lr_scale**decay_power * weight_decay_scale per leaf (all 0 without decay)."""
  if _validation.is_zero(settings.weight_decay):
    return [0.0] * n_leaves
  factors = [1.0] * n_leaves
  lr_scales = _per_leaf(settings.lr_scales, params, "lr_scales", _validation.static_float)
  if lr_scales is not None and decay_power != 1:
    lr_scales = [scale ** decay_power for scale in lr_scales]
  for part in (
      _per_leaf(settings.mask, params, "mask", _validation.static_bool),
      lr_scales,
      _per_leaf(
          settings.weight_decay_scales, params, "weight_decay_scales", _validation.static_float
      ),
  ):
    if part is not None:
      factors = [a * b for a, b in zip(factors, part)]
  return factors


class _Memo(dict):
  """Scalars computed once per key (compute dtype, static factor) rather than per leaf.

  With thousands of leaves, scalar arithmetic repeated per leaf is a large part
  of what is traced, lowered and compiled; XLA would merge the copies only
  after paying for them.
  """

  def __init__(self, compute_fn):
    super().__init__()
    self.compute_fn = compute_fn

  def __missing__(self, key):
    value = self[key] = self.compute_fn(*key)
    return value


def _decay_term(y, z, factor, rates, weight_decay_at):
  """lr * weight_decay * factor * (y or z), in the leaf's compute dtype; None if 0."""
  if factor == 0.0:
    return None
  compute = _averaging.float32_or_wider(y.dtype, z.dtype)
  at = y if weight_decay_at == "y" else z
  return rates[compute, factor] * at.astype(compute)


def _scaled_steps(directions, step_size, scales):
  """step_size * lr_scale * u per leaf, in u's compute dtype (u itself if both are 1)."""
  if step_size is None and scales is None:
    return directions
  scales = [None] * len(directions) if scales is None else scales

  def factor(compute, s):
    value = step_size if s is None else (s if step_size is None else step_size * s)
    return jnp.asarray(value).astype(compute)

  factors = _Memo(factor)
  steps = []
  for u, s in zip(directions, scales):
    compute = _averaging.float32_or_wider(u.dtype)
    steps.append(factors[compute, s] * u.astype(compute))
  return steps


def _steps_for_y(direction, steps, updates, base_state, scalars, count, scales, treedef):
  """The z-step's steps for the y update: evaluated again on CPU, shared elsewhere.

  XLA:CPU gives each output its own loop, so a step shared by the z and y loops
  would be written to a params-sized temporary. Where the z-step can evaluate
  its direction from the state it returned, the y loop evaluates it again from
  buffers it reads anyway; the optimization barrier stops XLA from merging the
  two copies (which would bring the temporary back). On GPU and TPU, where one
  kernel can write several outputs, the steps are simply shared. The
  recomputation is traced once, outside the platform branches, so that they
  hold no per-leaf work (with thousands of leaves that is tracing time).
  """
  if direction is None:
    return steps
  updates, base_state = jax.lax.optimization_barrier((updates, base_state))
  directions = direction(updates, base_state, learning_rate=scalars.learning_rate, count=count)
  recomputed = _scaled_steps(treedef.flatten_up_to(directions), scalars.step_size, scales)
  return jax.lax.platform_dependent(
      recomputed, steps, cpu=lambda recomputed, steps: recomputed,
      default=lambda recomputed, steps: steps,
  )


def _interpolation(c, b1, previous_b1=None):
  """Per compute dtype, the scalars of :func:`_move`: computed once, not per leaf.

  ``previous_b1``, when b1 changes from step to step, is the b1 that made y: with
  ``store_x=False`` x = (y - (1 - b1') z) / b1' then, and the update gains a term
  in (1 - c) (b1 / b1' - 1).
  """

  def coefficients(compute):
    c_c, b1_c = c.astype(compute), b1.astype(compute)
    drift = None
    if previous_b1 is not None:
      drift = (1 - c_c) * (b1_c / previous_b1.astype(compute) - 1)
    return c_c, b1_c, 1 - b1_c, (1 - c_c) * (1 - b1_c), drift

  return _Memo(coefficients)


def _move(y, z, x, step, step_for_y, term, interpolation):
  """One leaf of the step: (update y' - y, z', x'), computed in float32 or wider."""
  compute = _averaging.float32_or_wider(y.dtype, z.dtype)
  y_c, z_c = y.astype(compute), z.astype(compute)

  def change_of_z(step):
    return step.astype(compute) if term is None else step.astype(compute) - term

  z_next = z_c + change_of_z(step)
  c_c, b1_c, one_minus_b1, y_coefficient, drift = interpolation[(compute,)]
  if x is not None:
    x_c = x.astype(compute)
    x_next = x_c + c_c * (z_next - x_c)
    y_next = b1_c * x_next + one_minus_b1 * z_next
    return (y_next - y_c).astype(y.dtype), z_next.astype(z.dtype), x_next.astype(x.dtype)
  # Written with z' rather than z so that no kernel reads the old z after z'
  # may have overwritten it in place (otherwise XLA copies z).
  delta_for_y = change_of_z(step_for_y)
  update = c_c * (z_next - y_c) + y_coefficient * delta_for_y
  if drift is not None:
    # With rho = b1 / b1', x = (y - (1 - b1') z) / b1' gives
    # y' - y = c (z' - y) + (1 - c) (1 - b1) (z' - z) + (1 - c) (rho - 1) (y - z);
    # the last term is exactly 0 while b1 does not change.
    update = update + drift * (delta_for_y - (z_next - y_c))
  return update.astype(y.dtype), z_next.astype(z.dtype), None


def _state_dtype(leaf_dtype: Any, state_dtype: Any) -> Any:
  """``state_dtype`` if given; else the params' dtype, but never below float32.

  Half-precision state loses the steps: in float16, (1 - b2) g^2 underflows to
  0 for |g| < 3e-4 and z stops moving by lr-sized steps; in bfloat16, z + step
  rounds the step away once it is below 2^-8 of z.
  """
  return _averaging.float32_or_wider(leaf_dtype) if state_dtype is None else state_dtype


def _copy_as(tree: optax.Params, state_dtype: Any) -> optax.Params:
  # A copy, never an alias of params: params and state are donated together.
  return jax.tree.map(
      lambda p: jnp.array(p, dtype=_state_dtype(jnp.result_type(p), state_dtype), copy=True),
      tree,
  )


def schedule_free_transform(
    z_step: ZStep, settings: Settings
) -> optax.GradientTransformationExtraArgs:
  """The engine: a Schedule-Free transformation around a z-step.

  Args:
    z_step: how z moves (see :class:`~sf_optax._z_steps.ZStep`).
    settings: the common settings, validated (see ``_family``).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a
    :class:`ScheduleFreeState`.
  """
  state_dtype = None if settings.state_dtype is None else jnp.dtype(settings.state_dtype)
  store_x = settings.store_x

  def init_fn(params):
    _validation.check_parameter_dtypes(params)
    dtype = _averaging.float32_or_wider(
        state_dtype, *(jnp.result_type(leaf) for leaf in jax.tree.leaves(params))
    )
    z = _copy_as(params, state_dtype)
    return ScheduleFreeState(
        count=jnp.zeros([], jnp.int32),
        z=z,
        x=_copy_as(params, state_dtype) if store_x else None,
        weight_sum=jnp.zeros([], dtype),
        weight_sum_compensation=jnp.zeros([], dtype),
        lr_max=jnp.asarray(z_step.initial_lr_max, dtype),
        b1=jnp.asarray(settings.b1, dtype),
        base_state=z_step.init(z),
    )

  def update_fn(updates, state, params=None, **extra_args):
    _validation.check_update_inputs(updates, state.z, params)
    # Python scalar leaves are accepted, as by Optax's own transformations.
    updates, params = jax.tree.map(jnp.asarray, (updates, params))
    count = state.count
    step_size_of = None
    if z_step.step_size is not None:

      def step_size_of(learning_rate, b1):
        return z_step.step_size(
            updates, state.base_state, params=params, z=state.z, x=state.x,
            previous_b1=state.b1, b1=b1, learning_rate=learning_rate, count=count,
            **extra_args,
        )

    scalars, base_state = _step_scalars(z_step, settings, state, step_size_of)
    treedef = jax.tree.structure(params)
    leaves_y = treedef.flatten_up_to(params)
    leaves_z = treedef.flatten_up_to(state.z)
    scales = _per_leaf(settings.lr_scales, params, "lr_scales", _validation.static_float)

    rates = _Memo(lambda compute, factor: (scalars.decay_rate * factor).astype(compute))
    decay_terms = [
        _decay_term(y, z, factor, rates, settings.weight_decay_at)
        for y, z, factor in zip(
            leaves_y, leaves_z,
            _decay_factors(settings, params, len(leaves_y), z_step.decay_power))
    ]
    z_seen = treedef.unflatten([
        z if term is None else (z.astype(term.dtype) - term).astype(z.dtype)
        for z, term in zip(leaves_z, decay_terms)
    ])
    result = z_step.update(
        updates, base_state, z_seen, learning_rate=scalars.learning_rate, count=count,
        **extra_args,
    )
    directions, base_state = result[:2]
    direction = result[2] if len(result) == 3 else z_step.direction
    steps = _scaled_steps(treedef.flatten_up_to(directions), scalars.step_size, scales)
    steps_for_y = steps
    if not store_x:
      steps_for_y = _steps_for_y(
          direction, steps, updates, base_state, scalars, count, scales, treedef
      )
    leaves_x = treedef.flatten_up_to(state.x) if store_x else [None] * len(leaves_y)
    previous_b1 = None if z_step.b1_schedule is None or store_x else state.b1
    interpolation = _interpolation(scalars.averaging.c, scalars.b1, previous_b1)
    moved = [
        _move(*leaf, interpolation)
        for leaf in zip(leaves_y, leaves_z, leaves_x, steps, steps_for_y, decay_terms)
    ]
    new_state = ScheduleFreeState(
        count=optax.safe_increment(count),
        z=treedef.unflatten([z for _, z, _ in moved]),
        x=treedef.unflatten([x for _, _, x in moved]) if store_x else None,
        weight_sum=scalars.averaging.weight_sum,
        weight_sum_compensation=scalars.averaging.weight_sum_compensation,
        lr_max=scalars.averaging.lr_max,
        b1=scalars.b1,
        base_state=base_state,
    )
    return treedef.unflatten([update for update, _, _ in moved]), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
