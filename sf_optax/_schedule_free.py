"""The Schedule-Free transformation: one engine behind every optimizer of the family.

Schedule-Free (Defazio et al., 2024) keeps three sequences: z, moved by a base
step with the gradient taken at y; x, a weighted average of the z's; and
y = b1 * x + (1 - b1) * z, the point where the next gradient is taken. The
training loop's params are y; evaluation uses x (see :func:`eval_params`).

Every optimizer of this package is this engine with a different z-step:
``schedule_free`` takes any Optax transformation, the built-in SGD, AdamW and
RAdam variants take the reference's own directions. Per leaf and per step the
engine is a single elementwise pass: it reads g, y, z (and x), writes z (and x)
and the update y' - y.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import optax

from sf_optax import _averaging
from sf_optax import _replay
from sf_optax import _validation


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


class ZStepUpdate(Protocol):
  """Moves z: returns the change of z due to the gradient, and the new state."""

  def __call__(
      self,
      updates: optax.Updates,
      state: optax.OptState,
      params: optax.Params,
      *,
      learning_rate: jax.Array,
      count: jax.Array,
      scales: Optional[optax.Params],
      **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    ...


class ZStep(NamedTuple):
  """How z moves: the direction of a built-in optimizer, or a wrapped Optax one.

  ``recompute(updates, new_state, *, learning_rate, count, scales)``, when given,
  returns the same steps as ``update`` from the state ``update`` returned. The
  engine uses it on CPU, where XLA gives each output its own loop: rather than
  materialising the steps in a params-sized temporary for the y and z loops to
  share, each loop recomputes them from buffers it reads anyway.
  """

  init: Callable[[optax.Params], optax.OptState]
  update: ZStepUpdate
  recompute: Optional[Callable[..., optax.Updates]] = None


ScalarOrSchedule = optax.ScalarOrSchedule
LearningRateFn = Callable[[jax.Array, Any], jax.Array]
ScaleTree = Any  # a prefix tree of Python floats/bools matching params, or a function of params


def _broadcast_static(name: str, prefix: ScaleTree, params: optax.Params, cast) -> Any:
  """Expands a per-parameter prefix tree of static numbers to the params' tree."""
  if prefix is None:
    return None
  if callable(prefix):
    prefix = prefix(params)
  try:
    return jax.tree.map(
        lambda value, subtree: jax.tree.map(lambda _: cast(name, value), subtree),
        prefix,
        params,
    )
  except ValueError as error:
    raise ValueError(
        f"{name} must be a tree matching params (or a prefix of it), or a function"
        f" of params returning one: {error}"
    ) from None


def _static_float(name: str, value: Any) -> float:
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{name} must hold Python numbers (static), got a traced value.")
  try:
    return float(value)
  except (TypeError, ValueError):
    raise TypeError(f"{name} must hold numbers, got {value!r}.") from None


def _static_bool(name: str, value: Any) -> float:
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{name} must hold Python booleans (static), got a traced value.")
  return 1.0 if bool(value) else 0.0


def _is_zero(value: Any) -> bool:
  return _validation.is_concrete(value) and float(value) == 0.0


def _leaf_dtype(dtype: Any, state_dtype: Any) -> Any:
  return dtype if state_dtype is None else state_dtype


def _copy_as(tree: optax.Params, state_dtype: Any) -> optax.Params:
  # A copy, never an alias of params: params and state are donated together.
  return jax.tree.map(
      lambda p: jnp.array(p, dtype=_leaf_dtype(p.dtype, state_dtype), copy=True), tree
  )


