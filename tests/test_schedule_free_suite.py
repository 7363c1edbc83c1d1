"""The interoperability suite that every Schedule-Free optimizer passes.

Each test runs for every optimizer of the family (the built-ins, Adan,
ScheduleFree+ and the wrapper around ``optax.sgd`` and ``optax.adam``) and both
``store_x`` modes (the default tier runs a representative of each test, the
slow tier the rest: ``every_case``): the optimizer must behave like any Optax transformation
inside the usual wrappers (``chain``, ``inject_hyperparams``, ``MultiSteps``,
``apply_if_finite``, ``lax.cond``, ``jit`` with donation). See
``../shared/STYLE.md``. Every update is given the loss as the extra argument
``value`` (ScheduleFree+ needs it, the others ignore it), so the suite also
shows that it reaches the optimizer through each wrapper.

Every test jits one function at most (whole trajectories run in a
``lax.scan``); dtype checks are abstract (``jax.eval_shape``) and compile nothing.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sf_optax
from _helpers import default_tier


def schedule_free_around_sgd(
    learning_rate=0.1, *, b1=0.9, weight_decay=0.0, warmup_steps=0, r=0.0,
    weight_lr_power=2.0, state_dtype=None, store_x=True,
):
  """``sf_optax.schedule_free`` around ``optax.sgd``, with the built-ins' signature.

  ``learning_rate`` feeds both the base and the wrapper (so ``inject_hyperparams``
  over it reaches both); ``weight_decay`` is the wrapper's own.
  """
  return sf_optax.schedule_free(
      optax.sgd(learning_rate), learning_rate, b1=b1, warmup_steps=warmup_steps, r=r,
      weight_lr_power=weight_lr_power, weight_decay=weight_decay, state_dtype=state_dtype,
      store_x=store_x,
  )


def schedule_free_around_adam(
    learning_rate=0.1, *, b1=0.9, weight_decay=0.0, warmup_steps=0, r=0.0,
    weight_lr_power=2.0, state_dtype=None, store_x=True,
):
  """``sf_optax.schedule_free`` around ``optax.adam`` (no momentum of its own: b1 is the wrapper's)."""
  return sf_optax.schedule_free(
      optax.adam(learning_rate, b1=0.0), learning_rate, b1=b1, warmup_steps=warmup_steps, r=r,
      weight_lr_power=weight_lr_power, weight_decay=weight_decay, state_dtype=state_dtype,
      store_x=store_x,
  )


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """One optimizer of the suite: its factory and learning rates that converge."""

  name: str
  factory: Callable[..., optax.GradientTransformationExtraArgs]
  parabola_learning_rate: float
  rosenbrock_learning_rate: float

  def __str__(self):
    return self.name


# ScheduleFree+ has no learning rate of its own (a Polyak rate scaled by
# learning_rate). On the suite's noiseless parabola and Rosenbrock its default
# average (r=0, weights by lr_max**2) is a near-uniform average of all iterates,
# which converges slowly; weights growing like (k+1)**3 converge.
_plus_for_noiseless_problems = functools.partial(
    sf_optax.schedule_free_plus, r=3.0, weight_lr_power=0.0)

OPTIMIZERS = [
    Optimizer("sgd", sf_optax.schedule_free_sgd, 0.1, 0.01),
    Optimizer("adamw", sf_optax.schedule_free_adamw, 0.1, 0.03),
    Optimizer("adamw_paper", sf_optax.schedule_free_adamw_paper, 0.1, 0.01),
    Optimizer("radam", sf_optax.schedule_free_radam, 0.3, 0.03),
    Optimizer("adan", sf_optax.schedule_free_adan, 0.1, 0.03),
    Optimizer("wrapper_sgd", schedule_free_around_sgd, 0.1, 0.01),
    Optimizer("wrapper_adam", schedule_free_around_adam, 0.1, 0.03),
    Optimizer("plus", _plus_for_noiseless_problems, 1.0, 1.0),
]



def every_optimizer(*also):
  """Parametrizes a test over ``OPTIMIZERS``.

  The default tier runs ``adamw`` and the optimizers named in ``also`` (or
  every optimizer, with ``also=(all,)``); the other cases run in the slow
  tier.
  """
  keep = all if all in also else {"adamw", *also}
  return pytest.mark.parametrize("optimizer", default_tier(OPTIMIZERS, keep))


def every_case(*also):
  """Parametrizes a test over ``OPTIMIZERS`` and both ``store_x`` modes.

  The default tier runs ``adamw`` with x stored and the optimizers named in
  ``also`` without it; the other cases run in the slow tier.
  """
  cases = [(optimizer, store_x) for optimizer in OPTIMIZERS for store_x in (True, False)]
  keep = {"adamw-store_x", *(f"{name}-no_x" for name in also)}
  return pytest.mark.parametrize("optimizer,store_x", default_tier(
      cases, keep, ids=lambda case: f"{case[0]}-{'store_x' if case[1] else 'no_x'}", unpack=True))


both_store_x = pytest.mark.parametrize("store_x", [True, False], ids=["store_x", "no_x"])


def make_params(dtype=jnp.float32):
  """A small tree with two leaves of different shapes."""
  return {
      "w": jnp.array([[0.5, -1.0], [1.5, 0.25], [-0.75, 2.0]], dtype),
      "b": jnp.array([0.1, -0.3], dtype),
  }


TARGET = jax.tree.map(lambda t: 1.0 - t, make_params())


def loss(params):
  """A quadratic with curvatures 1 and 2 around TARGET."""
  return 0.5 * jnp.sum((params["w"] - TARGET["w"]) ** 2) + jnp.sum(
      (params["b"] - TARGET["b"]) ** 2
  )


def gradient_sequence(steps, dtype=jnp.float32, seed=0):
  """Fixed gradients, one tree per step, stacked along a leading axis (NumPy: no RNG to compile)."""
  rng = np.random.default_rng(seed)
  return {
      name: jnp.asarray(rng.standard_normal((steps, *leaf.shape)), dtype)
      for name, leaf in sorted(make_params().items())
  }


def trajectory(tx, params, grads):
  """Runs tx in a scan, step t with the loss gradient plus ``grads[t]``.

  Returns y (the params) and x (eval_params) after every step.
  """

  def step(carry, extra):
    params, state = carry
    g = jax.tree.map(lambda a, b: a + b.astype(a.dtype), jax.grad(loss)(params), extra)
    updates, state = tx.update(g, state, params, value=loss(params))
    params = optax.apply_updates(params, updates)
    return (params, state), (params, sf_optax.eval_params(state, params))

  return jax.lax.scan(step, (params, tx.init(params)), grads)[1]


def assert_trees_equal(actual, expected, **kwargs):
  """Leafwise assert_allclose (exact equality by default) with the same structure."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  kwargs.setdefault("rtol", 0)
  kwargs.setdefault("atol", 0)
  jax.tree.map(
      lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), **kwargs),
      actual,
      expected,
  )


def avals(tree):
  """(shape, dtype, weak_type) per leaf: what a jitted function is traced for."""

  def aval(leaf):
    if not isinstance(leaf, jax.ShapeDtypeStruct):
      leaf = jax.typeof(leaf)
    return leaf.shape, jnp.dtype(leaf.dtype), leaf.weak_type

  return jax.tree.map(aval, tree)


@every_case("sgd")
def test_extra_args_accepted(optimizer, store_x):
  tx = optimizer.factory(0.1, store_x=store_x)
  params = make_params()
  grads = jax.grad(loss)(params)
  expected, _ = tx.update(grads, tx.init(params), params, value=loss(params))
  for wrapped in (
      tx,
      optax.with_extra_args_support(tx),
      optax.chain(optax.identity(), tx),
      optax.chain(tx, optax.identity()),
  ):
    updates, _ = wrapped.update(
        grads, wrapped.init(params), params, value=loss(params), some_extra_arg=1)
    assert_trees_equal(updates, expected)


@every_case("adamw_paper")
def test_no_retrace_on_second_call(optimizer, store_x):
  tx = optimizer.factory(0.1, store_x=store_x)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(None)  # A Python side effect: runs once per trace.
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state

  params = make_params()
  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1


PARABOLA_OPTIMUM = jnp.array([1.0, -2.0, 3.0])


def parabola(params):
  return jnp.sum((params - PARABOLA_OPTIMUM) ** 2)


def rosenbrock(params):
  return jnp.sum(100.0 * (params[1:] - params[:-1] ** 2) ** 2 + (1.0 - params[:-1]) ** 2)


@every_case("sgd", "plus")
def test_converges_on_parabola_and_rosenbrock(optimizer, store_x):
  def final_x(tx, objective, params, steps):
    def step(carry, _):
      params, state = carry
      value, grads = jax.value_and_grad(objective)(params)
      updates, state = tx.update(grads, state, params, value=value)
      return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return sf_optax.eval_params(state, params)

  @jax.jit
  def run():
    return (
        final_x(
            optimizer.factory(optimizer.parabola_learning_rate, store_x=store_x),
            parabola, jnp.zeros(3), 1000,
        ),
        final_x(
            optimizer.factory(optimizer.rosenbrock_learning_rate, store_x=store_x),
            rosenbrock, jnp.zeros(2), 3000,
        ),
    )

  x_parabola, x_rosenbrock = run()
  np.testing.assert_allclose(x_parabola, PARABOLA_OPTIMUM, atol=2e-2)
  np.testing.assert_allclose(x_rosenbrock, jnp.ones(2), atol=2e-2)


@every_case("adan")
def test_inject_hyperparams_equals_plain(optimizer, store_x):
  hyperparams = dict(learning_rate=0.05, b1=0.8, weight_decay=0.1, warmup_steps=4)
  plain = optimizer.factory(**hyperparams, store_x=store_x)
  injected = optax.inject_hyperparams(optimizer.factory)(**hyperparams, store_x=store_x)
  grads = gradient_sequence(20)

  @jax.jit
  def run():
    return trajectory(plain, make_params(), grads), trajectory(injected, make_params(), grads)

  (ys_plain, xs_plain), (ys_injected, xs_injected) = run()
  # Bitwise: injected hyperparameters are float32 arrays, exactly the values
  # the plain version converts its Python floats to.
  assert_trees_equal(ys_injected, ys_plain)
  assert_trees_equal(xs_injected, xs_plain)


@every_case("wrapper_sgd")
def test_multisteps_updates_only_when_it_fires(optimizer, store_x):
  every_k, fires = 3, 6  # RAdam's first four steps are silent: six fires.
  tx = optimizer.factory(0.1, store_x=store_x, weight_decay=0.1)
  multi = optax.MultiSteps(tx, every_k_schedule=every_k)
  grads = gradient_sequence(every_k * fires)
  mean_grads = jax.tree.map(
      lambda g: g.reshape(fires, every_k, *g.shape[1:]).mean(axis=1), grads
  )

  def scan(tx, grads):
    def step(carry, g):
      params, state = carry
      updates, state = tx.update(g, state, params, value=loss(params))
      return (optax.apply_updates(params, updates), state), updates

    params = make_params()
    return jax.lax.scan(step, (params, tx.init(params)), grads)[1]

  @jax.jit
  def run():
    return scan(multi, grads), scan(tx, mean_grads)

  micro_updates, expected = run()
  micro_updates = jax.tree.map(
      lambda u: u.reshape(fires, every_k, *u.shape[1:]), micro_updates
  )
  for leaf in jax.tree.leaves(micro_updates):
    assert not np.any(leaf[:, :-1]), "MultiSteps updated before it fired"
  # MultiSteps averages the gradients its own way (a running mean), and an
  # update y' - y carries the rounding of y: a few float32 ulps of |y| ~ 1.
  assert_trees_equal(
      jax.tree.map(lambda u: u[:, -1], micro_updates), expected, rtol=1e-5, atol=1e-6
  )
  assert any(np.any(leaf) for leaf in jax.tree.leaves(expected))


def bitwise(tree):
  """The leaves' bytes, for bitwise comparisons that also compare NaNs."""
  return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree)]


