"""FSDP-sharded training of the character-level Transformer: muP + Schedule-Free AdamW.

Every parameter is split over all devices along its largest divisible axis
(fully sharded data parallel, FSDP), and so is the optimizer state: z, x and
the second moments of each parameter live where its shards live. The batch is
split over the same devices. The step is one ``jax.jit`` with its input and
output shardings pinned; XLA inserts the all-gathers and reduce-scatters. No
code of sf_optax or mup_flax knows about devices: the optimizer is elementwise
per parameter plus a few scalars, so it runs shard by shard.

By default the script runs on 8 virtual CPU devices (it sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` unless ``XLA_FLAGS`` is
already set); on a machine with accelerators set ``XLA_FLAGS`` (or
``JAX_PLATFORMS``) yourself and it uses them all.

Multi-host: run the same script on every host, with the coordinator's address::

  python examples/sharded_training.py --coordinator-address HOST0:1234 \\
      --num-processes 4 --process-id $RANK

(on TPU pods and under SLURM, ``--distributed`` alone lets
``jax.distributed.initialize()`` find them). The mesh then spans the devices of
all hosts, each process feeds only its own rows of the global batch
(``jax.make_array_from_process_local_data``), and everything else is the same
code. Checkpoints (``--checkpoint DIR``, Orbax) are written collectively by all
processes to a directory every host can reach.

The same multi-controller runtime runs on one machine: ``--num-processes N``
without a coordinator address starts this script N times on loopback, each
process with 8/N of the 8 virtual CPU devices, their collectives going
through Gloo (``jax_cpu_collectives_implementation="gloo"``) -- real
cross-process all-reduces, as between hosts.

Usage::

  python examples/sharded_training.py                  # about 2 minutes on 2 CPU cores
  python examples/sharded_training.py --num-processes 2   # 2 processes x 4 devices
  python examples/sharded_training.py --compare-single-device
  python examples/sharded_training.py --help

Writes ``sharded_training.json`` under ``--out``.
"""

from __future__ import annotations

import os

# What the user set, for the processes --num-processes starts on this machine.
_USER_XLA_FLAGS = os.environ.get("XLA_FLAGS")
VIRTUAL_DEVICES = 8
_VIRTUAL_DEVICE_FLAGS = (
    " --xla_cpu_multi_thread_eigen=false"
    " --xla_cpu_collective_call_terminate_timeout_seconds=600"
)

# Before JAX is imported: 8 virtual CPU devices unless the user chose otherwise.
# The virtual devices share one thread pool; multi-threaded Eigen kernels inside
# them can starve a device that a collective waits for (a deadlock, which XLA
# turns into an abort after 40 s), so they run single-threaded here.
if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = (
      f"--xla_force_host_platform_device_count={VIRTUAL_DEVICES}{_VIRTUAL_DEVICE_FLAGS}")

import argparse  # noqa: E402
import functools  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import mup_flax  # noqa: E402
import sf_optax  # noqa: E402


