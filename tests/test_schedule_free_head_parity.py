"""Float64 parity with the reference's HEAD: inner momentum and ScheduleFree+.

The fixtures in ``tests/reference/fixtures/schedule_free_head/`` were recorded from
``schedulefree`` at facebookresearch/schedule_free commit 70785b5 (May 2026) in
float64 by ``tests/reference/make_schedulefree_head_fixtures.py`` (see
``tests/reference/README.md``): the gradients and loss values each step was given,
y after every step and x (the reference's ``eval()``) at a few steps.

Two independent checks use them. A NumPy float64 transcription of the two
algorithms, written from the paper's and the reference's semantics
(``../shared/reference/schedule_free.md``), must reproduce them: it pins down what
the algorithms are. The same recorded gradients and values, replayed through
sf_optax (both ``store_x`` modes), must agree to 1e-10 relative error. No torch
is needed.
"""

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sf_optax
from _helpers import default_tier

FIXTURES = pathlib.Path(__file__).parent / "reference" / "fixtures" / "schedule_free_head"
META = json.loads((FIXTURES / "cases.json").read_text())
CASES = META["cases"]
LEAVES = sorted(META["leaves"])
PLUS_CASES = sorted(name for name, case in CASES.items() if case["optimizer"] == "plus")
ADAMW_CASES = sorted(name for name, case in CASES.items() if case["optimizer"] == "adamw")
TOLERANCE = 1e-10


def load(name):
  with np.load(FIXTURES / f"{name}.npz") as data:
    return {key: data[key] for key in data.files}


def relative_error(actual, reference):
  """Per step, max |actual - reference| over a leaf, over max |reference| of the run."""
  actual = np.asarray(actual)
  assert actual.shape == reference.shape, (actual.shape, reference.shape)
  assert actual.dtype == np.float64, actual.dtype
  difference = np.abs(actual - reference).reshape(len(reference), -1)
  return difference.max(axis=1) / np.abs(reference).max()


def trajectory_error(ys, xs, data):
  """Largest relative error of y (every step) and x (at the eval steps) over the leaves."""
  eval_index = data["eval_steps"] - 1
  errors = []
  for leaf in LEAVES:
    errors.append(relative_error(ys[leaf], data[f"y.{leaf}"]).max())
    errors.append(relative_error(np.asarray(xs[leaf])[eval_index], data[f"x.{leaf}"]).max())
  return max(errors)


def decay_factors(case):
  """1 for leaves that decay, 0 for the leaves the reference put in a weight_decay=0 group."""
  return {leaf: float(leaf not in case["weight_decay_excluded"]) for leaf in LEAVES}


# ----------------------------------------------------------------------------
# The NumPy transcriptions: float64, one loop over steps, scalars in Python floats.
# ----------------------------------------------------------------------------


def annealed_momentum(start, end, anneal_steps, step):
  """ScheduleFree+'s Schedule-Free momentum at 0-based ``step``.

  1 - momentum moves from 1 - start to 1 - end geometrically (linearly in log
  space) over ``anneal_steps`` steps, then stays; no annealing when it is 0.
  """
  if anneal_steps == 0:
    return start
  progress = min(step / anneal_steps, 1.0)
  log_gap = (1 - progress) * math.log(1 - start) + progress * math.log(1 - end)
  return 1 - math.exp(log_gap)


