"""BatchNorm statistics recomputed at x: sf_optax.recompute_batch_stats(_nnx)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import frozen_dict

import sf_optax
from sf_optax._batch_norm import recompute_batch_stats
from sf_optax._batch_norm import recompute_batch_stats_nnx

# From NumPy, as _helpers.normal: an eager jax.random call at import compiles in every test process.
BATCHES = (np.random.default_rng(0).standard_normal((4, 16, 3)) * 2.0 + 1.0).astype(np.float32)
ALL = BATCHES.reshape(-1, 3)


class MLP(nn.Module):
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)
    x = nn.Dense(5)(nn.relu(x))
    return nn.BatchNorm(use_running_average=not train)(x)  # momentum 0.99


def linen_forward(variables, batch):
  return MLP().apply(variables, batch, train=True, mutable=["batch_stats"])


def population(values):
  values = np.asarray(values, np.float64)
  return values.mean(0), values.var(0)


def test_linen_population_statistics():
  variables = MLP().init(jax.random.key(1), BATCHES[0], train=False)
  stats = recompute_batch_stats(linen_forward, variables, list(BATCHES))
  # First BatchNorm: the exact mean and (biased) variance of its inputs over all batches.
  dense0 = MLP().apply(variables, ALL, train=False, capture_intermediates=True,
                       mutable=["intermediates"])[1]["intermediates"]["Dense_0"]["__call__"][0]
  mean, var = population(dense0)
  np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["BatchNorm_0"]["var"], var, rtol=1e-5, atol=1e-6)

  # Second one: its inputs in training mode (batch statistics upstream), batch by batch.
  def dense1(batch):
    _, state = MLP().apply(variables, batch, train=True, capture_intermediates=True,
                           mutable=["batch_stats", "intermediates"])
    return state["intermediates"]["Dense_1"]["__call__"][0]

  mean, var = population(np.concatenate([dense1(b) for b in BATCHES]))
  np.testing.assert_allclose(stats["BatchNorm_1"]["mean"], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["BatchNorm_1"]["var"], var, rtol=1e-5, atol=1e-6)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), stats) == jax.tree.map(
      lambda a: (a.shape, a.dtype), variables["batch_stats"])


def test_linen_independent_of_momentum_and_old_stats():
  variables = MLP(momentum=0.5).init(jax.random.key(1), BATCHES[0], train=False)
  garbage = jax.tree.map(lambda a: a + 123.0, variables["batch_stats"])

  def forward(variables, batch):
    return MLP(momentum=0.5).apply(variables, batch, train=True, mutable=["batch_stats"])

  a = recompute_batch_stats(forward, variables, BATCHES)
  b = recompute_batch_stats(linen_forward, {**variables, "batch_stats": garbage}, BATCHES)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a, b)


def test_linen_num_batches_and_frozen_dict():
  variables = frozen_dict.freeze(MLP().init(jax.random.key(1), BATCHES[0], train=False))
  stats = recompute_batch_stats(linen_forward, variables, iter(BATCHES), num_batches=1)
  assert isinstance(stats, frozen_dict.FrozenDict)
  one = recompute_batch_stats(linen_forward, variables, BATCHES[:1])
  jax.tree.map(np.testing.assert_array_equal, stats, one)


def test_linen_scan_over_layers():

  class Block(nn.Module):
    train: bool

    @nn.compact
    def __call__(self, x, _):
      x = nn.BatchNorm(use_running_average=not self.train)(nn.Dense(3)(x))
      return nn.relu(x), None

  class Stack(nn.Module):
    train: bool = False

    @nn.compact
    def __call__(self, x):
      scan = nn.scan(Block, variable_axes={"params": 0, "batch_stats": 0},
                     split_rngs={"params": True}, length=3)
      return scan(self.train, name="layers")(x, None)[0]

  variables = Stack().init(jax.random.key(1), BATCHES[0])

  def forward(variables, batch):
    return Stack(train=True).apply(variables, batch, mutable=["batch_stats"])

  stats = recompute_batch_stats(forward, variables, BATCHES)["layers"]["BatchNorm_0"]
  assert stats["mean"].shape == (3, 3)
  kernel = variables["params"]["layers"]["Dense_0"]["kernel"][0]
  bias = variables["params"]["layers"]["Dense_0"]["bias"][0]
  mean, var = population(ALL @ np.asarray(kernel) + np.asarray(bias))
  np.testing.assert_allclose(stats["mean"][0], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"][0], var, rtol=1e-5, atol=1e-6)


def test_linen_errors():
  variables = MLP().init(jax.random.key(1), BATCHES[0], train=False)
  with pytest.raises(ValueError, match="use_running_average=True"):
    recompute_batch_stats(
        lambda v, b: MLP().apply(v, b, train=False, mutable=["batch_stats"]), variables, BATCHES)
  with pytest.raises(ValueError, match="mutable"):
    recompute_batch_stats(  # returns the output only
        lambda v, b: MLP().apply(v, b, train=True, mutable=["batch_stats"])[0], variables,
        BATCHES)
  with pytest.raises(ValueError, match="at least one batch"):
    recompute_batch_stats(linen_forward, variables, [])
  with pytest.raises(ValueError, match="'batch_stats'"):
    recompute_batch_stats(linen_forward, {"params": variables["params"]}, BATCHES)


class NNXModel(nnx.Module):

  def __init__(self, rngs, momentum=0.9):
    self.l1 = nnx.Linear(3, 6, rngs=rngs)
    self.bn1 = nnx.BatchNorm(6, momentum=momentum, rngs=rngs)
    self.l2 = nnx.Linear(6, 5, rngs=rngs)
    self.bn2 = nnx.BatchNorm(5, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    x = self.bn1(self.l1(x))
    return self.bn2(self.l2(self.dropout(nnx.relu(x))))


def test_nnx_population_statistics_in_place():
  model = NNXModel(nnx.Rngs(0))
  model.eval()  # dropout off; the helper switches the BatchNorms to batch statistics
  params_before = nnx.as_pure(nnx.state(model, nnx.Param))
  result = recompute_batch_stats_nnx(model, BATCHES)
  assert result is None
  mean, var = population(model.l1(ALL))
  np.testing.assert_allclose(model.bn1.mean[...], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.bn1.var[...], var, rtol=1e-5, atol=1e-6)
  # Downstream layers see upstream BatchNorms in batch-statistics mode, batch by batch.
  train_view = nnx.clone(model)
  for bn in (train_view.bn1, train_view.bn2):
    bn.use_running_average = False
  hidden = np.concatenate([train_view.l2(nnx.relu(train_view.bn1(train_view.l1(b))))
                           for b in BATCHES])
  mean, var = population(hidden)
  np.testing.assert_allclose(model.bn2.mean[...], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.bn2.var[...], var, rtol=1e-5, atol=1e-6)
  # Attributes and params untouched.
  assert model.bn1.use_running_average and model.bn1.momentum == 0.9
  assert model.dropout.deterministic
  jax.tree.map(np.testing.assert_array_equal, params_before,
               nnx.as_pure(nnx.state(model, nnx.Param)))


def test_nnx_custom_forward_and_errors():
  model = NNXModel(nnx.Rngs(0))
  model.eval()
  twice = nnx.clone(model)
  recompute_batch_stats_nnx(model, [{"x": b} for b in BATCHES], forward=lambda m, b: m(b["x"]),
                            num_batches=2)
  recompute_batch_stats_nnx(twice, BATCHES[:2])
  jax.tree.map(np.testing.assert_array_equal, nnx.as_pure(nnx.state(model, nnx.BatchStat)),
               nnx.as_pure(nnx.state(twice, nnx.BatchStat)))

  def skip_second(m, b):
    return m.bn1(m.l1(b))

  before = nnx.as_pure(nnx.state(model, nnx.BatchStat))
  with pytest.raises(ValueError, match=r"\['bn2'\]"):
    recompute_batch_stats_nnx(model, BATCHES, forward=skip_second)
  # A failed call leaves the model as it was.
  jax.tree.map(np.testing.assert_array_equal, before, nnx.as_pure(nnx.state(model, nnx.BatchStat)))
  with pytest.raises(ValueError, match="no nnx.BatchNorm"):
    recompute_batch_stats_nnx(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), BATCHES)
  with pytest.raises(ValueError, match="at least one batch"):
    recompute_batch_stats_nnx(model, [])


# ---------------------------------------------------------------------------
# The use case: a BatchNorm CNN trained with Schedule-Free, evaluated at x.
# ---------------------------------------------------------------------------


class CNN(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    for features in (16, 32):
      x = nn.Conv(features, (3, 3))(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))  # momentum 0.99
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def cnn_forward(variables, images):
  return CNN().apply(variables, images, train=True, mutable=["batch_stats"])


@pytest.mark.slow  # trains a CNN on digits end to end
def test_digits_cnn_accuracy_at_x_stale_vs_recomputed():
  sklearn = pytest.importorskip("sklearn.datasets")
  digits = sklearn.load_digits()
  images = jnp.asarray((digits.images / 16.0).astype(np.float32)[..., None])
  labels = jnp.asarray(digits.target.astype(np.int32))
  order = np.random.default_rng(0).permutation(len(images))
  test, train = order[:400], order[400:]
  batch_size, steps = 64, 90

  model = CNN()
  variables = model.init(jax.random.key(0), images[:1], train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = sf_optax.schedule_free_adamw(1e-2, warmup_steps=20)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, batch_stats, opt_state, idx):
    def loss_fn(p):
      logits, mutated = model.apply({"params": p, "batch_stats": batch_stats}, images[idx],
                                    train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()
      return loss, mutated["batch_stats"]

    (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state

  rng = np.random.default_rng(1)
  batches = [rng.choice(train, batch_size, replace=False) for _ in range(steps)]
  for idx in batches:
    params, batch_stats, opt_state = train_step(params, batch_stats, opt_state, idx)

  def accuracy(params, stats):
    logits = model.apply({"params": params, "batch_stats": stats}, images[test], train=False)
    return float(jnp.mean(jnp.argmax(logits, -1) == labels[test]))

  x = sf_optax.eval_params(opt_state, params)
  recomputed = recompute_batch_stats(
      cnn_forward, {"params": x, "batch_stats": batch_stats},
      (images[idx] for idx in batches[-10:]))
  stale, fresh = accuracy(x, batch_stats), accuracy(x, recomputed)
  print(f"test accuracy at x: stale statistics {stale:.3f}, recomputed {fresh:.3f}")
  assert fresh > 0.75, fresh
  assert fresh > stale + 0.2, (stale, fresh)