def same_bits(tree, other):
  """Whether two trees hold the same bits, as a traced boolean (NaNs included)."""

  def leaf_same(a, b):
    if jnp.issubdtype(a.dtype, jnp.floating):
      unsigned = jnp.dtype(f"uint{8 * a.dtype.itemsize}")
      a, b = jax.lax.bitcast_convert_type(a, unsigned), jax.lax.bitcast_convert_type(b, unsigned)
    return jnp.all(a == b)

  same = jax.tree.map(leaf_same, tree, other)
  return jnp.all(jnp.stack([jnp.asarray(True), *jax.tree.leaves(same)]))


@every_case("plus")
def test_apply_if_finite_skips_a_nan_step(optimizer, store_x):
  tx = optimizer.factory(0.1, store_x=store_x, weight_decay=0.1)
  guarded = optax.apply_if_finite(tx, max_consecutive_errors=2)
  grads = gradient_sequence(8)
  nan_step = 6  # After RAdam's silent phase, so the steps around it move.
  with_nan = jax.tree.map(lambda g: g.at[nan_step, 0].set(jnp.nan), grads)
  without = jax.tree.map(lambda g: jnp.delete(g, nan_step, axis=0), grads)

  def scan(tx, grads, inner_state):
    def step(carry, g):
      params, state = carry
      updates, new_state = tx.update(g, state, params, value=loss(params))
      # Per step, scalars only: stacking whole states per step is slow to compile.
      skipped = jnp.all(jnp.stack([jnp.all(u == 0) for u in jax.tree.leaves(updates)]))
      untouched = same_bits(inner_state(new_state), inner_state(state))
      return (optax.apply_updates(params, updates), new_state), (skipped, untouched)

    params = make_params()
    return jax.lax.scan(step, (params, tx.init(params)), grads)

  @jax.jit
  def run():
    return (
        scan(guarded, with_nan, lambda state: state.inner_state),
        scan(tx, without, lambda state: state)[0],
    )

  ((final_y, final_state), (skipped, untouched)), (expected_y, _) = run()
  assert skipped[nan_step] and not skipped[nan_step + 1]
  np.testing.assert_array_equal(untouched, np.arange(len(untouched)) == nan_step)
  assert int(final_state.total_notfinite) == 1
  # The run goes on as if the NaN step had never been.
  assert_trees_equal(final_y, expected_y)


