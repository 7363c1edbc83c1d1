"""Float64 parity of sf_optax with the reference PyTorch package ``schedulefree``.

The fixtures in ``tests/reference/fixtures/schedule_free/`` were recorded from
``schedulefree`` 1.4.1 in float64 by ``tests/reference/generate_schedule_free.py``
(see ``tests/reference/README.md``). Each holds the gradients the reference was
fed, y after every step and x (read with the reference's ``eval()``) at a few
steps. Here the same gradients are replayed through sf_optax and both
trajectories must agree to 1e-10 relative error. No torch is needed.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sf_optax

from _helpers import default_tier
from _helpers import trajectory_relative_error

FIXTURES = pathlib.Path(__file__).parent / "reference" / "fixtures" / "schedule_free"
META = json.loads((FIXTURES / "cases.json").read_text())
CASES = META["cases"]
LEAVES = sorted(META["leaves"])
TOLERANCE = 1e-10

FACTORIES = {
    "sgd": sf_optax.schedule_free_sgd,
    "adamw": sf_optax.schedule_free_adamw,
    "adamw_paper": sf_optax.schedule_free_adamw_paper,
    "radam": sf_optax.schedule_free_radam,
}


# Float64 for every test here (the `x64` fixture of conftest.py restores the
# previous setting after each): the fixtures are float64 trajectories.
pytestmark = pytest.mark.usefixtures("x64")


def load(name):
  with np.load(FIXTURES / f"{name}.npz") as data:
    return {key: data[key] for key in data.files}


def learning_rate(spec):
  if isinstance(spec, dict):
    assert spec["schedule"] == "linear", spec
    schedule = optax.linear_schedule(
        init_value=spec["init_value"],
        end_value=spec["end_value"],
        transition_steps=spec["transition_steps"],
        transition_begin=spec["transition_begin"],
    )
    # Optax's schedules divide the int32 count and so compute in float32 even
    # under x64; the reference's lr is a float64. A float64 count keeps the
    # schedule in float64, so the comparison is of the optimizer alone.
    return lambda count: schedule(jnp.asarray(count, jnp.float64))
  return spec


def base_optimizer(base):
  """The Optax equivalent of the torch base optimizer of a wrapper case."""
  if base["name"] == "sgd":
    # torch.optim.SGD(lr, momentum=m) == optax.sgd(lr, momentum=m); m = 0 is
    # plain SGD, which optax spells momentum=None.
    return optax.sgd(base["learning_rate"], momentum=base["momentum"] or None)
  if base["name"] == "adam":
    adam = optax.adam(base["learning_rate"], b1=base["b1"], b2=base["b2"],
                      eps=base["eps"])
    if base["weight_decay"]:
      # torch Adam's weight_decay is L2: added to the gradient before the
      # moments, at the params the base sees (z).
      return optax.chain(optax.add_decayed_weights(base["weight_decay"]), adam)
    return adam
  raise ValueError(f"unknown base optimizer {base['name']!r}")


def build(case, *, store_x, **overrides):
  """The sf_optax optimizer of a case; ``overrides`` replace hyperparameters."""
  # The fixtures keep the reference wrapper's name; sf_optax spells it weight_decay.
  hyperparameters = {
      "weight_decay" if name == "weight_decay_at_y" else name: value
      for name, value in case["hyperparameters"].items()
  }
  hyperparameters.update(overrides)
  lr = learning_rate(case["learning_rate"])
  if case["optimizer"] == "wrapper":
    return sf_optax.schedule_free(base_optimizer(case["base"]), lr,
                                  store_x=store_x, **hyperparameters)
  excluded = case["weight_decay_excluded"]
  if excluded:
    hyperparameters.setdefault(
        "mask", {leaf: leaf not in excluded for leaf in LEAVES})
  return FACTORIES[case["optimizer"]](lr, store_x=store_x, **hyperparameters)


@functools.partial(jax.jit, static_argnums=0)
def replay(tx, params, grads):
  """Feeds the recorded gradients; returns y and x after every step."""

  def step(carry, grad):
    params, state = carry
    updates, state = tx.update(grad, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), (params, sf_optax.eval_params(state, params))

  _, (ys, xs) = jax.lax.scan(step, (params, tx.init(params)), grads)
  return ys, xs


def run(tx, data):
  params = {leaf: jnp.asarray(data[f"init.{leaf}"]) for leaf in LEAVES}
  grads = {leaf: jnp.asarray(data[f"grad.{leaf}"]) for leaf in LEAVES}
  ys, xs = replay(tx, params, grads)
  eval_index = data["eval_steps"] - 1
  return ({leaf: np.asarray(ys[leaf]) for leaf in LEAVES},
          {leaf: np.asarray(xs[leaf])[eval_index] for leaf in LEAVES})


def trajectory_errors(tx, data):
  """Largest relative error of y (every step) and x (eval steps) per leaf."""
  ys, xs = run(tx, data)
  errors = {}
  for leaf in LEAVES:
    errors[f"y.{leaf}"] = trajectory_relative_error(ys[leaf], data[f"y.{leaf}"])
    errors[f"x.{leaf}"] = trajectory_relative_error(xs[leaf], data[f"x.{leaf}"])
  return errors


def worst(errors):
  return max(float(e.max()) for e in errors.values())


def describe_failures(errors, eval_steps):
  lines = []
  for key, per_step in errors.items():
    bad = np.flatnonzero(~(per_step <= TOLERANCE))
    if bad.size:
      steps = (bad + 1) if key.startswith("y.") else eval_steps[bad]
      lines.append(
          f"{key}: first bad after step {steps[0]} ({per_step[bad[0]]:.3e}),"
          f" worst {per_step.max():.3e} after step"
          f" {steps[np.argmax(per_step[bad])]}")
  return "\n".join(lines)


# The default tier runs eleven cases, every optimizer of the family with and
# without x stored; the slow tier the rest.
DEFAULT_TIER = {
    "adamw_warmup_wd-store_x", "adamw_schedule_warmup-store_x", "adamw_paper_warmup_wd-store_x",
    "radam_wd_mask-store_x", "radam_silent-store_x", "sgd_warmup_wd_mask-store_x",
    "wrapper_adam_l2_wd_at_y_r-store_x", "wrapper_sgd_momentum_wd_at_y-store_x",
    "adamw_wd_mask_r1_b1_095-no_x", "sgd_b1_095_r05_power1_warmup-no_x", "wrapper_adam-no_x",
}


@pytest.mark.parametrize("name,store_x", default_tier(
    [(name, store_x) for name in sorted(CASES) for store_x in (True, False)], DEFAULT_TIER,
    ids=lambda case: f"{case[0]}-{'store_x' if case[1] else 'no_x'}", unpack=True))
def test_matches_reference(name, store_x):
  case = CASES[name]
  data = load(name)
  errors = trajectory_errors(build(case, store_x=store_x), data)
  assert worst(errors) <= TOLERANCE, (
      f"{name} ({case['torch']}) store_x={store_x} departs from the"
      f" reference:\n{describe_failures(errors, data['eval_steps'])}")


# Each perturbation is a plausible implementation mistake. If the fixtures
# could not tell it from the reference, the parity test above would prove
# little; each must move the trajectory by many orders of magnitude more than
# the tolerance.
PERTURBATIONS = {
    "warmup_one_step_late": ("adamw_warmup_wd", {"warmup_steps": 11}),
    "warmup_one_step_early": ("adamw_long_warmup", {"warmup_steps": 29}),
    "sgd_warmup_one_step_late": ("sgd_warmup_wd_mask", {"warmup_steps": 11}),
    "mask_ignored": ("sgd_warmup_wd_mask", {"mask": None}),
    "r_ignored": ("adamw_wd_mask_r1_b1_095", {"r": 0.0}),
    "weight_lr_power_ignored": ("sgd_b1_095_r05_power1_warmup",
                                {"weight_lr_power": 2.0}),
    "silent_phase_flipped": ("radam_silent", {"silent_sgd_phase": False}),
    "loud_phase_flipped": ("radam_not_silent", {"silent_sgd_phase": True}),
    "weight_decay_at_y_ignored": ("wrapper_sgd_momentum_wd_at_y",
                                  {"weight_decay": 0.0}),
}


@pytest.mark.parametrize("perturbation", default_tier(sorted(PERTURBATIONS), {
    "warmup_one_step_late", "mask_ignored", "silent_phase_flipped", "weight_decay_at_y_ignored"}))
def test_fixtures_detect_small_mistakes(perturbation):
  name, overrides = PERTURBATIONS[perturbation]
  case = CASES[name]
  error = worst(trajectory_errors(
      build(case, store_x=True, **overrides), load(name)))
  assert error > 1e4 * TOLERANCE, (perturbation, error)


def test_fixtures_detect_the_paper_variant():
  """AdamW and its paper variant differ only in bias correction and lr."""
  case = CASES["adamw_paper_warmup_wd"]
  tx = sf_optax.schedule_free_adamw(case["learning_rate"],
                                    **case["hyperparameters"])
  assert worst(trajectory_errors(tx, load("adamw_paper_warmup_wd"))) > 1e-6


def test_fixtures_cover_the_family():
  """Every optimizer is checked over >= 100 steps, with the required settings."""
  assert {case["optimizer"] for case in CASES.values()} == {
      *FACTORIES, "wrapper"}
  assert all(case["steps"] >= 100 for case in CASES.values())
  hyperparameters = [case["hyperparameters"] for case in CASES.values()]
  assert any(h.get("warmup_steps") for h in hyperparameters)
  assert any(h.get("r") for h in hyperparameters)
  assert any(h.get("b1") == 0.95 for h in hyperparameters)
  assert any(h.get("weight_decay") for h in hyperparameters)
  assert any(c["weight_decay_excluded"] for c in CASES.values())
  assert {h.get("silent_sgd_phase") for h in hyperparameters} >= {True, False}
  assert {c["base"]["name"] for c in CASES.values() if "base" in c} == {
      "sgd", "adam"}
