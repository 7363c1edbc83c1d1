r"""Schedule-Free Adan: Adan's Nesterov correction and denominator on the z-step.

Adan (Xie et al., 2022) keeps three exponential averages of the gradients
:math:`g_t` it sees, written here with decays (the official code's
``betas=(0.98, 0.92, 0.99)``) and :math:`d_t = g_t - g_{t-1}` (:math:`d_1 = 0`):

.. math::

  m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
  v_t = \beta_2 v_{t-1} + (1 - \beta_2) d_t, \quad
  n_t = \beta_3 n_{t-1} + (1 - \beta_3) (g_t + \beta_2 d_t)^2,

and steps :math:`\theta_{t+1} = \theta_t - \gamma (\hat m_t + \beta_2 \hat v_t)
/ (\sqrt{\hat n_t} + \epsilon)` (hats: bias-corrected, :math:`\hat m_t = m_t /
(1 - \beta_1^t)` and so on). :math:`g_t + \beta_2 d_t` is its "Nesterov
momentum estimate": the gradient extrapolated along the last move, from the
gradients already taken.

Schedule-Free replaces momentum by the interpolation
:math:`y = b_1 x + (1 - b_1) z` and the average :math:`x` (Defazio et al.,
2024). As Schedule-Free AdamW drops Adam's :math:`m` and keeps its :math:`v`,
Schedule-Free Adan drops :math:`m` (:math:`\hat m_t \to g_t`) and keeps what
makes Adan Adan: the average :math:`v` of gradient differences and the
denominator :math:`n` of the Nesterov gradient. Its z-step is

.. math::

  u_t = \frac{g_t + \beta_2 \hat v_t}{\sqrt{\hat n_t} + \epsilon}, \qquad
  z_{t+1} = z_t - \gamma_t u_t - \gamma_t \lambda w_t,

with :math:`\gamma_t` the warmed-up learning rate and :math:`w_t = y_t` (or
:math:`z_t` with ``weight_decay_at="z"``); :math:`x` and :math:`y` then move as
for every Schedule-Free optimizer. The full derivation, and why each piece sits
where it does, is in :func:`schedule_free_adan`'s docstring.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sf_optax import _averaging
from sf_optax import _optimizers
from sf_optax import _schedule_free
from sf_optax import _validation


class AdanState(NamedTuple):
  """State of Schedule-Free Adan's z-step (Adan without its first moment)."""

  previous_gradient: optax.Params  # like z: g_{t-1}, taken at y_{t-1} (zeros before step 1)
  difference: optax.Params  # like z: v, average of gradient differences g_t - g_{t-1}
  nu: optax.Params  # like z: n, average of the squared Nesterov gradient g_t + b2 (g_t - g_{t-1})


def adan_z_step(b2: Any, b3: Any, eps: Any) -> _schedule_free.ZStep:
  """Adan's direction without its first moment: -lr * lr_scale * u per leaf.

  Args:
    b2: decay of the average of gradient differences, and the weight of that
      average in the direction (the official Adan's ``betas[1]``).
    b3: decay of the average of the squared Nesterov gradient.
    eps: added to the denominator.

  Returns:
    A :class:`~sf_optax._schedule_free.ZStep` whose state is an
    :class:`AdanState`. Every buffer has the dtype of z (``state_dtype``).
  """

  def init(params):
    return AdanState(
        previous_gradient=optax.tree.zeros_like(params),
        difference=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
    )

  def update(updates, state, params, *, learning_rate, count, scales, **extra_args):
    del params, extra_args
    dtype = learning_rate.dtype
    correction_difference = _averaging.bias_correction(b2, count, dtype)
    correction_nu = _averaging.bias_correction(b3, count, dtype)
    # No gradient before the first: its difference is zero, as in the official
    # code (previous gradient := current one) and optax.scale_by_adan.
    first_step = count == 0

    def direction(g, previous, difference, nu):
      compute = jnp.promote_types(g.dtype, nu.dtype)
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
    results = [
        direction(*leaves)
        for leaves in zip(
            treedef.flatten_up_to(updates),
            treedef.flatten_up_to(state.previous_gradient),
            treedef.flatten_up_to(state.difference),
            treedef.flatten_up_to(state.nu),
        )
    ]

    def buffer(index, like):
      # Cast back so that the state never drifts from its dtype.
      return treedef.unflatten([
          result[index].astype(old.dtype)
          for result, old in zip(results, treedef.flatten_up_to(like))
      ])

    directions = treedef.unflatten([result[0] for result in results])
    new_state = AdanState(
        previous_gradient=buffer(1, state.previous_gradient),
        difference=buffer(2, state.difference),
        nu=buffer(3, state.nu),
    )
    return _optimizers._scaled_steps(directions, learning_rate, scales), new_state

  return _schedule_free.ZStep(init, update)