@every_case("wrapper_adam")
def test_lax_cond_keeps_the_state_types(optimizer, store_x):
  tx = optimizer.factory(0.1, store_x=store_x)
  params = make_params()
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  update = functools.partial(tx.update, value=loss(params))
  _, after = jax.eval_shape(update, grads, state, params)
  # dtype, shape and weak type of every leaf: anything else changes the jit
  # cache key (a retrace per step) and breaks lax.cond / lax.scan carries.
  assert jax.tree.structure(after) == jax.tree.structure(state)
  assert avals(after) == avals(state)

  @jax.jit
  def maybe_update(state, skip):
    return jax.lax.cond(
        skip,
        lambda state: (optax.tree.zeros_like(grads), state),
        lambda state: tx.update(grads, state, params, value=loss(params)),
        state,
    )

  _, skipped = maybe_update(state, True)
  assert bitwise(skipped) == bitwise(state)
  _, updated = maybe_update(state, False)
  assert avals(updated) == avals(state)


@every_optimizer(all)
@both_store_x
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("state_dtype", [None, jnp.float32], ids=["state_like_params", "state_f32"])
def test_updates_keep_the_params_dtype(optimizer, store_x, dtype, state_dtype):
  tx = optimizer.factory(0.1, store_x=store_x, state_dtype=state_dtype, weight_decay=0.1)
  params = make_params(dtype)
  state = jax.eval_shape(tx.init, params)
  updates, new_state = jax.eval_shape(
      lambda g, s, p: tx.update(g, s, p, value=loss(p)), params, state, params)
  assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda p: p.dtype, params)
  assert avals(new_state) == avals(state)
  # No state_dtype: the params' dtype, but never below float32.
  z_dtype = jnp.float32 if state_dtype is None else state_dtype
  assert {leaf.dtype for leaf in jax.tree.leaves(state.z)} == {jnp.dtype(z_dtype)}
  x = jax.eval_shape(sf_optax.eval_params, new_state, params)
  assert jax.tree.map(lambda leaf: leaf.dtype, x) == jax.tree.map(lambda p: p.dtype, params)


