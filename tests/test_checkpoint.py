"""Orbax checkpoints of Schedule-Free training: bitwise resume, clear errors.

sf_optax.CheckpointManager (step directories) and save_checkpoint /
restore_checkpoint (one directory) on optimizer states, Flax TrainState, NNX
and μP models. Damage and preemption: tests/test_checkpoint_faults.py.
"""

import os

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sf_optax
from sf_optax import CheckpointError
from sf_optax import CheckpointManager
from sf_optax import restore_checkpoint
from sf_optax import save_checkpoint

import _helpers

pytest.importorskip("orbax.checkpoint")

OPTIMIZERS = {
    "sgd": lambda: sf_optax.schedule_free_sgd(0.1, weight_decay=1e-3, warmup_steps=2),
    "adamw": lambda: sf_optax.schedule_free_adamw(1e-2, weight_decay=1e-3, warmup_steps=2),
    "adamw_paper": lambda: sf_optax.schedule_free_adamw_paper(1e-2, warmup_steps=2),
    "radam": lambda: sf_optax.schedule_free_radam(1e-2, weight_decay=1e-3),
    "adan": lambda: sf_optax.schedule_free_adan(1e-2, weight_decay=1e-3, warmup_steps=2),
    "wrapper_adam": lambda: sf_optax.schedule_free(optax.adam(1e-2, b1=0.0), 1e-2),
    "adamw_no_x": lambda: sf_optax.schedule_free_adamw(1e-2, store_x=False),
    "adamw_bf16_params": lambda: sf_optax.schedule_free_adamw(1e-2, state_dtype=jnp.float32),
    "chain_inject": lambda: optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(sf_optax.schedule_free_adamw)(learning_rate=1e-2),
    ),
    "multi_steps": lambda: optax.MultiSteps(sf_optax.schedule_free_sgd(0.1), every_k_schedule=2),
    "apply_if_finite": lambda: optax.apply_if_finite(sf_optax.schedule_free_adamw(1e-2), 3),
}


class MLP(nn.Module):
  dtype: jnp.dtype = jnp.float32
  width: int = 16

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(self.width, param_dtype=self.dtype)(x))
    return nn.Dense(4, param_dtype=self.dtype)(x)


def setup(name, width=16):
  dtype = jnp.bfloat16 if name == "adamw_bf16_params" else jnp.float32
  model = MLP(dtype=dtype, width=width)
  x = jax.random.normal(jax.random.key(1), (32, 8))
  y = jax.random.normal(jax.random.key(2), (32, 4))
  params = model.init(jax.random.key(0), x)["params"]
  tx = OPTIMIZERS[name]() if name in OPTIMIZERS else name

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      return jnp.mean((model.apply({"params": p}, x).astype(jnp.float32) - y) ** 2)

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return params, tx, step


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if isinstance(v, (int, float)):  # Python scalar leaves come back as such
      assert type(u) is type(v) and u == v, (u, v)
      continue
    if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
      u, v = jax.random.key_data(u), jax.random.key_data(v)
    assert u.dtype == v.dtype and u.shape == v.shape
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("name", _helpers.default_tier(
    sorted(OPTIMIZERS), {"chain_inject"}))
def test_resume_is_bitwise_equal(tmp_path, name):
  params, tx, step = setup(name)
  opt_state = tx.init(params)
  for _ in range(3):
    params, opt_state = step(params, opt_state)
  with CheckpointManager(tmp_path / "run", max_to_keep=1) as manager:
    manager.save(3, {"params": params, "opt_state": opt_state})
  uninterrupted = (params, opt_state)
  for _ in range(3):
    uninterrupted = step(*uninterrupted)

  # A fresh process would build the same model and optimizer and restore into them.
  fresh_params, fresh_tx, _ = setup(name)
  target = {"params": fresh_params, "opt_state": fresh_tx.init(fresh_params)}
  with CheckpointManager(tmp_path / "run") as manager:
    assert manager.latest_step() == 3
    restored = manager.restore(target)
  assert_bitwise_equal(restored, {"params": params, "opt_state": opt_state})
  resumed = (restored["params"], restored["opt_state"])
  for _ in range(3):
    resumed = step(*resumed)
  assert_bitwise_equal(resumed, uninterrupted)
  assert_bitwise_equal(sf_optax.eval_params(resumed[1], resumed[0]),
                       sf_optax.eval_params(uninterrupted[1], uninterrupted[0]))


