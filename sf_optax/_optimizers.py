"""The built-in Schedule-Free optimizers: SGD, AdamW, AdamW (paper variant), RAdam.

Each is one z-step of ``_z_steps`` plus the common settings (``_family``).
"""

from __future__ import annotations

from typing import Any

import optax

from sf_optax import _family
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
  return _family.optimizer(_z_steps.sgd(), learning_rate, common, owner="schedule_free_sgd")


@_family.member
def schedule_free_adamw(
    learning_rate: optax.ScalarOrSchedule = 0.0025,
    *,
    b2: Any = 0.999,
    eps: Any = 1e-8,
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

  Args:
    learning_rate: a float or an Optax schedule; multiplied by the warmup.
    b2: decay of the second-moment average, in [0, 1).
    eps: added to the denominator.
    COMMON_SETTINGS

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
  return _family.optimizer(
      _z_steps.adamw(b2, eps), learning_rate, common, owner="schedule_free_adamw"
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