@every_optimizer(all)
@both_store_x
def test_init_on_shape_dtype_struct(optimizer, store_x):
  tx = optimizer.factory(0.1, store_x=store_x)
  params = make_params()
  structs = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  abstract = jax.eval_shape(tx.init, structs)
  assert avals(abstract) == avals(tx.init(params))


@every_case("radam")
def test_buffers_can_be_donated(optimizer, store_x):
  tx = optimizer.factory(0.1, store_x=store_x, weight_decay=0.1)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state

  params = make_params()
  # The state straight from init: it must not alias params (donating one
  # buffer twice is an error), and with filterwarnings=error an unusable
  # donation ("Some donated buffers were not usable") fails the test.
  state = tx.init(params)
  donated = jax.tree.leaves((params, state))
  for _ in range(2):
    params, state = step(params, state)
  jax.block_until_ready((params, state))
  # Every params-sized buffer was reused in place (XLA may keep a scalar that
  # the step recomputes as a constant, such as b1).
  assert all(leaf.is_deleted() for leaf in donated if leaf.ndim)


@every_case("plus")
def test_constant_schedule_equals_float(optimizer, store_x):
  kwargs = dict(store_x=store_x, weight_decay=0.1, warmup_steps=3)
  with_float = optimizer.factory(0.05, **kwargs)
  with_schedule = optimizer.factory(optax.constant_schedule(0.05), **kwargs)
  grads = gradient_sequence(10)

  @jax.jit
  def run():
    return (
        trajectory(with_float, make_params(), grads),
        trajectory(with_schedule, make_params(), grads),
    )

  plain, scheduled = run()
  assert_trees_equal(scheduled, plain)