def numpy_schedule_free_plus(case, data):
  """ScheduleFree+ replayed on the recorded gradients and loss values.

  Returns y and x after every step (dicts of ``(steps, *shape)`` arrays), the
  effective step size and the stored L1 estimate of every step.
  """
  h = case["hyperparameters"]
  b1, b2 = h.get("b1", 0.9), h.get("b2", 0.95)
  eps, decay = h.get("eps", 1e-8), h.get("weight_decay", 0.0)
  r, power = h.get("r", 0.0), h.get("weight_lr_power", 2.0)
  polyak_b, c_warmup = h.get("polyak_b", 0.0), h.get("c_warmup", 0)
  momentum = functools.partial(
      annealed_momentum, h.get("sf_b1", 0.9), h.get("sf_b1_max", 0.965),
      h.get("sf_b1_anneal_steps", 0))
  factor = decay_factors(case)

  y = {leaf: data[f"init.{leaf}"].copy() for leaf in LEAVES}
  z = {leaf: y[leaf].copy() for leaf in LEAVES}
  x = {leaf: y[leaf].copy() for leaf in LEAVES}
  first = {leaf: np.zeros_like(y[leaf]) for leaf in LEAVES}
  second = {leaf: np.zeros_like(y[leaf]) for leaf in LEAVES}
  l1_estimate, largest_rate, weights = 0.0, eps, 0.0
  ys = {leaf: [] for leaf in LEAVES}
  xs = {leaf: [] for leaf in LEAVES}
  rates, estimates = [], []
  for k in range(case["steps"]):
    g = {leaf: data[f"grad.{leaf}"][k] for leaf in LEAVES}
    m_k = momentum(k)
    # The Polyak step: how far the loss is from 0, corrected by the first-order
    # change <g, y - x'> the interpolation makes (y - x = (1 - m)(z - x) is
    # reached by the gradient through y), over the expected L1 size of g.
    l1 = sum(float(np.abs(g[leaf]).sum()) for leaf in LEAVES)
    correction = m_k * sum(float((g[leaf] * (z[leaf] - x[leaf])).sum()) for leaf in LEAVES)
    raw = polyak_b * l1_estimate + (1 - polyak_b) * math.sqrt(math.pi / 2) * l1
    # The reference keeps the bias-corrected value as the running estimate.
    l1_estimate = raw / (1 - polyak_b ** (k + 1))
    # The base learning rate is floored at eps, so that a warmup from 0 moves.
    rate = max(data["learning_rate"][k], eps) * (
        max(0.0, data["value"][k] + correction) / l1_estimate)
    largest_rate = max(largest_rate, rate)
    if k < c_warmup:
      c = 1.0
    else:
      weight = (k + 1) ** r * largest_rate ** power
      weights += weight
      c = weight / weights
    for leaf in LEAVES:
      # AdamC: decoupled decay at y, proportional to the square of the step size.
      z[leaf] = z[leaf] - rate * rate * decay * factor[leaf] * y[leaf]
      first[leaf] = b1 * first[leaf] + (1 - b1) * g[leaf]
      second[leaf] = b2 * second[leaf] + (1 - b2) * g[leaf] ** 2
      direction = (first[leaf] / (1 - b1 ** (k + 1))) / (
          np.sqrt(second[leaf] / (1 - b2 ** (k + 1))) + eps)
      z[leaf] = z[leaf] - rate * direction
      x[leaf] = (1 - c) * x[leaf] + c * z[leaf]
      y[leaf] = m_k * x[leaf] + (1 - m_k) * z[leaf]
      ys[leaf].append(y[leaf].copy())
      xs[leaf].append(x[leaf].copy())
    rates.append(rate)
    estimates.append(l1_estimate)
  return ({leaf: np.stack(v) for leaf, v in ys.items()},
          {leaf: np.stack(v) for leaf, v in xs.items()},
          np.asarray(rates), np.asarray(estimates))


def numpy_adamw_inner_momentum(case, data):
  """Schedule-Free AdamW whose z-step uses an EMA of g (with its own bias correction)."""
  h = case["hyperparameters"]
  b1, b2, eps = h.get("b1", 0.9), h.get("b2", 0.999), h.get("eps", 1e-8)
  decay, warmup = h.get("weight_decay", 0.0), h.get("warmup_steps", 0)
  r, power = h.get("r", 0.0), h.get("weight_lr_power", 2.0)
  mu, at_z = h["inner_momentum"], h.get("weight_decay_at", "y") == "z"
  factor = decay_factors(case)

  y = {leaf: data[f"init.{leaf}"].copy() for leaf in LEAVES}
  z = {leaf: y[leaf].copy() for leaf in LEAVES}
  x = {leaf: y[leaf].copy() for leaf in LEAVES}
  inner = {leaf: np.zeros_like(y[leaf]) for leaf in LEAVES}
  second = {leaf: np.zeros_like(y[leaf]) for leaf in LEAVES}
  largest, weights = -1.0, 0.0
  ys = {leaf: [] for leaf in LEAVES}
  xs = {leaf: [] for leaf in LEAVES}
  for k in range(case["steps"]):
    lr = data["learning_rate"][k] * (min((k + 1) / warmup, 1.0) if warmup else 1.0)
    largest = max(largest, lr)
    weight = (k + 1) ** r * largest ** power
    weights += weight
    c = weight / weights
    for leaf in LEAVES:
      g = data[f"grad.{leaf}"][k]
      z[leaf] = z[leaf] - lr * decay * factor[leaf] * (z[leaf] if at_z else y[leaf])
      inner[leaf] = mu * inner[leaf] + (1 - mu) * g
      second[leaf] = b2 * second[leaf] + (1 - b2) * g * g
      z[leaf] = z[leaf] - lr * (inner[leaf] / (1 - mu ** (k + 1))) / (
          np.sqrt(second[leaf] / (1 - b2 ** (k + 1))) + eps)
      x[leaf] = (1 - c) * x[leaf] + c * z[leaf]
      y[leaf] = b1 * x[leaf] + (1 - b1) * z[leaf]
      ys[leaf].append(y[leaf].copy())
      xs[leaf].append(x[leaf].copy())
  return ({leaf: np.stack(v) for leaf, v in ys.items()},
          {leaf: np.stack(v) for leaf, v in xs.items()})


