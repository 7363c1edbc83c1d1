"""The built-in Schedule-Free optimizers: SGD, AdamW, AdamW (paper variant), RAdam.

Each is the engine of ``_schedule_free`` with the reference's own z-step
direction u and learning rate:

=============  ==================================  ===============================
optimizer      direction u                         learning rate
=============  ==================================  ===============================
SGD            g                                   lr * warmup
AdamW          g / (sqrt(v / (1 - b2^t)) + eps)    lr * warmup
AdamW (paper)  g / (sqrt(v) + eps)                 lr * warmup * sqrt(1 - b2^t)
RAdam          as AdamW once rho_t > 4, else g     lr * rectification(t)
=============  ==================================  ===============================

with v = b2 v + (1 - b2) g^2 updated on every step, and the z-step
``-lr * lr_scale * u`` (weight decay at y is the engine's).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sf_optax import _averaging
from sf_optax import _schedule_free
from sf_optax import _validation


class SecondMomentState(NamedTuple):
  """State of an adaptive z-step."""

  nu: optax.Params  # like z: exponential average of squared gradients


def _rectification(b2: Any, count: jax.Array, dtype: Any, silent_sgd_phase: bool):
  """RAdam's rectification factor and whether the adaptive step is on (rho_t > 4)."""
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


def _sgd_z_step() -> _schedule_free.ZStep:
  def update(updates, state, params, *, learning_rate, count, scales, **extra_args):
    del params, count, extra_args
    return _scaled_steps(updates, learning_rate, scales), state

  return _schedule_free.ZStep(lambda params: optax.EmptyState(), update)


def _scaled_steps(directions, learning_rate, scales):
  """-lr * lr_scale * u, per leaf, in each direction's dtype."""
  if scales is None:
    return jax.tree.map(lambda u: -learning_rate.astype(u.dtype) * u, directions)
  return jax.tree.map(
      lambda u, s: -(learning_rate * s).astype(u.dtype) * u, directions, scales
  )


def _adaptive_z_step(
    b2: Any, eps: Any, *, bias_correct: bool, rectify: bool, silent_sgd_phase: bool = True
) -> _schedule_free.ZStep:
  """The reference's second-moment direction (no first moment: b1 plays that role)."""

  def init(params):
    return SecondMomentState(nu=optax.tree.zeros_like(params))

  def directions(updates, nu_tree, learning_rate, count, scales):
    """-lr * lr_scale * g / (sqrt(v / bc2) + eps) from the updated v."""
    dtype = learning_rate.dtype
    bias_correction2 = _averaging.bias_correction(b2, count, dtype)
    if rectify:
      _, adaptive = _rectification(b2, count, dtype, silent_sgd_phase)

    def direction(g, nu):
      compute = _averaging.float32_or_wider(g.dtype, nu.dtype)
      nu = nu.astype(compute)
      second = nu / bias_correction2.astype(compute) if bias_correct else nu
      denominator = jnp.sqrt(second) + jnp.asarray(eps, dtype).astype(compute)
      if rectify:
        # Selecting the denominator, not u, keeps g read once.
        denominator = jnp.where(adaptive, denominator, 1)
      return g.astype(compute) / denominator

    return _scaled_steps(jax.tree.map(direction, updates, nu_tree), learning_rate, scales)

  def update(updates, state, params, *, learning_rate, count, scales, **extra_args):
    del params, extra_args

    def second_moment(g, nu):
      compute = _averaging.float32_or_wider(g.dtype, nu.dtype)
      g = g.astype(compute)
      b2_c = jnp.asarray(b2, learning_rate.dtype).astype(compute)
      return (b2_c * nu.astype(compute) + (1 - b2_c) * g * g).astype(nu.dtype)

    nu = jax.tree.map(second_moment, updates, state.nu)
    steps = directions(updates, nu, learning_rate, count, scales)
    return steps, SecondMomentState(nu=nu)

  def recompute(updates, state, *, learning_rate, count, scales):
    return directions(updates, state.nu, learning_rate, count, scales)

  return _schedule_free.ZStep(init, update, recompute)


def _check_adaptive(learning_rate, b1, b2, eps, weight_decay, r, weight_lr_power, warmup_steps=0):
  _schedule_free.check_common(
      b1, r, weight_lr_power, warmup_steps, eps=eps, weight_decay=weight_decay
  )
  _validation.check_scalar("b2", b2, lower=0.0, upper=1.0)
  if _validation.is_concrete(b2) and float(b2) == 1.0:
    raise ValueError(f"b2 must lie in [0, 1), got {b2!r}.")
  if not callable(learning_rate):
    _validation.check_nonnegative(learning_rate=learning_rate)


