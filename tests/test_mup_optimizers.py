"""Behaviour of the μP optimizers (mup_flax/_optimizers.py).

Reference parity (against ``mup`` 1.0.0) is in test_mup_parity.py; here: at
base width they are the plain Optax optimizers bit for bit; away from it they
are the plain optimizers run on mup's parameter groups; epsilon scaling,
weight-decay variants, accepted inputs and the errors for bad ones.
"""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mup_flax
import sf_optax
from mup_flax import InfDim, InfShape

from _helpers import default_tier
from _helpers import normal

LR, WD = 3e-2, 0.1


def infshapes_at(width, base=8):
  """A small model's InfShapes at ``width`` with base width ``base``.

  Dense kernels are (in, out): ``inp`` (finite fan-in, vector-like), ``hidden``
  (matrix-like, fan-out twice as wide), ``readout`` (finite fan-out); a bias, a
  finite ``gain`` (scalar-like) and an embedding table.
  """
  return {
      "inp": {"kernel": InfShape([InfDim(None, 3), InfDim(base, width)])},
      "hidden": {"kernel": InfShape([InfDim(base, width), InfDim(2 * base, 2 * width)]),
                 "bias": InfShape([InfDim(2 * base, 2 * width)])},
      "readout": {"kernel": InfShape([InfDim(2 * base, 2 * width), InfDim(None, 5)])},
      "gain": InfShape([InfDim(None, 5)]),
      "embed": {"embedding": InfShape([InfDim(None, 11), InfDim(base, width)])},
  }


def params_for(infshapes, seed=0, dtype=jnp.float32):
  leaves, treedef = jax.tree.flatten(infshapes, is_leaf=lambda x: isinstance(x, InfShape))
  rng = np.random.default_rng(seed)
  return treedef.unflatten([normal(rng, s.shape, dtype) for s in leaves])


def run(tx, params, steps=3, seed=1, scale=1.0):
  """Updates of ``steps`` steps with random gradients (the same for every tx)."""
  state = tx.init(params)
  update = tx.update   # eager: small ops compile once for all tests, whole updates would not
  out = []
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    grads = jax.tree.map(lambda p: normal(rng, p.shape, p.dtype) * scale, params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


def assert_same(a, b):
  for x, y in zip(a, b):
    jax.tree.map(np.testing.assert_array_equal, x, y)


def assert_close(a, b, rtol=1e-6):
  """Per leaf, max |u - v| <= rtol * max |v| (float32 rounding, relative to the leaf's scale)."""
  def check(u, v):
    assert np.max(np.abs(u - v)) <= rtol * np.max(np.abs(v)), (u, v)
  for x, y in zip(a, b):
    jax.tree.map(check, x, y)


# -- base == target: exactly the plain optimizers ---------------------------------------


BASE = infshapes_at(8)
SP = jax.tree.map(lambda s: InfShape([InfDim(None, d) for d in s.shape]), BASE,
                  is_leaf=lambda x: isinstance(x, InfShape))


@pytest.mark.parametrize("infshapes", default_tier(
    [BASE, SP], {"base_width"}, ids=lambda shapes: "base_width" if shapes is BASE else "no_infinite_dims"))
def test_at_base_width_equal_plain_optax(infshapes):
  params = params_for(infshapes)
  pairs = [
      (mup_flax.mu_adam(LR, infshapes), optax.adam(LR)),
      (mup_flax.mu_adam(LR, infshapes, weight_decay=WD, b1=0.8, nesterov=True),
       optax.chain(optax.add_decayed_weights(WD), optax.adam(LR, b1=0.8, nesterov=True))),
      (mup_flax.mu_adam(LR, infshapes, scale_eps=True, eps=1e-3), optax.adam(LR, eps=1e-3)),
      (mup_flax.mu_adamw(LR, infshapes, weight_decay=WD), optax.adamw(LR, weight_decay=WD)),
      (mup_flax.mu_adamw(LR, infshapes, weight_decay=WD, decoupled_wd=True, scale_eps=True),
       optax.adamw(LR, weight_decay=WD)),
      (mup_flax.mu_sgd(LR, infshapes), optax.sgd(LR)),
      (mup_flax.mu_sgd(LR, infshapes, momentum=0.9, nesterov=True, weight_decay=WD),
       optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=0.9, nesterov=True))),
  ]
  for mu, plain in pairs:
    assert_same(run(mu, params), run(plain, params))
  for rule in ("adam", "sgd"):
    tx = mup_flax.scale_by_mup(infshapes, rule=rule)
    assert_same(run(tx, params, steps=1), run(optax.identity(), params, steps=1))


# -- away from base: the plain optimizers on mup's parameter groups -----------------------


