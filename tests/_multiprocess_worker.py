"""The worker of ``tests/test_multiprocess.py``: one JAX process of a multi-process job.

Started by ``tests/_multiprocess.launch`` (2 processes x 4 virtual CPU
devices over loopback, or 1 process x 8 devices for the references)::

  python tests/_multiprocess_worker.py CASE OUT_DIR [OPTIONS]

Process 0 prints one JSON line ``{"case": ..., ...}`` and writes the arrays
the test compares to ``OUT_DIR`` (``.npz``). Runs in float64.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import threading
import time

import _multiprocess

jax = _multiprocess.initialize()
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))

import _common  # noqa: E402

import mup_flax  # noqa: E402
import sf_optax  # noqa: E402

# A small char-level Transformer of examples/_common.py (muP).
WIDTH, BASE_WIDTH, DEPTH, HEADS, SEQ_LEN = 32, 16, 1, 2, 8
BATCH = 16  # global rows: 2 per device
LR, WARMUP, WEIGHT_DECAY = 1e-2, 2, 1e-3


def log(record: dict) -> None:
  if jax.process_index() == 0:
    print(json.dumps(record), flush=True)


# ---------------------------------------------------------------------------
# The job: model, optimizers, FSDP shardings, data.
# ---------------------------------------------------------------------------


def model_and_params(init_file=None):
  """(apply, float64 params as numpy, infshapes): identical in every process and job.

  The width-``WIDTH`` muP model of examples/char_lm.py. Its params are read
  from ``init_file`` when it exists; otherwise they are initialized (under
  ``jax.jit``: one compilation) and process 0 writes them there, so that the
  following jobs skip that compilation.
  """
  make = lambda width: _common.CharTransformer(  # noqa: E731
      width=width, depth=DEPTH, heads=HEADS, seq_len=SEQ_LEN, mup=True, base_width=BASE_WIDTH)
  model = _common.mup_model(make, WIDTH, BASE_WIDTH)
  example = jnp.zeros((1, SEQ_LEN), jnp.int32)
  key = jax.random.key(0)
  abstract = jax.eval_shape(model.init, key, example)["params"]
  if init_file and os.path.isfile(init_file):
    stored = np.load(init_file)
    params = jax.tree_util.tree_map_with_path(
        lambda path, _: stored[jax.tree_util.keystr(path)], nn.unbox(abstract))
  else:
    boxed = jax.jit(model.init)(key, example)["params"]
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), nn.unbox(boxed))
    if init_file:
      save_npz(init_file, flat(params))
  apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  return apply, params, mup_flax.get_infshapes(abstract)


def optimizers(infshapes) -> dict:
  """The optimizers the jobs train with, by name, all with muP's per-parameter scales.

  ``plus`` is ScheduleFree+ under jit (its loss is the global mean and its two
  sums run over the sharded arrays: XLA all-reduces them). ``plus_shard_map``
  is the same optimizer applied inside ``shard_map`` to each device's slice of
  every parameter with ``axis_name``: there the sums are ``psum``'d and the
  devices' local losses ``pmean``'d explicitly, across the processes.
  """
  scales = mup_flax.schedule_free_scales(infshapes)
  common = dict(warmup_steps=WARMUP, weight_decay=WEIGHT_DECAY, **scales)
  plus = dict(warmup_steps=WARMUP, **PLUS, **scales)
  return {
      "adamw": sf_optax.schedule_free_adamw(LR, **common),
      "adamw_no_x": sf_optax.schedule_free_adamw(LR, store_x=False, **common),
      "plus": sf_optax.schedule_free_plus(**plus),
      "plus_shard_map": sf_optax.schedule_free_plus(axis_name="fsdp", **plus),
  }


# Every feature of ScheduleFree+'s step size on: an L1 EMA, the c warmup, the
# annealed momentum, AdamC decay, polynomial weights.
PLUS = dict(weight_decay=2.0, polyak_b=0.9, c_warmup=1, sf_b1_anneal_steps=3, r=0.5)
SHARD_MAP = ("plus_shard_map",)
# Checkpointed, resumed and restored (the other two share their state's layout).
CHECKPOINTED = ("adamw", "plus")
NEEDS_LOSS = ("plus", "plus_shard_map")


def fsdp_spec(shape, n: int, axis: str = "fsdp") -> P:
  """Splits the largest axis that ``n`` divides (examples/sharded_training.py's rule)."""
  candidates = [(size, i) for i, size in enumerate(shape) if size % n == 0]
  if not candidates:
    return P()
  _, split = max(candidates)
  return P(*[(axis if i == split else None) for i in range(len(shape))])


def shardings(name, tx, params, mesh):
  """The params' and the state's shardings: FSDP, or the leading axis for shard_map."""
  n = mesh.devices.size
  if name in SHARD_MAP:
    bad = [p.shape for p in jax.tree.leaves(params) if p.shape[0] % n]
    assert not bad, f"shard_map splits every leading axis over {n} devices: {bad}"
    spec = lambda shape: P("fsdp")  # noqa: E731
  else:
    spec = lambda shape: fsdp_spec(shape, n)  # noqa: E731
  param_sh = jax.tree.map(lambda p: NamedSharding(mesh, spec(p.shape)), params)
  state_sh = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_sh,
      transform_non_params=lambda _: NamedSharding(mesh, P()),
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return param_sh, state_sh


def global_array(value: np.ndarray, sharding) -> jax.Array:
  """A global array from a value every process knows (each places its own shards)."""
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
  """The global batch of ``step`` (every process computes it; each places its rows)."""
  tokens = batch.tokens
  rng = np.random.default_rng([7, step])
  starts = rng.integers(0, len(tokens) - SEQ_LEN - 1, size=BATCH)
  windows = tokens[starts[:, None] + np.arange(SEQ_LEN + 1)]
  return windows[:, :-1], windows[:, 1:]


batch.tokens = _common.char_splits(max_chars=20_000)[0]


def make_train_step(name, apply, tx, param_sh, state_sh, batch_sh):
  """One jitted step, its in- and output shardings pinned, params and state donated."""
  mesh = batch_sh.mesh

  def loss_fn(params, inputs, targets):
    per_row = optax.softmax_cross_entropy_with_integer_labels(
        apply(params, inputs), targets).mean(axis=1)
    return per_row.mean(), per_row

  def local_update(params, opt_state, grads, local_loss):
    # One device's slice of every leaf and the loss of its rows of the batch.
    updates, opt_state = tx.update(grads, opt_state, params, value=local_loss[0])
    return optax.apply_updates(params, updates), opt_state

  @functools.partial(jax.jit, in_shardings=(param_sh, state_sh, batch_sh, batch_sh),
                     out_shardings=(param_sh, state_sh, None), donate_argnums=(0, 1))
  def train_step(params, opt_state, inputs, targets):
    (loss, per_row), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, inputs, targets)
    if name in SHARD_MAP:
      # The batch rows of device d are rows d*B/8 ... (d+1)*B/8 - 1.
      local_losses = per_row.reshape(mesh.devices.size, -1).mean(axis=1)
      spec = lambda tree: jax.tree.map(lambda s: s.spec, tree)  # noqa: E731
      params, opt_state = jax.shard_map(
          local_update, mesh=mesh,
          in_specs=(spec(param_sh), spec(state_sh), spec(param_sh), P("fsdp")),
          out_specs=(spec(param_sh), spec(state_sh)))(params, opt_state, grads, local_losses)
      return params, opt_state, loss
    extra = {"value": loss} if name in NEEDS_LOSS else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def gather(tree) -> dict[str, np.ndarray]:
  """Every leaf as a full numpy array (collective: all processes call it), by path."""
  return flat(multihost_utils.process_allgather(tree, tiled=True))


