"""The Flax training loops of docs/TRAINING.md: Linen TrainState and NNX nnx.Optimizer.

Each loop trains with a Schedule-Free optimizer at y and evaluates at x
(sf_optax.eval_params), with and without muP, and is checked against the plain
optax loop it stands for.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import mup_flax
import sf_optax
from sf_optax._batch_norm import recompute_batch_stats

from _helpers import MLP
from _helpers import MuMLP
from _helpers import NNXMLP

# From NumPy, as _helpers.normal (the teacher too: an eager matmul at import would compile).
_RNG = np.random.default_rng(0)
_X = _RNG.standard_normal((64, 5)).astype(np.float32)
X = jnp.asarray(_X)
Y = jnp.asarray(np.tanh(_X @ _RNG.standard_normal((5, 3)).astype(np.float32)))
STEPS = 25


def mse(pred):
  return jnp.mean((pred - Y) ** 2)


# ---------------------------------------------------------------------------
# Linen: flax.training.train_state.TrainState.
# ---------------------------------------------------------------------------


@jax.jit
def linen_train_step(state):
  def loss_fn(params):
    return mse(state.apply_fn({"params": params}, X))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


@jax.jit
def linen_eval(state):
  x = sf_optax.eval_params(state.opt_state, state.params)
  return mse(state.apply_fn({"params": x}, X))


@pytest.mark.slow  # the default tier: the NNX loops
def test_linen_train_state_loop():
  model = MLP()
  params = model.init(jax.random.key(2), X)["params"]
  tx = sf_optax.schedule_free_adamw(1e-2, warmup_steps=5)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  for _ in range(STEPS):
    state, _ = linen_train_step(state)

  # The plain optax loop it stands for.
  opt_state, p = tx.init(params), params

  @jax.jit
  def plain_step(p, opt_state):
    grads = jax.grad(lambda q: mse(model.apply({"params": q}, X)))(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  for _ in range(STEPS):
    p, opt_state = plain_step(p, opt_state)
  jax.tree.map(np.testing.assert_array_equal, state.params, p)
  assert int(state.step) == STEPS and int(state.opt_state.count) == STEPS

  loss_x = float(linen_eval(state))
  assert loss_x < 0.5 * float(mse(model.apply({"params": params}, X)))
  x = sf_optax.eval_params(state.opt_state, state.params)
  jax.tree.map(np.testing.assert_array_equal, x, state.opt_state.x)


class BNTrainState(train_state.TrainState):
  batch_stats: dict


class BNMLP(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(32)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    return nn.Dense(3)(x)


@pytest.mark.slow  # the default tier: test_batch_norm.py and the loops without BatchNorm
def test_linen_train_state_with_batch_norm():
  model = BNMLP()
  variables = model.init(jax.random.key(2), X, train=False)
  state = BNTrainState.create(apply_fn=model.apply, params=variables["params"],
                              batch_stats=variables["batch_stats"],
                              tx=sf_optax.schedule_free_adamw(1e-2))

  @jax.jit
  def train_step(state, batch):
    def loss_fn(params):
      pred, mutated = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                     X[batch], train=True, mutable=["batch_stats"])
      return jnp.mean((pred - Y[batch]) ** 2), mutated["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss

  batches = [np.arange(i, i + 16) % 64 for i in range(0, 64 * 4, 16)]
  for batch in batches:
    state, _ = train_step(state, batch)

  def forward(variables, batch):
    return model.apply(variables, X[batch], train=True, mutable=["batch_stats"])

  x = sf_optax.eval_params(state.opt_state, state.params)
  stats_x = recompute_batch_stats(forward, {"params": x, "batch_stats": state.batch_stats},
                                  batches[:4])

  def loss_at(params, stats):
    return float(mse(model.apply({"params": params, "batch_stats": stats}, X, train=False)))

  # The 4 batches cover the 64 rows once: the recomputed statistics are those of all
  # the rows at x, so evaluating with them equals training mode on the full batch.
  full_batch = float(mse(forward({"params": x, "batch_stats": state.batch_stats},
                                 np.arange(64))[0]))
  np.testing.assert_allclose(loss_at(x, stats_x), full_batch, rtol=1e-4)
  assert abs(loss_at(x, state.batch_stats) - full_batch) > 1e-3  # stale ones differ


@pytest.mark.slow  # the default tier: the NNX muP loop
def test_linen_mup_train_state_loop():
  model = mup_flax.MuP(MuMLP(128), base=MuMLP(16), delta=MuMLP(32))
  params = model.init(jax.random.key(2), X)["params"]  # boxed: InfShapeBox leaves
  infshapes = mup_flax.get_infshapes(params)
  tx = sf_optax.schedule_free_adamw(1e-2, **mup_flax.schedule_free_scales(infshapes))
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  initial = float(mse(model.apply({"params": params}, X)))
  for _ in range(STEPS):
    state, _ = linen_train_step(state)
  assert float(linen_eval(state)) < 0.5 * initial
  x = sf_optax.eval_params(state.opt_state, state.params)
  assert isinstance(x["Dense_1"]["kernel"], mup_flax.InfShapeBox)  # annotations kept
  assert mup_flax.get_infshapes(x) == infshapes

  # The same run on plain arrays with the per-parameter learning rates spelled out.
  plain = nn.meta.unbox(params)
  scales = mup_flax.schedule_free_scales(infshapes)
  assert scales["lr_scales"]["Dense_1"]["kernel"] == 16 / 128
  tx_plain = sf_optax.schedule_free_adamw(1e-2, **scales)
  plain_state = train_state.TrainState.create(
      apply_fn=model.apply, params=plain, tx=tx_plain)
  for _ in range(STEPS):
    plain_state, _ = linen_train_step(plain_state)
  jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(state.params), plain_state.params)


# ---------------------------------------------------------------------------
# NNX: nnx.Optimizer and nnx.jit.
# ---------------------------------------------------------------------------


@nnx.jit
def nnx_train_step(model, optimizer):
  loss, grads = nnx.value_and_grad(lambda m: mse(m(X)))(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def nnx_eval(model, optimizer):
  return mse(sf_optax.eval_model(model, optimizer)(X))


def test_nnx_optimizer_loop():
  model = NNXMLP(32, nnx.Rngs(2))
  tx = sf_optax.schedule_free_adamw(1e-2, warmup_steps=5)
  graphdef, params0 = nnx.split(model, nnx.Param)
  params0 = nnx.as_pure(params0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  initial = float(mse(model(X)))
  for _ in range(STEPS):
    nnx_train_step(model, optimizer)
  assert int(optimizer.step[...]) == STEPS

  # The functional optax loop it stands for.
  def apply(params, x):
    return nnx.merge(graphdef, params)(x)

  @jax.jit
  def plain_step(p, opt_state):
    grads = jax.grad(lambda q: mse(apply(q, X)))(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  p, opt_state = params0, tx.init(params0)
  for _ in range(STEPS):
    p, opt_state = plain_step(p, opt_state)
  y = nnx.as_pure(nnx.state(model, nnx.Param))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), y, p)

  loss_x = float(nnx_eval(model, optimizer))
  assert loss_x < 0.5 * initial
  np.testing.assert_allclose(loss_x, mse(apply(sf_optax.eval_params(opt_state, p), X)),
                             rtol=1e-5)
  # Evaluating did not move the model off y.
  jax.tree.map(np.testing.assert_array_equal, nnx.as_pure(nnx.state(model, nnx.Param)), y)


def test_nnx_mup_optimizer_loop():
  def make(width):
    return NNXMLP(width, nnx.Rngs(2), readout=mup_flax.nnx.MuReadout)

  base_shapes = mup_flax.make_base_shapes(lambda: make(16), lambda: make(32))
  model = mup_flax.nnx.set_base_shapes(make(128), base_shapes, rescale_params=True)
  infshapes = mup_flax.get_infshapes(model)
  optimizer = nnx.Optimizer(
      model, sf_optax.schedule_free_adamw(1e-2, **mup_flax.schedule_free_scales(infshapes)),
      wrt=nnx.Param)
  initial = float(mse(model(X)))
  for _ in range(STEPS):
    nnx_train_step(model, optimizer)
  assert float(nnx_eval(model, optimizer)) < 0.5 * initial
  assert mup_flax.get_infshapes(model) == infshapes
  assert mup_flax.get_infshapes(sf_optax.eval_model(model, optimizer)) == infshapes