def test_restore_into_abstract_target_and_export_eval_params(tmp_path):
  params, tx, step = setup("adamw")
  opt_state = tx.init(params)
  for _ in range(2):
    params, opt_state = step(params, opt_state)
  save_checkpoint(tmp_path / "train", {"params": params, "opt_state": opt_state})
  abstract = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
  restored = restore_checkpoint(tmp_path / "train", abstract)
  assert_bitwise_equal(restored, {"params": params, "opt_state": opt_state})
  # What users export: x, the evaluation params, without the optimizer state.
  x = sf_optax.eval_params(opt_state, params)
  save_checkpoint(tmp_path / "export", x)
  assert_bitwise_equal(restore_checkpoint(tmp_path / "export", jax.eval_shape(lambda: x)), x)


def test_save_checkpoint_never_replaces_a_checkpoint(tmp_path):
  params, _, _ = setup("sgd")
  save_checkpoint(tmp_path / "c", params)
  doubled = jax.tree.map(lambda p: 2 * p, params)
  with pytest.raises(ValueError, match="exists: save_checkpoint writes a new directory"):
    save_checkpoint(tmp_path / "c", doubled)
  assert_bitwise_equal(restore_checkpoint(tmp_path / "c", params), params)


def test_manager_rotation_async_and_steps(tmp_path):
  params, tx, step = setup("adamw")
  opt_state = tx.init(params)
  saved = {}
  with CheckpointManager(tmp_path / "run", max_to_keep=2, async_save=True) as manager:
    for k in range(5):
      params, opt_state = step(params, opt_state)
      saved[k] = {"params": params, "opt_state": opt_state, "step": k}
      manager.save(k, saved[k])
    manager.wait_until_finished()
    assert manager.all_steps() == [3, 4] and manager.latest_step() == 4
    assert sorted(os.listdir(tmp_path / "run")) == ["3", "4"]  # no temporary directory left
    with pytest.raises(ValueError, match="step 4 exists already"):
      manager.save(4, saved[4])
    for bad in (-1, 1.5, True, "7"):
      with pytest.raises(ValueError, match="step must be a non-negative int"):
        manager.save(bad, saved[4])
    with pytest.raises(FileNotFoundError, match="No committed step 1 .*steps: \\[3, 4\\]"):
      manager.restore(saved[4], step=1)
  with CheckpointManager(tmp_path / "run") as manager:  # a new process
    assert_bitwise_equal(manager.restore(saved[4]), saved[4])
    assert_bitwise_equal(manager.restore(saved[4], step=3), saved[3])
  with CheckpointManager(tmp_path / "empty") as manager:
    assert manager.latest_step() is None and manager.all_steps() == []
    with pytest.raises(FileNotFoundError, match="No committed checkpoint in"):
      manager.restore(saved[4])
  with pytest.raises(ValueError, match="max_to_keep must be a positive int"):
    CheckpointManager(tmp_path / "x", max_to_keep=0)
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="file exists and is not a directory"):
    CheckpointManager(tmp_path / "file")
  # A manager's root is not one checkpoint: the error says what to do.
  with pytest.raises(CheckpointError, match="it holds steps: restore with CheckpointManager"):
    restore_checkpoint(tmp_path / "run", saved[4])


def test_unsupported_leaves_are_named(tmp_path):
  with CheckpointManager(tmp_path / "run") as manager:
    with pytest.raises(TypeError, match="leaf layers/0/name is a str"):
      manager.save(0, {"w": jnp.ones(2), "layers": [{"name": "mlp"}]})
    assert manager.all_steps() == []
  save_checkpoint(tmp_path / "c", {"w": jnp.ones(2)})
  with pytest.raises(TypeError, match="restore target: target leaf of type str"):
    restore_checkpoint(tmp_path / "c", {"w": "x"})