def fsdp_spec(shape, n_devices: int) -> P:
  """Shards the largest axis that the device count divides; replicates the rest."""
  candidates = [(size, axis) for axis, size in enumerate(shape) if size % n_devices == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def state_shardings(tx, params, param_shardings, mesh):
  """Each params-sized leaf of the optimizer state like its param; scalars replicated."""
  return optax.tree_map_params(
      tx,
      lambda _, sharding: sharding,
      jax.eval_shape(tx.init, params),
      param_shardings,
      transform_non_params=lambda _: NamedSharding(mesh, P()),
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
  )


def local_batch(tokens, step: int, global_batch: int, seq_len: int, seed: int):
  """This process's rows of the global batch of step ``step`` (numpy, host memory)."""
  per_process = global_batch // jax.process_count()
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(tokens) - seq_len - 1, size=global_batch)
  mine = starts[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
  windows = tokens[mine[:, None] + np.arange(seq_len + 1)]
  return windows[:, :-1], windows[:, 1:]


def run_local_processes(argv: list[str], num_processes: int, grace_s: float = 10.0) -> int:
  """Runs this script as ``num_processes`` connected JAX processes on this machine.

  Each gets ``--coordinator-address 127.0.0.1:PORT --process-id i`` (a free
  loopback port) and, unless ``XLA_FLAGS`` is set, ``VIRTUAL_DEVICES /
  num_processes`` virtual CPU devices. Process 0 prints. If one process
  fails, the others are stopped after ``grace_s`` seconds (they would wait in
  a collective for it); none outlives this function. Returns the worst exit code.
  """
  if VIRTUAL_DEVICES % num_processes and _USER_XLA_FLAGS is None:
    raise SystemExit(f"--num-processes {num_processes} must divide the {VIRTUAL_DEVICES}"
                     " virtual devices")
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  env = dict(os.environ)
  if _USER_XLA_FLAGS is None:
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count="
                        f"{VIRTUAL_DEVICES // num_processes}{_VIRTUAL_DEVICE_FLAGS}")
  procs = []
  try:
    for i in range(num_processes):
      procs.append(subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), *argv,
           "--coordinator-address", f"127.0.0.1:{port}", "--process-id", str(i)],
          env=env, start_new_session=True))
    failed_at = None
    while [p.poll() for p in procs].count(None):  # poll every one (no short circuit)
      if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
        failed_at = time.monotonic()
      if failed_at is not None and time.monotonic() > failed_at + grace_s:
        break
      time.sleep(0.1)
  finally:
    for p in procs:  # also on Ctrl-C: each process group, with whatever it started
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
      p.wait()
  codes = [p.returncode for p in procs]
  if any(codes):
    print(f"exit codes of the {num_processes} processes: {codes}", file=sys.stderr)
  return max(codes, key=abs)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=64, help="global batch")
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--eval-every", type=int, default=50)
  parser.add_argument("--lr", type=float, default=1e-2)
  parser.add_argument("--warmup", type=int, default=20)
  parser.add_argument("--base-width", type=int, default=32, help="muP base width")
  parser.add_argument("--no-mup", action="store_true", help="standard parametrization")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--compare-single-device", action="store_true",
                      help="also run the steps on one device and report the difference")
  parser.add_argument("--checkpoint", default=None,
                      help="save params + state here, in DIR/<step> (sf_optax.CheckpointManager)")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() (multi-host)")
  parser.add_argument("--coordinator-address", default=None)
  parser.add_argument("--num-processes", type=int, default=None,
                      help="with --coordinator-address: the number of hosts' processes;"
                           " alone: run N processes on this machine (loopback)")
  parser.add_argument("--process-id", type=int, default=None)
  _common.add_common_args(parser, default_out="out/sharded_training")
  args = parser.parse_args(argv)

  if args.num_processes is not None and args.num_processes < 1:
    parser.error(f"--num-processes must be at least 1, got {args.num_processes}")
  if args.num_processes and not (args.distributed or args.coordinator_address):
    if args.process_id is not None:
      parser.error("--process-id needs --coordinator-address (the address of process 0)")
    code = run_local_processes(sys.argv[1:] if argv is None else list(argv), args.num_processes)
    if code:
      raise SystemExit(code)
    return None
  if args.distributed or args.coordinator_address:
    # CPU collectives between processes go through Gloo (the CPU backend has
    # none by default); accelerators use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Before any other JAX call; afterwards jax.devices() lists every host's devices.
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)
  # After jax.distributed.initialize: the record lists the devices, which starts the backend.
  record = _common.run_record(__file__, argv)
  n = jax.device_count()
  if args.batch_size % n:
    parser.error(f"--batch-size {args.batch_size} must be a multiple of the {n} devices")
  mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(AxisType.Auto,))
  log = print if jax.process_index() == 0 else (lambda *a, **k: None)
  log(f"{n} devices over {jax.process_count()} process(es): {jax.devices()[0].platform}")

  # The model of examples/_common.py, muP-annotated (plain params + their infshapes).
  mup = not args.no_mup

  def make(width):
    return _common.CharTransformer(width=width, depth=args.depth, heads=args.heads,
                                   seq_len=args.seq_len, mup=mup, base_width=args.base_width)

  example = jnp.zeros((1, args.seq_len), jnp.int32)
  apply, params, infshapes = _common.init_model(
      make, args.width, args.base_width, mup, jax.random.key(args.seed), example)
  scales = mup_flax.schedule_free_scales(infshapes) if mup else {}
  tx = sf_optax.schedule_free_adamw(args.lr, warmup_steps=args.warmup, weight_decay=0.0,
                                    **scales)

  param_sh = jax.tree.map(lambda p: NamedSharding(mesh, fsdp_spec(p.shape, n)), params)
  state_sh = state_shardings(tx, params, param_sh, mesh)
  batch_sh = NamedSharding(mesh, P("fsdp"))
  replicated = NamedSharding(mesh, P())

  def loss_fn(params, inputs, targets):
    logits = apply(params, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @functools.partial(jax.jit, in_shardings=(param_sh, state_sh, batch_sh, batch_sh),
                     out_shardings=(param_sh, state_sh, replicated), donate_argnums=(0, 1))
  def train_step(params, opt_state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @functools.partial(jax.jit, in_shardings=(state_sh, param_sh, batch_sh, batch_sh),
                     out_shardings=replicated)
  def eval_loss(opt_state, params, inputs, targets):
    return loss_fn(sf_optax.eval_params(opt_state, params), inputs, targets)  # at x

  # Place params (a jitted identity: fresh buffers, safe to donate) and init the state.
  params = jax.jit(lambda p: p, out_shardings=param_sh)(params)
  opt_state = jax.jit(tx.init, out_shardings=state_sh)(params)
  leaves = jax.tree.leaves(params)
  log(f"params: {sum(p.size for p in leaves):,} in total,"
      f" {sum(p.addressable_shards[0].data.size for p in leaves):,} on each device"
      f" ({len(leaves)} tensors, {sum(p.sharding.is_fully_replicated for p in leaves)}"
      " replicated)")

  train_tokens, val_tokens = _common.char_splits(max_chars=200_000)
  val_x, val_y = _common.fixed_char_batches(val_tokens, 4, args.batch_size, args.seq_len)

  def global_array(local):
    return jax.make_array_from_process_local_data(batch_sh, local)

  def evaluate():
    per_process = args.batch_size // jax.process_count()
    rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    losses = [float(eval_loss(opt_state, params, global_array(vx[rows]), global_array(vy[rows])))
              for vx, vy in zip(val_x, val_y)]
    return float(np.mean(losses))

  history, timer = [], _common.timer()
  if args.compare_single_device:
    initial_params = jax.tree.map(np.asarray, params)  # before donation
  for step in range(1, args.steps + 1):
    inputs, targets = local_batch(train_tokens, step, args.batch_size, args.seq_len, args.seed)
    params, opt_state, loss = train_step(params, opt_state, global_array(inputs),
                                         global_array(targets))
    # One step at a time: on virtual CPU devices (threads of one process) XLA can
    # deadlock when collectives of several in-flight programs compete for threads.
    loss.block_until_ready()
    if step % args.eval_every == 0 or step == args.steps:
      val = evaluate()
      history.append(dict(step=step, train_loss=float(loss), val_loss_at_x=val,
                          seconds=timer()))
      log(f"step {step:5d}  train loss (at y) {float(loss):.4f}  val loss (at x) {val:.4f}"
          f"  {timer():.1f} s")

  shardings_kept = all(
      a.sharding.is_equivalent_to(s, a.ndim)
      for a, s in zip(jax.tree.leaves(opt_state), jax.tree.leaves(state_sh)))
  log(f"optimizer state keeps the params' shardings: {shardings_kept}")
  result = dict(args=vars(args), history=history, devices=n,
                processes=jax.process_count(), **record)

  if args.compare_single_device and jax.process_count() == 1:
    # The same steps on one device. Compare losses: per tensor, parameters whose
    # exact gradient is zero (e.g. the attention key bias: softmax ignores it)
    # follow rounding noise, which Adam-type steps scale up to full-size steps,
    # so they differ between any two reduction orders.
    @jax.jit
    def one_device_step(params, opt_state, inputs, targets):
      grads = jax.grad(loss_fn)(params, inputs, targets)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    p1 = jax.device_put(initial_params, jax.devices()[0])
    s1 = tx.init(p1)
    for step in range(1, args.steps + 1):
      inputs, targets = local_batch(train_tokens, step, args.batch_size, args.seq_len, args.seed)
      p1, s1 = jax.block_until_ready(one_device_step(p1, s1, inputs, targets))
    x1 = sf_optax.eval_params(s1, p1)
    single = float(np.mean([float(loss_fn(x1, vx, vy)) for vx, vy in zip(val_x, val_y)]))
    sharded = history[-1]["val_loss_at_x"]
    log(f"val loss at x after {args.steps} steps: sharded {sharded:.6f}, one device"
        f" {single:.6f} (relative difference {abs(sharded - single) / single:.1e};"
        " float32 reduction order)")
    result["val_loss_at_x_single_device"] = single

  if args.checkpoint:
    # A rolling checkpoint: step args.steps is committed before an older one is removed.
    with sf_optax.CheckpointManager(args.checkpoint, max_to_keep=1) as manager:
      manager.save(args.steps, {"params": params, "opt_state": opt_state})
      log(f"checkpoint written to {manager.step_directory(args.steps)}")
  if jax.process_index() == 0:
    path = os.path.join(args.out, "sharded_training.json")
    _common.write_json(path, result)
    log(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