def grouped(infshapes, make):
  """optax.partition by μP group: ``make(lr_mult, wd_mult, eps_mult)`` per group.

  This is the reference's construction (one torch param group per multiplier),
  written with plain Optax optimizers; the rules are spelled out here again on
  purpose, from the parity fixtures' table (Table 8 of Tensor Programs V).
  """
  def groups(rule, decoupled_wd):
    def one(s):
      if rule == "adam":
        m = s.width_mult() if s.ninf() == 2 else 1.0
        return (1 / m, 1.0 if decoupled_wd else m, 1 / m)
      m = (1.0 if s.ninf() == 0 else
           1 / s.width_mult() if s.ninf() == 1 else s.fanin_fanout_mult_ratio())
      return (1 / m, 1.0 if decoupled_wd else m, 1.0)
    return jax.tree.map(one, infshapes, is_leaf=lambda x: isinstance(x, InfShape))

  def build(rule, decoupled_wd=False):
    labels = groups(rule, decoupled_wd)
    is_group = lambda x: isinstance(x, tuple)
    keys = {g for g in jax.tree.leaves(labels, is_leaf=is_group)}
    return optax.partition({repr(g): make(*g) for g in keys},
                           jax.tree.map(repr, labels, is_leaf=is_group))
  return build


@pytest.mark.parametrize("decoupled_wd", default_tier([False, True], {"True"}))
def test_away_from_base_equal_optax_on_param_groups(decoupled_wd):
  infshapes = infshapes_at(32)
  params = params_for(infshapes)
  cases = [
      (mup_flax.mu_adam(LR, infshapes, weight_decay=WD, decoupled_wd=decoupled_wd),
       lambda lr, wd, _: optax.chain(optax.add_decayed_weights(WD * wd), optax.adam(LR * lr)),
       "adam"),
      (mup_flax.mu_adamw(LR, infshapes, weight_decay=WD, decoupled_wd=decoupled_wd),
       lambda lr, wd, _: optax.adamw(LR * lr, weight_decay=WD * wd), "adam"),
      (mup_flax.mu_adam(LR, infshapes, eps=1e-2, scale_eps=True, decoupled_wd=decoupled_wd),
       lambda lr, wd, eps: optax.adam(LR * lr, eps=1e-2 * eps), "adam"),
      (mup_flax.mu_sgd(LR, infshapes, momentum=0.9, weight_decay=WD, decoupled_wd=decoupled_wd),
       lambda lr, wd, _: optax.chain(optax.add_decayed_weights(WD * wd),
                                     optax.sgd(LR * lr, momentum=0.9)), "sgd"),
  ]
  for mu, make, rule in cases:
    assert_close(run(mu, params), run(grouped(infshapes, make)(rule, decoupled_wd), params))


def test_multipliers_per_parameter_class():
  infshapes = infshapes_at(32)  # width_mult 4; hidden fan-out multiplier also 4
  ones = jax.tree.map(jnp.ones_like, params_for(infshapes))
  expected = {
      "adam": {"inp/kernel": 1.0, "hidden/kernel": 0.25, "hidden/bias": 1.0,
               "readout/kernel": 1.0, "gain": 1.0, "embed/embedding": 1.0},
      "sgd": {"inp/kernel": 4.0, "hidden/kernel": 1.0, "hidden/bias": 4.0,
              "readout/kernel": 4.0, "gain": 1.0, "embed/embedding": 4.0},
  }
  for rule, table in expected.items():
    tx = mup_flax.scale_by_mup(infshapes, rule=rule)
    updates = tx.update(ones, tx.init(ones))[0]
    flat = {"/".join(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]}
    assert {k: float(v.reshape(-1)[0]) for k, v in flat.items()} == table
  # A matrix whose fan-in grows faster than its fan-out: SGD divides by the ratio.
  tall = {"w": InfShape([InfDim(8, 64), InfDim(8, 16)])}
  tx = mup_flax.scale_by_mup(tall, rule="sgd")
  assert float(tx.update({"w": jnp.ones((64, 16))}, None)[0]["w"][0, 0]) == 0.25