def _warmed_up(learning_rate, warmup_steps):
  def learning_rate_fn(count, dtype):
    return _schedule_free.scheduled(learning_rate, count, dtype) * _averaging.warmup_factor(
        count, warmup_steps, dtype
    )

  return learning_rate_fn


def schedule_free_sgd(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    b1: Any = 0.9,
    weight_decay: Any = 0.0,
    warmup_steps: int = 0,
    r: Any = 0.0,
    weight_lr_power: Any = 2.0,
    mask: Any = None,
    lr_scales: Any = None,
    weight_decay_scales: Any = None,
    weight_decay_at: str = "y",
    state_dtype: Any = None,
    store_x: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Schedule-Free SGD.

  .. math::

    z_{t+1} = z_t - \gamma_t (g_t + \lambda y_t), \quad
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}, \quad
    y_{t+1} = b_1 x_{t+1} + (1 - b_1) z_{t+1},

  where :math:`g_t` is the gradient at :math:`y_t` (the params), :math:`\gamma_t`
  the learning rate after linear warmup, and
  :math:`c_{t+1} = w_{t+1} / \sum_{i \le t+1} w_i` with
  :math:`w_t = t^r \gamma_{\max}^{p}`. Evaluate at x: :func:`eval_params`.

  Args:
    learning_rate: a float or an Optax schedule; multiplied by the warmup.
    b1: interpolation between x and z (the momentum), in (0, 1].
    weight_decay: decoupled weight decay, evaluated at y and scaled by the
      learning rate.
    warmup_steps: linear warmup (k+1)/warmup_steps of the learning rate.
    r: polynomial weighting power of the average.
    weight_lr_power: power of the largest learning rate in the averaging weights.
    mask: which params decay: a tree of bools matching the params (or a prefix)
      or a function of params returning one.
    lr_scales: per-parameter multipliers of the learning rate (Python floats; a
      tree or a function of params), like torch parameter groups. The averaging
      weights stay global. Used for muP: ``mup_flax.schedule_free_scales``.
    weight_decay_scales: per-parameter multipliers of ``weight_decay``.
    weight_decay_at: where the decay is evaluated: "y" (the reference's default,
      the gradient point) or "z" (the base iterate; the reference's
      AdamWScheduleFreeReference with ``decay_at_z``). See the README.
    state_dtype: dtype of z and x; e.g. ``jnp.float32`` with bf16 params.
    store_x: keep x in the state (default: exact and free evaluation, robust to
      low-precision params, one more params-sized buffer) or reconstruct it as
      (y - (1 - b1) z) / b1 (the state then holds z alone, like the reference).

  Returns:
    A ``GradientTransformationExtraArgs`` with a :class:`ScheduleFreeState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sf_optax
    >>> tx = sf_optax.schedule_free_sgd(0.1)
    >>> params = jnp.array([1.0, -2.0])
    >>> state = tx.init(params)
    >>> for _ in range(100):
    ...   grads = jax.grad(lambda p: jnp.sum(p ** 2))(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> x = sf_optax.eval_params(state, params)
    >>> bool(jnp.all(jnp.abs(x) < 0.1))
    True

  References:
    Defazio et al, `The Road Less Scheduled <https://arxiv.org/abs/2405.15682>`_,
    2024
  """
  _schedule_free.check_common(b1, r, weight_lr_power, warmup_steps, weight_decay=weight_decay)
  if not callable(learning_rate):
    _validation.check_nonnegative(learning_rate=learning_rate)
  return _schedule_free.schedule_free_transform(
      _sgd_z_step(),
      _warmed_up(learning_rate, warmup_steps),
      b1=b1,
      r=r,
      weight_lr_power=weight_lr_power,
      weight_decay=weight_decay,
      mask=mask,
      lr_scales=lr_scales,
      weight_decay_scales=weight_decay_scales,
      weight_decay_at=weight_decay_at,
      state_dtype=state_dtype,
      store_x=store_x,
  )


def schedule_free_adamw(
    learning_rate: optax.ScalarOrSchedule = 0.0025,
    *,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    warmup_steps: int = 0,
    r: Any = 0.0,
    weight_lr_power: Any = 2.0,
    mask: Any = None,
    lr_scales: Any = None,
    weight_decay_scales: Any = None,
    weight_decay_at: str = "y",
    state_dtype: Any = None,
    store_x: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Schedule-Free AdamW.

  The z-step is Adam's without its first moment (b1 interpolates instead), with
  the bias correction inside the square root, and decoupled weight decay taken
  at y:

  .. math::

    v_t = b_2 v_{t-1} + (1 - b_2) g_t^2, \quad
    u_t = \frac{g_t}{\sqrt{v_t / (1 - b_2^t)} + \epsilon} + \lambda y_t, \quad
    z_{t+1} = z_t - \gamma_t u_t,

  then x and y move as in :func:`schedule_free_sgd`.

  Args:
    learning_rate: a float or an Optax schedule; multiplied by the warmup.
    b1: interpolation between x and z, in (0, 1].
    b2: decay of the second-moment average, in [0, 1).
    eps: added to the denominator.
    weight_decay: decoupled weight decay at y, scaled by the learning rate.
    warmup_steps: linear warmup of the learning rate.
    r: polynomial weighting power of the average.
    weight_lr_power: power of the largest learning rate in the averaging weights.
    mask: weight-decay mask (tree of bools or a function of params).
    lr_scales: per-parameter learning-rate multipliers (see
      :func:`schedule_free_sgd`).
    weight_decay_scales: per-parameter multipliers of ``weight_decay``.
    weight_decay_at: where the decay is evaluated: "y" (the reference's default,
      the gradient point) or "z" (the base iterate; the reference's
      AdamWScheduleFreeReference with ``decay_at_z``). See the README.
    state_dtype: dtype of z, x and v.
    store_x: keep x in the state (see :func:`schedule_free_sgd`).

  Returns:
    A ``GradientTransformationExtraArgs`` with a :class:`ScheduleFreeState`
    whose ``base_state`` holds v.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sf_optax
    >>> tx = sf_optax.schedule_free_adamw(1e-1, warmup_steps=10, weight_decay=1e-4)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> for _ in range(200):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(sf_optax.eval_params(state, params)) < 1e-2)
    True

  References:
    Defazio et al, `The Road Less Scheduled <https://arxiv.org/abs/2405.15682>`_,
    2024
  """
  _check_adaptive(learning_rate, b1, b2, eps, weight_decay, r, weight_lr_power, warmup_steps)
  return _schedule_free.schedule_free_transform(
      _adaptive_z_step(b2, eps, bias_correct=True, rectify=False),
      _warmed_up(learning_rate, warmup_steps),
      b1=b1,
      r=r,
      weight_lr_power=weight_lr_power,
      weight_decay=weight_decay,
      mask=mask,
      lr_scales=lr_scales,
      weight_decay_scales=weight_decay_scales,
      weight_decay_at=weight_decay_at,
      state_dtype=state_dtype,
      store_x=store_x,
  )


