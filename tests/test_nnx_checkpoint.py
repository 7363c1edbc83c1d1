"""NNX checkpoints: a model and its nnx.Optimizer restored into a freshly built one.

The fresh model is abstract (``nnx.eval_shape``: nothing is initialised), the
way a new process restores; the resumed run must be bitwise the uninterrupted
one, and the model at x (``sf_optax.eval_model``) exported for inference must
restore bitwise into a fresh model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sf_optax

from _helpers import normal

pytest.importorskip("orbax.checkpoint")

_RNG = np.random.default_rng(1)
X = normal(_RNG, (32, 8))
Y = normal(_RNG, (32, 4))
STEPS = 3


class Net(nnx.Module):
  """Params, BatchNorm statistics and a Dropout's RNG stream: everything nnx.state holds."""

  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.l2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(jnp.tanh(self.bn(self.l1(x)))))


def build(seed, store_x):
  model = Net(nnx.Rngs(seed))
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   sf_optax.schedule_free_adamw(1e-2, warmup_steps=2, store_x=store_x))
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer):
  grads = nnx.grad(lambda m: jnp.mean((m(X) - Y) ** 2))(model)
  optimizer.update(model, grads)


def pure(tree):
  return nnx.as_pure(nnx.state(tree))


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
      u, v = jax.random.key_data(u), jax.random.key_data(v)
    assert u.dtype == v.dtype and u.shape == v.shape
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.slow  # test_checkpoint.py's NNX resume is the default tier's
@pytest.mark.parametrize("store_x", [True, False])
def test_restore_into_a_fresh_abstract_model_resumes_bitwise(tmp_path, store_x):
  model, optimizer = build(0, store_x)
  model.train()
  for _ in range(STEPS):
    train_step(model, optimizer)
  with sf_optax.CheckpointManager(tmp_path / "run") as manager:
    manager.save(STEPS, nnx.state((model, optimizer)))
  saved = pure((model, optimizer))  # a snapshot: steps replace the arrays, never write into them
  for _ in range(STEPS):
    train_step(model, optimizer)

  # A new process: an abstract model and optimizer (another seed: the values must
  # all come from the checkpoint), restored, merged, trained on.
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(1, store_x)))
  with sf_optax.CheckpointManager(tmp_path / "run") as manager:
    restored = manager.restore(abstract)
  fresh, fresh_optimizer = nnx.merge(graphdef, restored)
  assert_bitwise_equal(pure((fresh, fresh_optimizer)), saved)
  assert int(fresh_optimizer.step[...]) == STEPS
  assert not fresh.bn.use_running_average  # the graph (modes included) is the fresh one's: train
  for _ in range(STEPS):
    train_step(fresh, fresh_optimizer)
  assert_bitwise_equal(pure((fresh, fresh_optimizer)), pure((model, optimizer)))
  assert_bitwise_equal(pure(sf_optax.eval_model(fresh, fresh_optimizer)),
                       pure(sf_optax.eval_model(model, optimizer)))


@pytest.mark.slow
def test_export_the_model_at_x_and_restore_it_for_inference(tmp_path):
  model, optimizer = build(0, True)
  for _ in range(STEPS):
    train_step(model, optimizer)
  before = pure((model, optimizer))
  model_x = sf_optax.eval_model(model, optimizer)
  sf_optax.save_checkpoint(tmp_path / "export", nnx.state(model_x))

  # Inference elsewhere: the model alone, no optimizer.
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Net(nnx.Rngs(1))))
  served = nnx.merge(graphdef, sf_optax.restore_checkpoint(tmp_path / "export", abstract))
  assert_bitwise_equal(pure(served), pure(model_x))
  served.eval()
  model_x.eval()
  np.testing.assert_array_equal(served(X), model_x(X))
  assert_bitwise_equal(pure((model, optimizer)), before)
