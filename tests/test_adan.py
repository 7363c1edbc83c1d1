"""Schedule-Free Adan: against a float64 NumPy transcription, and its reductions.

The transcription below is written from the algorithm as derived in
``docs/EXTRAS.md`` (Adan's official update with its first moment dropped,
inside the reference's Schedule-Free bookkeeping of
``shared/reference/schedule_free.md``), explicitly keeping x, y and z, with
Python floats for the scalar bookkeeping. It shares no code with sf_optax.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sf_optax

TOLERANCE = 1e-10
STEPS = 60
SHAPES = {"bias": (3,), "kernel": (4, 3)}


# ---------------------------------------------------------------------------
# The transcription.
# ---------------------------------------------------------------------------


def noisy_gradient(y, noise):
  """A nonconvex objective's gradient plus fixed 'minibatch' noise; NumPy or jnp."""
  module = jnp if isinstance(y, jax.Array) else np
  return 0.5 * y + module.cos(3.0 * y) + noise


def reference_schedule_free_adan(
    params, noises, *, learning_rate, b1, b2, b3, eps, weight_decay, warmup_steps, r,
    weight_lr_power, mask, lr_scales, weight_decay_at):
  """y after every step and x at the end, in float64."""
  y = {k: np.array(v, np.float64) for k, v in params.items()}
  z = {k: v.copy() for k, v in y.items()}
  x = {k: v.copy() for k, v in y.items()}
  previous = {k: np.zeros_like(v) for k, v in y.items()}
  difference = {k: np.zeros_like(v) for k, v in y.items()}
  nu = {k: np.zeros_like(v) for k, v in y.items()}
  lr_max, weight_sum = -1.0, 0.0
  ys = []
  for k in range(len(noises)):
    grads = {name: noisy_gradient(y[name], noises[k][name]) for name in y}
    base = learning_rate(k) if callable(learning_rate) else learning_rate
    sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
    lr = base * sched
    lr_max = max(lr, lr_max)
    weight = (k + 1) ** r * lr_max ** weight_lr_power
    weight_sum += weight
    c = weight / weight_sum if weight_sum else 0.0
    for name in y:
      g = grads[name]
      d = g - previous[name] if k > 0 else np.zeros_like(g)
      difference[name] = b2 * difference[name] + (1 - b2) * d
      nu[name] = b3 * nu[name] + (1 - b3) * (g + b2 * d) ** 2
      u = (g + b2 * difference[name] / (1 - b2 ** (k + 1))) / (
          np.sqrt(nu[name] / (1 - b3 ** (k + 1))) + eps)
      s = lr_scales[name]
      decay = weight_decay * s * float(mask[name])
      at = y[name] if weight_decay_at == "y" else z[name]
      z[name] = z[name] - lr * s * u - lr * decay * at
      x[name] = (1 - c) * x[name] + c * z[name]
      y[name] = b1 * x[name] + (1 - b1) * z[name]
      previous[name] = g
    ys.append({name: v.copy() for name, v in y.items()})
  return ys, x


CASES = {
    "plain": dict(learning_rate=0.05, b1=0.9, b2=0.92, b3=0.99, eps=1e-8, weight_decay=0.0,
                  warmup_steps=0, r=0.0, weight_lr_power=2.0),
    "warmup_wd_mask_r_schedule": dict(
        learning_rate=lambda k: 0.08 * (1.0 - k / 120.0), b1=0.95, b2=0.7, b3=0.995, eps=1e-6,
        weight_decay=0.3, warmup_steps=10, r=1.0, weight_lr_power=1.0,
        mask={"bias": False, "kernel": True}),
    "decay_at_z_lr_scales": dict(
        learning_rate=0.03, b1=0.8, b2=0.98, b3=0.9, eps=1e-8, weight_decay=0.5,
        warmup_steps=5, r=0.5, weight_lr_power=2.0, weight_decay_at="z",
        lr_scales={"bias": 1.0, "kernel": 0.25}),
}


def initial_params_and_noises(seed=0, steps=STEPS):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=shape) for k, shape in SHAPES.items()}
  noises = [{k: 0.3 * rng.normal(size=shape) for k, shape in SHAPES.items()}
            for _ in range(steps)]
  return params, noises


