"""sf_optax.eval_model: an NNX model at x, the training model left at y."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mup_flax
import sf_optax

from _helpers import NNXMLP
from _helpers import assert_trees_equal
from _helpers import default_tier
from _helpers import normal

_RNG = np.random.default_rng(0)
X = normal(_RNG, (16, 5))
Y = normal(_RNG, (16, 3))
STEPS = 4


def loss(model, x=None, y=None):
  x = X if x is None else x
  y = Y if y is None else y
  return jnp.mean((model(x.astype(model.inp.kernel.dtype)) - y) ** 2)


@nnx.jit
def train_step(model, optimizer):
  grads = nnx.grad(loss)(model)
  optimizer.update(model, grads)


def params_of(model, wrt=nnx.Param):
  return nnx.as_pure(nnx.state(model, wrt))


def copy_of(tree):
  """NumPy copies of every array (RNG keys as their key data)."""
  def copy(a):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a = jax.random.key_data(a)
    return np.array(a)

  return jax.tree.map(copy, nnx.as_pure(tree))


def trained(tx, width=16, dtype=jnp.float32, steps=STEPS, **kw):
  model = NNXMLP(width, nnx.Rngs(0), dtype=dtype, **kw)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for _ in range(steps):
    train_step(model, optimizer)
  return model, optimizer


@pytest.mark.parametrize("store_x", default_tier([True, False], {"False"}))
def test_equals_eval_params_of_the_functional_loop(x64, store_x):
  """x of the copy: eval_params of the same run done with plain optax (float64)."""
  tx = sf_optax.schedule_free_adamw(1e-2, weight_decay=1e-3, warmup_steps=2, store_x=store_x)
  model, optimizer = trained(tx, dtype=jnp.float64)
  model_x = sf_optax.eval_model(model, optimizer)

  # On the optimizer's own pure state: the same function, the same inputs, bitwise.
  expected = sf_optax.eval_params(nnx.as_pure(optimizer.opt_state), params_of(model))
  assert_trees_equal(params_of(model_x), expected)

  # Against the plain optax loop that nnx.Optimizer stands for.
  graphdef, params = nnx.split(NNXMLP(16, nnx.Rngs(0), dtype=jnp.float64), nnx.Param)
  params = nnx.as_pure(params)
  opt_state = tx.init(params)

  @jax.jit
  def step(p, s):
    grads = jax.grad(lambda q: loss(nnx.merge(graphdef, q)))(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  for _ in range(STEPS):
    params, opt_state = step(params, opt_state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15),
               params_of(model_x), sf_optax.eval_params(opt_state, params))
  # x differs from y: the test would not see a copy of y.
  assert not np.allclose(model_x.hidden.kernel[...], model.hidden.kernel[...])


def test_training_model_untouched_and_variables_independent():
  tx = sf_optax.schedule_free_adamw(1e-2)
  model, optimizer = trained(tx)
  before = copy_of(nnx.state((model, optimizer)))
  model_x = sf_optax.eval_model(model, optimizer)
  assert_trees_equal(copy_of(nnx.state((model, optimizer))), before)

  # New Variables: writing into the copy leaves the model alone ...
  assert model_x.hidden.kernel is not model.hidden.kernel
  model_x.hidden.kernel[...] = jnp.zeros_like(model_x.hidden.kernel[...])
  nnx.update(model_x, jax.tree.map(jnp.ones_like, params_of(model_x)))
  assert_trees_equal(copy_of(nnx.state((model, optimizer))), before)
  # ... and training the model on leaves the copy alone.
  model_x = sf_optax.eval_model(model, optimizer)
  x = copy_of(params_of(model_x))
  train_step(model, optimizer)
  assert_trees_equal(params_of(model_x), x)


def test_under_nnx_jit(x64):
  tx = sf_optax.schedule_free_adamw(1e-2, warmup_steps=2)
  model, optimizer = trained(tx, dtype=jnp.float64)
  before = copy_of(params_of(model))

  @nnx.jit
  def eval_step(model, optimizer):
    return loss(sf_optax.eval_model(model, optimizer))

  @nnx.jit
  def at_x(model, optimizer):
    return sf_optax.eval_model(model, optimizer)

  eager = sf_optax.eval_model(model, optimizer)
  jitted = at_x(model, optimizer)
  assert type(jitted) is NNXMLP
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-14),
               params_of(jitted), params_of(eager))
  np.testing.assert_allclose(eval_step(model, optimizer), loss(eager), rtol=1e-13)
  assert_trees_equal(params_of(model), before)
  assert jitted.hidden.kernel is not model.hidden.kernel


WRAPPERS = {
    "chain": lambda sf: optax.chain(optax.clip_by_global_norm(1.0), sf),
    "inject_hyperparams": lambda sf: sf,  # built below with inject_hyperparams
    "multi_steps": lambda sf: optax.MultiSteps(sf, every_k_schedule=2),
    "apply_if_finite": lambda sf: optax.apply_if_finite(sf, max_consecutive_errors=2),
}


@pytest.mark.parametrize("wrapper, store_x", default_tier(
    [("chain", True), ("chain", False), ("inject_hyperparams", False),
     ("multi_steps", True), ("apply_if_finite", False)],
    {"multi_steps-True"}, ids=lambda case: f"{case[0]}-{case[1]}", unpack=True))
def test_through_optax_wrappers(wrapper, store_x):
  if wrapper == "inject_hyperparams":
    tx = optax.inject_hyperparams(sf_optax.schedule_free_adamw)(
        learning_rate=1e-2, store_x=store_x)
  else:
    tx = WRAPPERS[wrapper](sf_optax.schedule_free_adamw(1e-2, store_x=store_x))
  model, optimizer = trained(tx)
  model_x = sf_optax.eval_model(model, optimizer)
  assert_trees_equal(params_of(model_x),
                    sf_optax.eval_params(nnx.as_pure(optimizer.opt_state), params_of(model)))
  assert not np.allclose(model_x.hidden.kernel[...], model.hidden.kernel[...])


def test_masked_and_a_partial_wrt():
  """Params no Schedule-Free state covers, or the optimizer does not train, keep y."""
  masked = optax.masked(sf_optax.schedule_free_adamw(1e-2),
                        lambda p: jax.tree.map(lambda a: a.ndim == 2, p))
  model, optimizer = trained(masked)
  model_x = sf_optax.eval_model(model, optimizer)
  np.testing.assert_array_equal(model_x.out.bias[...], model.out.bias[...])
  assert not np.allclose(model_x.out.kernel[...], model.out.kernel[...])

  model = NNXMLP(16, nnx.Rngs(0))
  wrt = nnx.All(nnx.Param, nnx.PathContains("hidden"))
  optimizer = nnx.Optimizer(model, sf_optax.schedule_free_adamw(1e-2), wrt=wrt)
  for _ in range(STEPS):
    optimizer.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model))
  model_x = sf_optax.eval_model(model, optimizer)
  assert_trees_equal(params_of(model_x, nnx.PathContains("inp")),
                    params_of(model, nnx.PathContains("inp")))
  assert_trees_equal(params_of(model_x, wrt),
                    sf_optax.eval_params(nnx.as_pure(optimizer.opt_state), params_of(model, wrt)))
  assert not np.allclose(model_x.hidden.kernel[...], model.hidden.kernel[...])


def test_keeps_infshape_and_sharding_metadata():
  """muP's infshape and nnx.with_partitioning's out_sharding ride along."""
  with nnx.use_eager_sharding(False):  # metadata only: no mesh in this process
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "fsdp"))

    def make(width):
      return NNXMLP(width, nnx.Rngs(0), readout=mup_flax.nnx.MuReadout, kernel_init=init)

    base_shapes = mup_flax.make_base_shapes(lambda: make(8), lambda: make(16))
    model = mup_flax.nnx.set_base_shapes(make(32), base_shapes, rescale_params=True)
    infshapes = mup_flax.get_infshapes(model)
    tx = sf_optax.schedule_free_adamw(1e-2, **mup_flax.schedule_free_scales(infshapes))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for _ in range(STEPS):
      train_step(model, optimizer)
    model_x = nnx.jit(sf_optax.eval_model)(model, optimizer)
  assert mup_flax.get_infshapes(model_x) == infshapes
  assert model_x.out.width_mult() == 4.0
  for name in ("inp", "hidden", "out"):
    kernel = getattr(model_x, name).kernel
    assert kernel.get_metadata() == getattr(model, name).kernel.get_metadata()
    assert tuple(kernel.get_metadata("out_sharding")) == (None, "fsdp")


class BatchNormNet(nnx.Module):

  def __init__(self, rngs):
    self.inp = nnx.Linear(5, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(nnx.relu(self.norm(self.inp(x)))))


@pytest.mark.slow  # trains a BatchNorm model, then recomputes its statistics
def test_composes_with_recompute_batch_stats_nnx():
  model = BatchNormNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, sf_optax.schedule_free_adamw(1e-2), wrt=nnx.Param)
  model.train()
  for _ in range(STEPS):
    train_step(model, optimizer)
  before = copy_of(nnx.state((model, optimizer)))

  model_x = sf_optax.eval_model(model, optimizer)
  model_x.eval()
  batches = np.asarray(jax.random.normal(jax.random.key(3), (3, 16, 5)) * 2.0 + 1.0)
  sf_optax.recompute_batch_stats_nnx(model_x, list(batches))

  # The statistics of the BatchNorm inputs at x over all batches (NumPy, float64).
  kernel = np.asarray(model_x.inp.kernel[...], np.float64)
  bias = np.asarray(model_x.inp.bias[...], np.float64)
  inputs = batches.reshape(-1, 5).astype(np.float64) @ kernel + bias
  np.testing.assert_allclose(model_x.norm.mean[...], inputs.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model_x.norm.var[...], inputs.var(0), rtol=1e-5, atol=1e-6)
  # The training model: its params, statistics and modes as they were.
  assert_trees_equal(copy_of(nnx.state((model, optimizer))), before)
  assert not model.norm.use_running_average and not model.drop.deterministic
  assert not np.allclose(model.norm.mean[...], model_x.norm.mean[...])


def test_errors():
  tx = sf_optax.schedule_free_sgd(0.1)
  model, optimizer = trained(tx, steps=1)
  with pytest.raises(TypeError, match="model must be an nnx.Module.*eval_params"):
    sf_optax.eval_model(params_of(model), optimizer)
  with pytest.raises(TypeError, match="optimizer must be an nnx.Optimizer"):
    sf_optax.eval_model(model, nnx.as_pure(optimizer.opt_state))
  with pytest.raises(ValueError, match=r"eval_model: .* differ: only in the model: bias, kernel;"
                     r" only in the optimizer state: hidden/bias, .* and 1 more; .*wrt=Param"):
    sf_optax.eval_model(nnx.Linear(5, 3, rngs=nnx.Rngs(0)), optimizer)
  for store_x in (True, False):
    narrow = nnx.Optimizer(model, sf_optax.schedule_free_sgd(0.1, store_x=store_x), wrt=nnx.Param)
    with pytest.raises(ValueError, match=r"eval_model: .*shapes \(hidden/bias: \(16,\) in the"
                       r" optimizer state, \(8,\) in the model; hidden/kernel: .*wrt="):
      sf_optax.eval_model(NNXMLP(8, nnx.Rngs(0)), narrow)
  adam = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  with pytest.raises(ValueError, match="eval_model: .*no Schedule-Free state"):
    sf_optax.eval_model(model, adam)


def test_import_sf_optax_does_not_import_flax():
  import subprocess
  import sys

  code = ("import sys, sf_optax; assert 'flax' not in sys.modules;"
          " f = sf_optax.eval_model; assert f.__module__ == 'sf_optax._nnx';"
          " assert 'eval_model' in dir(sf_optax)")
  subprocess.run([sys.executable, "-c", code], check=True)


class Tied(nnx.Module):
  """An embedding table shared with the readout: one Variable at two places."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(5, 4, rngs=rngs)
    self.readout = nnx.Linear(4, 5, rngs=rngs)
    self.readout.kernel = self.embed.embedding

  def __call__(self, ids):
    return self.embed(ids) @ self.readout.kernel[...].T + self.readout.bias[...][None]


def test_shared_variables_stay_shared_in_the_copy():
  model = Tied(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, sf_optax.schedule_free_adamw(0.1), wrt=nnx.Param)
  for _ in range(2):
    optimizer.update(model, nnx.grad(lambda m: jnp.sum(m(jnp.arange(3)) ** 2))(model))
  model_x = nnx.jit(sf_optax.eval_model)(model, optimizer)
  assert model_x.readout.kernel is model_x.embed.embedding
  assert model_x.embed.embedding is not model.embed.embedding
  assert_trees_equal(params_of(model_x),
                    sf_optax.eval_params(nnx.as_pure(optimizer.opt_state), params_of(model)))
