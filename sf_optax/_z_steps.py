"""How z moves: the z-steps of the Schedule-Free family, as small named building blocks.

A z-step turns the gradient g (taken at y) into a direction u; the engine moves
z by ``step_size * lr_scale * u``, where the step size is -lr for the built-in
directions and the warmup factor for a wrapped Optax optimizer (whose output is
a step already):

=============  =====================================  ==================================
z-step         direction u                            learning-rate factor
=============  =====================================  ==================================
sgd            g                                      1
adamw          g / (sqrt(v / (1 - b2^t)) + eps)       1
adamw_paper    g / (sqrt(v) + eps)                    sqrt(1 - b2^t)
radam          as adamw once rho_t > 4, else g        RAdam's rectification r_t
adan           (g + b2 v_d / (1-b2^t))                1
               / (sqrt(n / (1 - b3^t)) + eps)
transformation the wrapped optimizer's update         (its own learning rate)
=============  =====================================  ==================================

with v = b2 v + (1 - b2) g^2 updated on every step; Adan's averages are in
docs/EXTRAS.md. No z-step keeps a first moment: Schedule-Free's interpolation
b1 plays that role. Every z-step computes in float32 or wider and keeps its
buffers in their own dtype (the dtype of z: ``state_dtype``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import optax

from sf_optax import _averaging
from sf_optax import _replay
from sf_optax import _validation


class ZStepUpdate(Protocol):
  """Returns the direction u and the z-step's new state."""

  def __call__(
      self,
      updates: optax.Updates,
      state: optax.OptState,
      params: optax.Params,
      *,
      learning_rate: jax.Array,
      count: jax.Array,
      **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    ...


class ZStep(NamedTuple):
  """How z moves.

  Attributes:
    init: ``params -> state``, the z-step's own state (zeros, in z's dtype).
    update: ``(updates, state, params, *, learning_rate, count, **extra_args)
      -> (u, new_state)``: the direction u for the gradient ``updates`` (params
      are z, after any weight decay at y or z). A z-step whose direction is
      only known once its update is traced (a wrapped Optax optimizer) returns
      ``(u, new_state, direction)`` instead, with ``direction`` as below for
      this trace, or None.
    direction: optional ``(updates, new_state, *, learning_rate, count) -> u``,
      the same u from the gradient and the state ``update`` returned. A z-step
      that can say so lets the engine evaluate u where it is needed rather than
      keep it in a params-sized temporary (see ``_schedule_free``).
    learning_rate_factor: optional ``(count, dtype) -> scalar`` multiplying the
      learning rate of step k (and so lr_max, the averaging weights and the
      decay).
    applies_learning_rate: whether u is already a step (a wrapped Optax
      optimizer applies its own learning rate): then z moves by
      ``warmup * lr_scale * u`` rather than ``-lr * lr_scale * u``.
    step_size: optional ``(updates, state, *, params, z, x, previous_b1, b1,
      learning_rate, count, **extra_args) -> (step_size, state)``: a step size
      computed in the step from the gradient and the iterates (x is None with
      ``store_x=False``; previous_b1 is the b1 that made y from x and z). It
      replaces the learning rate of step k everywhere (the z-step, lr_max, the
      averaging weights, the decay). ScheduleFree+'s Polyak rule.
    decay_power: the weight decay moves z by ``(lr * lr_scale)**decay_power *
      weight_decay * weight_decay_scale * w``: 1 is decoupled decay, 2 AdamC's.
    b1_schedule: optional ``(count, dtype) -> b1`` of step k, replacing the
      constant b1 (ScheduleFree+'s annealed Schedule-Free momentum).
    c_warmup: for the first ``c_warmup`` steps c = 1 (x follows z) and no
      averaging weight is accumulated.
    initial_lr_max: lr_max before the first step (the reference's -1 or 0 is
      the same for lr >= 0; ScheduleFree+ starts at eps).
  """

  init: Callable[[optax.Params], optax.OptState]
  update: ZStepUpdate
  direction: Optional[Callable[..., optax.Updates]] = None
  learning_rate_factor: Optional[Callable[[jax.Array, Any], jax.Array]] = None
  applies_learning_rate: bool = False
  step_size: Optional[Callable[..., tuple[jax.Array, optax.OptState]]] = None
  decay_power: int = 1
  b1_schedule: Optional[Callable[[jax.Array, Any], jax.Array]] = None
  c_warmup: Any = 0
  initial_lr_max: Any = 0.0


class SecondMomentState(NamedTuple):
  """State of an adaptive z-step."""

  nu: optax.Params  # like z: exponential average of squared gradients


class MomentsState(NamedTuple):
  """State of Schedule-Free AdamW's z-step with inner momentum."""

  mu: optax.Params  # like z: exponential average of gradients (the inner momentum)
  nu: optax.Params  # like z: exponential average of squared gradients


class ScheduleFreePlusState(NamedTuple):
  """State of ScheduleFree+'s z-step: Adam's moments and the Polyak rule's scalars."""

  mu: optax.Params  # like z: exponential average of gradients
  nu: optax.Params  # like z: exponential average of squared gradients
  grad_l1_ema: jax.Array  # [] float32 or wider: the stored (bias-corrected) L1 estimate
  polyak_rate: jax.Array  # [] like grad_l1_ema: max(0, f + ip) / grad_l1_ema of the last step
  step_size: jax.Array  # [] like grad_l1_ema: the last step's step size, lr * polyak_rate


class AdanState(NamedTuple):
  """State of Schedule-Free Adan's z-step (Adan without its first moment)."""

  previous_gradient: optax.Params  # like z: g_{t-1}, taken at y_{t-1} (zeros before step 1)
  difference: optax.Params  # like z: v, average of gradient differences g_t - g_{t-1}
  nu: optax.Params  # like z: n, average of the squared Nesterov gradient g_t + b2 (g_t - g_{t-1})


def _compute_dtype(*leaves: jax.Array) -> Any:
  return _averaging.float32_or_wider(*(leaf.dtype for leaf in leaves))


def sgd() -> ZStep:
  """The plain gradient: u = g."""

  def update(updates, state, params, *, learning_rate, count, **extra_args):
    del params, learning_rate, count, extra_args
    return jax.tree.map(lambda g: g.astype(_compute_dtype(g)), updates), state

  return ZStep(lambda params: optax.EmptyState(), update)


def rectification(b2: Any, count: jax.Array, dtype: Any, silent_sgd_phase: bool):
  """RAdam's rectification factor and whether the adaptive step is on (rho_t > 4).

  While rho_t <= 4 the factor is 0 (``silent_sgd_phase``: no step, no weight in
  the average) or 1 (plain SGD).
  """
  b2 = jnp.asarray(b2, dtype)
  step = (count + 1).astype(dtype)
  bias_correction2 = _averaging.bias_correction(b2, count, dtype)
  rho_inf = 2 / (1 - b2) - 1
  rho_t = rho_inf - 2 * step * jnp.power(b2, step) / bias_correction2
  adaptive = rho_t > 4
  safe_rho_t = jnp.where(adaptive, rho_t, 5)
  rect = jnp.sqrt(
      (safe_rho_t - 4) * (safe_rho_t - 2) * rho_inf
      / ((rho_inf - 4) * (rho_inf - 2) * safe_rho_t)
  )
  fallback = 0.0 if silent_sgd_phase else 1.0
  return jnp.where(adaptive, rect, fallback).astype(dtype), adaptive


def _second_moment(
    b2: Any,
    eps: Any,
    *,
    bias_correct: bool,
    rectify: bool = False,
    silent_sgd_phase: bool = True,
    learning_rate_factor: Optional[Callable[[jax.Array, Any], jax.Array]] = None,
) -> ZStep:
  """Adam's second-moment direction without its first moment."""
  _validation.check_adaptive(b2=b2, eps=eps)

  def init(params):
    return SecondMomentState(nu=optax.tree.zeros_like(params))

  def direction(updates, state, *, learning_rate, count):
    dtype = learning_rate.dtype
    bias_correction2 = _averaging.bias_correction(b2, count, dtype)
    if rectify:
      _, adaptive = rectification(b2, count, dtype, silent_sgd_phase)

    constants = {}  # per compute dtype, not per leaf (see _schedule_free._Memo)

    def one(g, nu):
      compute = _compute_dtype(g, nu)
      if compute not in constants:
        constants[compute] = (bias_correction2.astype(compute),
                              jnp.asarray(eps, dtype).astype(compute))
      bias_correction2_c, eps_c = constants[compute]
      nu = nu.astype(compute)
      second = nu / bias_correction2_c if bias_correct else nu
      denominator = jnp.sqrt(second) + eps_c
      if rectify:
        # Selecting the denominator, not u, keeps g read once.
        denominator = jnp.where(adaptive, denominator, 1)
      return g.astype(compute) / denominator

    return jax.tree.map(one, updates, state.nu)

  def update(updates, state, params, *, learning_rate, count, **extra_args):
    del params, extra_args

    constants = {}

    def second_moment(g, nu):
      compute = _compute_dtype(g, nu)
      if compute not in constants:
        b2_c = jnp.asarray(b2, learning_rate.dtype).astype(compute)
        constants[compute] = (b2_c, 1 - b2_c)
      b2_c, one_minus_b2 = constants[compute]
      g = g.astype(compute)
      return (b2_c * nu.astype(compute) + one_minus_b2 * g * g).astype(nu.dtype)

    new_state = SecondMomentState(nu=jax.tree.map(second_moment, updates, state.nu))
    return direction(updates, new_state, learning_rate=learning_rate, count=count), new_state

  return ZStep(init, update, direction, learning_rate_factor)


def _moments(first: Any, b2: Any, eps: Any):
  """Adam's two averages and its direction (m / (1 - first^t)) / (sqrt(v / (1 - b2^t)) + eps).

  Returns ``(averages, direction)``: ``averages(updates, mu, nu, dtype) -> (mu,
  nu)`` updates both averages (cast back to their dtypes); ``direction(mu, nu,
  count, dtype)`` is the direction from them.
  """

  def averages(updates, mu, nu, dtype):
    def one(g, m, v):
      compute = _compute_dtype(g, m, v)
      g = g.astype(compute)
      first_c = jnp.asarray(first, dtype).astype(compute)
      b2_c = jnp.asarray(b2, dtype).astype(compute)
      return ((first_c * m.astype(compute) + (1 - first_c) * g).astype(m.dtype),
              (b2_c * v.astype(compute) + (1 - b2_c) * g * g).astype(v.dtype))

    treedef = jax.tree.structure(updates)
    pairs = [one(*leaves) for leaves in zip(
        treedef.flatten_up_to(updates), treedef.flatten_up_to(mu), treedef.flatten_up_to(nu))]
    return (treedef.unflatten([m for m, _ in pairs]), treedef.unflatten([v for _, v in pairs]))

  def direction(mu, nu, count, dtype):
    correction1 = _averaging.bias_correction(first, count, dtype)
    correction2 = _averaging.bias_correction(b2, count, dtype)

    def one(m, v):
      compute = _compute_dtype(m, v)
      denominator = jnp.sqrt(v.astype(compute) / correction2.astype(compute)) + jnp.asarray(
          eps, dtype).astype(compute)
      return (m.astype(compute) / correction1.astype(compute)) / denominator

    return jax.tree.map(one, mu, nu)

  return averages, direction


def adamw(b2: Any, eps: Any, inner_momentum: Any = 0.0) -> ZStep:
  """Adam's direction with the bias correction inside the square root (the reference's AdamW).

  With ``inner_momentum`` mu > 0 (the reference after 1.4.1) the gradient in the
  numerator is replaced by its exponential average m = mu m + (1 - mu) g, with
  its own bias correction 1 - mu^(k+1); with 0 there is no such buffer.
  """
  _validation.check_decay("inner_momentum", inner_momentum)
  plain = _second_moment(b2, eps, bias_correct=True)
  if _validation.is_zero(inner_momentum):
    return plain
  averages, moments_direction = _moments(inner_momentum, b2, eps)

  # What the state holds decides: optax.inject_hyperparams builds the optimizer
  # again in every update with inner_momentum traced, after an init that saw
  # its value. An inner momentum of 0 at init allocates no buffer and stays off.
  def init(params):
    return MomentsState(mu=optax.tree.zeros_like(params), nu=optax.tree.zeros_like(params))

  def direction(updates, state, *, learning_rate, count):
    if isinstance(state, SecondMomentState):
      return plain.direction(updates, state, learning_rate=learning_rate, count=count)
    return moments_direction(state.mu, state.nu, count, learning_rate.dtype)

  def update(updates, state, params, *, learning_rate, count, **extra_args):
    if isinstance(state, SecondMomentState):
      return plain.update(
          updates, state, params, learning_rate=learning_rate, count=count, **extra_args)
    new_state = MomentsState(*averages(updates, state.mu, state.nu, learning_rate.dtype))
    return direction(updates, new_state, learning_rate=learning_rate, count=count), new_state

  return ZStep(init, update, direction)


def adamw_paper(b2: Any, eps: Any) -> ZStep:
  """The paper's AdamW: g / (sqrt(v) + eps), the bias correction on the learning rate."""

  def factor(count, dtype):
    return jnp.sqrt(_averaging.bias_correction(b2, count, dtype))

  return _second_moment(b2, eps, bias_correct=False, learning_rate_factor=factor)


def radam(b2: Any, eps: Any, silent_sgd_phase: bool) -> ZStep:
  """RAdam's direction, its rectification on the learning rate."""

  def factor(count, dtype):
    return rectification(b2, count, dtype, silent_sgd_phase)[0]

  return _second_moment(
      b2, eps, bias_correct=True, rectify=True, silent_sgd_phase=silent_sgd_phase,
      learning_rate_factor=factor,
  )


def annealed_b1(sf_b1: Any, sf_b1_max: Any, anneal_steps: Any, count: jax.Array, dtype: Any):
  """ScheduleFree+'s Schedule-Free momentum at step k (k counts from 0).

  1 - b1 moves geometrically (linearly in log space) from 1 - sf_b1 to
  1 - sf_b1_max over ``anneal_steps`` steps and stays there; 0 steps: sf_b1.
  """
  start = jnp.asarray(sf_b1, dtype)
  steps = jnp.asarray(anneal_steps, dtype)
  progress = jnp.minimum(count.astype(dtype) / jnp.maximum(steps, 1), 1)
  log_gap = jnp.log1p(-start) * (1 - progress) + jnp.log1p(-jnp.asarray(sf_b1_max, dtype)) * progress
  return jnp.where(steps > 0, -jnp.expm1(log_gap), start).astype(dtype)


def _l1_and_inner(g: jax.Array, z: jax.Array, other: jax.Array) -> tuple[jax.Array, jax.Array]:
  """sum |g| and sum g (z - other) of one leaf, in one pass over the three buffers.

  One reduction with two results: as two reductions, XLA:CPU writes the
  widened g (bf16 params) to a params-sized temporary that both read.
  """
  compute = _compute_dtype(g, z, other)
  g = g.astype(compute)
  zero = jnp.zeros([], compute)
  return jax.lax.reduce(
      (jnp.abs(g), g * (z.astype(compute) - other.astype(compute))), (zero, zero),
      lambda a, b: (a[0] + b[0], a[1] + b[1]), tuple(range(g.ndim)))


def _missing_value_error() -> ValueError:
  return ValueError(
      "schedule_free_plus needs the loss at the params (its Polyak step size is"
      " computed from it): call update(grads, state, params, value=loss), e.g. with"
      " loss, grads = jax.value_and_grad(loss_fn)(params). Wrappers such as"
      " optax.chain, inject_hyperparams, MultiSteps and apply_if_finite pass it on."
  )


def schedule_free_plus(
    b1: Any,
    b2: Any,
    eps: Any,
    *,
    sf_b1: Any,
    sf_b1_max: Any,
    sf_b1_anneal_steps: Any,
    polyak_b: Any,
    c_warmup: Any,
    axis_name: Optional[Any],
) -> ZStep:
  """ScheduleFree+'s z-step: Adam's direction, a Polyak step size, AdamC's decay.

  The direction is Adam's with both bias corrections. The step size of step k
  is ``max(lr, eps) * max(0, f + ip) / e`` with f the loss at y (``value``), ip
  = b1_k <g, z - x> and e the L1 estimate: e = polyak_b e + (1 - polyak_b)
  sqrt(pi/2) ||g||_1, divided by 1 - polyak_b^(k+1), and the divided value is
  what is kept for the next step (as the reference does). Sums over all leaves,
  and over ``axis_name`` when given (the loss is averaged there).
  """
  _validation.check_adaptive(b1=b1, b2=b2, eps=eps, polyak_b=polyak_b)
  averages, moments_direction = _moments(b1, b2, eps)
  anneals = not _validation.is_zero(sf_b1_anneal_steps)

  def init(params):
    dtype = _averaging.float32_or_wider(*(leaf.dtype for leaf in jax.tree.leaves(params)))
    zero = jnp.zeros([], dtype)
    return ScheduleFreePlusState(
        mu=optax.tree.zeros_like(params), nu=optax.tree.zeros_like(params),
        grad_l1_ema=zero, polyak_rate=zero, step_size=zero)

  def step_size(updates, state, *, params, z, x, previous_b1, b1, learning_rate, count,
                **extra_args):
    value = extra_args.get("value")
    if value is None:
      raise _missing_value_error()
    dtype = learning_rate.dtype
    treedef = jax.tree.structure(params)
    leaves_g = treedef.flatten_up_to(updates)
    leaves_z = treedef.flatten_up_to(z)
    # z - x, read from the buffers the step holds: with store_x=False,
    # x = (y - (1 - b1') z) / b1' (b1' made y), so z - x = (z - y) / b1'.
    leaves_other = treedef.flatten_up_to(params if x is None else x)
    l1 = jnp.zeros([], dtype)
    inner = jnp.zeros([], dtype)
    for g, z_leaf, other in zip(leaves_g, leaves_z, leaves_other):
      leaf_l1, leaf_inner = _l1_and_inner(g, z_leaf, other)
      l1 = l1 + leaf_l1.astype(dtype)
      inner = inner + leaf_inner.astype(dtype)
    if x is None:
      inner = inner / previous_b1.astype(dtype)
    value = jnp.asarray(value).astype(dtype)
    if axis_name is not None:
      # As the reference does for sharded (DTensor) gradients: the two sums
      # over the shards, the loss averaged.
      l1, inner = jax.lax.psum((l1, inner), axis_name)
      value = jax.lax.pmean(value, axis_name)
    beta = jnp.asarray(polyak_b, dtype)
    estimate = (beta * state.grad_l1_ema.astype(dtype)
                + (1 - beta) * l1 * jnp.sqrt(jnp.asarray(math.pi / 2, dtype)))
    estimate = estimate / _averaging.bias_correction(polyak_b, count, dtype)
    numerator = jnp.maximum(value + b1.astype(dtype) * inner, 0)
    # A zero gradient has nothing to follow: a zero step (the reference divides by 0).
    positive = estimate > 0
    polyak_rate = jnp.where(positive, numerator / jnp.where(positive, estimate, 1), 0)
    rate = jnp.maximum(learning_rate, jnp.asarray(eps, dtype)) * polyak_rate
    scalar_dtype = state.grad_l1_ema.dtype
    return rate, state._replace(
        grad_l1_ema=estimate.astype(scalar_dtype),
        polyak_rate=polyak_rate.astype(scalar_dtype),
        step_size=rate.astype(scalar_dtype))

  def direction(updates, state, *, learning_rate, count):
    del updates
    return moments_direction(state.mu, state.nu, count, learning_rate.dtype)

  def update(updates, state, params, *, learning_rate, count, **extra_args):
    del params, extra_args
    mu, nu = averages(updates, state.mu, state.nu, learning_rate.dtype)
    new_state = state._replace(mu=mu, nu=nu)
    return direction(updates, new_state, learning_rate=learning_rate, count=count), new_state

  def b1_schedule(count, dtype):
    return annealed_b1(sf_b1, sf_b1_max, sf_b1_anneal_steps, count, dtype)

  return ZStep(
      init, update, direction, step_size=step_size, decay_power=2,
      b1_schedule=b1_schedule if anneals else None, c_warmup=c_warmup, initial_lr_max=eps)


def adan(b2: Any, b3: Any, eps: Any) -> ZStep:
  """Adan's direction without its first moment (derivation: docs/EXTRAS.md).

  Args:
    b2: decay of the average of gradient differences, and the weight of that
      average in the direction (the official Adan's ``betas[1]``).
    b3: decay of the average of the squared Nesterov gradient.
    eps: added to the denominator.

  Returns:
    A :class:`ZStep` whose state is an :class:`AdanState`.
  """
  _validation.check_adaptive(b2=b2, b3=b3, eps=eps)

  def init(params):
    return AdanState(
        previous_gradient=optax.tree.zeros_like(params),
        difference=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
    )

  def direction(updates, state, *, learning_rate, count):
    """(g + b2 v' / (1 - b2^t)) / (sqrt(n' / (1 - b3^t)) + eps), from the new v' and n'."""
    dtype = learning_rate.dtype
    correction_difference = _averaging.bias_correction(b2, count, dtype)
    correction_nu = _averaging.bias_correction(b3, count, dtype)

    def one(g, difference, nu):
      compute = _compute_dtype(g, nu)
      b2_c = jnp.asarray(b2, dtype).astype(compute)
      numerator = g.astype(compute) + b2_c * difference.astype(compute) / (
          correction_difference.astype(compute))
      denominator = jnp.sqrt(nu.astype(compute) / correction_nu.astype(compute)) + jnp.asarray(
          eps, dtype).astype(compute)
      return numerator / denominator

    return jax.tree.map(one, updates, state.difference, state.nu)

  def update(updates, state, params, *, learning_rate, count, **extra_args):
    del params, extra_args
    dtype = learning_rate.dtype
    # No gradient before the first: its difference is zero, as in the official
    # code (previous gradient := current one) and optax.scale_by_adan.
    first_step = count == 0

    def one(g, previous, difference, nu):
      compute = _compute_dtype(g, nu)
      g = g.astype(compute)
      b2_c = jnp.asarray(b2, dtype).astype(compute)
      b3_c = jnp.asarray(b3, dtype).astype(compute)
      change = jnp.where(first_step, jnp.zeros_like(g), g - previous.astype(compute))
      difference_next = b2_c * difference.astype(compute) + (1 - b2_c) * change
      nesterov = g + b2_c * change
      nu_next = b3_c * nu.astype(compute) + (1 - b3_c) * nesterov * nesterov
      # Cast back so that the state never drifts from its dtype.
      return (g.astype(previous.dtype), difference_next.astype(difference.dtype),
              nu_next.astype(nu.dtype))

    treedef = jax.tree.structure(updates)
    olds = [treedef.flatten_up_to(buffer) for buffer in state]
    results = [one(g, *old) for g, *old in zip(treedef.flatten_up_to(updates), *olds)]
    new_state = AdanState(*(treedef.unflatten(list(part)) for part in zip(*results)))
    return direction(updates, new_state, learning_rate=learning_rate, count=count), new_state

  return ZStep(init, update, direction)


def transformation(base: optax.GradientTransformation) -> ZStep:
  """A wrapped Optax optimizer: its update is the step of z (it sees z as params).

  Its direction from the new state is read off the base's own program
  (``_replay``): available when the base's step depends on its old state and
  the params only through its new state (Adam, RMSProp, SGD with momentum, and
  chains of such), not for Lion (its step reads the old momentum) or a base
  with a weight decay of its own (its step reads the params).
  """
  base = optax.with_extra_args_support(base)

  def update(updates, state, params, *, learning_rate, count, **extra_args):
    del learning_rate, count
    steps, new_state, replay = _replay.trace_steps(
        lambda u, s, p: base.update(u, s, p, **extra_args), updates, state, params
    )
    direction = None
    if replay is not None:
      def direction(updates, new_state, *, learning_rate, count):
        del learning_rate, count
        return replay(updates, new_state)
    return steps, new_state, direction

  return ZStep(base.init, update, applies_learning_rate=True)