def check_shardings(tree, expected) -> int:
  checked = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(expected), strict=True):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.sharding, sharding)
    checked += 1
  return checked


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Process 0 writes; atomically (another job's process may be reading it)."""
  if jax.process_index() == 0:
    with open(path + ".tmp", "wb") as f:
      np.savez(f, **arrays)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------
# Cases.
# ---------------------------------------------------------------------------


def case_smoke(args):
  """The runtime itself: 8 global devices, a cross-process sum and all-gather."""
  mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(AxisType.Auto,))
  sharding = NamedSharding(mesh, P("d"))
  values = np.arange(jax.device_count(), dtype=np.float64)
  x = global_array(values, sharding)
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
  gathered = multihost_utils.process_allgather(x, tiled=True)
  log({"case": "smoke", "process_count": jax.process_count(),
       "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
       "sum": float(total), "gathered": np.asarray(gathered).tolist()})


def train_state(name, apply, tx, params0, mesh, steps, *, start=None, manager=None, save_at=None):
  """Runs steps ``1..steps`` (or from ``start = (step, params, opt_state)``).

  Saves ``{"params", "opt_state", "step"}`` with ``manager`` after step
  ``save_at``. Returns the final params, state, losses and the state at
  ``save_at`` gathered to numpy.
  """
  param_sh, state_sh = shardings(name, tx, params0, mesh)
  batch_sh = NamedSharding(mesh, P("fsdp"))
  if start is None:
    first, params = 1, jax.tree.map(global_array, params0, param_sh)
    opt_state = jax.jit(tx.init, out_shardings=state_sh)(params)
  else:
    first, params, opt_state = start[0] + 1, start[1], start[2]
  train_step = make_train_step(name, apply, tx, param_sh, state_sh, batch_sh)
  losses, saved = [], None
  for step in range(first, steps + 1):
    inputs, targets = (global_array(a, batch_sh) for a in batch(step))
    params, opt_state, loss = train_step(params, opt_state, inputs, targets)
    losses.append(float(loss))
    if manager is not None and step == save_at:
      # Asynchronous: the arrays are copied off the devices before save returns
      # (the next step donates them), then written while training goes on.
      manager.save(step, {"params": params, "opt_state": opt_state, "step": step})
      saved = multihost_utils.process_allgather({"params": params, "opt_state": opt_state},
                                                tiled=True)
  check_shardings((params, opt_state), (param_sh, state_sh))
  return params, opt_state, losses, saved


