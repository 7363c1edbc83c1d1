"""ScheduleFree+ (``sf_optax.schedule_free_plus``) beyond the reference fixtures.

Parity with the reference is ``test_schedule_free_head_parity.py``; the shared
interoperability suite is ``test_schedule_free_suite.py``; sharded runs are
``test_sharding_plus.py``. Here: μP scales against a float64 NumPy
transcription, the logged step size, the errors, and the edge cases the
reference does not reach (a zero gradient, a schedule against warmup_steps).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mup_flax
import sf_optax
from mup_flax import InfDim
from mup_flax import InfShape

from _helpers import default_tier


def params_and_infshapes(width=32, base=8):
  rng = np.random.default_rng(0)
  params = {
      "embed": rng.normal(size=(3, width)),  # vector-like: one infinite dimension
      "hidden": rng.normal(size=(width, width)) / math.sqrt(width),  # matrix-like
      "bias": rng.normal(size=(width,)),  # vector-like
      "gain": np.asarray(0.7),  # scalar-like
  }
  infshapes = {
      "embed": InfShape([InfDim(None, 3), InfDim(base, width)]),
      "hidden": InfShape([InfDim(base, width), InfDim(base, width)]),
      "bias": InfShape([InfDim(base, width)]),
      "gain": InfShape([]),
  }
  return params, infshapes


def loss_fn(params, inputs):
  hidden = jnp.tanh(inputs @ params["embed"] + params["bias"][None, :])
  return 0.5 * jnp.mean((params["gain"] * hidden @ params["hidden"]) ** 2) + 0.1


def numpy_schedule_free_plus_scaled(params, grads, values, *, learning_rate, lr_scales,
                                    weight_decay_scales, weight_decay, b1=0.9, b2=0.95,
                                    sf_b1=0.9, eps=1e-8, polyak_b=0.0, c_warmup=0):
  """ScheduleFree+ on the reference's parameter groups, one group per leaf.

  A torch param group with ``lr = learning_rate * s`` and ``weight_decay =
  weight_decay * d`` moves its z with the step size ``s * rate`` (rate global:
  one Polyak rule over all parameters) and decays it by ``(s * rate)**2 *
  weight_decay * d * y``; the averaging weights are the same in every group
  (a constant factor s**weight_lr_power cancels out of c).
  """
  names = sorted(params)
  y = {n: np.array(params[n], np.float64) for n in names}
  z = {n: y[n].copy() for n in names}
  x = {n: y[n].copy() for n in names}
  m = {n: np.zeros_like(y[n]) for n in names}
  v = {n: np.zeros_like(y[n]) for n in names}
  estimate, largest, weights = 0.0, eps, 0.0
  for k, (g, f) in enumerate(zip(grads, values)):
    l1 = sum(float(np.abs(g[n]).sum()) for n in names)
    ip = sf_b1 * sum(float((g[n] * (z[n] - x[n])).sum()) for n in names)
    estimate = (polyak_b * estimate + (1 - polyak_b) * math.sqrt(math.pi / 2) * l1) / (
        1 - polyak_b ** (k + 1))
    rate = max(learning_rate, eps) * max(0.0, f + ip) / estimate
    largest = max(largest, rate)
    if k < c_warmup:
      c = 1.0
    else:
      weights += (k + 1) ** 0.0 * largest ** 2.0
      c = largest ** 2.0 / weights
    for n in names:
      step = lr_scales[n] * rate
      z[n] = z[n] - step * step * weight_decay * weight_decay_scales[n] * y[n]
      m[n] = b1 * m[n] + (1 - b1) * g[n]
      v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
      z[n] = z[n] - step * (m[n] / (1 - b1 ** (k + 1))) / (
          np.sqrt(v[n] / (1 - b2 ** (k + 1))) + eps)
      x[n] = (1 - c) * x[n] + c * z[n]
      y[n] = sf_b1 * x[n] + (1 - sf_b1) * z[n]
  return y, x


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize(
    "store_x", default_tier([True, False], {"no_x"}, ids={True: "store_x", False: "no_x"}.get))
def test_mup_scales_the_z_step_and_keeps_the_rate_global(store_x):
  params, infshapes = params_and_infshapes()
  scales = mup_flax.schedule_free_scales(infshapes)
  assert scales["lr_scales"]["hidden"] == 0.25 and scales["weight_decay_scales"]["hidden"] == 4.0
  hyperparameters = dict(learning_rate=0.5, weight_decay=2.0, polyak_b=0.5, c_warmup=3)
  tx = sf_optax.schedule_free_plus(**hyperparameters, store_x=store_x, **scales)
  inputs = jnp.asarray(np.random.default_rng(1).normal(size=(16, 3)))

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      value, grads = jax.value_and_grad(loss_fn)(params, inputs)
      updates, state = tx.update(grads, state, params, value=value)
      return (optax.apply_updates(params, updates), state), (grads, value)

    (params, state), (grads, values) = jax.lax.scan(
        step, (params, tx.init(params)), None, length=30)
    return params, sf_optax.eval_params(state, params), grads, values

  y, x, grads, values = run(jax.tree.map(jnp.asarray, params))
  grads = [{n: np.asarray(g[k]) for n, g in grads.items()} for k in range(len(values))]
  expected_y, expected_x = numpy_schedule_free_plus_scaled(
      params, grads, np.asarray(values), **hyperparameters, **scales)
  for n in params:
    scale = np.abs(expected_y[n]).max()
    assert np.abs(np.asarray(y[n]) - expected_y[n]).max() <= 1e-10 * scale, n
    assert np.abs(np.asarray(x[n]) - expected_x[n]).max() <= 1e-10 * scale, n
  # The scales matter: the same gradients without them give another trajectory.
  ones = {n: 1.0 for n in params}
  unscaled_y, _ = numpy_schedule_free_plus_scaled(
      params, grads, np.asarray(values), **hyperparameters, lr_scales=ones,
      weight_decay_scales=ones)
  assert max(np.abs(np.asarray(y[n]) - unscaled_y[n]).max() for n in params) > 1e-3


def test_missing_value_is_a_clear_error():
  tx = sf_optax.schedule_free_plus()
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"value=loss"):
    tx.update({"w": jnp.ones(3)}, state, params)
  with pytest.raises(ValueError, match=r"value=loss"):
    optax.chain(optax.clip(1.0), tx).update(
        {"w": jnp.ones(3)}, optax.chain(optax.clip(1.0), tx).init(params), params)


def test_step_size_is_logged_in_the_state():
  tx = optax.inject_hyperparams(sf_optax.schedule_free_plus)(learning_rate=0.5)
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  state = tx.init(params)
  loss = lambda p: jnp.sum(p["w"] ** 2)
  for _ in range(3):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params, value=value)
    params = optax.apply_updates(params, updates)
  step_size = optax.tree.get(state, "step_size")
  polyak_rate = optax.tree.get(state, "polyak_rate")
  assert float(step_size) > 0
  np.testing.assert_allclose(step_size, 0.5 * polyak_rate, rtol=1e-6)


def test_first_step_size_is_the_polyak_rule():
  """Step 1: ip = 0, the L1 estimate is sqrt(pi/2) ||g||_1, so rate = lr * f / that."""
  tx = sf_optax.schedule_free_plus(0.5)
  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(3.0)}
  grads = {"w": jnp.array([0.5, -1.5]), "b": jnp.array(2.0)}
  _, state = tx.update(grads, tx.init(params), params, value=jnp.asarray(4.0))
  expected = 0.5 * 4.0 / (math.sqrt(math.pi / 2) * 4.0)
  np.testing.assert_allclose(optax.tree.get(state, "step_size"), expected, rtol=1e-6)


def test_zero_gradient_gives_a_zero_step():
  """The reference divides by zero here; a zero gradient has nothing to follow."""
  tx = sf_optax.schedule_free_plus(weight_decay=1.0)
  params = {"w": jnp.array([1.0, -2.0])}
  updates, state = tx.update({"w": jnp.zeros(2)}, tx.init(params), params, value=1.0)
  assert not np.any(np.asarray(updates["w"]))
  assert float(optax.tree.get(state, "step_size")) == 0.0
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state))


def test_warmup_steps_equals_a_warmup_schedule():
  kwargs = dict(weight_decay=1.0, c_warmup=4, polyak_b=0.9)
  with_warmup = sf_optax.schedule_free_plus(0.5, warmup_steps=5, **kwargs)
  # The reference's own warmup: the group lr set to lr * (k+1)/5 before step k.
  with_schedule = sf_optax.schedule_free_plus(
      lambda count: 0.5 * jnp.minimum((count + 1) / 5, 1.0), **kwargs)
  params = jnp.array([1.0, -2.0, 0.5])
  loss = lambda p: jnp.sum((p - 0.3) ** 2) + 0.05
  results = []
  for tx in (with_warmup, with_schedule):
    p, state = params, tx.init(params)
    for _ in range(8):
      value, grads = jax.value_and_grad(loss)(p)
      updates, state = tx.update(grads, state, p, value=value)
      p = optax.apply_updates(p, updates)
    results.append(p)
  np.testing.assert_allclose(results[0], results[1], rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(polyak_b=1.0), "polyak_b"),
    (dict(polyak_b=-0.1), "polyak_b"),
    (dict(sf_b1=0.0), "sf_b1"),
    (dict(sf_b1_max=1.0), "sf_b1_max"),
    (dict(sf_b1_anneal_steps=-1), "sf_b1_anneal_steps"),
    (dict(sf_b1_anneal_steps=2.5), "sf_b1_anneal_steps"),
    (dict(c_warmup=-1), "c_warmup"),
    (dict(b2=1.0), "b2"),
    (dict(eps=-1.0), "eps"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(learning_rate=-1.0), "learning_rate"),
])
def test_bad_hyperparameters_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sf_optax.schedule_free_plus(**kwargs)


def test_adamw_without_inner_momentum_has_no_buffer():
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  plain = sf_optax.schedule_free_adamw(1e-2).init(params)
  zero = sf_optax.schedule_free_adamw(1e-2, inner_momentum=0.0).init(params)
  with_momentum = sf_optax.schedule_free_adamw(1e-2, inner_momentum=0.9).init(params)
  size = lambda state: sum(leaf.size for leaf in jax.tree.leaves(state))
  assert size(zero) == size(plain)
  assert size(with_momentum) == size(plain) + 15


@pytest.mark.parametrize("inner_momentum", [-0.1, 1.0])
def test_bad_inner_momentum_is_named(inner_momentum):
  with pytest.raises(ValueError, match="inner_momentum"):
    sf_optax.schedule_free_adamw(1e-2, inner_momentum=inner_momentum)
