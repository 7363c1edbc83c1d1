"""Saves checkpoints in a loop until it is killed: the victim of tests/test_checkpoint_faults.py.

Usage: python tests/_checkpoint_worker.py DIRECTORY MAX_TO_KEEP ASYNC(0|1)

Resumes like a preempted run (from the latest committed step + 1) and prints
"committed <step>" once each save has returned (with ASYNC, once the next save
or wait_until_finished has returned, i.e. once it is committed).
"""

import sys

import jax.numpy as jnp
import numpy as np

import sf_optax


def state_at(step: int) -> dict:
  """A state whose every bit depends on the step (about 2 MB, several leaves)."""
  rng = np.random.default_rng(step)
  return {
      "params": {"kernel": jnp.asarray(rng.standard_normal((256, 1024), np.float32)),
                 "bias": jnp.asarray(rng.standard_normal((1024,), np.float32))},
      "opt_state": {"count": jnp.asarray(step, jnp.int32),
                    "nu": jnp.asarray(rng.standard_normal((512, 256)).astype(jnp.bfloat16))},
      "step": step,
      "loss": float(rng.standard_normal()),
  }


def main():
  directory, max_to_keep, async_save = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
  manager = sf_optax.CheckpointManager(directory, max_to_keep=max_to_keep, async_save=async_save)
  latest = manager.latest_step()
  step = 0 if latest is None else latest + 1
  print("ready", flush=True)
  while True:
    manager.save(step, state_at(step))
    if async_save:
      manager.wait_until_finished()
    print(f"committed {step}", flush=True)
    step += 1


if __name__ == "__main__":
  main()