def final_arrays(name, tx, params0, mesh, params, opt_state) -> dict:
  param_sh, _ = shardings(name, tx, params0, mesh)
  x = jax.jit(sf_optax.eval_params, out_shardings=param_sh)(opt_state, params)
  check_shardings(x, param_sh)
  return {"params": params, "opt_state": opt_state, "eval_params": x}


def fsdp_mesh():
  return jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=(AxisType.Auto,))


def case_train(args):
  """FSDP training over all devices: params, state and eval_params after --steps steps.

  With --checkpoint, the state of each optimizer of CHECKPOINTED after step
  --save-at is saved (by all processes, asynchronously) under
  CHECKPOINT/<optimizer>/<step> and written to ``saved.npz`` as well.
  """
  apply, params0, infshapes = model_and_params(args.init)
  mesh = fsdp_mesh()
  finals, saved, losses = {}, {}, {}
  for name, tx in optimizers(infshapes).items():
    manager = None
    if args.checkpoint and name in CHECKPOINTED:
      manager = sf_optax.CheckpointManager(os.path.join(args.checkpoint, name), async_save=True)
    params, opt_state, losses[name], saved[name] = train_state(
        name, apply, tx, params0, mesh, args.steps, manager=manager, save_at=args.save_at)
    if manager is not None:
      manager.close()  # waits for the commit
    finals[name] = final_arrays(name, tx, params0, mesh, params, opt_state)
  save_npz(os.path.join(args.out, "train.npz"), gather(finals))
  if args.checkpoint:
    save_npz(os.path.join(args.out, "saved.npz"),
             flat({name: saved[name] for name in CHECKPOINTED}))
  log({"case": "train", "process_count": jax.process_count(),
       "device_count": jax.device_count(), "losses": losses,
       "sharded_params": sum(not a.sharding.is_fully_replicated
                             for a in jax.tree.leaves(params))})


def case_resume(args):
  """A fresh job restores the step saved by ``train`` and trains to --steps."""
  apply, params0, infshapes = model_and_params(args.init)
  mesh = fsdp_mesh()
  finals, losses, restored_steps = {}, {}, {}
  for name in CHECKPOINTED:
    tx = optimizers(infshapes)[name]
    param_sh, state_sh = shardings(name, tx, params0, mesh)
    target = abstract_state(tx, params0, param_sh, state_sh)
    with sf_optax.CheckpointManager(os.path.join(args.checkpoint, name)) as manager:
      restored = manager.restore(target)
    step = restored_steps[name] = restored["step"]
    check_shardings((restored["params"], restored["opt_state"]), (param_sh, state_sh))
    params, opt_state, losses[name], _ = train_state(
        name, apply, tx, params0, mesh, args.steps,
        start=(step, restored["params"], restored["opt_state"]))
    finals[name] = final_arrays(name, tx, params0, mesh, params, opt_state)
  save_npz(os.path.join(args.out, "resume.npz"), gather(finals))
  log({"case": "resume", "process_count": jax.process_count(), "losses": losses,
       "restored_steps": restored_steps})


def case_restore(args):
  """Restores the step saved by ``train`` on this job's mesh (other devices, other shardings)."""
  _, params0, infshapes = model_and_params(args.init)
  mesh = fsdp_mesh()
  restored_all, split, steps = {}, {}, {}
  for name in CHECKPOINTED:
    tx = optimizers(infshapes)[name]
    param_sh, state_sh = shardings(name, tx, params0, mesh)
    with sf_optax.CheckpointManager(os.path.join(args.checkpoint, name)) as manager:
      restored = manager.restore(abstract_state(tx, params0, param_sh, state_sh))
    steps[name] = restored.pop("step")
    check_shardings(restored, {"params": param_sh, "opt_state": state_sh})
    split[name] = sum(len(a.sharding.device_set) > 1 and not a.sharding.is_fully_replicated
                      for a in jax.tree.leaves(restored))
    restored_all[name] = restored
  save_npz(os.path.join(args.out, "restored.npz"), gather(restored_all))
  log({"case": "restore", "process_count": jax.process_count(),
       "device_count": jax.device_count(), "restored_steps": steps, "split_leaves": split})