def test_weight_decay_against_width():
  """The torch-coupled decay lr_p * wd_p is the same at every width unless decoupled_wd."""
  infshapes = infshapes_at(64)   # hidden width_mult 8
  params = params_for(infshapes)
  zeros = jax.tree.map(jnp.zeros_like, params)   # Adam's step on a zero gradient is zero

  def decay(**kwargs):
    tx = mup_flax.mu_adamw(LR, infshapes, weight_decay=WD, **kwargs)
    return tx.update(zeros, tx.init(params), params)[0]

  coupled, decoupled = decay(), decay(decoupled_wd=True)
  np.testing.assert_allclose(coupled["hidden"]["kernel"], -LR * WD * params["hidden"]["kernel"],
                             rtol=1e-6)
  np.testing.assert_allclose(decoupled["hidden"]["kernel"],
                             -LR * WD / 8 * params["hidden"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(decoupled["hidden"]["bias"], coupled["hidden"]["bias"], rtol=1e-6)
  # mask: no decay where False.
  mask = jax.tree.map(lambda _: True, params)
  mask["hidden"]["bias"] = False
  masked = decay(mask=mask)
  np.testing.assert_array_equal(masked["hidden"]["bias"], 0.0)
  np.testing.assert_array_equal(masked["hidden"]["kernel"], coupled["hidden"]["kernel"])


def test_weight_decay_schedule_and_inject_hyperparams():
  infshapes = infshapes_at(32)
  params = params_for(infshapes)
  schedule = optax.linear_schedule(WD, 0.0, 10)
  scheduled = mup_flax.mu_adamw(LR, infshapes, weight_decay=schedule)
  constant = mup_flax.mu_adamw(LR, infshapes, weight_decay=WD)
  np.testing.assert_allclose(run(scheduled, params, steps=1)[0]["hidden"]["kernel"],
                             run(constant, params, steps=1)[0]["hidden"]["kernel"], rtol=1e-6)
  injected = optax.inject_hyperparams(mup_flax.mu_adamw)(
      learning_rate=LR, infshapes=infshapes, weight_decay=WD)
  assert_close(run(injected, params), run(constant, params), rtol=1e-5)  # f32 hyperparams


def test_scale_eps_divides_eps_of_matrix_like_params():
  infshapes = infshapes_at(32)   # hidden width_mult 4
  params = params_for(infshapes)
  tiny = 1e-6   # gradients of the order of eps: eps matters
  scaled = run(mup_flax.mu_adam(LR, infshapes, eps=1e-6, scale_eps=True), params, scale=tiny)
  plain = run(mup_flax.mu_adam(LR, infshapes, eps=1e-6), params, scale=tiny)
  reference = run(optax.adam(LR / 4, eps=1e-6 / 4), params, scale=tiny)
  for s, p, r in zip(scaled, plain, reference):
    np.testing.assert_allclose(s["hidden"]["kernel"], r["hidden"]["kernel"], rtol=1e-5)
    assert not np.allclose(s["hidden"]["kernel"], p["hidden"]["kernel"], rtol=1e-2)
    np.testing.assert_array_equal(s["hidden"]["bias"], p["hidden"]["bias"])
    np.testing.assert_array_equal(s["embed"]["embedding"], p["embed"]["embedding"])


@pytest.mark.slow
def test_keeps_dtype():
  infshapes = infshapes_at(32)
  params = params_for(infshapes, dtype=jnp.bfloat16)
  for tx in (mup_flax.mu_adamw(LR, infshapes), mup_flax.mu_sgd(LR, infshapes, momentum=0.9),
             mup_flax.mu_adam(LR, infshapes, scale_eps=True)):
    for updates in run(tx, params):
      assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}


# -- accepted inputs ------------------------------------------------------------------------


class Net(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.width)(x))
    x = nn.relu(nn.Dense(self.width)(x))
    return mup_flax.MuReadout(3)(x)


def test_linen_boxed_params_and_gradients():
  model = mup_flax.MuP(Net(64), base=Net(16), delta=Net(32))
  x = jnp.ones((2, 5))
  boxed = model.init(jax.random.key(0), x)["params"]
  infshapes = mup_flax.get_infshapes(boxed)
  params = nn.unbox(boxed)
  from_boxes = run(mup_flax.mu_adamw(LR, boxed), params)
  from_tree = run(mup_flax.mu_adamw(LR, infshapes), params)
  assert_same(from_boxes, from_tree)
  assert float(from_tree[0]["Dense_1"]["kernel"][0, 0]) != float(
      run(optax.adamw(LR), params)[0]["Dense_1"]["kernel"][0, 0])

  # Gradients of boxed params come back boxed; the boxes are kept.
  loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
  grads = jax.grad(loss)(boxed)
  tx = mup_flax.mu_adamw(LR, infshapes)
  updates, _ = tx.update(grads, tx.init(boxed), boxed)
  assert isinstance(updates["Dense_1"]["kernel"], mup_flax.InfShapeBox)
  plain, _ = tx.update(nn.unbox(grads), tx.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(updates), plain)