def test_python_scalar_leaves_and_train_state(tmp_path):
  """Item 2 of issue 10: a TrainState's step is a Python int; it used to be unrestorable."""
  params, tx, _ = setup("adamw")
  state = train_state.TrainState.create(apply_fn=MLP().apply, params=params, tx=tx)
  state = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, params))
  assert isinstance(state.step, int) and state.step == 1
  tree = {"a": jnp.ones(3), "step": 5, "lr": 0.1 + 0.2, "none": None, "empty": ()}
  with CheckpointManager(tmp_path / "run") as manager:
    manager.save(1, state)
    manager.save(2, tree)
    fresh = train_state.TrainState.create(apply_fn=state.apply_fn, params=params, tx=tx)
    restored = manager.restore(fresh, step=1)
    assert isinstance(restored, train_state.TrainState) and restored.step == 1
    assert_bitwise_equal(restored, state)
    back = manager.restore({"a": jnp.zeros(3), "step": 0, "lr": 0.0, "none": None, "empty": ()})
    assert back["step"] == 5 and type(back["step"]) is int and back["lr"] == 0.1 + 0.2
    assert_bitwise_equal(back, tree)
    # A scalar where the checkpoint has an array (or the other way) is named.
    with pytest.raises(CheckpointError, match="step: Python scalar of dtype int64 in the checkpoint,"
                       " Python float in the target"):
      manager.restore({"a": jnp.zeros(3), "step": 0.0, "lr": 0.0, "none": None, "empty": ()})
    with pytest.raises(CheckpointError, match=r"a: array of shape \(3,\) and dtype float32 in the"
                       " checkpoint, Python int in the target"):
      manager.restore({"a": 0, "step": 0, "lr": 0.0, "none": None, "empty": ()})
    with pytest.raises(CheckpointError, match=r"step: Python scalar in the checkpoint, array of shape"):
      manager.restore({"a": jnp.zeros(3), "step": jnp.int32(0), "lr": 0.0, "none": None,
                       "empty": ()})


# ---------------------------------------------------------------------------
# Mismatched and damaged checkpoints: a clear error, the running state untouched.
# ---------------------------------------------------------------------------


@pytest.fixture
def running(tmp_path):
  params, tx, step = setup("adamw")
  opt_state = tx.init(params)
  params, opt_state = step(params, opt_state)
  state = {"params": params, "opt_state": opt_state}
  save_checkpoint(tmp_path / "good", state)
  copy = jax.tree.map(np.array, state)
  return state, copy, step


def assert_untouched(state, copy, step):
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
  assert_bitwise_equal(jax.tree.map(jnp.asarray, copy), state)
  step(state["params"], state["opt_state"])  # still usable


def test_mismatched_width(tmp_path, running):
  state, copy, step = running
  wide, tx, _ = setup("adamw", width=32)
  with pytest.raises(CheckpointError) as info:
    restore_checkpoint(tmp_path / "good", {"params": wide, "opt_state": tx.init(wide)})
  message = str(info.value)
  assert "does not match" in message and "nothing was restored" in message
  assert "params/Dense_0/kernel: shape (8, 16) in the checkpoint, (8, 32) in the target" in message
  assert "opt_state/z/Dense_0/kernel" in message
  assert_untouched(state, copy, step)


def test_mismatched_optimizer_and_dtype(tmp_path, running):
  state, copy, step = running
  params = state["params"]
  with pytest.raises(CheckpointError, match="in the checkpoint, not in the target: opt_state/base_state/nu"):
    restore_checkpoint(tmp_path / "good", {"params": params,
                                           "opt_state": OPTIMIZERS["sgd"]().init(params)})
  half = jax.tree.map(lambda p: p.astype(jnp.bfloat16), state)
  with pytest.raises(CheckpointError, match="dtype float32 in the checkpoint, bfloat16 in the target"):
    restore_checkpoint(tmp_path / "good", half)
  assert_untouched(state, copy, step)


def test_checkpoint_without_x_into_state_with_x(tmp_path, running):
  state, copy, step = running
  params = state["params"]
  no_x = OPTIMIZERS["adamw_no_x"]()
  save_checkpoint(tmp_path / "no_x", {"params": params, "opt_state": no_x.init(params)})
  with pytest.raises(CheckpointError, match="missing from the checkpoint: opt_state/x/Dense_0/bias"):
    restore_checkpoint(tmp_path / "no_x", state)
  assert_untouched(state, copy, step)


def test_missing_checkpoint(tmp_path, running):
  state, copy, step = running
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    restore_checkpoint(tmp_path / "nothing", state)
  assert_untouched(state, copy, step)


