"""The worker of ``tests/test_multiprocess.py``: one JAX process of a multi-process job.

Started by ``tests/_multiprocess.launch`` (2 processes x 4 virtual CPU
devices over loopback, or 1 process x 8 devices for the references)::

  python tests/_multiprocess_worker.py CASE OUT_DIR [OPTIONS]

Process 0 prints one JSON line ``{"case": ..., ...}`` and writes the arrays
the test compares to ``OUT_DIR`` (``.npz``). Runs in float64.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import _multiprocess

jax = _multiprocess.initialize()
jax.config.update("jax_enable_x64", True)

import functools  # noqa: E402

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


def model_and_params():
  """(apply, float64 params as numpy, infshapes): identical in every process.

  The width-``WIDTH`` muP model of examples/char_lm.py, initialized under
  ``jax.jit`` (one compilation instead of one per initializer).
  """
  make = lambda width: _common.CharTransformer(  # noqa: E731
      width=width, depth=DEPTH, heads=HEADS, seq_len=SEQ_LEN, mup=True, base_width=BASE_WIDTH)
  model = _common.mup_model(make, WIDTH, BASE_WIDTH)
  example = jnp.zeros((1, SEQ_LEN), jnp.int32)
  boxed = jax.jit(model.init)(jax.random.key(0), example)["params"]
  params = jax.tree.map(lambda p: np.asarray(p, np.float64), nn.unbox(boxed))
  apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  return apply, params, mup_flax.get_infshapes(boxed)


def optimizers(infshapes) -> dict:
  scales = mup_flax.schedule_free_scales(infshapes)
  common = dict(warmup_steps=WARMUP, weight_decay=WEIGHT_DECAY, **scales)
  return {
      "adamw": sf_optax.schedule_free_adamw(LR, **common),
      "adamw_no_x": sf_optax.schedule_free_adamw(LR, store_x=False, **common),
  }


def fsdp_spec(shape, n: int, axis: str = "fsdp") -> P:
  """Splits the largest axis that ``n`` divides (examples/sharded_training.py's rule)."""
  candidates = [(size, i) for i, size in enumerate(shape) if size % n == 0]
  if not candidates:
    return P()
  _, split = max(candidates)
  return P(*[(axis if i == split else None) for i in range(len(shape))])


def shardings(tx, params, mesh):
  n = mesh.devices.size
  param_sh = jax.tree.map(lambda p: NamedSharding(mesh, fsdp_spec(p.shape, n)), params)
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


def make_train_step(apply, tx, param_sh, state_sh, batch_sh):
  def loss_fn(params, inputs, targets):
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, inputs), targets).mean()

  @functools.partial(jax.jit, in_shardings=(param_sh, state_sh, batch_sh, batch_sh),
                     out_shardings=(param_sh, state_sh, None), donate_argnums=(0, 1))
  def train_step(params, opt_state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def gather(tree) -> dict[str, np.ndarray]:
  """Every leaf as a full numpy array (collective: all processes call it), by path."""
  full = multihost_utils.process_allgather(tree, tiled=True)
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(full)[0]}


def check_shardings(tree, expected) -> int:
  checked = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(expected), strict=True):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.sharding, sharding)
    checked += 1
  return checked


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  if jax.process_index() == 0:
    np.savez(path, **arrays)


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


def case_train(args):
  """FSDP training over all devices; writes params and eval_params after --steps steps."""
  apply, params0, infshapes = model_and_params()
  mesh = jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=(AxisType.Auto,))
  batch_sh = NamedSharding(mesh, P("fsdp"))
  results, losses, checked = {}, {}, {}
  for name, tx in optimizers(infshapes).items():
    param_sh, state_sh = shardings(tx, params0, mesh)
    params = jax.tree.map(global_array, params0, param_sh)
    opt_state = jax.jit(tx.init, out_shardings=state_sh)(params)
    train_step = make_train_step(apply, tx, param_sh, state_sh, batch_sh)
    losses[name] = []
    for step in range(1, args.steps + 1):
      inputs, targets = (global_array(a, batch_sh) for a in batch(step))
      params, opt_state, loss = train_step(params, opt_state, inputs, targets)
      losses[name].append(float(loss))
    x = jax.jit(sf_optax.eval_params, out_shardings=param_sh)(opt_state, params)
    checked[name] = check_shardings((params, opt_state, x), (param_sh, state_sh, param_sh))
    results[name] = {"params": params, "eval_params": x}
  save_npz(os.path.join(args.out, "train.npz"), gather(results))
  log({"case": "train", "process_count": jax.process_count(),
       "device_count": jax.device_count(), "losses": losses, "shardings_checked": checked,
       "sharded_params": sum(not a.sharding.is_fully_replicated
                             for a in jax.tree.leaves(params))})


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("case", choices=sorted(CASES))
  parser.add_argument("out")
  parser.add_argument("--steps", type=int, default=4)
  args = parser.parse_args(argv)
  CASES[args.case](args)


if __name__ == "__main__":
  main(sys.argv[1:])
