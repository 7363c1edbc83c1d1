"""No silent wrong step: the bad inputs of issue 10 (items 5-10), each refused or handled right.

Every case here was observed to go wrong silently (or with a raw error) before:
half-precision state that loses the steps, averaging weights that under- or
overflow, infinite or non-numeric hyperparameters accepted, eps = 0 dividing
0 by 0, a string for ``base_optimizer``, Python scalar leaves, integer and
complex params, and ``eval_params`` on params of other shapes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sf_optax
from sf_optax import _averaging

from _helpers import default_tier
from test_schedule_free_suite import OPTIMIZERS, every_optimizer, make_params

ADAPTIVE = [o for o in OPTIMIZERS if o.name in ("adamw", "adamw_paper", "radam", "adan")]
every_adaptive = pytest.mark.parametrize("optimizer", ADAPTIVE, ids=str)


def run(tx, params, grads, steps):
  state = tx.init(params)
  for _ in range(steps):
    # A loss value for ScheduleFree+ (the others ignore the extra argument).
    updates, state = tx.update(grads, state, params, value=1.0)
    params = optax.apply_updates(params, updates)
  return params, state


# --------------------------------------------------------------------------- 5. half precision


def test_float16_adamw_moves_z_by_the_learning_rate():
  # Observed: z moved by -10, because (1 - b2) g^2 = 1e-11 underflows to 0 in float16.
  params = jnp.zeros(3, jnp.float16)
  _, state = run(sf_optax.schedule_free_adamw(1e-3), params, jnp.full(3, 1e-4, jnp.float16), 1)
  np.testing.assert_allclose(np.asarray(state.z, np.float64), -1e-3, rtol=1e-3)


@every_optimizer(all)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["f16", "bf16"])
def test_half_precision_params_get_a_float32_state_by_default(optimizer, dtype):
  params = make_params(dtype)
  state = jax.eval_shape(optimizer.factory(0.1).init, params)
  buffers = [state.z, state.x, state.base_state]
  floating = {leaf.dtype for leaf in jax.tree.leaves(buffers) if leaf.ndim}
  if not optimizer.name.startswith("wrapper"):  # optax.adam keeps its own moments' dtype
    assert floating == {jnp.dtype(jnp.float32)}
  assert {leaf.dtype for leaf in jax.tree.leaves(state.z)} == {jnp.dtype(jnp.float32)}
  updates, _ = jax.eval_shape(
      lambda g, s, p: optimizer.factory(0.1).update(g, s, p, value=1.0), params, state, params)
  assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(dtype)}


@every_optimizer(all)
def test_an_explicit_half_precision_state_is_kept(optimizer):
  params = make_params(jnp.bfloat16)
  state = jax.eval_shape(optimizer.factory(0.1, state_dtype=jnp.bfloat16).init, params)
  assert {leaf.dtype for leaf in jax.tree.leaves(state.z)} == {jnp.dtype(jnp.bfloat16)}


# --------------------------------------------------------------------------- 6. averaging weights


def test_weight_lr_power_16_with_a_small_learning_rate_still_averages():
  # Observed: (1e-3)^16 underflows float32, every weight is 0 and x never moves.
  params, state = run(sf_optax.schedule_free_sgd(1e-3, weight_lr_power=16), jnp.ones(2),
                      jnp.ones(2), 10)
  x = sf_optax.eval_params(state, params)
  # c = 1/(k+1) with a constant lr and r = 0: x is the mean of z_1..z_10.
  np.testing.assert_allclose(x, 1 - 1e-3 * 5.5, rtol=1e-6)


def test_r_8_does_not_overflow_after_65k_steps():
  # Observed: (k+1)^8 overflows float32 after about 65k steps and x became NaN.
  tx = sf_optax.schedule_free_sgd(1e-3, r=8)
  params = jnp.zeros(1)

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(jnp.ones(1), state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=70_000))(
      (params, tx.init(params)))
  x = sf_optax.eval_params(state, params)
  assert bool(jnp.all(jnp.isfinite(x)))
  # z_k = -k lr; the (k+1)^8-weighted mean of z_1..z_n is -lr (8+1)/(8+2) n nearly.
  np.testing.assert_allclose(x, -1e-3 * 70_000 * 9 / 10, rtol=1e-3)


def power_sum(n, r):
  """sum_{i=1}^{n} i^r in float64 (Euler-Maclaurin; relative error ~ n^-4 at n = 1e8)."""
  return n ** (r + 1) / (r + 1) + n**r / 2 + r * n ** (r - 1) / 12


@pytest.mark.parametrize("r", default_tier([0.0, 0.5, 1.0, 3.0, 10.0], keep={"0.0", "10.0"}))
@pytest.mark.parametrize("weight_lr_power", default_tier([0.0, 2.0, 16.0], keep={"2.0", "16.0"}))
@pytest.mark.parametrize("learning_rate", [1e-5, 1e-3, 3.0])
def test_averaging_coefficient_is_right_after_1e8_steps(r, weight_lr_power, learning_rate):
  start, steps = 100_000_000 - 50, 50
  lr = jnp.asarray(learning_rate, jnp.float32)
  # The state after `start` steps at a constant learning rate, from float64:
  # the sum of the weights in units of 2^E of the last weight (the representation).
  mantissa, exponent = _averaging.weight_exponent_and_mantissa(
      jnp.asarray(start, jnp.float32), lr, r, weight_lr_power)
  log2_sum = math.log2(power_sum(start, r)) + weight_lr_power * math.log2(float(lr))
  weight_sum = jnp.asarray(2.0 ** (log2_sum - float(exponent)), jnp.float32)
  zero = jnp.zeros([], jnp.float32)
  count = jnp.asarray(start, jnp.int32)
  for k in range(start, start + steps):
    averaging = _averaging.averaging_step(count, lr, lr, weight_sum, zero, r=r,
                                          weight_lr_power=weight_lr_power)
    count, weight_sum, zero = count + 1, averaging.weight_sum, averaging.weight_sum_compensation
    expected = (k + 1) ** r / power_sum(k + 1, r)
    assert math.isfinite(float(averaging.c))
    assert abs(float(averaging.c) - expected) <= 1e-5 * expected, (k, float(averaging.c), expected)
  del mantissa


@pytest.mark.parametrize("name,value", [("r", 10.5), ("weight_lr_power", 16.5), ("r", 100.0)])
def test_powers_outside_the_validated_range_are_refused(name, value):
  with pytest.raises(ValueError, match=name):
    sf_optax.schedule_free_sgd(1e-3, **{name: value})


# --------------------------------------------------------------------------- 7 and 9. hyperparameters


NON_FINITE = [float("inf"), -float("inf"), np.float32("inf"), jnp.asarray(float("inf"))]
NON_NUMERIC = ["0.01", None, object(), [0.1], jnp.ones(2)]


def _value_id(value):
  """A test id that is the same in every process (pytest-xdist compares collections)."""
  if type(value) is object:
    return "<object>"
  if callable(value):
    return getattr(value, "__name__", type(value).__name__)
  return repr(value)


@every_optimizer(all)
@pytest.mark.parametrize("value", NON_FINITE + NON_NUMERIC, ids=_value_id)
def test_learning_rate_must_be_a_finite_number_or_a_schedule(optimizer, value):
  with pytest.raises(ValueError, match="learning_rate"):
    if optimizer.name.startswith("wrapper"):  # the suite's helper hands it to optax first
      sf_optax.schedule_free(optax.sgd(0.1), value)
    else:
      optimizer.factory(value)


@every_optimizer(all)
@pytest.mark.parametrize("name", ["b1", "weight_decay", "r", "weight_lr_power", "warmup_steps"])
@pytest.mark.parametrize("value", [float("inf"), "0.5", None], ids=_value_id)
def test_other_hyperparameters_must_be_finite_numbers(optimizer, name, value):
  with pytest.raises(ValueError, match=name):
    optimizer.factory(0.1, **{name: value})


@every_adaptive
@pytest.mark.parametrize("value", [0.0, float("inf"), "1e-8"], ids=_value_id)
def test_eps_must_be_positive_and_finite(optimizer, value):
  with pytest.raises(ValueError, match="eps"):
    optimizer.factory(0.1, eps=value)


@every_adaptive
def test_a_parameter_without_gradient_stays_finite_with_a_small_eps(optimizer):
  # eps = 0 turned a parameter whose gradient is 0 into 0 / 0 = NaN; the smallest eps
  # allowed keeps it finite.
  params = {"w": jnp.ones(2), "b": jnp.zeros(2)}
  grads = {"w": jnp.ones(2), "b": jnp.zeros(2)}
  params, state = run(optimizer.factory(0.1, eps=1e-30), params, grads, 6)
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves((params, state)))


@pytest.mark.parametrize("base", ["adam", None, optax.adam, 0.1], ids=_value_id)
def test_base_optimizer_must_be_a_transformation(base):
  with pytest.raises(TypeError, match="base_optimizer"):
    sf_optax.schedule_free(base, 1e-3)


def test_a_traced_b1_of_zero_without_x_gives_nan_not_a_wrong_x():
  # Concrete b1 = 0 is refused; traced through inject_hyperparams it cannot be.
  # With store_x=False, y = z and x is lost: eval_params says so with NaN.
  tx = optax.inject_hyperparams(sf_optax.schedule_free_sgd)(learning_rate=0.1, b1=0.5,
                                                            store_x=False)
  params = jnp.ones(3)
  state = tx.init(params)
  state.hyperparams["b1"] = jnp.asarray(0.0)
  updates, state = jax.jit(tx.update)(jnp.ones(3), state, params)
  params = optax.apply_updates(params, updates)
  assert bool(jnp.all(jnp.isnan(sf_optax.eval_params(state, params))))
  # With store_x=True x is kept in the state and stays right.
  tx = optax.inject_hyperparams(sf_optax.schedule_free_sgd)(learning_rate=0.1, b1=0.5)
  state = tx.init(jnp.ones(3))
  state.hyperparams["b1"] = jnp.asarray(0.0)
  updates, state = jax.jit(tx.update)(jnp.ones(3), state, jnp.ones(3))
  np.testing.assert_allclose(sf_optax.eval_params(state, jnp.ones(3) + updates), 0.9)


# --------------------------------------------------------------------------- 8. params


@every_optimizer(all)
def test_python_scalar_leaves_are_accepted_like_optax(optimizer):
  # Observed: AttributeError: 'float' object has no attribute 'dtype'.
  tx = optimizer.factory(0.1)
  with_float = run(tx, {"a": 1.5, "b": jnp.ones(2)}, {"a": 0.5, "b": jnp.ones(2)}, 3)
  with_array = run(tx, {"a": jnp.asarray(1.5), "b": jnp.ones(2)},
                   {"a": jnp.asarray(0.5), "b": jnp.ones(2)}, 3)
  np.testing.assert_array_equal(with_float[0]["a"], with_array[0]["a"])
  np.testing.assert_array_equal(sf_optax.eval_params(with_float[1], with_float[0])["a"],
                                sf_optax.eval_params(with_array[1], with_array[0])["a"])
  # Like optax.adam, which accepts the same tree.
  optax.adam(0.1).init({"a": 1.5})


@every_optimizer(all)
@pytest.mark.parametrize("leaf", [jnp.ones(2, jnp.int32), jnp.ones(2, jnp.int8),
                                  jnp.ones(2, bool), 3], ids=["int32", "int8", "bool", "int"])
def test_integer_params_are_refused_naming_the_path(optimizer, leaf):
  # Observed: int32 params truncated every update to 0 while z moved.
  with pytest.raises(TypeError, match="parameter layer/count has dtype"):
    optimizer.factory(0.1).init({"layer": {"count": leaf, "w": jnp.ones(2)}})


@every_optimizer(all)
def test_complex_params_are_refused_naming_the_path(optimizer):
  # Observed: SGD lost the imaginary part of the update (0.95+1j, not 0.95+0.95j).
  with pytest.raises(TypeError, match="parameter w has dtype complex64"):
    optimizer.factory(0.1).init({"w": jnp.ones(2, jnp.complex64)})


# --------------------------------------------------------------------------- 10. eval_params


@pytest.mark.parametrize("store_x", [True, False], ids=["store_x", "no_x"])
def test_eval_params_names_a_shape_mismatch(store_x):
  # Observed: the state's x came back (store_x=True), or y broadcast against z.
  tx = sf_optax.schedule_free_sgd(0.1, store_x=store_x)
  state = tx.init({"layer": {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}})
  other = {"layer": {"w": jnp.ones((3,)), "b": jnp.ones(3)}}
  with pytest.raises(ValueError, match=r"params at layer/w has shape \(3,\).*\(2, 3\)"):
    sf_optax.eval_params(state, other)
