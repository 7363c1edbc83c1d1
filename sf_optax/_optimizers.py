"""The built-in Schedule-Free optimizers: SGD, AdamW, AdamW (paper variant), RAdam, ScheduleFree+.

Each is one z-step of ``_z_steps`` plus the common settings (``_family``).
"""

from __future__ import annotations

from typing import Any

import optax

from sf_optax import _family
from sf_optax import _validation
from sf_optax import _z_steps


@_family.member
def schedule_free_sgd(
    learning_rate: optax.ScalarOrSchedule = 1.0, **common: Any
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
    COMMON_SETTINGS

  Returns:
    A ``GradientTransformationExtraArgs`` with a :class:`ScheduleFreeState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sf_optax
    >>> tx = sf_optax.schedule_free_sgd(0.1)
    >>> params = jnp.array([1.0, -2.0])
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   grads = jax.grad(lambda p: jnp.sum(p ** 2))(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(100):
    ...   params, state = step(params, state)
    >>> x = sf_optax.eval_params(state, params)
    >>> bool(jnp.all(jnp.abs(x) < 0.1))
    True

  References:
    Defazio et al, `The Road Less Scheduled <https://arxiv.org/abs/2405.15682>`_,
    2024
  """
  return _family.optimizer(_z_steps.sgd(), learning_rate, common, owner="schedule_free_sgd")


@_family.member
def schedule_free_adamw(
    learning_rate: optax.ScalarOrSchedule = 0.0025,
    *,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    inner_momentum: Any = 0.0,
    **common: Any,
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

  With ``inner_momentum`` :math:`\mu > 0` (the reference after its version
  1.4.1, ``AdamWScheduleFree(inner_momentum=...)``), the gradient in the
  numerator is replaced by its exponential average with its own bias
  correction, :math:`m_t = \mu m_{t-1} + (1 - \mu) g_t` and
  :math:`u_t = \frac{m_t / (1 - \mu^t)}{\sqrt{v_t / (1 - b_2^t)} + \epsilon}
  + \lambda y_t`; with 0 (the default) no buffer for m is allocated.

  Args:
    learning_rate: a float or an Optax schedule; multiplied by the warmup.
    b2: decay of the second-moment average, in [0, 1).
    eps: added to the denominator.
    inner_momentum: decay of the average of gradients inside the z-step, in
      [0, 1); 0 keeps the plain gradient and allocates nothing.
    COMMON_SETTINGS

  Returns:
    A ``GradientTransformationExtraArgs`` with a :class:`ScheduleFreeState`
    whose ``base_state`` holds v (a :class:`SecondMomentState`), or m and v (a
    :class:`MomentsState`) with inner momentum.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sf_optax
    >>> tx = sf_optax.schedule_free_adamw(1e-1, warmup_steps=10, weight_decay=1e-4)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(200):
    ...   params, state = step(params, state)
    >>> bool(loss(sf_optax.eval_params(state, params)) < 1e-2)
    True

  References:
    Defazio et al, `The Road Less Scheduled <https://arxiv.org/abs/2405.15682>`_,
    2024
  """
  return _family.optimizer(
      _z_steps.adamw(b2, eps, inner_momentum), learning_rate, common,
      owner="schedule_free_adamw",
  )


@_family.member
def schedule_free_adamw_paper(
    learning_rate: optax.ScalarOrSchedule = 0.0025,
    *,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    **common: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Schedule-Free AdamW as used in the paper's experiments (reference < 1.3).

  Differs from :func:`schedule_free_adamw` in two places: the bias correction
  multiplies the learning rate, :math:`\gamma_t = \gamma \cdot
  \mathrm{warmup}_t \sqrt{1 - b_2^t}` (and this learning rate also feeds lr_max,
  the averaging weights and the weight decay), and the denominator is
  :math:`\sqrt{v_t} + \epsilon`.

  Args:
    learning_rate: a float or an Optax schedule; multiplied by the warmup.
    b2: decay of the second-moment average, in [0, 1).
    eps: added to the denominator.
    COMMON_SETTINGS

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
  return _family.optimizer(
      _z_steps.adamw_paper(b2, eps), learning_rate, common, owner="schedule_free_adamw_paper"
  )


@_family.member
def schedule_free_radam(
    learning_rate: optax.ScalarOrSchedule = 0.0025,
    *,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    silent_sgd_phase: bool = True,
    **common: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Schedule-Free RAdam: the rectification replaces the warmup.

  With :math:`\rho_\infty = 2/(1-b_2) - 1` and
  :math:`\rho_t = \rho_\infty - 2 t b_2^t / (1 - b_2^t)`, the learning rate is
  :math:`\gamma r_t` with RAdam's rectification :math:`r_t` while
  :math:`\rho_t > 4`; before that the step is plain SGD on z with learning rate
  :math:`\gamma` or, with ``silent_sgd_phase`` (the default), no step at all
  (lr = 0, so those steps carry no weight in the average). With b2 = 0.999 the
  first four steps are silent. ``warmup_steps`` (default 0) multiplies the
  rectified learning rate.

  Args:
    learning_rate: a float or an Optax schedule.
    b2: decay of the second-moment average, in [0, 1).
    eps: added to the denominator.
    silent_sgd_phase: take no step while rho_t <= 4.
    COMMON_SETTINGS

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
  return _family.optimizer(
      _z_steps.radam(b2, eps, silent_sgd_phase), learning_rate, common,
      owner="schedule_free_radam",
  )


def schedule_free_plus(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    b1: Any = 0.9,
    b2: Any = 0.95,
    sf_b1: Any = 0.9,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    r: Any = 0.0,
    polyak_b: Any = 0.0,
    c_warmup: int = 0,
    sf_b1_anneal_steps: int = 0,
    sf_b1_max: Any = 0.965,
    weight_lr_power: Any = 2.0,
    axis_name: Any = None,
    mask: Any = None,
    lr_scales: Any = None,
    weight_decay_scales: Any = None,
    warmup_steps: int = 0,
    weight_decay_at: str = "y",
    state_dtype: Any = None,
    store_x: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""ScheduleFree+: learning-rate-free Schedule-Free AdamW with a Polyak step size.

  The reference's ``AdamCScheduleFreePlusPaper`` (Defazio, 2026). Each update
  needs the loss at the params, passed as ``value`` (like
  ``optax.polyak_sgd``)::

    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)

  Step k (k counts from 0) with gradient :math:`g` and loss :math:`f` at y:

  .. math::

    \beta_k &= 1 - (1 - \beta)^{1 - p_k} (1 - \beta_{\max})^{p_k}, \quad
      p_k = \min(k / K, 1) \\
    e_k &= \frac{\rho\, e_{k-1} + (1 - \rho) \sqrt{\pi / 2}\, \|g\|_1}{1 - \rho^{k+1}}
      \\
    \gamma_k &= \max(\eta_k, \epsilon)\,
      \frac{\max(0,\ f + \beta_k \langle g, z - x \rangle)}{e_k} \\
    z &\leftarrow z - \gamma_k^2 \lambda\, y
      - \gamma_k \frac{m_k / (1 - b_1^{k+1})}{\sqrt{v_k / (1 - b_2^{k+1})} + \epsilon}
      \\
    x &\leftarrow (1 - c_k)\, x + c_k z, \quad
    y = \beta_k x + (1 - \beta_k) z,

  with :math:`\beta` = ``sf_b1``, :math:`\beta_{\max}` = ``sf_b1_max``, K =
  ``sf_b1_anneal_steps`` (no annealing when 0), :math:`\rho` = ``polyak_b``,
  :math:`\eta_k` the learning rate (a multiplier of the Polyak rate, 1 by
  default), m and v Adam's averages of g and g² (``b1``, ``b2``). The weight
  decay is AdamC's: it scales with the square of the step size, so its values
  are tens, not AdamW's 0.1. The averaging weight is the family's,
  :math:`c_k = w_k / \sum_{i \le k} w_i` with :math:`w_k = (k+1)^r\,
  \gamma_{\max}^{p}` and :math:`\gamma_{\max}` starting at eps, except that for
  the first ``c_warmup`` steps c = 1 (x follows z) and nothing is accumulated.

  As in the reference, the bias-corrected L1 estimate :math:`e_k` is what is
  kept for the next step (``group['grad_l1_ema'] = grad_l1_ema_corr``): with
  ``polyak_b`` > 0 the division by :math:`1 - \rho^{k+1}` compounds over the
  first steps (with :math:`\rho = 0.9` the estimate reaches about 4000 times
  the gradient's size around step 20 for a constant gradient, then decays back),
  which makes the first steps short. This is matched, not corrected.

  The step size is global: the L1 norm, the inner product and the loss are
  taken over all parameters. Under ``jit`` with sharded arrays (FSDP,
  ``NamedSharding``) that is automatic. Inside ``shard_map`` or ``pmap`` with
  the parameters split over an axis, give ``axis_name``: the two sums are then
  added over it and the loss averaged over it, as the reference all-reduces
  for sharded (DTensor) gradients. With replicated parameters (data
  parallelism) leave it None and pass the loss averaged over the devices.
  A zero gradient gives a zero step (the reference divides by zero).

  The step size, the Polyak rate and the L1 estimate of the last step are in
  the state, for logging: ``optax.tree.get(opt_state, "step_size")``,
  ``"polyak_rate"`` and ``"grad_l1_ema"`` (a :class:`ScheduleFreePlusState`).

  Args:
    learning_rate: a multiplier of the Polyak rate (float or Optax schedule; the
      reference's group ``lr``, which users change for a warmup), floored at
      eps.
    b1: decay of Adam's first moment, in [0, 1).
    b2: decay of Adam's second moment, in [0, 1).
    sf_b1: Schedule-Free's interpolation between x and z (the other
      optimizers' ``b1``), in (0, 1).
    eps: added to Adam's denominator; also the floor of the learning rate and
      the initial lr_max.
    weight_decay: AdamC's decay: z moves by ``-(step size)**2 * weight_decay *
      y``.
    r: polynomial weighting power of the average.
    polyak_b: decay of the L1 estimate, in [0, 1); 0 uses the current norm.
    c_warmup: number of first steps with c = 1 (the reference recommends 1-2
      times the learning-rate warmup).
    sf_b1_anneal_steps: number of steps over which ``sf_b1`` is annealed to
      ``sf_b1_max`` (in log space on 1 - sf_b1); 0 keeps ``sf_b1``.
    sf_b1_max: the end of the annealing, in (0, 1).
    weight_lr_power: power of the largest step size in the averaging weights.
    axis_name: a mapped axis (``shard_map``, ``pmap``) over which the
      parameters are split: the L1 norm and the inner product are summed over
      it and the loss averaged.
    mask: which params decay (given as to :func:`schedule_free_adamw`).
    lr_scales: per-parameter multipliers of the step size (μP:
      ``mup_flax.schedule_free_scales``), like torch parameter groups with
      ``lr * scale``: the Polyak rate stays global, each parameter moves by
      ``scale * step size`` and decays by ``(scale * step size)**2 *
      weight_decay * weight_decay_scale``.
    weight_decay_scales: per-parameter multipliers of ``weight_decay``.
    warmup_steps: linear warmup (k+1)/warmup_steps of ``learning_rate`` (the
      reference's way: the group lr set by hand).
    weight_decay_at: "y" (the reference) or "z".
    state_dtype: dtype of z, x, m and v; None keeps the params' dtypes.
    store_x: keep x in the state (default) or reconstruct it from y and z.

  Returns:
    A ``GradientTransformationExtraArgs`` with a :class:`ScheduleFreeState`
    whose ``base_state`` is a :class:`ScheduleFreePlusState`.

  Raises:
    ValueError: from ``update`` when ``value`` is missing.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sf_optax
    >>> tx = sf_optax.schedule_free_plus()  # no learning rate to tune
    >>> params = {"w": jnp.array([1.0, -2.0, 3.0])}
    >>> loss_fn = lambda p: jnp.sum((p["w"] - 0.5) ** 2)
    >>> opt_state = tx.init(params)
    >>> @jax.jit
    ... def step(params, opt_state):
    ...   loss, grads = jax.value_and_grad(loss_fn)(params)
    ...   updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    ...   return optax.apply_updates(params, updates), opt_state
    >>> for _ in range(100):
    ...   params, opt_state = step(params, opt_state)
    >>> x = sf_optax.eval_params(opt_state, params)
    >>> bool(loss_fn(x) < 1e-2 * loss_fn({"w": jnp.array([1.0, -2.0, 3.0])}))
    True
    >>> step_size = optax.tree.get(opt_state, "step_size")  # for logging

  References:
    Defazio, `ScheduleFree+: Scaling Learning-Rate-Free & Schedule-Free Learning
    to Large Language Models <https://arxiv.org/abs/2605.19095>`_, 2026;
    Defazio et al, `The Road Less Scheduled <https://arxiv.org/abs/2405.15682>`_,
    2024
  """
  # Named as in the reference: b1 and b2 are Adam's, sf_b1 is the Schedule-Free
  # interpolation (the family's common ``b1``), hence no ``_family.member``.
  _validation.check_scalar("sf_b1", sf_b1, lower=0.0, upper=1.0, lower_open=True)
  _validation.check_scalar("sf_b1_max", sf_b1_max, lower=0.0, upper=1.0, lower_open=True)
  _validation.check_decay("sf_b1_max", sf_b1_max)
  _validation.check_step_count("c_warmup", c_warmup)
  _validation.check_step_count("sf_b1_anneal_steps", sf_b1_anneal_steps)
  z_step = _z_steps.schedule_free_plus(
      b1, b2, eps, sf_b1=sf_b1, sf_b1_max=sf_b1_max, sf_b1_anneal_steps=sf_b1_anneal_steps,
      polyak_b=polyak_b, c_warmup=c_warmup, axis_name=axis_name,
  )
  common = dict(
      b1=sf_b1, weight_decay=weight_decay, weight_decay_at=weight_decay_at, mask=mask,
      lr_scales=lr_scales, weight_decay_scales=weight_decay_scales, warmup_steps=warmup_steps,
      r=r, weight_lr_power=weight_lr_power, state_dtype=state_dtype, store_x=store_x,
  )
  return _family.optimizer(z_step, learning_rate, common, owner="schedule_free_plus")
