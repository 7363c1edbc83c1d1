"""Schedule-Free Adan: Adan's Nesterov correction and denominator on the z-step.

The derivation (what is kept of Adan, what is dropped, and why) is in
docs/EXTRAS.md, section 1; the z-step is ``_z_steps.adan``.
"""

from __future__ import annotations

from typing import Any

import optax

from sf_optax import _family
from sf_optax import _z_steps


@_family.member
def schedule_free_adan(
    learning_rate: optax.ScalarOrSchedule = 0.0025,
    *,
    b2: Any = 0.92,
    b3: Any = 0.99,
    eps: Any = 1e-8,
    **common: Any,
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
  the averaging weights of :func:`schedule_free_sgd`. Adan's own momentum
  :math:`m` is dropped (b1's interpolation plays its role, as Schedule-Free
  AdamW drops Adam's); its averages :math:`v` and :math:`n` are kept, with the
  gradient difference taken between consecutive points y. Why each piece sits
  where it does, the reductions to Schedule-Free AdamW (``b2=0``) and to Adan,
  and measurements: docs/EXTRAS.md. Memory: z, x (unless ``store_x=False``)
  and three buffers like z.

  Args:
    learning_rate: a float or an Optax schedule; multiplied by the warmup.
    b2: decay of the average of gradient differences and its weight in the
      direction, in [0, 1) (the official ``betas[1]``).
    b3: decay of the average of the squared Nesterov gradient, in [0, 1)
      (the official ``betas[2]``).
    eps: added to the denominator.
    COMMON_SETTINGS

  Returns:
    A ``GradientTransformationExtraArgs`` with a :class:`ScheduleFreeState`
    whose ``base_state`` is an :class:`AdanState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sf_optax
    >>> tx = sf_optax.schedule_free_adan(0.1, warmup_steps=10)
    >>> distance = lambda p: jnp.sum((p - jnp.array([1.0, -2.0])) ** 2)
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(distance)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(200):
    ...   params, state = step(params, state)
    >>> print(type(state.base_state).__name__, bool(distance(sf_optax.eval_params(state, params)) < 1e-2))
    AdanState True

  References:
    Xie et al, `Adan: Adaptive Nesterov Momentum Algorithm for Faster
    Optimizing Deep Models <https://arxiv.org/abs/2208.06677>`_, 2022;
    Defazio et al, `The Road Less Scheduled <https://arxiv.org/abs/2405.15682>`_,
    2024
  """
  return _family.optimizer(
      _z_steps.adan(b2, b3, eps), learning_rate, common, owner="schedule_free_adan"
  )