def run_sf_optax(tx, params, noises):
  """y after every step and eval_params at the end, through jit and lax.scan."""
  params = jax.tree.map(jnp.asarray, params)
  stacked = jax.tree.map(lambda *n: jnp.asarray(np.stack(n)), *noises)

  @jax.jit
  def replay(params, stacked):
    def step(carry, noise):
      params, state = carry
      grads = jax.tree.map(noisy_gradient, params, noise)
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), params

    (params, state), ys = jax.lax.scan(step, (params, tx.init(params)), stacked)
    return ys, sf_optax.eval_params(state, params)

  return replay(params, stacked)


def relative_error(actual, reference):
  actual, reference = np.asarray(actual), np.asarray(reference)
  assert actual.dtype == np.float64
  return float(np.abs(actual - reference).max() / np.abs(reference).max())


# ---------------------------------------------------------------------------
# Transcription parity.
# ---------------------------------------------------------------------------


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("store_x", [True, False], ids=["store_x", "no_x"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_transcription(case, store_x):
  hyperparameters = dict(CASES[case])
  weight_decay_at = hyperparameters.pop("weight_decay_at", "y")
  mask = hyperparameters.pop("mask", None)
  lr_scales = hyperparameters.pop("lr_scales", None)
  params, noises = initial_params_and_noises()
  tx = sf_optax.schedule_free_adan(
      **hyperparameters, mask=mask, lr_scales=lr_scales, weight_decay_at=weight_decay_at,
      store_x=store_x)
  ys, x = run_sf_optax(tx, params, noises)
  ref_ys, ref_x = reference_schedule_free_adan(
      params, noises, **hyperparameters, weight_decay_at=weight_decay_at,
      mask=mask or {k: True for k in SHAPES}, lr_scales=lr_scales or {k: 1.0 for k in SHAPES})
  for name in SHAPES:
    trajectory = np.stack([step[name] for step in ref_ys])
    assert relative_error(ys[name], trajectory) <= TOLERANCE, name
    assert relative_error(x[name], ref_x[name]) <= TOLERANCE, name


@pytest.mark.usefixtures("x64")
def test_transcription_detects_a_dropped_nesterov_term():
  """The parity above could not pass if the difference term were ignored."""
  params, noises = initial_params_and_noises()
  hyperparameters = dict(CASES["plain"])
  ys, _ = run_sf_optax(sf_optax.schedule_free_adan(**hyperparameters), params, noises)
  ref_ys, _ = reference_schedule_free_adan(
      params, noises, **{**hyperparameters, "b2": 0.0}, weight_decay_at="y",
      mask={k: True for k in SHAPES}, lr_scales={k: 1.0 for k in SHAPES})
  trajectory = np.stack([step["kernel"] for step in ref_ys])
  assert relative_error(ys["kernel"], trajectory) > 1e4 * TOLERANCE


@pytest.mark.usefixtures("x64")
def test_first_step_is_a_normalized_gradient_step():
  """No previous gradient: d = 0, v = 0, n = g^2 after correction; c = 1 so y = z."""
  lr, eps = 0.1, 1e-8
  tx = sf_optax.schedule_free_adan(lr, eps=eps)
  params = jnp.array([2.0, -0.5, 0.0])
  grads = jnp.array([4.0, -1e-3, 0.0])
  updates, state = tx.update(grads, tx.init(params), params)
  expected = -lr * grads / (jnp.abs(grads) + eps)
  np.testing.assert_allclose(updates, expected, rtol=1e-14, atol=0)
  np.testing.assert_array_equal(state.base_state.previous_gradient, grads)
  np.testing.assert_array_equal(state.base_state.difference, jnp.zeros(3))
  np.testing.assert_allclose(state.base_state.nu, (1 - 0.99) * grads**2, rtol=1e-15)


# ---------------------------------------------------------------------------
# Reductions.
# ---------------------------------------------------------------------------


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("store_x", [True, False], ids=["store_x", "no_x"])
def test_without_nesterov_term_is_schedule_free_adamw(store_x):
  """b2 = 0: u = g / (sqrt(n_hat) + eps) with n the second moment of g."""
  params, noises = initial_params_and_noises()
  common = dict(b1=0.9, eps=1e-8, weight_decay=0.1, warmup_steps=7, r=0.5, store_x=store_x)
  adan = run_sf_optax(sf_optax.schedule_free_adan(0.05, b2=0.0, b3=0.999, **common),
                      params, noises)
  adamw = run_sf_optax(sf_optax.schedule_free_adamw(0.05, b2=0.999, **common), params, noises)
  for name in SHAPES:
    assert relative_error(adan[0][name], adamw[0][name]) <= 1e-14
    assert relative_error(adan[1][name], adamw[1][name]) <= 1e-14


def optax_adan_without_first_moment(lr, b2, b3, eps):
  """optax.adan with decay 0 for m (so m_hat = g) and no eps_root."""
  return optax.adan(lr, b1=0.0, b2=b2, b3=b3, eps=eps, eps_root=0.0)


@pytest.mark.usefixtures("x64")
def test_z_step_alone_is_published_adan_without_first_moment():
  """Schedule-Free switched off: x = y = z (b1 = 1, c = 1), no decay.

  The z-sequence alone, fed with gradients taken at z, is Adan with its first
  moment's decay set to 0. optax.adan computes that at b2 = 0.5, the one value
  where its (1 - b2) weight of the difference term equals the paper's b2.
  """
  from sf_optax import _z_steps

  lr, b2, b3, eps = 0.05, 0.5, 0.99, 1e-8
  params, noises = initial_params_and_noises()
  z_step = _z_steps.adan(b2, b3, eps)
  adan = optax_adan_without_first_moment(lr, b2, b3, eps)
  z = jax.tree.map(jnp.asarray, params)
  theta = z
  z_state, adan_state = z_step.init(z), adan.init(theta)
  for k, noise in enumerate(noises):
    directions, z_state = z_step.update(
        jax.tree.map(noisy_gradient, z, noise), z_state, z,
        learning_rate=jnp.asarray(lr, jnp.float64), count=jnp.asarray(k, jnp.int32))
    z = jax.tree.map(lambda z, u: z - lr * u, z, directions)
    updates, adan_state = adan.update(
        jax.tree.map(noisy_gradient, theta, noise), adan_state, theta)
    theta = optax.apply_updates(theta, updates)
  for name in SHAPES:
    assert relative_error(z[name], theta[name]) <= TOLERANCE


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("store_x", [True, False], ids=["store_x", "no_x"])
def test_equals_schedule_free_wrapper_around_optax_adan(store_x):
  """The whole optimizer equals sf_optax.schedule_free(optax.adan(b1=0)) at b2 = 0.5."""
  lr, b2, b3, eps = 0.05, 0.5, 0.99, 1e-8
  params, noises = initial_params_and_noises()
  common = dict(b1=0.9, warmup_steps=8, store_x=store_x)
  built_in = run_sf_optax(
      sf_optax.schedule_free_adan(lr, b2=b2, b3=b3, eps=eps, weight_decay=0.2, **common),
      params, noises)
  wrapped = run_sf_optax(
      sf_optax.schedule_free(optax_adan_without_first_moment(lr, b2, b3, eps), lr,
                             weight_decay=0.2, **common),
      params, noises)
  for name in SHAPES:
    assert relative_error(built_in[0][name], wrapped[0][name]) <= TOLERANCE
    assert relative_error(built_in[1][name], wrapped[1][name]) <= TOLERANCE


# ---------------------------------------------------------------------------
# Shared behaviour: jit, retracing, dtypes, shapes, composition.
# ---------------------------------------------------------------------------


def quadratic_problem():
  params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5, jnp.float32)}
  loss = lambda p: jnp.sum(p["w"] ** 2) + (p["b"] - 1.0) ** 2
  return params, loss