@pytest.mark.parametrize("name", PLUS_CASES)
def test_numpy_schedule_free_plus_matches_reference(name):
  case, data = CASES[name], load(name)
  ys, xs, rates, estimates = numpy_schedule_free_plus(case, data)
  assert trajectory_error(ys, xs, data) <= TOLERANCE
  np.testing.assert_allclose(rates, data["scheduled_lr"], rtol=1e-12, atol=0)
  np.testing.assert_allclose(estimates, data["grad_l1_ema"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ADAMW_CASES)
def test_numpy_adamw_inner_momentum_matches_reference(name):
  case, data = CASES[name], load(name)
  ys, xs = numpy_adamw_inner_momentum(case, data)
  assert trajectory_error(ys, xs, data) <= TOLERANCE


def test_stored_l1_estimate_is_the_corrected_one():
  """With polyak_b > 0 the reference feeds the corrected estimate into the next step.

  An ordinary bias-corrected EMA (raw state kept, corrected only for use) misses
  the fixtures by far: that is the detail matched.
  """
  name = "plus_polyak_09_cwarmup_anneal_wd_r"
  case, data = CASES[name], load(name)
  beta = case["hyperparameters"]["polyak_b"]
  l1 = np.asarray([
      sum(np.abs(data[f"grad.{leaf}"][k]).sum() for leaf in LEAVES)
      for k in range(case["steps"])]) * math.sqrt(math.pi / 2)
  raw, stored, textbook = 0.0, 0.0, []
  for k, value in enumerate(l1):
    raw = beta * raw + (1 - beta) * value
    textbook.append(raw / (1 - beta ** (k + 1)))
    stored = (beta * stored + (1 - beta) * value) / (1 - beta ** (k + 1))
    assert stored == pytest.approx(data["grad_l1_ema"][k], rel=1e-12)
  # Early on the stored estimate is many times the textbook one (the division by
  # 1 - beta^(k+1) compounds), which shrinks the first steps; it forgets later.
  inflation = data["grad_l1_ema"] / np.asarray(textbook)
  assert inflation.max() > 10 and abs(inflation[-1] - 1) < 0.1


def test_fixtures_cover_the_issue():
  """What issue 13 asks the fixtures to cover: >= 150 steps, every setting."""
  assert all(case["steps"] >= 150 for case in CASES.values())
  adamw = [CASES[name]["hyperparameters"] for name in ADAMW_CASES]
  assert {h["inner_momentum"] for h in adamw} == {0.5, 0.9}
  assert all(h["warmup_steps"] and h["weight_decay"] for h in adamw)
  assert {CASES[name]["torch_class"] for name in ADAMW_CASES} == {
      "AdamWScheduleFree", "AdamWScheduleFreeReference"}
  plus = [CASES[name]["hyperparameters"] for name in PLUS_CASES]
  assert {h.get("polyak_b", 0.0) for h in plus} == {0.0, 0.9}
  assert {h.get("weight_lr_power", 2.0) for h in plus} == {0.0, 2.0}
  assert any(h.get("c_warmup") and h.get("sf_b1_anneal_steps") and h.get("weight_decay")
             and h.get("r") for h in plus)
  assert any(isinstance(CASES[name]["learning_rate"], dict) for name in PLUS_CASES)
  assert {len(shape) for shape in META["leaves"].values()} == {0, 1, 2}
  # The Polyak numerator max(0, f + ip) is clipped to 0 on some steps.
  assert any((load(name)["scheduled_lr"] == 0).any() for name in PLUS_CASES)


# ----------------------------------------------------------------------------
# sf_optax against the fixtures.
# ----------------------------------------------------------------------------


def learning_rate(spec):
  if isinstance(spec, dict):
    assert spec["schedule"] == "linear", spec
    schedule = optax.linear_schedule(
        init_value=spec["init_value"], end_value=spec["end_value"],
        transition_steps=spec["transition_steps"],
        transition_begin=spec["transition_begin"])
    # A float64 count keeps Optax's schedule in float64 (see test_schedule_free_parity.py).
    return lambda count: schedule(jnp.asarray(count, jnp.float64))
  return spec


def build(case, *, store_x, **overrides):
  """The sf_optax optimizer of a case; ``overrides`` replace hyperparameters."""
  hyperparameters = {**case["hyperparameters"], **overrides}
  if case["weight_decay_excluded"]:
    hyperparameters.setdefault(
        "mask", {leaf: leaf not in case["weight_decay_excluded"] for leaf in LEAVES})
  factory = {"plus": sf_optax.schedule_free_plus,
             "adamw": sf_optax.schedule_free_adamw}[case["optimizer"]]
  return factory(learning_rate(case["learning_rate"]), store_x=store_x, **hyperparameters)


@functools.partial(jax.jit, static_argnums=0)
def replay(tx, params, grads, values):
  """Feeds the recorded gradients and loss values; y, x and the logged scalars per step."""

  def step(carry, inputs):
    params, state = carry
    grad, value = inputs
    # Every optimizer takes extra arguments; only ScheduleFree+ reads `value`.
    updates, state = tx.update(grad, state, params, value=value)
    params = optax.apply_updates(params, updates)
    logged = {name: optax.tree.get(state, name, jnp.nan)
              for name in ("step_size", "grad_l1_ema")}
    return (params, state), (params, sf_optax.eval_params(state, params), logged)

  _, outputs = jax.lax.scan(step, (params, tx.init(params)), (grads, values))
  return outputs


def run(tx, data):
  params = {leaf: jnp.asarray(data[f"init.{leaf}"]) for leaf in LEAVES}
  grads = {leaf: jnp.asarray(data[f"grad.{leaf}"]) for leaf in LEAVES}
  ys, xs, logged = replay(tx, params, grads, jnp.asarray(data["value"]))
  return (jax.tree.map(np.asarray, ys), jax.tree.map(np.asarray, xs),
          jax.tree.map(np.asarray, logged))


# The default tier runs four cases (x stored, and one without); the slow tier the rest.
DEFAULT_TIER = {"adamw_inner_09_warmup_wd_r_mask-store_x", "adamw_reference_inner_05_decay_at_z-no_x",
                "plus_defaults-store_x", "plus_polyak_09_cwarmup_anneal_wd_r-store_x"}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name,store_x", default_tier(
    [(name, store_x) for name in sorted(CASES) for store_x in (True, False)], DEFAULT_TIER,
    ids=lambda case: f"{case[0]}-{'store_x' if case[1] else 'no_x'}", unpack=True))