def schedule_free_transform(
    z_step: ZStep,
    learning_rate_fn: LearningRateFn,
    *,
    b1: Any,
    r: Any,
    weight_lr_power: Any,
    weight_decay: Any,
    mask: ScaleTree = None,
    lr_scales: ScaleTree = None,
    weight_decay_scales: ScaleTree = None,
    weight_decay_at: str = "y",
    state_dtype: Any = None,
    store_x: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """The engine: a Schedule-Free transformation around a z-step.

  Per parameter leaf, with lr the step's learning rate and s = lr_scale,
  d = weight_decay * lr_scale * weight_decay_scale * mask::

      z' = z + z_step(g) - lr * d * w        (w = y, or z with weight_decay_at="z")
      x' = x + c * (z' - x)
      y' = b1 * x' + (1 - b1) * z'

  The z-step sees z - lr * d * w as its params (the reference wrapper decays
  before the base step). Decay at z is a plain change of z: x and y follow from
  the same interpolation, so the state stays a valid Schedule-Free state. With ``store_x=False`` the update is computed from
  (y, z) alone: y' - y = c (z' - y) + (1 - c) (1 - b1) (z' - z).

  Args:
    z_step: the base step (see :class:`ZStep`).
    learning_rate_fn: ``(count, dtype) -> lr`` for the step with index count.
    b1: interpolation between x and z.
    r: polynomial weighting power.
    weight_lr_power: power of lr_max in the averaging weights.
    weight_decay: decoupled weight decay taken at y, scaled by lr.
    mask: weight-decay mask (tree of bools or a function of params).
    lr_scales: per-parameter multipliers of the z-step (like torch param groups'
      lr).
    weight_decay_scales: per-parameter multipliers of weight_decay.
    weight_decay_at: "y" (the reference) or "z" (the reference's
      AdamWScheduleFreeReference with decay_at_z).
    state_dtype: dtype of z and x (and the z-step's buffers); None keeps the
      params' dtypes.
    store_x: keep x in the state (exact, free evaluation) or reconstruct it.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a
    :class:`ScheduleFreeState`.
  """
  if weight_decay_at not in ("y", "z"):
    raise ValueError(f'weight_decay_at must be "y" or "z", got {weight_decay_at!r}.')
  state_dtype = None if state_dtype is None else jnp.dtype(state_dtype)
  no_decay = _is_zero(weight_decay)

  def init_fn(params):
    dtype = _averaging.float32_or_wider(
        state_dtype, *(leaf.dtype for leaf in jax.tree.leaves(params))
    )
    z = _copy_as(params, state_dtype)
    return ScheduleFreeState(
        count=jnp.zeros([], jnp.int32),
        z=z,
        x=_copy_as(params, state_dtype) if store_x else None,
        weight_sum=jnp.zeros([], dtype),
        weight_sum_compensation=jnp.zeros([], dtype),
        lr_max=jnp.zeros([], dtype),
        b1=jnp.asarray(b1, dtype),
        base_state=z_step.init(z),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "Schedule-Free optimizers need params (the point y where the gradient was"
          " taken): call update(grads, state, params)."
      )
    for name, tree in (("grads", updates), ("params", params)):
      _validation.check_same_structure(name, tree, "state.z", state.z)
      _validation.check_same_shapes(name, tree, "state.z", state.z)
    dtype = state.weight_sum.dtype
    count = state.count
    lr = jnp.asarray(learning_rate_fn(count, dtype), dtype)
    averaging = _averaging.averaging_step(
        count,
        lr,
        state.lr_max,
        state.weight_sum,
        state.weight_sum_compensation,
        r=r,
        weight_lr_power=weight_lr_power,
    )
    b1_now = jnp.asarray(b1, dtype)
    c = averaging.c

    scales = _broadcast_static("lr_scales", lr_scales, params, _static_float)
    treedef = jax.tree.structure(params)
    leaves_y = treedef.flatten_up_to(params)
    leaves_z = treedef.flatten_up_to(state.z)

    # Decoupled weight decay, per leaf: lr * weight_decay * d * (y or z).
    decay_factors = [0.0] * len(leaves_y)
    if not no_decay:
      parts = [
          _broadcast_static("mask", mask, params, _static_bool),
          scales,
          _broadcast_static("weight_decay_scales", weight_decay_scales, params, _static_float),
      ]
      decay_factors = [1.0] * len(leaves_y)
      for part in parts:
        if part is not None:
          decay_factors = [a * b for a, b in zip(decay_factors, treedef.flatten_up_to(part))]
    decay_rate = lr * jnp.asarray(weight_decay, dtype)

    def decay_term(y, z, factor):
      """lr * weight_decay * factor * (y or z), in the leaf's compute dtype."""
      if factor == 0.0:
        return None
      compute = _averaging.float32_or_wider(y.dtype, z.dtype)
      at = y if weight_decay_at == "y" else z
      return (decay_rate * factor).astype(compute) * at.astype(compute)

    decay_terms = [decay_term(*leaf) for leaf in zip(leaves_y, leaves_z, decay_factors)]
    z_seen = treedef.unflatten([
        z if term is None else (z.astype(term.dtype) - term).astype(z.dtype)
        for z, term in zip(leaves_z, decay_terms)
    ])
    grad_steps, base_state = z_step.update(
        updates,
        state.base_state,
        z_seen,
        learning_rate=lr,
        count=count,
        scales=scales,
        **extra_args,
    )
    leaves_step = treedef.flatten_up_to(grad_steps)
    leaves_step_for_y = leaves_step
    if not store_x and z_step.recompute is not None and getattr(
        z_step.recompute, "available", lambda: True)():
      leaves_step_for_y = treedef.flatten_up_to(
          _steps_for_y(z_step, grad_steps, updates, base_state, lr, count, scales)
      )
    leaves_x = treedef.flatten_up_to(state.x) if store_x else [None] * len(leaves_y)

    new_updates, new_z, new_x = [], [], []
    for y, z, x, step, step_for_y, term in zip(
        leaves_y, leaves_z, leaves_x, leaves_step, leaves_step_for_y, decay_terms
    ):
      compute = _averaging.float32_or_wider(y.dtype, z.dtype)
      y_c, z_c = y.astype(compute), z.astype(compute)

      def change_of_z(step):
        return step.astype(compute) if term is None else step.astype(compute) - term

      delta = change_of_z(step)
      z_next = z_c + delta
      c_c, b1_c = c.astype(compute), b1_now.astype(compute)
      if store_x:
        x_c = x.astype(compute)
        x_next = x_c + c_c * (z_next - x_c)
        y_next = b1_c * x_next + (1 - b1_c) * z_next
        new_updates.append((y_next - y_c).astype(y.dtype))
        new_x.append(x_next.astype(x.dtype))
      else:
        # Written with z' rather than z so that no kernel reads the old z after
        # z' may have overwritten it in place (otherwise XLA copies z).
        delta_for_y = change_of_z(step_for_y)
        new_updates.append(
            (c_c * (z_next - y_c) + (1 - c_c) * (1 - b1_c) * delta_for_y).astype(y.dtype)
        )
      new_z.append(z_next.astype(z.dtype))

    new_state = ScheduleFreeState(
        count=optax.safe_increment(count),
        z=treedef.unflatten(new_z),
        x=treedef.unflatten(new_x) if store_x else None,
        weight_sum=averaging.weight_sum,
        weight_sum_compensation=averaging.weight_sum_compensation,
        lr_max=averaging.lr_max,
        b1=b1_now,
        base_state=base_state,
    )
    return treedef.unflatten(new_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _steps_for_y(z_step, steps, updates, base_state, learning_rate, count, scales):
  """The z-step's steps for the y update: recomputed on CPU, shared elsewhere.

  On CPU the optimization barrier stops XLA from merging the recomputation with
  the original (which would bring back the shared temporary); on GPU and TPU,
  where one kernel can write several outputs, the steps are simply shared.
  """

  def on_cpu(updates, base_state):
    updates, base_state = jax.lax.optimization_barrier((updates, base_state))
    return z_step.recompute(
        updates, base_state, learning_rate=learning_rate, count=count, scales=scales
    )

  return jax.lax.platform_dependent(
      updates, base_state, cpu=on_cpu, default=lambda updates, base_state: steps
  )


def check_common(b1, r, weight_lr_power, warmup_steps=0, **nonnegative) -> None:
  """Validates the hyperparameters every optimizer of the family shares."""
  _validation.check_b1(b1)
  _validation.check_nonnegative(r=r, weight_lr_power=weight_lr_power, **nonnegative)
  _validation.check_warmup_steps(warmup_steps)


def scheduled(learning_rate: ScalarOrSchedule, count: jax.Array, dtype: Any) -> jax.Array:
  """The learning rate at step ``count``: a float, or an Optax schedule evaluated."""
  value = learning_rate(count) if callable(learning_rate) else learning_rate
  return jnp.asarray(value).astype(dtype)


def schedule_free(
    base_optimizer: optax.GradientTransformation,
    learning_rate: ScalarOrSchedule,
    *,
    b1: Any = 0.9,
    warmup_steps: int = 0,
    r: Any = 0.0,
    weight_lr_power: Any = 2.0,
    weight_decay_at_y: Any = 0.0,
    state_dtype: Any = None,
    store_x: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Makes any Optax optimizer Schedule-Free.

  The base optimizer moves z with the gradient taken at y, seeing z as its
  ``params`` (so its own weight decay, if any, acts at z). The wrapper keeps the
  average x and returns updates that move the params to
  :math:`y = b_1 x + (1 - b_1) z`:

  .. math::

    z_{t+1} = z_t + \mathrm{base}(g_t), \quad
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}, \quad
    y_{t+1} = b_1 x_{t+1} + (1 - b_1) z_{t+1},

  with :math:`c_{t+1} = w_{t+1} / \sum_{i \le t+1} w_i` and
  :math:`w_t = t^r \, \mathrm{lr}_{\max}^{p}`. Give the base no momentum of its
  own unless you want both: b1 plays that role.

  Args:
    base_optimizer: any Optax transformation; it moves z.
    learning_rate: the base's learning rate (float or schedule): used for the
      averaging weights and for ``weight_decay_at_y``. Pass the same schedule
      the base uses.
    b1: interpolation between x and z, in (0, 1].
    warmup_steps: linear warmup of the z-step and of the averaging weights. Leave
      it 0 if the base's own schedule warms up already.
    r: polynomial weighting power of the average.
    weight_lr_power: power of lr_max in the averaging weights.
    weight_decay_at_y: decoupled weight decay evaluated at y and scaled by lr,
      applied to z before the base step (x is left unchanged by it).
    state_dtype: dtype of z and x, e.g. ``jnp.float32`` with bf16 params.
    store_x: keep x in the state (default). With ``False`` the state holds no
      x, only the base's bytes plus z, and :func:`eval_params` reconstructs x as
      (y - (1 - b1) z) / b1, which loses precision with low-precision params.

  Returns:
    A ``GradientTransformationExtraArgs``; its state is a
    :class:`ScheduleFreeState` with the base's state in ``base_state``.

  Example:
    >>> import jax.numpy as jnp, optax, sf_optax
    >>> tx = sf_optax.schedule_free(optax.adam(1e-2, b1=0.0), 1e-2)
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.ones(3)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> x = sf_optax.eval_params(state, params)
    >>> bool(jnp.allclose(x["w"], 0.99))  # one Adam step of 1e-2 from 1.0
    True

  References:
    Defazio et al, `The Road Less Scheduled <https://arxiv.org/abs/2405.15682>`_,
    2024
  """
  check_common(b1, r, weight_lr_power, warmup_steps, weight_decay_at_y=weight_decay_at_y)
  if not callable(learning_rate):
    _validation.check_nonnegative(learning_rate=learning_rate)
  base_optimizer = optax.with_extra_args_support(base_optimizer)
  has_warmup = not _is_zero(warmup_steps)

  def learning_rate_fn(count, dtype):
    lr = scheduled(learning_rate, count, dtype)
    if has_warmup:
      lr = lr * _averaging.warmup_factor(count, warmup_steps, dtype)
    return lr

  replays = []

  def warm(steps, learning_rate, count):
    if has_warmup:
      factor = _averaging.warmup_factor(count, warmup_steps, learning_rate.dtype)
      steps = jax.tree.map(
          lambda s: s * factor.astype(_averaging.float32_or_wider(s.dtype)), steps
      )
    return steps

  def update(updates, state, params, *, learning_rate, count, scales, **extra_args):
    del scales
    steps, state, replay = _replay.trace_steps(
        lambda u, s, p: base_optimizer.update(u, s, p, **extra_args), updates, state, params)
    replays[:] = [replay]
    return warm(steps, learning_rate, count), state

  def recompute(updates, state, *, learning_rate, count, scales):
    return warm(replays[0](updates, state), learning_rate, count)

  recompute.available = lambda: replays[0] is not None

  return schedule_free_transform(
      ZStep(base_optimizer.init, update, recompute),
      learning_rate_fn,
      b1=b1,
      r=r,
      weight_lr_power=weight_lr_power,
      weight_decay=weight_decay_at_y,
      state_dtype=state_dtype,
      store_x=store_x,
  )