# ---------------------------------------------------------------------------
# NNX: nnx.Optimizer state and the model state.
# ---------------------------------------------------------------------------


class NNXModel(nnx.Module):
  """Params, BatchNorm statistics and a Dropout's RNG key and counter: all in nnx.state."""

  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.l2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(jnp.tanh(self.bn(self.l1(x)))))


@nnx.jit
def nnx_step(model, optimizer, x, y):
  grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
  optimizer.update(model, grads)


def test_nnx_resume_is_bitwise_equal(tmp_path):
  x = jax.random.normal(jax.random.key(1), (32, 8))
  y = jax.random.normal(jax.random.key(2), (32, 4))

  def build(seed):
    model = NNXModel(nnx.Rngs(seed))
    return model, nnx.Optimizer(model, sf_optax.schedule_free_adamw(1e-2, warmup_steps=2),
                                wrt=nnx.Param)

  model, optimizer = build(0)
  for _ in range(3):
    nnx_step(model, optimizer, x, y)
  with CheckpointManager(tmp_path / "nnx") as manager:
    manager.save(3, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)})
  for _ in range(3):
    nnx_step(model, optimizer, x, y)

  # A fresh process builds the model with any seed and restores everything, RNG state included.
  resumed_model, resumed_optimizer = build(1)
  target = {"model": nnx.state(resumed_model), "optimizer": nnx.state(resumed_optimizer)}
  with CheckpointManager(tmp_path / "nnx") as manager:
    restored = manager.restore(target)
  nnx.update(resumed_model, restored["model"])
  nnx.update(resumed_optimizer, restored["optimizer"])
  assert int(resumed_optimizer.step[...]) == 3
  for _ in range(3):
    nnx_step(resumed_model, resumed_optimizer, x, y)
  assert_bitwise_equal(nnx.as_pure(nnx.state(resumed_model)), nnx.as_pure(nnx.state(model)))
  assert_bitwise_equal(nnx.as_pure(resumed_optimizer.opt_state), nnx.as_pure(optimizer.opt_state))


# ---------------------------------------------------------------------------
# muP: base shapes saved with the checkpoint; restoring re-annotates, never rescales.
# ---------------------------------------------------------------------------


def MuMLP(width):
  """The shared Linen μP MLP (tests/_helpers.py) with 4 outputs."""
  return _helpers.MuMLP(width, out=4)