def abstract_state(tx, params0, param_sh, state_sh):
  """What a fresh job restores into: shapes, dtypes and this mesh's shardings."""
  def spec(value, sharding):
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)

  return {"params": jax.tree.map(spec, params0, param_sh),
          "opt_state": jax.tree.map(spec, jax.eval_shape(tx.init, params0), state_sh),
          "step": 0}


def state_at(step: int, mesh) -> dict:
  """A training-like state whose every bit depends on ``step``, split over the mesh."""
  rng = np.random.default_rng(step)
  values = {
      "params": {"kernel": rng.standard_normal((256, 512)).astype(np.float32),
                 "bias": rng.standard_normal(512).astype(np.float32)},
      "opt_state": {"count": np.asarray(step, np.int32),
                    "nu": rng.standard_normal((512, 256)).astype(jnp.bfloat16)},
  }
  specs = {"params": {"kernel": P("fsdp", None), "bias": P("fsdp")},
           "opt_state": {"count": P(), "nu": P(None, "fsdp")}}
  arrays = jax.tree.map(lambda v, spec: global_array(v, NamedSharding(mesh, spec)),
                        values, specs, is_leaf=lambda x: isinstance(x, P))
  return {**arrays, "step": step}


def bitwise_equal(restored, expected) -> bool:
  """Compares this process's shards (and the Python scalars) without any collective."""
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
    if isinstance(b, jax.Array):
      if not a.sharding.is_equivalent_to(b.sharding, a.ndim) or a.dtype != b.dtype:
        return False
      for shard, other in zip(a.addressable_shards, b.addressable_shards, strict=True):
        if shard.index != other.index or not np.array_equal(np.asarray(shard.data),
                                                            np.asarray(other.data)):
          return False
    elif type(a) is not type(b) or a != b:
      return False
  return True


def case_save_loop(args):
  """What a restarted job finds after a kill, then saves steps until it is killed itself.

  First verifies the directory as a restarted run would: the latest committed
  step must restore bitwise equal to ``state_at(step)``; every older step
  either restores bitwise or raises CheckpointError (it was being removed when
  the last job died). Then, unless --verify-only, saves step after step
  (max_to_keep=2, so older steps are removed as it goes); --kill-process
  (0, 1 or "both") is SIGKILLed --kill-after seconds after the first save began.
  """
  mesh = fsdp_mesh()
  manager = sf_optax.CheckpointManager(args.checkpoint, max_to_keep=2)
  steps = manager.all_steps()
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
      if isinstance(a, jax.Array) else 0, state_at(0, mesh))
  checked = {}
  for step in steps:
    try:
      restored = manager.restore(target, step=step)
    except sf_optax.CheckpointError as error:
      checked[step] = f"CheckpointError: {str(error).splitlines()[0]}"
      continue
    checked[step] = bitwise_equal(restored, state_at(step, mesh))
  log({"case": "save_loop", "process_count": jax.process_count(), "steps": steps,
       "checked": {str(k): v for k, v in checked.items()},
       "leftovers": sorted(n for n in os.listdir(args.checkpoint) if not n.isdigit())})
  if args.verify_only:
    manager.close()
    return
  me = str(jax.process_index())
  if args.kill_process in (me, "both"):
    def kill():
      time.sleep(args.kill_after)
      os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()
  start = 0 if not steps else steps[-1] + 1
  for step in range(start, start + 100):
    manager.save(step, state_at(step, mesh))
    if jax.process_index() == 0:
      print(f"committed {step}", flush=True)
  manager.close()


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("case", choices=sorted(CASES))
  parser.add_argument("out")
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--checkpoint", default=None)
  parser.add_argument("--init", default=None, help="initial params (.npz): read, or written")
  parser.add_argument("--save-at", type=int, default=2)
  parser.add_argument("--kill-process", default=None, choices=("0", "1", "both"))
  parser.add_argument("--kill-after", type=float, default=1.0)
  parser.add_argument("--verify-only", action="store_true")
  args = parser.parse_args(argv)
  CASES[args.case](args)


if __name__ == "__main__":
  main(sys.argv[1:])