class NnxNet(nnx.Module):

  def __init__(self, width, rngs):
    self.inp = nnx.Linear(5, width, rngs=rngs)
    self.hidden = nnx.Linear(width, width, rngs=rngs)
    self.readout = mup_flax.nnx.MuReadout(width, 3, rngs=rngs)

  def __call__(self, x):
    return self.readout(nnx.relu(self.hidden(nnx.relu(self.inp(x)))))


@pytest.mark.parametrize("scale_eps", [False, True])
def test_nnx_optimizer_equals_the_functional_update(scale_eps):
  """nnx.Optimizer strips metadata: the infshape tree (an nnx.State) is matched by path."""
  shapes = lambda w: nnx.state(nnx.eval_shape(lambda: NnxNet(w, nnx.Rngs(0))), nnx.Param)
  model = NnxNet(64, nnx.Rngs(0))
  mup_flax.nnx.set_base_shapes(model, mup_flax.make_base_shapes(shapes(16), shapes(32)),
                               rescale_params=True)
  infshapes = mup_flax.get_infshapes(model)
  tx = mup_flax.mu_adamw(LR, infshapes, weight_decay=WD, scale_eps=scale_eps)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  x = jnp.ones((2, 5))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
  updates, _ = tx.update(nnx.to_pure_dict(grads), tx.init(params), params)
  expected = optax.apply_updates(params, updates)

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx.jit(lambda m, o, g: o.update(m, g))(model, optimizer, grads)
  actual = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert_close([actual], [expected])
  # The hidden kernel moved by lr / width_mult, not lr.
  assert mup_flax.schedule_free_scales(infshapes)["lr_scales"]["hidden"]["kernel"] == 0.25
  # The model itself works as infshapes too.
  from_model = mup_flax.mu_adamw(LR, model, weight_decay=WD, scale_eps=scale_eps)
  assert_same(run(from_model, params), run(tx, params))


def test_schedule_free_scales():
  infshapes = infshapes_at(32)
  adam = mup_flax.schedule_free_scales(infshapes)
  assert adam["lr_scales"]["hidden"]["kernel"] == 0.25
  assert adam["weight_decay_scales"]["hidden"]["kernel"] == 4.0
  assert adam["lr_scales"]["hidden"]["bias"] == 1.0
  sgd = mup_flax.schedule_free_scales(infshapes, rule="sgd", decoupled_wd=True)
  assert sgd["lr_scales"]["hidden"]["bias"] == 4.0
  assert sgd["weight_decay_scales"]["hidden"]["bias"] == 1.0
  # The scales splat into sf_optax; at base width they change nothing.
  params = params_for(BASE)
  with_scales = sf_optax.schedule_free_adamw(LR, weight_decay=WD,
                                             **mup_flax.schedule_free_scales(BASE))
  assert_same(run(with_scales, params), run(sf_optax.schedule_free_adamw(LR, weight_decay=WD),
                                            params))


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [
    lambda s: mup_flax.mu_adam(LR, s), lambda s: mup_flax.mu_adamw(LR, s),
    lambda s: mup_flax.mu_sgd(LR, s, weight_decay=WD), lambda s: mup_flax.scale_by_mup(s),
    lambda s: mup_flax.mu_adam(LR, s, scale_eps=True),
])
def test_missing_infshape_names_the_parameter(factory):
  infshapes = infshapes_at(32)
  params = params_for(infshapes)
  params["extra"] = {"kernel": jnp.zeros((4, 4))}
  with pytest.raises(ValueError, match=r"infshapes gives no value for parameter extra/kernel"):
    factory(infshapes).init(params)


def test_missing_infshape_at_update_names_the_parameter():
  infshapes = infshapes_at(32)
  params = params_for(infshapes)
  tx = mup_flax.scale_by_mup(infshapes)
  state = tx.init(params)
  params["extra"] = {"kernel": jnp.zeros((4, 4))}
  with pytest.raises(ValueError, match="infshapes gives no value for parameter extra/kernel"):
    jax.jit(tx.update)(params, state)


def test_infshapes_of_another_width_are_an_error():
  tx = mup_flax.mu_adamw(LR, infshapes_at(32))
  with pytest.raises(ValueError, match=r"parameter \w+/\w+ has shape \(.*\) but its InfShape"):
    tx.init(params_for(infshapes_at(64)))


def test_bad_rule_and_unannotated_infshapes():
  with pytest.raises(ValueError, match="rule must be one of"):
    mup_flax.scale_by_mup(infshapes_at(32), rule="lion")
  with pytest.raises(ValueError, match="rule must be one of"):
    mup_flax.schedule_free_scales(infshapes_at(32), rule="adamw")
  with pytest.raises(ValueError, match="w carries no InfShape"):
    mup_flax.mu_adamw(LR, {"w": jnp.zeros((3, 3))})