@pytest.mark.slow  # the default tier: test_mup_nnx_resume_with_base_shapes
def test_mup_linen_resume_with_base_shapes(tmp_path):
  import mup_flax

  x = jax.random.normal(jax.random.key(1), (32, 8))
  y = jax.random.normal(jax.random.key(2), (32, 4))

  def build():
    model = mup_flax.MuP(MuMLP(64), base=MuMLP(16), delta=MuMLP(32))
    boxed = model.init(jax.random.key(0), x)["params"]
    infshapes = mup_flax.get_infshapes(boxed)
    tx = sf_optax.schedule_free_adamw(1e-2, warmup_steps=2,
                                      **mup_flax.schedule_free_scales(infshapes))
    return model, boxed, infshapes, tx

  model, boxed, infshapes, tx = build()

  @jax.jit
  def step(params, opt_state):  # plain arrays: MuP.apply re-annotates them
    grads = jax.grad(lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = nn.meta.unbox(boxed)
  opt_state = tx.init(params)
  for _ in range(3):
    params, opt_state = step(params, opt_state)
  with CheckpointManager(tmp_path / "mup") as manager:
    manager.save(3, {"params": params, "opt_state": opt_state}, base_shapes=model.base_shapes(x))
  uninterrupted = (params, opt_state)
  for _ in range(3):
    uninterrupted = step(*uninterrupted)

  # A fresh process: abstract target, restore, re-annotate from the saved base shapes.
  fresh_model, fresh_boxed, _, fresh_tx = build()
  target = jax.eval_shape(lambda: {"params": nn.meta.unbox(fresh_boxed),
                                   "opt_state": fresh_tx.init(nn.meta.unbox(fresh_boxed))})
  with CheckpointManager(tmp_path / "mup") as manager:
    restored = manager.restore(target)
    saved_shapes = manager.base_shapes()
  assert saved_shapes == model.base_shapes(x)
  # The model from the saved base shapes (no base/delta models needed); annotate()
  # never rescales and reads the readout roles from the model.
  saved_model = mup_flax.MuP(MuMLP(64), base_shapes=saved_shapes)
  annotated = saved_model.annotate(restored["params"], x)
  assert mup_flax.get_infshapes(annotated) == infshapes
  assert_bitwise_equal(nn.meta.unbox(annotated), params)  # not rescaled
  resumed = (restored["params"], restored["opt_state"])
  for _ in range(3):
    resumed = step(*resumed)
  assert_bitwise_equal(resumed, uninterrupted)


def test_mup_linen_boxed_state_roundtrip(tmp_path):
  """Boxed params and state (InfShapeBox leaves) checkpoint as they are."""
  import mup_flax

  x = jax.random.normal(jax.random.key(1), (32, 8))
  model = mup_flax.MuP(MuMLP(64), base=MuMLP(16), delta=MuMLP(32))
  boxed = model.init(jax.random.key(0), x)["params"]
  tx = sf_optax.schedule_free_adamw(
      1e-2, **mup_flax.schedule_free_scales(mup_flax.get_infshapes(boxed)))
  state = {"params": boxed, "opt_state": tx.init(boxed)}
  save_checkpoint(tmp_path / "boxed", state)
  other = model.init(jax.random.key(7), x)["params"]  # same model, other values
  restored = restore_checkpoint(tmp_path / "boxed", {"params": other, "opt_state": tx.init(other)})
  assert isinstance(restored["params"]["Dense_1"]["kernel"], mup_flax.InfShapeBox)
  assert mup_flax.get_infshapes(restored["params"]) == mup_flax.get_infshapes(boxed)
  assert_bitwise_equal(restored, state)


def test_mup_nnx_resume_with_base_shapes(tmp_path):
  import mup_flax

  x = jax.random.normal(jax.random.key(1), (32, 8))
  y = jax.random.normal(jax.random.key(2), (32, 4))

  class Net(nnx.Module):

    def __init__(self, width, rngs):
      self.l1 = nnx.Linear(8, width, rngs=rngs)
      self.l2 = nnx.Linear(width, width, rngs=rngs)
      self.out = mup_flax.nnx.MuReadout(width, 4, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.l2(nnx.relu(self.l1(x)))))

  base_shapes = mup_flax.make_base_shapes(lambda: Net(16, nnx.Rngs(0)),
                                          lambda: Net(32, nnx.Rngs(0)))

  def build(seed, shapes):
    model = mup_flax.nnx.set_base_shapes(Net(64, nnx.Rngs(seed)), shapes, rescale_params=True)
    tx = sf_optax.schedule_free_adamw(
        1e-2, warmup_steps=2, **mup_flax.schedule_free_scales(mup_flax.get_infshapes(model)))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)

  model, optimizer = build(0, base_shapes)
  for _ in range(3):
    step(model, optimizer)
  with CheckpointManager(tmp_path / "mup_nnx") as manager:
    manager.save(3, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)},
                 base_shapes=base_shapes)
  saved_params = jax.tree.map(np.array, nnx.as_pure(nnx.state(model, nnx.Param)))
  for _ in range(3):
    step(model, optimizer)

  # A fresh process: any init (here another seed), annotated from the saved base shapes.
  with CheckpointManager(tmp_path / "mup_nnx") as manager:
    fresh, fresh_optimizer = build(1, manager.base_shapes())
    restored = manager.restore({"model": nnx.state(fresh),
                                "optimizer": nnx.state(fresh_optimizer)})
  nnx.update(fresh, restored["model"])
  nnx.update(fresh_optimizer, restored["optimizer"])
  assert mup_flax.get_infshapes(fresh) == mup_flax.get_infshapes(model)
  assert_bitwise_equal(nnx.as_pure(nnx.state(fresh, nnx.Param)),
                       jax.tree.map(jnp.asarray, saved_params))  # not rescaled
  for _ in range(3):
    step(fresh, fresh_optimizer)
  assert_bitwise_equal(nnx.as_pure(nnx.state(fresh)), nnx.as_pure(nnx.state(model)))
  assert_bitwise_equal(nnx.as_pure(fresh_optimizer.opt_state), nnx.as_pure(optimizer.opt_state))