def schedule_free_adan(
    learning_rate: optax.ScalarOrSchedule = 0.0025,
    *,
    b1: Any = 0.9,
    b2: Any = 0.92,
    b3: Any = 0.99,
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
  r"""Schedule-Free Adan.

  Adan's z-step without its first moment, inside the Schedule-Free averaging.
  With :math:`g_t` the gradient at :math:`y_t` (the params) and
  :math:`d_t = g_t - g_{t-1}` (:math:`d_1 = 0`):

  .. math::

    v_t &= b_2 v_{t-1} + (1 - b_2) d_t, \qquad
    n_t = b_3 n_{t-1} + (1 - b_3) (g_t + b_2 d_t)^2, \\
    u_t &= \frac{g_t + b_2 v_t / (1 - b_2^t)}{\sqrt{n_t / (1 - b_3^t)} + \epsilon},
    \qquad z_{t+1} = z_t - \gamma_t (u_t + \lambda y_t), \\
    x_{t+1} &= (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}, \qquad
    y_{t+1} = b_1 x_{t+1} + (1 - b_1) z_{t+1},

  with :math:`\gamma_t` the learning rate after linear warmup and :math:`c`
  the averaging weights of :func:`schedule_free_sgd`.

  Derivation (each choice and why):

  * **Adan's m is dropped.** Adan's :math:`\hat m_t` averages gradients
    over about :math:`1/(1-\beta_1)` steps: momentum. Schedule-Free already
    gets momentum's benefit from the interpolation :math:`y = b_1 x + (1-b_1)
    z` and the average :math:`x`; keeping :math:`m` as well would average
    twice (Schedule-Free AdamW drops Adam's :math:`m` for the same reason).
    So :math:`\hat m_t \to g_t`, and ``b1`` here is the interpolation, not
    Adan's :math:`\beta_1`.
  * **v and n are kept.** :math:`\hat v_t` estimates the change of gradient
    along the path (the Hessian times the last move), so
    :math:`g_t + b_2 \hat v_t` is Adan's Nesterov look-ahead gradient; it is
    what makes Adan differ from Adam, and the averaging of :math:`x` does not
    provide it. Its average matters: a single difference of two minibatch
    gradients has twice their noise variance, the average of
    :math:`1/(1-b_2)` of them about :math:`(1-b_2)/(1+b_2)` of that. :math:`n`
    is Adan's adaptive denominator, the second moment of the Nesterov gradient
    :math:`g_t + b_2 d_t`, exactly as in Adan.
  * **The difference is taken at y.** Gradients exist only at the points
    :math:`y_t` where the training loop takes them, so
    :math:`d_t = \nabla f(y_t) - \nabla f(y_{t-1})`, two gradients both taken at
    y; it estimates the Hessian times :math:`y_t - y_{t-1}`. No extra gradient
    evaluation is made.
  * **Warmup** multiplies the learning rate of the z-step and enters the
    averaging weights (through :math:`\gamma_{\max}`) as in every
    Schedule-Free optimizer; Adan's averages are updated on every step,
    warmup or not (they are statistics of the gradients, not of the step).
  * **Weight decay** is the engine's decoupled decay, evaluated at
    :math:`y` (the reference's convention) or at :math:`z` with
    ``weight_decay_at="z"``, scaled by the learning rate and kept out of
    Adan's averages (which see raw gradients only). It is the decay of
    ``optax.adan`` and of the official code's ``no_prox=True``; the official
    default, :math:`\theta \leftarrow (\theta - \gamma u) / (1 + \gamma\lambda)`,
    differs by :math:`O((\gamma\lambda)^2)` per step.
  * **State and first step.** All three buffers start at zero, in
    ``state_dtype`` (like z), so ``init`` works on shapes alone. On the first
    step there is no previous gradient: :math:`d_1 = 0`, hence
    :math:`v_1 = 0` and :math:`u_1 = g_1 / (|g_1| + \epsilon)`. The bias
    corrections count that zero difference as an observation, as the official
    code and ``optax.scale_by_adan`` do, so that this reduces to Adan. The
    previous gradient is replaced by the current raw gradient every step
    (never by the decay term), in z's dtype.

  Reductions (tested): with ``b2=0`` (no Nesterov term, :math:`n` the
  second moment of :math:`g`) this is :func:`schedule_free_adamw` with
  ``b2=b3``. With the Schedule-Free parts switched off (:math:`x = y = z`:
  no interpolation, :math:`b_1 = 1`, and no averaging, :math:`c_t = 1`) the
  iteration is :math:`z_{t+1} = z_t - \gamma (u_t + \lambda z_t)`, the
  published Adan with its first-moment decay set to 0; ``optax.adan(lr,
  b1=0.0, b2=b2, b3=b3, eps=eps, eps_root=0.0)`` computes it when ``b2=0.5``.
  (``optax.scale_by_adan`` weights the difference by ``1 - b2`` instead of
  the paper's and official code's ``b2``; the two agree only at 0.5.)

  Memory: z, x (unless ``store_x=False``) and Adan's three buffers.

  Args:
    learning_rate: a float or an Optax schedule; multiplied by the warmup.
    b1: interpolation between x and z (Schedule-Free's momentum), in (0, 1].
      Adan's own first-moment decay (0.98 in the official code) has no
      counterpart: b1 plays that role (0.95-0.98 suits long runs).
    b2: decay of the average of gradient differences and its weight in the
      direction, in [0, 1) (the official ``betas[1]``).
    b3: decay of the average of the squared Nesterov gradient, in [0, 1)
      (the official ``betas[2]``).
    eps: added to the denominator.
    weight_decay: decoupled weight decay, scaled by the learning rate.
    warmup_steps: linear warmup (k+1)/warmup_steps of the learning rate.
    r: polynomial weighting power of the average.
    weight_lr_power: power of the largest learning rate in the averaging
      weights.
    mask: which params decay: a tree of bools (or a prefix), or a function of
      params returning one.
    lr_scales: per-parameter learning-rate multipliers (see
      :func:`schedule_free_sgd`); for μP use
      ``mup_flax.schedule_free_scales(infshapes, rule="adam")``: the direction
      is normalized entrywise, like Adam's.
    weight_decay_scales: per-parameter multipliers of ``weight_decay``.
    weight_decay_at: where the decay is evaluated, "y" (default) or "z".
    state_dtype: dtype of z, x and Adan's buffers.
    store_x: keep x in the state (see :func:`schedule_free_sgd`).

  Returns:
    A ``GradientTransformationExtraArgs`` with a :class:`ScheduleFreeState`
    whose ``base_state`` is an :class:`AdanState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sf_optax
    >>> tx = sf_optax.schedule_free_adan(0.1, warmup_steps=10)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> for _ in range(200):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(sf_optax.eval_params(state, params)) < 1e-2)
    True

  References:
    Xie et al, `Adan: Adaptive Nesterov Momentum Algorithm for Faster
    Optimizing Deep Models <https://arxiv.org/abs/2208.06677>`_, 2022;
    Defazio et al, `The Road Less Scheduled <https://arxiv.org/abs/2405.15682>`_,
    2024
  """
  _optimizers._check_adaptive(
      learning_rate, b1, b2, eps, weight_decay, r, weight_lr_power, warmup_steps
  )
  _validation.check_scalar("b3", b3, lower=0.0, upper=1.0)
  if _validation.is_concrete(b3) and float(b3) == 1.0:
    raise ValueError(f"b3 must lie in [0, 1), got {b3!r}.")
  return _schedule_free.schedule_free_transform(
      adan_z_step(b2, b3, eps),
      _optimizers._warmed_up(learning_rate, warmup_steps),
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
