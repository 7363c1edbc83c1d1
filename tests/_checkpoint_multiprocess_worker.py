"""One process of a multi-process checkpoint test (tests/test_checkpoint_faults.py).

Usage: python tests/_checkpoint_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT DIRECTORY save|restore

Each process has 2 virtual CPU devices. ``save`` writes steps 3 and 4 of an
array sharded over all processes' devices; ``restore`` reads the latest step
onto a mesh of this run's devices. Prints one JSON line.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sf_optax  # noqa: E402

FULL = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)


def main(process_id, num_processes, port, directory, action):
  jax.config.update("jax_platforms", "cpu")
  if num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=num_processes, process_id=process_id)
  mesh = jax.make_mesh((jax.device_count(),), ("data",), devices=jax.devices())
  sharding = NamedSharding(mesh, P("data"))

  def state(step):
    array = jax.make_array_from_callback(FULL.shape, sharding, lambda index: FULL[index] * step)
    return {"w": array, "step": step}

  with sf_optax.CheckpointManager(directory, max_to_keep=1) as manager:
    if action == "save":
      manager.save(3, state(3))
      manager.save(4, state(4))
    target = {"w": jax.ShapeDtypeStruct(FULL.shape, jnp.float32, sharding=sharding), "step": 0}
    restored = manager.restore(target)
    shards = restored["w"].addressable_shards
    print(json.dumps({
        "process": process_id, "steps": manager.all_steps(), "step": restored["step"],
        "bitwise": all(np.array_equal(np.asarray(s.data), FULL[s.index] * 4) for s in shards),
        "devices": len(restored["w"].sharding.device_set),
    }), flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
