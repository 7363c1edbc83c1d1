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
  """

  init: Callable[[optax.Params], optax.OptState]
  update: ZStepUpdate
  direction: Optional[Callable[..., optax.Updates]] = None
  learning_rate_factor: Optional[Callable[[jax.Array, Any], jax.Array]] = None
  applies_learning_rate: bool = False


class SecondMomentState(NamedTuple):
  """State of an adaptive z-step."""

  nu: optax.Params  # like z: exponential average of squared gradients


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


def adamw(b2: Any, eps: Any) -> ZStep:
  """Adam's direction with the bias correction inside the square root (the reference's AdamW)."""
  return _second_moment(b2, eps, bias_correct=True)


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

  def update(updates, state, params, *, learning_rate, count, **extra_args):
    del params, extra_args
    dtype = learning_rate.dtype
    correction_difference = _averaging.bias_correction(b2, count, dtype)
    correction_nu = _averaging.bias_correction(b3, count, dtype)
    # No gradient before the first: its difference is zero, as in the official
    # code (previous gradient := current one) and optax.scale_by_adan.
    first_step = count == 0

    def one(g, previous, difference, nu):
      compute = _compute_dtype(g, nu)
      g = g.astype(compute)
      b2_c = jnp.asarray(b2, dtype).astype(compute)
      b3_c = jnp.asarray(b3, dtype).astype(compute)
      change = jnp.where(first_step, jnp.zeros_like(g), g - previous.astype(compute))
      difference = b2_c * difference.astype(compute) + (1 - b2_c) * change
      nesterov = g + b2_c * change
      nu = b3_c * nu.astype(compute) + (1 - b3_c) * nesterov * nesterov
      numerator = g + b2_c * difference / correction_difference.astype(compute)
      denominator = jnp.sqrt(nu / correction_nu.astype(compute)) + jnp.asarray(
          eps, dtype
      ).astype(compute)
      return numerator / denominator, g, difference, nu

    treedef = jax.tree.structure(updates)
    olds = [treedef.flatten_up_to(buffer) for buffer in state]
    results = [one(g, *old) for g, *old in zip(treedef.flatten_up_to(updates), *olds)]
    # Cast back so that the state never drifts from its dtype.
    new_state = AdanState(*(
        treedef.unflatten([result[i + 1].astype(o.dtype) for result, o in zip(results, old)])
        for i, old in enumerate(olds)
    ))
    return treedef.unflatten([result[0] for result in results]), new_state

  return ZStep(init, update)


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
