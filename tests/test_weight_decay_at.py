"""Where the decoupled weight decay is evaluated: ``weight_decay_at="y"`` or ``"z"``.

Per step, with lr the step's learning rate, u the z-step's direction and
lambda the decay (times its mask and scales)::

    z' = z - lr * u - lr * lambda * (y if weight_decay_at == "y" else z)
    x' = (1 - c) x + c z' ;  y' = b1 x' + (1 - b1) z'

The float64 transcriptions below are written independently of sf_optax, for
each built-in optimizer (SGD, AdamW, AdamW paper, RAdam): the "y" placement in
the reference's memory-lean form (schedulefree's ``AdamWScheduleFree.step``,
which never stores x), the "z" placement in the form of its
``AdamWScheduleFreeReference(decay_at_z=True)`` (explicit x, y and z).
"""

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
from _helpers import relative_error

pytestmark = pytest.mark.usefixtures("x64")

TOLERANCE = 1e-10
STEPS = 60
SHAPES = {"bias": (3,), "kernel": (4, 3)}
FACTORIES = {
    "sgd": sf_optax.schedule_free_sgd,
    "adamw": sf_optax.schedule_free_adamw,
    "adamw_paper": sf_optax.schedule_free_adamw_paper,
    "radam": sf_optax.schedule_free_radam,
}
HYPERPARAMETERS = {
    "sgd": dict(learning_rate=0.05, b1=0.9, weight_decay=0.5, warmup_steps=10, r=0.5),
    "adamw": dict(learning_rate=0.03, b1=0.95, b2=0.99, eps=1e-8, weight_decay=0.5,
                  warmup_steps=10, r=1.0, weight_lr_power=1.0),
    "adamw_paper": dict(learning_rate=0.03, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.5,
                        warmup_steps=10),
    "radam": dict(learning_rate=0.03, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.5, r=0.5),
}
MASK = {"bias": False, "kernel": True}


def gradient(y, noise):
  """A nonconvex objective's gradient plus fixed noise, in NumPy or jnp."""
  module = jnp if isinstance(y, jax.Array) else np
  return 0.5 * y + module.cos(3.0 * y) + noise


def problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=shape) for k, shape in SHAPES.items()}
  noises = [{k: 0.3 * rng.normal(size=shape) for k, shape in SHAPES.items()}
            for _ in range(STEPS)]
  return params, noises


# ---------------------------------------------------------------------------
# Transcriptions.
# ---------------------------------------------------------------------------


def scalars(optimizer, k, hp):
  """(lr, adaptive) of step k: the learning rate and whether u is Adam's."""
  step = k + 1
  warmup = hp.get("warmup_steps", 0)
  sched = step / warmup if k < warmup else 1.0
  b2 = hp.get("b2", 0.999)
  if optimizer == "sgd":
    return hp["learning_rate"] * sched, False
  if optimizer == "adamw":
    return hp["learning_rate"] * sched, True
  if optimizer == "adamw_paper":
    return hp["learning_rate"] * sched * math.sqrt(1 - b2**step), True
  rho_inf = 2 / (1 - b2) - 1
  rho_t = rho_inf - 2 * step * b2**step / (1 - b2**step)
  if rho_t > 4:
    rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    return hp["learning_rate"] * rect, True
  return 0.0, False  # silent_sgd_phase (the default)


def direction(optimizer, g, v, k, hp):
  """The z-step direction u (before decay) and the new second moment."""
  if optimizer == "sgd":
    return g, v
  b2, eps = hp.get("b2", 0.999), hp.get("eps", 1e-8)
  v = b2 * v + (1 - b2) * g * g
  if optimizer == "adamw_paper":
    return g / (np.sqrt(v) + eps), v
  _, adaptive = scalars(optimizer, k, hp)
  if not adaptive:
    return g, v
  return g / (np.sqrt(v / (1 - b2 ** (k + 1))) + eps), v


