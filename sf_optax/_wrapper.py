"""schedule_free(base, ...): any Optax optimizer as the z-step of Schedule-Free."""

from __future__ import annotations

import warnings
from typing import Any

import optax

from sf_optax import _family
from sf_optax import _validation
from sf_optax import _z_steps


@_family.member
def schedule_free(
    base_optimizer: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay_at_y: Any = None,
    **common: Any,
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
  own unless you want both: b1 plays that role. The common settings act as for
  the built-in optimizers: ``warmup_steps`` and ``lr_scales`` multiply the
  base's step, ``weight_decay`` is the wrapper's own decoupled decay (at y by
  default, applied to z before the base step), on top of any decay of the base.

  The state is the base's state plus z (plus x). With ``store_x=False`` both
  the z and the y update need the base's step; on CPU, where XLA gives each
  output its own loop, the y loop recomputes it from the gradient and the
  base's *new* state, replaying the base's own equations (so no params-sized
  temporary holds it). That works for elementwise bases whose step depends on
  their old state and the params only through their new state: SGD with or
  without momentum, Adam/AdamW without decay, RMSProp, AdaBelief,
  ``mup_flax.mu_adam``/``mu_sgd`` and chains of such. It cannot be done for a
  base whose step reads its old state otherwise (``optax.lion``: sign(b1 m +
  (1 - b1) g) while m' = b2 m + (1 - b2) g) or reads the params (a weight decay
  inside the base, e.g. ``optax.add_decayed_weights`` in a chain; pass
  ``weight_decay`` to the wrapper instead): then the step is shared, and XLA:CPU
  may write it to a params-sized temporary, which costs one more write and read
  of the parameters' size per step (``benchmarks/step_time.py``, wrapper suite,
  measures it). A base with a reduction over the gradient
  (``optax.clip_by_global_norm``) is replayed with its reduction: one more read
  of the gradient.

  The base's state is kept as the base defines it, and its buffers cost their
  reads and writes: ``optax.adam(b1=0)`` still keeps its first moment, so
  ``schedule_free(optax.adam(lr, b1=0), lr)`` moves 1.22x (``store_x=True``) to
  1.29x (``store_x=False``) the bytes of ``schedule_free_adamw(lr)`` and takes
  1.17x to 1.24x its step time: the same time per byte. Where a built-in
  computes the same thing, prefer it.

  Args:
    base_optimizer: any Optax transformation; it moves z.
    learning_rate: the base's learning rate (float or schedule): used for the
      averaging weights and for ``weight_decay``. Pass the same schedule the
      base uses.
    weight_decay_at_y: deprecated spelling of ``weight_decay`` (the name of
      the PyTorch reference's ``ScheduleFreeWrapper``).
    COMMON_SETTINGS

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
  if weight_decay_at_y is not None:
    if "weight_decay" in common:
      raise TypeError(
          "schedule_free() got both weight_decay and its deprecated spelling"
          " weight_decay_at_y: pass weight_decay only."
      )
    warnings.warn(
        "schedule_free(weight_decay_at_y=...) is deprecated: pass weight_decay=...",
        DeprecationWarning,
        stacklevel=2,
    )
    common = {**common, "weight_decay": weight_decay_at_y}
  _validation.check_base_optimizer(base_optimizer)
  return _family.optimizer(
      _z_steps.transformation(base_optimizer), learning_rate, common, owner="schedule_free"
  )
