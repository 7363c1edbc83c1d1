"""Precision of the Schedule-Free bookkeeping and of low-precision params.

Three properties, each with a test that fails when it breaks:

- the scalar bookkeeping (count, weight_sum, lr_max, c) is float32 or wider,
  whatever the params' dtype;
- with float32 bookkeeping, the averaging coefficient c stays within 1e-6
  relative of the reference's float64 value over a million steps (a plain
  float32 sum does not, which the test also shows);
- bf16 params with ``state_dtype=jnp.float32``: y stays bf16, z and x float32,
  and x follows a float32 run to within the rounding of y to bf16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sf_optax
from sf_optax import _averaging

from test_schedule_free_suite import every_optimizer, make_params

BOOKKEEPING = ("weight_sum", "weight_sum_compensation", "lr_max", "b1")


def dtype_id(dtype):
  return "None" if dtype is None else jnp.dtype(dtype).name


@every_optimizer(all)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=dtype_id)
@pytest.mark.parametrize("state_dtype", [None, jnp.bfloat16, jnp.float32], ids=dtype_id)
def test_bookkeeping_is_float32_or_wider(optimizer, dtype, state_dtype):
  tx = optimizer.factory(0.1, state_dtype=state_dtype)
  params = make_params(dtype)
  state = jax.eval_shape(tx.init, params)
  _, new_state = jax.eval_shape(
      lambda g, s, p: tx.update(g, s, p, value=jnp.ones([])), params, state, params)
  for s in (state, new_state):
    assert s.count.dtype == jnp.int32
    for name in BOOKKEEPING:
      assert getattr(s, name).dtype == jnp.float32, name


@every_optimizer(all)
def test_bookkeeping_is_float32_under_inject_hyperparams_with_bf16_params(optimizer):
  # inject_hyperparams casts the hyperparameters to the params' dtype (bf16).
  tx = optax.inject_hyperparams(optimizer.factory)(learning_rate=0.1, b1=0.9)
  params = make_params(jnp.bfloat16)
  state = jax.eval_shape(tx.init, params)
  _, new_state = jax.eval_shape(
      lambda g, s, p: tx.update(g, s, p, value=jnp.ones([], jnp.bfloat16)), params, state, params)
  assert new_state.hyperparams["b1"].dtype == jnp.bfloat16
  for s in (state.inner_state, new_state.inner_state):
    for name in BOOKKEEPING:
      assert getattr(s, name).dtype == jnp.float32, name


@pytest.mark.usefixtures("x64")
def test_bookkeeping_follows_float64_params():
  tx = sf_optax.schedule_free_adamw(0.1)
  state = jax.eval_shape(tx.init, make_params(jnp.float64))
  for name in BOOKKEEPING:
    assert getattr(state, name).dtype == jnp.float64, name


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=dtype_id)
def test_averaging_coefficient_is_float32_with_low_precision_learning_rates(dtype):
  # inject_hyperparams hands the factory hyperparameters in the params' dtype.
  zero = jnp.zeros([], jnp.float32)
  averaging = _averaging.averaging_step(
      jnp.zeros([], jnp.int32), jnp.asarray(0.1, dtype), zero, zero, zero,
      r=0.5, weight_lr_power=2.0,
  )
  for name, value in averaging._asdict().items():
    assert value.dtype == jnp.float32, name


STEPS = 1_000_000
WARMUP_STEPS = 10_000
R = 0.5
WEIGHT_LR_POWER = 2.0


def reference_learning_rates():
  """The learning rate of every step, in float64.

  Four silent steps (lr = 0, as RAdam's), a linear warmup, then a schedule that
  raises lr (so lr_max and the weights jump) and then decays it (lr_max holds).
  """
  k = np.arange(STEPS, dtype=np.float64)
  base = np.where(
      k < 400_000,
      0.3,
      np.where(k < 700_000, 0.7, 0.7 * (0.55 + 0.45 * np.cos(np.pi * (k - 700_000) / 300_000))),
  )
  sched = np.where(k < WARMUP_STEPS, (k + 1) / WARMUP_STEPS, 1.0)
  learning_rates = base * sched
  learning_rates[:4] = 0.0
  return learning_rates


def reference_coefficients(learning_rates):
  """c of every step, transcribed from the reference (Python float64)::

      lr_max = max(lr, lr_max)                 # lr_max starts at -1.0
      weight = (k+1)**r * lr_max**weight_lr_power
      weight_sum += weight                     # starts at 0.0
      c = weight / weight_sum   (0 if weight_sum == 0)
  """
  k = np.arange(len(learning_rates), dtype=np.float64)
  lr_max = np.maximum.accumulate(np.maximum(learning_rates, -1.0))
  weight = (k + 1) ** R * lr_max**WEIGHT_LR_POWER
  weight_sum = np.cumsum(weight)
  return np.divide(weight, weight_sum, out=np.zeros_like(weight), where=weight_sum != 0)


@jax.jit
def float32_coefficients(learning_rates):
  """c of every step from averaging_step in float32, and from a plain float32 sum."""

  def step(carry, learning_rate):
    count, lr_max, weight_sum, compensation, naive_sum = carry
    averaging = _averaging.averaging_step(
        count, learning_rate, lr_max, weight_sum, compensation,
        r=R, weight_lr_power=WEIGHT_LR_POWER,
    )
    # The naive alternative: the same weight, summed without compensation.
    weight = jnp.power((count + 1).astype(jnp.float32), R) * jnp.power(
        averaging.lr_max, WEIGHT_LR_POWER
    )
    naive_sum = naive_sum + weight
    naive_c = jnp.where(naive_sum > 0, weight / jnp.where(naive_sum > 0, naive_sum, 1), 0)
    carry = (
        count + 1, averaging.lr_max, averaging.weight_sum,
        averaging.weight_sum_compensation, naive_sum,
    )
    return carry, (averaging.c, naive_c)

  zero = jnp.zeros([], jnp.float32)
  init = (jnp.zeros([], jnp.int32), zero, zero, zero, zero)
  return jax.lax.scan(step, init, learning_rates)[1]


def test_averaging_coefficient_matches_float64_over_a_million_steps():
  learning_rates = reference_learning_rates()
  expected = reference_coefficients(learning_rates)
  c, naive_c = map(np.asarray, float32_coefficients(jnp.asarray(learning_rates, jnp.float32)))
  assert c.dtype == np.float32

  silent = expected == 0
  assert silent.sum() == 4
  np.testing.assert_array_equal(c[silent], 0)

  def max_relative_error(actual):
    return np.max(np.abs(actual[~silent] - expected[~silent]) / expected[~silent])

  assert max_relative_error(c) <= 1e-6
  # The bound has teeth: a plain float32 running sum drifts ~1e-3 away.
  assert max_relative_error(naive_c) > 1e-5


BF16_STEPS = 2_000
TARGET = jnp.linspace(1.0, 1.9, 8, dtype=jnp.float32).reshape(2, 4)
CURVATURE = jnp.linspace(0.5, 1.0, 8, dtype=jnp.float32).reshape(2, 4)


def noisy_gradient(y, noise):
  """A noisy quadratic around TARGET in [1, 2), in the params' dtype, as training computes it."""
  return (CURVATURE * (y.astype(jnp.float32) - TARGET) + 0.5 * noise).astype(y.dtype)


def noiseless_loss(y):
  """The loss whose gradient noisy_gradient perturbs (its minimum is 0), in float32."""
  return 0.5 * jnp.sum(CURVATURE * (y.astype(jnp.float32) - TARGET) ** 2)


def x_deviation(tx_low, low_dtype, tx_high):
  """Runs tx_low on low_dtype params and tx_high on float32 params side by side.

  Both see the same gradient noise; each gradient is taken at its own y.
  Returns max over steps and entries of |x_low - x_high|, max |y| of the float32
  run, and the final params and state of the low-precision run.
  """
  noise = jax.random.normal(jax.random.key(0), (BF16_STEPS, *TARGET.shape))

  def step(carry, noise):
    (y_low, state_low), (y_high, state_high), deviation, y_max = carry
    # ScheduleFree+ reads the loss (`value`); the other optimizers ignore it.
    updates_low, state_low = tx_low.update(
        noisy_gradient(y_low, noise), state_low, y_low, value=noiseless_loss(y_low))
    y_low = optax.apply_updates(y_low, updates_low)
    updates_high, state_high = tx_high.update(
        noisy_gradient(y_high, noise), state_high, y_high, value=noiseless_loss(y_high))
    y_high = optax.apply_updates(y_high, updates_high)
    x_low = sf_optax.eval_params(state_low, y_low) if state_low.x is None else state_low.x
    difference = jnp.abs(x_low.astype(jnp.float32) - state_high.x)
    deviation = jnp.maximum(deviation, jnp.max(difference))
    y_max = jnp.maximum(y_max, jnp.max(jnp.abs(y_high)))
    return ((y_low, state_low), (y_high, state_high), deviation, y_max), None

  y_low, y_high = jnp.zeros(TARGET.shape, low_dtype), jnp.zeros(TARGET.shape, jnp.float32)
  zero = jnp.zeros([], jnp.float32)
  init = ((y_low, tx_low.init(y_low)), (y_high, tx_high.init(y_high)), zero, zero)
  ((y_low, state_low), _, deviation, y_max), _ = jax.lax.scan(step, init, noise)
  return deviation, y_max, y_low, state_low


def bf16_rounding(magnitude):
  """The largest error of rounding a value of this magnitude to bf16: half its spacing.

  bf16 keeps 8 significant bits: values in [2^e, 2^(e+1)) are spaced 2^(e-7).
  """
  return 0.5 * 2.0 ** (np.floor(np.log2(magnitude)) - 7)


@every_optimizer()
def test_bf16_params_with_float32_state_follow_a_float32_run(optimizer):
  learning_rate = 0.05
  tx_bf16 = optimizer.factory(learning_rate, state_dtype=jnp.float32)
  tx_f32 = optimizer.factory(learning_rate)
  deviation, y_max, y, state = jax.jit(
      lambda: x_deviation(tx_bf16, jnp.bfloat16, tx_f32)
  )()
  assert y.dtype == jnp.bfloat16
  assert state.z.dtype == jnp.float32 and state.x.dtype == jnp.float32
  # Why this bound. The bf16 run differs from the float32 run only in that y
  # is rounded to bf16 after each step (and its gradient, taken there, in
  # bf16): z, x and the bookkeeping are float32, and y is recomputed from them
  # each step, so the rounding errors do not accumulate in y. They reach x only
  # through gradients, and x averages them over the run. So x must stay within
  # a single rounding of y to bf16 (half a bf16 ulp of max|y|, 2^-9 for y in
  # [1, 2)): x is then as good as y's own storage allows, not worse. Measured:
  # about a tenth of that; a bf16 state misses it by 10-60x (the next test).
  assert float(deviation) <= bf16_rounding(float(y_max)), (
      f"x deviates by {float(deviation) / bf16_rounding(float(y_max)):.2f} bf16 roundings of y"
  )


def test_bf16_bound_fails_with_a_bf16_state():
  # The same comparison, the state kept in bf16 (state_dtype=jnp.bfloat16): small
  # updates of z and x are lost to rounding, and the bound above catches it.
  tx_f32 = sf_optax.schedule_free_sgd(0.05)
  deviation, y_max, _, state = jax.jit(
      lambda: x_deviation(
          sf_optax.schedule_free_sgd(0.05, state_dtype=jnp.bfloat16), jnp.bfloat16, tx_f32)
  )()
  assert state.x.dtype == jnp.bfloat16
  assert float(deviation) > 5 * bf16_rounding(float(y_max))


@pytest.mark.parametrize(
    "factory",
    [sf_optax.schedule_free_adamw, sf_optax.schedule_free_adamw_paper, sf_optax.schedule_free_radam],
    ids=lambda f: f.__name__,
)
def test_adaptive_steps_with_a_bf16_state_stay_bounded(factory):
  # With bf16 params and state_dtype=bf16 the second moment v is bf16; it must
  # still be an average of g^2 (bf16 rounds b2 = 0.999 to 1: arithmetic must be
  # float32 or wider) (as optax.adam's and the reference's are), so a
  # step of an adaptive method stays about lr in size.
  kwargs = dict(state_dtype=jnp.bfloat16)
  if factory is sf_optax.schedule_free_radam:
    kwargs["silent_sgd_phase"] = False
  tx = factory(1e-2, **kwargs)
  params = jnp.ones(3, jnp.bfloat16)
  state = tx.init(params)
  for _ in range(6):
    updates, state = tx.update(jnp.full(3, 0.5, jnp.bfloat16), state, params)
    assert float(jnp.max(jnp.abs(updates))) < 0.1
    params = optax.apply_updates(params, updates)