def schedule_free_adamw_paper(
    learning_rate: optax.ScalarOrSchedule = 0.0025,
    *,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    warmup_steps: int = 0,
    r: Any = 0.0,
    weight_lr_power: Any = 2.0,
    mask: Any = None,
    lr_scales: Any = None,
    weight_decay_scales: Any = None,
    weight_decay_at: str = "y",
    state_dtype: Any = None,
    store_x: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Schedule-Free AdamW as used in the paper's experiments (reference < 1.3).

  Differs from :func:`schedule_free_adamw` in two places: the bias correction
  multiplies the learning rate, :math:`\gamma_t = \gamma \cdot
  \mathrm{warmup}_t \sqrt{1 - b_2^t}` (and this learning rate also feeds lr_max,
  the averaging weights and the weight decay), and the denominator is
  :math:`\sqrt{v_t} + \epsilon`.

  Args:
    learning_rate: a float or an Optax schedule; multiplied by the warmup.
    b1: interpolation between x and z, in (0, 1].
    b2: decay of the second-moment average, in [0, 1).
    eps: added to the denominator.
    weight_decay: decoupled weight decay at y, scaled by the learning rate.
    warmup_steps: linear warmup of the learning rate.
    r: polynomial weighting power of the average.
    weight_lr_power: power of the largest learning rate in the averaging weights.
    mask: weight-decay mask (tree of bools or a function of params).
    lr_scales: per-parameter learning-rate multipliers.
    weight_decay_scales: per-parameter multipliers of ``weight_decay``.
    weight_decay_at: where the decay is evaluated: "y" (the reference's default,
      the gradient point) or "z" (the base iterate; the reference's
      AdamWScheduleFreeReference with ``decay_at_z``). See the README.
    state_dtype: dtype of z, x and v.
    store_x: keep x in the state (see :func:`schedule_free_sgd`).

  Returns:
    A ``GradientTransformationExtraArgs`` with a :class:`ScheduleFreeState`.

  Example:
    >>> import jax.numpy as jnp, sf_optax
    >>> tx = sf_optax.schedule_free_adamw_paper(1e-2)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> updates, state = tx.update({"w": jnp.ones(2)}, state, {"w": jnp.zeros(2)})
    >>> int(state.count)
    1

  References:
    Defazio et al, `The Road Less Scheduled <https://arxiv.org/abs/2405.15682>`_,
    2024
  """
  _check_adaptive(learning_rate, b1, b2, eps, weight_decay, r, weight_lr_power, warmup_steps)
  warmed_up = _warmed_up(learning_rate, warmup_steps)

  def learning_rate_fn(count, dtype):
    return warmed_up(count, dtype) * jnp.sqrt(_averaging.bias_correction(b2, count, dtype))

  return _schedule_free.schedule_free_transform(
      _adaptive_z_step(b2, eps, bias_correct=False, rectify=False),
      learning_rate_fn,
      b1=b1,
      r=r,
      weight_lr_power=weight_lr_power,
      weight_decay=weight_decay,
      mask=mask,
      lr_scales=lr_scales,
      weight_decay_scales=weight_decay_scales,
      weight_decay_at=weight_decay_at,
      state_dtype=state_dtype,
      store_x=store_x,
  )


def schedule_free_radam(
    learning_rate: optax.ScalarOrSchedule = 0.0025,
    *,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    r: Any = 0.0,
    weight_lr_power: Any = 2.0,
    silent_sgd_phase: bool = True,
    mask: Any = None,
    lr_scales: Any = None,
    weight_decay_scales: Any = None,
    weight_decay_at: str = "y",
    state_dtype: Any = None,
    store_x: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Schedule-Free RAdam: the rectification replaces the warmup.

  With :math:`\rho_\infty = 2/(1-b_2) - 1` and
  :math:`\rho_t = \rho_\infty - 2 t b_2^t / (1 - b_2^t)`, the learning rate is
  :math:`\gamma r_t` with RAdam's rectification :math:`r_t` while
  :math:`\rho_t > 4`; before that the step is plain SGD on z with learning rate
  :math:`\gamma` or, with ``silent_sgd_phase`` (the default), no step at all
  (lr = 0, so those steps carry no weight in the average). With b2 = 0.999 the
  first four steps are silent.

  Args:
    learning_rate: a float or an Optax schedule.
    b1: interpolation between x and z, in (0, 1].
    b2: decay of the second-moment average, in [0, 1).
    eps: added to the denominator.
    weight_decay: decoupled weight decay at y, scaled by the learning rate.
    r: polynomial weighting power of the average.
    weight_lr_power: power of the largest learning rate in the averaging weights.
    silent_sgd_phase: take no step while rho_t <= 4.
    mask: weight-decay mask (tree of bools or a function of params).
    lr_scales: per-parameter learning-rate multipliers.
    weight_decay_scales: per-parameter multipliers of ``weight_decay``.
    weight_decay_at: where the decay is evaluated: "y" (the reference's default,
      the gradient point) or "z" (the base iterate; the reference's
      AdamWScheduleFreeReference with ``decay_at_z``). See the README.
    state_dtype: dtype of z, x and v.
    store_x: keep x in the state (see :func:`schedule_free_sgd`).

  Returns:
    A ``GradientTransformationExtraArgs`` with a :class:`ScheduleFreeState`.

  Example:
    >>> import jax.numpy as jnp, optax, sf_optax
    >>> tx = sf_optax.schedule_free_radam(1e-2)
    >>> params = jnp.ones(2)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.ones(2), state, params)
    >>> print(updates)  # the first steps are silent
    [0. 0.]

  References:
    Defazio et al, `The Road Less Scheduled <https://arxiv.org/abs/2405.15682>`_,
    2024; Liu et al, `On the Variance of the Adaptive Learning Rate and Beyond
    <https://arxiv.org/abs/1908.03265>`_, 2020
  """
  _check_adaptive(learning_rate, b1, b2, eps, weight_decay, r, weight_lr_power)

  def learning_rate_fn(count, dtype):
    rect, _ = _rectification(b2, count, dtype, silent_sgd_phase)
    return _schedule_free.scheduled(learning_rate, count, dtype) * rect

  return _schedule_free.schedule_free_transform(
      _adaptive_z_step(
          b2, eps, bias_correct=True, rectify=True, silent_sgd_phase=silent_sgd_phase
      ),
      learning_rate_fn,
      b1=b1,
      r=r,
      weight_lr_power=weight_lr_power,
      weight_decay=weight_decay,
      mask=mask,
      lr_scales=lr_scales,
      weight_decay_scales=weight_decay_scales,
      weight_decay_at=weight_decay_at,
      state_dtype=state_dtype,
      store_x=store_x,
  )