def train(tx, params, loss, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_converges_on_a_parabola():
  params, loss = quadratic_problem()
  params, state = train(sf_optax.schedule_free_adan(0.1, warmup_steps=10), params, loss, 300)
  assert float(loss(sf_optax.eval_params(state, params))) < 1e-3


def test_converges_on_rosenbrock():
  params = jnp.array([-1.0, 1.5])
  loss = lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2
  params, state = train(sf_optax.schedule_free_adan(0.02, b1=0.95, warmup_steps=50), params,
                        loss, 3000)
  assert float(loss(sf_optax.eval_params(state, params))) < 1e-2


def test_no_retrace_and_extra_args():
  traces = []
  tx = sf_optax.schedule_free_adan(0.01)
  params, loss = quadratic_problem()

  @jax.jit
  def step(params, state):
    traces.append(None)
    updates, state = tx.update(jax.grad(loss)(params), state, params, unused_extra_arg=1)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1


@pytest.mark.parametrize("state_dtype", [jnp.bfloat16, None], ids=["bf16_state", "f32_state"])
def test_dtypes_are_kept(state_dtype):
  params = {"w": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.zeros(3, jnp.float32)}
  tx = sf_optax.schedule_free_adan(0.01, state_dtype=state_dtype)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(2):
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert jax.tree.map(lambda u: u.dtype, updates) == {"w": jnp.bfloat16, "b": jnp.float32}
  # No state_dtype: the params' dtype, never below float32; else state_dtype for all.
  expected = jnp.float32 if state_dtype is None else state_dtype
  for buffer in (state.z, state.x, *state.base_state):
    assert buffer["w"].dtype == expected
    assert buffer["b"].dtype == expected
  assert state.weight_sum.dtype == jnp.float32


def test_init_on_shapes_alone():
  tx = sf_optax.schedule_free_adan(0.01, state_dtype=jnp.float32)
  shapes = {"w": jax.ShapeDtypeStruct((5, 2), jnp.bfloat16)}
  state = jax.eval_shape(tx.init, shapes)
  assert state.base_state.nu["w"].shape == (5, 2)
  assert state.base_state.previous_gradient["w"].dtype == jnp.float32


def test_inject_hyperparams_and_schedule_match_constants():
  params, loss = quadratic_problem()
  plain, _ = train(sf_optax.schedule_free_adan(0.05, b2=0.9, b3=0.98, eps=1e-6), params, loss,
                   20)
  injected = optax.inject_hyperparams(sf_optax.schedule_free_adan)(
      learning_rate=0.05, b2=0.9, b3=0.98, eps=1e-6)
  via_injection, _ = train(injected, params, loss, 20)
  scheduled, _ = train(sf_optax.schedule_free_adan(lambda count: 0.05, b2=0.9, b3=0.98,
                                                   eps=1e-6), params, loss, 20)
  for other in (via_injection, scheduled):
    for name in params:
      np.testing.assert_allclose(other[name], plain[name], rtol=1e-6, atol=1e-7)


def test_multi_steps_and_eval_params():
  params, loss = quadratic_problem()
  tx = optax.MultiSteps(sf_optax.schedule_free_adan(0.05), every_k_schedule=2)
  params, state = train(tx, params, loss, 10)
  assert int(sf_optax._eval_params.find_schedule_free_states(state)[0].count) == 5
  assert jax.tree.structure(sf_optax.eval_params(state, params)) == jax.tree.structure(params)


def test_update_without_params_is_an_error():
  tx = sf_optax.schedule_free_adan()
  params = jnp.ones(2)
  with pytest.raises(ValueError, match="need params"):
    tx.update(params, tx.init(params))


@pytest.mark.parametrize(
    "argument, value",
    [("learning_rate", -1.0), ("b1", 0.0), ("b1", 1.5), ("b2", 1.0), ("b2", -0.1),
     ("b3", 1.0), ("b3", 2.0), ("eps", -1e-8), ("weight_decay", -0.1), ("r", -1.0),
     ("weight_lr_power", -2.0), ("warmup_steps", -1), ("warmup_steps", 2.5),
     ("weight_decay_at", "x")],
)
def test_bad_hyperparameters_name_the_argument(argument, value):
  with pytest.raises(ValueError, match=argument):
    sf_optax.schedule_free_adan(**{argument: value})


def test_nan_hyperparameter_is_rejected():
  with pytest.raises(ValueError, match="b3"):
    sf_optax.schedule_free_adan(b3=math.nan)
