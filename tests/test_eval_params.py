"""eval_params: x found inside any Optax wrapper, and nothing invented where there is none.

Each wrapper is checked against the bare optimizer run on the same gradients:
the x that eval_params reads through the wrapper must be the bare run's x.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sf_optax

from _helpers import assert_trees_close
from _helpers import default_tier

both_store_x = pytest.mark.parametrize("store_x", [True, False], ids=["store_x", "no_x"])

STEPS = 4


def make_params():
  return {
      "w": jnp.array([[0.5, -1.0], [1.5, 0.25]], jnp.float32),
      "b": jnp.array([0.1, -0.3, 0.7], jnp.float32),
  }


def gradients():
  """Fixed gradients, one tree per step, stacked along a leading axis."""
  rng = np.random.default_rng(0)
  return {
      name: rng.standard_normal((STEPS, *leaf.shape)).astype(np.float32)
      for name, leaf in sorted(make_params().items())
  }


def schedule_free(store_x, **kwargs):
  return sf_optax.schedule_free_adamw(0.1, weight_decay=0.1, store_x=store_x, **kwargs)


def run(tx, params=None):
  """STEPS updates with fixed gradients: the final params (y) and state."""
  params = make_params() if params is None else params

  def step(carry, grads):
    params, state = carry
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  grads = {name: g for name, g in gradients().items() if name in params}
  return jax.lax.scan(step, (params, tx.init(params)), grads)[0]


WRAPPERS = {
    "chain": lambda tx: optax.chain(optax.identity(), tx, optax.identity()),
    "nested_chain": lambda tx: optax.chain(optax.chain(optax.identity(), tx)),
    "inject_hyperparams": lambda tx: optax.inject_hyperparams(
        lambda learning_rate: optax.chain(tx, optax.scale(learning_rate))
    )(learning_rate=1.0),
    "multi_steps": lambda tx: optax.MultiSteps(tx, every_k_schedule=1),
    "apply_if_finite": lambda tx: optax.apply_if_finite(tx, max_consecutive_errors=2),
    "everything": lambda tx: optax.apply_if_finite(
        optax.MultiSteps(optax.chain(optax.identity(), tx), every_k_schedule=1), 2
    ),
}


# Finding the state does not depend on store_x, and reconstructing x does not
# depend on the wrapper: store_x=False everywhere (x is rebuilt from the found
# state's z and b1), and once store_x=True through every wrapper at once.
@pytest.mark.parametrize("wrapper,store_x", default_tier(
    [(wrapper, False) for wrapper in WRAPPERS] + [("everything", True)],
    {"multi_steps-False", "everything-True"}, ids=lambda case: f"{case[0]}-{case[1]}",
    unpack=True))
def test_eval_params_finds_the_state_inside_wrappers(wrapper, store_x):
  tx = schedule_free(store_x)

  @jax.jit
  def both():
    params, state = run(WRAPPERS[wrapper](tx))
    bare_params, bare_state = run(tx)
    return (
        params, sf_optax.eval_params(state, params),
        bare_params, sf_optax.eval_params(bare_state, bare_params),
    )

  params, x, bare_params, bare_x = both()
  # Not bitwise: XLA fuses the step differently inside MultiSteps' and
  # apply_if_finite's conditionals (1 ulp).
  assert_trees_close(params, bare_params, rtol=1e-6)
  assert_trees_close(x, bare_x, rtol=1e-6)
  assert not np.allclose(x["w"], params["w"])  # x and y differ: the check has teeth


def test_eval_params_with_inject_hyperparams_of_the_optimizer_itself():
  tx = optax.inject_hyperparams(sf_optax.schedule_free_sgd)(learning_rate=0.1, b1=0.8)
  plain = sf_optax.schedule_free_sgd(0.1, b1=0.8, store_x=False)
  injected_no_x = optax.inject_hyperparams(sf_optax.schedule_free_sgd)(
      learning_rate=0.1, b1=0.8, store_x=False
  )

  @jax.jit
  def runs():
    return [(params, sf_optax.eval_params(state, params))
            for params, state in (run(tx), run(plain), run(injected_no_x))]

  (_, x), (_, x_plain), (_, x_no_x) = runs()
  # x stored, or reconstructed from y and z with the b1 of the state.
  assert_trees_close(x, x_plain, rtol=1e-6)
  assert_trees_close(x_no_x, x_plain, rtol=1e-6)


@both_store_x
@pytest.mark.parametrize("mask_kind", ["tree", "function"])
def test_masked_leaves_are_returned_unchanged(store_x, mask_kind):
  mask = {"w": True, "b": False}
  masked = optax.masked(schedule_free(store_x), mask if mask_kind == "tree" else lambda p: mask)

  @jax.jit
  def both():
    params, state = run(masked)
    # The same optimizer on w alone: the x that eval_params must give for w.
    only_w, only_w_state = run(schedule_free(store_x), {"w": make_params()["w"]})
    return params, sf_optax.eval_params(state, params), sf_optax.eval_params(only_w_state, only_w)

  params, x, x_only_w = both()
  np.testing.assert_array_equal(x["b"], params["b"])
  np.testing.assert_allclose(x["w"], x_only_w["w"], rtol=0)
  assert not np.allclose(x["w"], params["w"])


@both_store_x
def test_partition_returns_x_for_its_schedule_free_part_only(store_x):
  labels = {"w": "schedule_free", "b": "sgd"}
  tx = optax.partition(
      {"schedule_free": schedule_free(store_x), "sgd": optax.sgd(0.1)}, labels
  )

  @jax.jit
  def both():
    params, state = run(tx)
    only_w, only_w_state = run(schedule_free(store_x), {"w": make_params()["w"]})
    return params, sf_optax.eval_params(state, params), sf_optax.eval_params(only_w_state, only_w)

  params, x, x_only_w = both()
  np.testing.assert_array_equal(x["b"], params["b"])
  np.testing.assert_allclose(x["w"], x_only_w["w"], rtol=0)


def test_partition_with_two_schedule_free_parts():
  # Two Schedule-Free states, each covering its own leaves, with different b1
  # (store_x=False: each part's x is reconstructed with its own b1).
  labels = {"w": "slow", "b": "fast"}
  parts = {
      "slow": sf_optax.schedule_free_sgd(0.05, b1=0.95, store_x=False),
      "fast": sf_optax.schedule_free_adamw(0.1, b1=0.8),
  }
  tx = optax.partition(parts, labels)

  @jax.jit
  def runs():
    params, state = run(tx)
    w, w_state = run(parts["slow"], {"w": make_params()["w"]})
    b, b_state = run(parts["fast"], {"b": make_params()["b"]})
    return (
        sf_optax.eval_params(state, params),
        sf_optax.eval_params(w_state, w),
        sf_optax.eval_params(b_state, b),
    )

  x, x_w, x_b = runs()
  np.testing.assert_allclose(x["w"], x_w["w"], rtol=0)
  np.testing.assert_allclose(x["b"], x_b["b"], rtol=0)


@pytest.mark.parametrize(
    "tx",
    [optax.adam(0.1), optax.chain(optax.sgd(0.1), optax.identity()), optax.identity()],
    ids=["adam", "chain", "identity"],
)
def test_no_schedule_free_state_is_a_value_error(tx):
  params = make_params()
  with pytest.raises(ValueError, match="no Schedule-Free state"):
    sf_optax.eval_params(tx.init(params), params)


def test_params_that_do_not_match_the_state_are_a_value_error():
  tx = schedule_free(True)
  state = tx.init(make_params())
  with pytest.raises(ValueError, match="do not match"):
    sf_optax.eval_params(state, {"w": make_params()["w"]})


def test_a_leaf_covered_twice_is_a_value_error():
  tx = optax.chain(schedule_free(True), schedule_free(True))
  params = make_params()
  with pytest.raises(ValueError, match="two Schedule-Free states"):
    sf_optax.eval_params(tx.init(params), params)


@pytest.mark.parametrize("store_x", [True, False], ids=["store_x", "no_x"])
def test_eval_params_returns_the_params_dtype(store_x):
  tx = sf_optax.schedule_free_sgd(0.1, state_dtype=jnp.float32, store_x=store_x)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), make_params())
  state = jax.eval_shape(tx.init, params)
  x = jax.eval_shape(sf_optax.eval_params, state, params)
  assert jax.tree.map(lambda leaf: leaf.dtype, x) == jax.tree.map(lambda p: p.dtype, params)


def test_eval_params_at_init_is_the_params():
  # Before any step x = y = z: evaluating right after init is well defined.
  for store_x in (True, False):
    tx = sf_optax.schedule_free_adamw(0.1, store_x=store_x)
    params = make_params()
    assert_trees_close(sf_optax.eval_params(tx.init(params), params), params, rtol=1e-7)
