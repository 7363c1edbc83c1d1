"""What sf_optax.CheckpointManager's digest manifest costs against plain Orbax.

One command, one process::

    python benchmarks/checkpoint_overhead.py              # 256 MiB of float32, 3 rounds
    python benchmarks/checkpoint_overhead.py --mib 32 --rounds 1   # a smoke test

Times, in the same process and round-robin (so other load falls on both alike):
a synchronous ``sf_optax.CheckpointManager.save`` (Orbax's save plus the SHA-256
manifest written at commit) against Orbax's own synchronous
``ocp.CheckpointManager.save``, and ``sf_optax.CheckpointManager.restore`` (the
manifest checked, the tree compared, then Orbax's read) against Orbax's
``restore``, plus the check alone. Prints medians and the load average; the
numbers are ratios of one run on one machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mib", type=int, default=256, help="size of the state")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()

  import orbax.checkpoint as ocp

  import sf_optax
  from sf_optax import _checkpoint

  leaves = max(1, args.mib // 32)
  state = {f"w{i}": jax.numpy.asarray(np.random.default_rng(i).standard_normal(
      (2048, 4096 * args.mib // (32 * leaves)), np.float32)) for i in range(leaves)}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  times = {k: [] for k in ("save", "plain save", "restore", "plain restore", "verify")}
  root = tempfile.mkdtemp()
  try:
    for r in range(args.rounds):
      with sf_optax.CheckpointManager(os.path.join(root, f"managed{r}")) as manager:
        t = time.perf_counter()
        manager.save(0, state)
        times["save"].append(time.perf_counter() - t)
        step_dir = manager.step_directory(0)
        t = time.perf_counter()
        jax.block_until_ready(manager.restore(state))
        times["restore"].append(time.perf_counter() - t)
        t = time.perf_counter()
        _checkpoint.verify_directory(step_dir)
        times["verify"].append(time.perf_counter() - t)
      options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
      with ocp.CheckpointManager(os.path.join(root, f"plain{r}"), options=options,
                                 item_names=("state",)) as plain:
        t = time.perf_counter()
        plain.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        times["plain save"].append(time.perf_counter() - t)
        t = time.perf_counter()
        restored = plain.restore(0, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        jax.block_until_ready(restored["state"])
        times["plain restore"].append(time.perf_counter() - t)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(step_dir) for f in fs)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  median = {k: statistics.median(v) for k, v in times.items()}
  print(f"{size / 2**20:.0f} MiB on disk, {args.rounds} rounds, load {os.getloadavg()[0]:.1f}"
        f" on {os.cpu_count()} CPUs; medians:")
  print(f"  save    {median['save']:.2f} s vs plain Orbax {median['plain save']:.2f} s"
        f" (x{median['save'] / median['plain save']:.2f})")
  print(f"  restore {median['restore']:.2f} s vs plain Orbax {median['plain restore']:.2f} s"
        f" (x{median['restore'] / median['plain restore']:.2f}); the check alone"
        f" {median['verify']:.2f} s ({size / 2**20 / median['verify']:.0f} MiB/s)")


if __name__ == "__main__":
  main()