def test_matches_reference(name, store_x):
  case, data = CASES[name], load(name)
  ys, xs, logged = run(build(case, store_x=store_x), data)
  error = trajectory_error(ys, xs, data)
  assert error <= TOLERANCE, f"{name} ({case['torch']}) store_x={store_x}: {error:.3e}"
  if case["optimizer"] == "plus":
    # The step size of every step and the L1 estimate, as the reference logs them.
    np.testing.assert_allclose(logged["step_size"], data["scheduled_lr"], rtol=TOLERANCE, atol=0)
    np.testing.assert_allclose(logged["grad_l1_ema"], data["grad_l1_ema"], rtol=TOLERANCE, atol=0)


# Each perturbation is a plausible implementation mistake; the fixtures must tell
# it from the reference by many orders of magnitude more than the tolerance.
PERTURBATIONS = {
    "inner_momentum_ignored": ("adamw_inner_05_warmup_wd", {"inner_momentum": 0.0}),
    "inner_momentum_other": ("adamw_reference_inner_09_warmup_wd", {"inner_momentum": 0.8}),
    "c_warmup_one_step_late": ("plus_polyak_09_cwarmup_anneal_wd_r", {"c_warmup": 11}),
    "c_warmup_ignored": ("plus_polyak_0_cwarmup_anneal_wd_r_power0", {"c_warmup": 0}),
    "anneal_one_step_late": ("plus_polyak_09_cwarmup_anneal_wd_r", {"sf_b1_anneal_steps": 101}),
    "anneal_ignored": ("plus_schedule_polyak_09_mask", {"sf_b1_anneal_steps": 0}),
    "polyak_b_ignored": ("plus_polyak_09_cwarmup_anneal_wd_r", {"polyak_b": 0.0}),
    "weight_decay_ignored": ("plus_polyak_09_cwarmup_anneal_wd_r", {"weight_decay": 0.0}),
    "mask_ignored": ("plus_schedule_polyak_09_mask", {"mask": None}),
    "weight_lr_power_ignored": ("plus_polyak_0_cwarmup_anneal_wd_r_power0",
                                {"weight_lr_power": 2.0}),
    "r_ignored": ("plus_polyak_09_cwarmup_anneal_wd_r", {"r": 0.0}),
    "b2_default": ("plus_polyak_0_cwarmup_anneal_wd_r_power0", {"b2": 0.95}),
}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("perturbation", default_tier(sorted(PERTURBATIONS), {
    "inner_momentum_ignored", "c_warmup_one_step_late", "polyak_b_ignored", "mask_ignored"}))
def test_fixtures_detect_small_mistakes(perturbation):
  name, overrides = PERTURBATIONS[perturbation]
  data = load(name)
  ys, xs, _ = run(build(CASES[name], store_x=True, **overrides), data)
  assert trajectory_error(ys, xs, data) > 1e4 * TOLERANCE, perturbation