def transcription(optimizer, placement, params, noises, hp, mask):
  """y after every step and x at the end, in float64."""
  b1 = hp.get("b1", 0.9)
  r, power = hp.get("r", 0.0), hp.get("weight_lr_power", 2.0)
  wd = hp["weight_decay"]
  y = {k: np.array(v, np.float64) for k, v in params.items()}
  z = {k: v.copy() for k, v in y.items()}
  x = {k: v.copy() for k, v in y.items()}
  v = {k: np.zeros_like(p) for k, p in y.items()}
  lr_max, weight_sum, ys = -1.0, 0.0, []
  for k, noise in enumerate(noises):
    lr, _ = scalars(optimizer, k, hp)
    lr_max = max(lr, lr_max)
    weight = (k + 1) ** r * lr_max**power
    weight_sum += weight
    c = weight / weight_sum if weight_sum else 0.0
    for name in y:
      g = gradient(y[name], noise[name])
      u, v[name] = direction(optimizer, g, v[name], k, hp)
      decay = wd * float(mask[name])
      if placement == "y":
        # The reference's AdamWScheduleFree.step: decay folded into u, x implicit.
        u = u + decay * y[name]
        y[name] = y[name] + c * (z[name] - y[name])
        y[name] = y[name] + lr * (b1 * (1 - c) - 1) * u
        z[name] = z[name] - lr * u
        x[name] = (y[name] - (1 - b1) * z[name]) / b1
      else:
        # AdamWScheduleFreeReference with decay_at_z: decay z, step z, average.
        z[name] = z[name] - lr * decay * z[name]
        z[name] = z[name] - lr * u
        x[name] = (1 - c) * x[name] + c * z[name]
        y[name] = b1 * x[name] + (1 - b1) * z[name]
    ys.append({name: p.copy() for name, p in y.items()})
  return ys, x


# ---------------------------------------------------------------------------
# sf_optax runs.
# ---------------------------------------------------------------------------


def run(tx, params, noises):
  """y after every step, x (eval_params), z and stored x after every step."""
  params = jax.tree.map(jnp.asarray, params)
  stacked = jax.tree.map(lambda *n: jnp.asarray(np.stack(n)), *noises)

  @jax.jit
  def replay(params, stacked):
    def step(carry, noise):
      params, state = carry
      updates, state = tx.update(jax.tree.map(gradient, params, noise), state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), (params, sf_optax.eval_params(state, params), state.z)

    (_, state), outputs = jax.lax.scan(step, (params, tx.init(params)), stacked)
    return outputs

  return replay(params, stacked)


@pytest.mark.parametrize("store_x", [True, False], ids=["store_x", "no_x"])
@pytest.mark.parametrize("placement", ["y", "z"])
@pytest.mark.parametrize("optimizer", default_tier(sorted(FACTORIES), {"adamw"}))
def test_matches_float64_transcription(optimizer, placement, store_x):
  params, noises = problem()
  hp = HYPERPARAMETERS[optimizer]
  tx = FACTORIES[optimizer](**hp, mask=MASK, weight_decay_at=placement, store_x=store_x)
  ys, xs, _ = run(tx, params, noises)
  ref_ys, ref_x = transcription(optimizer, placement, params, noises, hp, MASK)
  for name in SHAPES:
    assert relative_error(ys[name], np.stack([s[name] for s in ref_ys])) <= TOLERANCE, name
    assert relative_error(xs[name][-1], ref_x[name]) <= TOLERANCE, name


@pytest.mark.parametrize("optimizer", default_tier(sorted(FACTORIES), {"sgd"}))
def test_the_placements_differ(optimizer):
  """Each transcription tells the placements apart (so the test above has teeth)."""
  params, noises = problem()
  hp = HYPERPARAMETERS[optimizer]
  ys, _, _ = run(FACTORIES[optimizer](**hp, mask=MASK, weight_decay_at="z"), params, noises)
  ref_ys, _ = transcription(optimizer, "y", params, noises, hp, MASK)
  assert relative_error(ys["kernel"], np.stack([s["kernel"] for s in ref_ys])) > 1e-4


@pytest.mark.parametrize("placement", ["y", "z"])
@pytest.mark.parametrize("optimizer", default_tier(sorted(FACTORIES), {"adamw_paper"}))
def test_state_stays_a_schedule_free_state(optimizer, placement):
  """y = b1 x + (1 - b1) z after every step; the reconstructed x is the stored one."""
  params, noises = problem()
  hp = HYPERPARAMETERS[optimizer]
  b1 = hp.get("b1", 0.9)
  ys, xs, zs = run(
      FACTORIES[optimizer](**hp, mask=MASK, weight_decay_at=placement), params, noises)
  _, xs_rebuilt, zs_no_x = run(
      FACTORIES[optimizer](**hp, mask=MASK, weight_decay_at=placement, store_x=False),
      params, noises)
  for name in SHAPES:
    interpolation = b1 * xs[name] + (1 - b1) * zs[name]
    assert relative_error(interpolation, ys[name]) <= 1e-13
    assert relative_error(xs_rebuilt[name], xs[name]) <= TOLERANCE
    assert relative_error(zs_no_x[name], zs[name]) <= TOLERANCE


# ---------------------------------------------------------------------------
# "y" is the reference's default; "z" is the wrapper's base decay.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", default_tier(sorted(FACTORIES), {"radam"}))
def test_default_is_y(optimizer):
  params, noises = problem()
  hp = HYPERPARAMETERS[optimizer]
  default = run(FACTORIES[optimizer](**hp, mask=MASK), params, noises)
  explicit = run(FACTORIES[optimizer](**hp, mask=MASK, weight_decay_at="y"), params, noises)
  for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(explicit)):
    np.testing.assert_array_equal(a, b)


FIXTURES = pathlib.Path(__file__).parent / "reference" / "fixtures" / "schedule_free"
# Reference runs (schedulefree 1.4.1, float64) whose weight decay is non-zero.
DECAYED_CASES = ["adamw_paper_warmup_wd", "adamw_warmup_wd", "adamw_wd_mask_r1_b1_095",
                 "radam_wd_mask", "sgd_warmup_wd_mask"]


def fixture_errors(name, placement):
  case = json.loads((FIXTURES / "cases.json").read_text())["cases"][name]
  with np.load(FIXTURES / f"{name}.npz") as npz:
    data = {key: npz[key] for key in npz.files}
  leaves = sorted({key.split(".", 1)[1] for key in data if key.startswith("init.")})
  hyperparameters = dict(case["hyperparameters"])
  if case["weight_decay_excluded"]:
    hyperparameters["mask"] = {leaf: leaf not in case["weight_decay_excluded"] for leaf in leaves}
  tx = FACTORIES[case["optimizer"]](case["learning_rate"], weight_decay_at=placement,
                                    **hyperparameters)
  params = {leaf: jnp.asarray(data[f"init.{leaf}"]) for leaf in leaves}
  grads = {leaf: jnp.asarray(data[f"grad.{leaf}"]) for leaf in leaves}

  def step(carry, grad):
    params, state = carry
    updates, state = tx.update(grad, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), params

  _, ys = jax.jit(lambda p, g: jax.lax.scan(step, (p, tx.init(p)), g))(params, grads)
  return max(relative_error(ys[leaf], data[f"y.{leaf}"]) for leaf in leaves)


@pytest.mark.parametrize("name", default_tier(DECAYED_CASES, {"adamw_warmup_wd", "sgd_warmup_wd_mask"}))
def test_y_is_the_reference_default(name):
  """The reference optimizers decay at y: "y" reproduces them, "z" does not."""
  assert fixture_errors(name, "y") <= TOLERANCE
  assert fixture_errors(name, "z") > 1e-6


@pytest.mark.parametrize(
    "store_x", default_tier([True, False], {"no_x"}, ids={True: "store_x", False: "no_x"}.get))
def test_z_is_the_wrappers_base_decay(store_x):
  """Decay at z == schedule_free(optax.adamw(b1=0)): the base decays the z it sees.

  Likewise decay at y == schedule_free(optax.adam(b1=0), weight_decay=...).
  """
  params, noises = problem()
  lr, b2, eps, wd, warmup = 0.03, 0.99, 1e-8, 0.5, 0
  built_in_z = run(sf_optax.schedule_free_adamw(
      lr, b2=b2, eps=eps, weight_decay=wd, weight_decay_at="z", store_x=store_x), params, noises)
  wrapped_z = run(sf_optax.schedule_free(
      optax.adamw(lr, b1=0.0, b2=b2, eps=eps, weight_decay=wd), lr, store_x=store_x),
      params, noises)
  built_in_y = run(sf_optax.schedule_free_adamw(
      lr, b2=b2, eps=eps, weight_decay=wd, warmup_steps=warmup, store_x=store_x), params, noises)
  wrapped_y = run(sf_optax.schedule_free(
      optax.adam(lr, b1=0.0, b2=b2, eps=eps), lr, weight_decay=wd, store_x=store_x),
      params, noises)
  for built_in, wrapped in ((built_in_z, wrapped_z), (built_in_y, wrapped_y)):
    for name in SHAPES:
      assert relative_error(built_in[0][name], wrapped[0][name]) <= TOLERANCE
      assert relative_error(built_in[1][name], wrapped[1][name]) <= TOLERANCE


def test_adan_takes_both_placements():
  params, noises = problem()
  for placement in ("y", "z"):
    ys, xs, zs = run(sf_optax.schedule_free_adan(0.03, weight_decay=0.5,
                                                 weight_decay_at=placement), params, noises)
    for name in SHAPES:
      assert relative_error(0.9 * xs[name] + 0.1 * zs[name], ys[name]) <= 1e-13
