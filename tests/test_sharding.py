"""Sharded and data-parallel training on 8 virtual CPU devices.

The cases live in ``tests/_sharding_worker.py`` and run in ONE child process
started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (JAX fixes
its device count at start-up, so the flag is never set in this process). Each
test here asserts on its case's line of the worker's output. Under
pytest-xdist the worker still runs once: the first xdist worker to need it
writes the results to a file the others read. Every test here is in the slow tier.

Run alone: ``python -m pytest tests/test_sharding.py -q``, or the worker itself:
``python tests/_sharding_worker.py [CASE ...]``.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from _helpers import run_device_worker
from _helpers import worker_case

pytestmark = pytest.mark.slow  # a subprocess with 8 devices: the slow tier

WORKER = pathlib.Path(__file__).with_name("_sharding_worker.py")
TIMEOUT_S = 900


def _run_worker() -> dict:
  return run_device_worker(WORKER, TIMEOUT_S)


@pytest.fixture(scope="session")
def worker_output(tmp_path_factory, worker_id):
  if worker_id == "master":
    return _run_worker()
  try:
    from filelock import FileLock
  except ImportError:  # every xdist worker runs its own copy then
    return _run_worker()
  shared = tmp_path_factory.getbasetemp().parent / "sharding_worker.json"
  with FileLock(str(shared) + ".lock"):
    if shared.is_file():
      return json.loads(shared.read_text())
    output = _run_worker()
    shared.write_text(json.dumps(output))
    return output


@pytest.fixture(scope="session", name="worker_id")
def _worker_id(request):
  # pytest-xdist provides `worker_id`; without the plugin this stands in.
  if hasattr(request.config, "workerinput"):
    return request.config.workerinput["workerid"]
  return "master"



def test_init_gives_state_the_param_shardings(worker_output):
  record = worker_case(worker_output, "init_shardings")
  # 3 sharded params (two kernels and a bias): z, x and the second moments.
  assert record["leaves_checked"]["adamw/jit"] == 18


def test_fsdp_step_matches_single_device(worker_output):
  record = worker_case(worker_output, "fsdp_step")
  assert set(record["rel_error"]) == {"adamw", "wrapper_adam", "adamw_no_x"}
  assert max(record["rel_error"].values()) <= 1e-9


def test_sharded_checkpoint_roundtrip(worker_output):
  # z, x, nu and params of the three sharded params.
  assert worker_case(worker_output, "checkpoint_sharded")["restored_sharded_leaves"] == 12


def test_fsdp_float32_differs_by_reduction_order_only(worker_output):
  assert worker_case(worker_output, "fsdp_float32")["rel_error"] <= 1e-5


def test_explicit_sharding_mesh(worker_output):
  record = worker_case(worker_output, "explicit_mesh")
  assert max(record["rel_error"].values()) <= 1e-9


def test_nnx_fsdp(worker_output):
  assert worker_case(worker_output, "nnx_fsdp")["rel_error"] <= 1e-9


def test_shard_map_data_parallel(worker_output):
  record = worker_case(worker_output, "shard_map_dp")
  assert max(record["rel_error"].values()) <= 1e-9


def test_shard_map_data_parallel_summed_loss(worker_output):
  assert worker_case(worker_output, "shard_map_psum_loss")["rel_error"] <= 1e-9


def test_pmap_data_parallel(worker_output):
  record = worker_case(worker_output, "pmap_dp")
  assert max(record["rel_error"].values()) <= 1e-9


def test_mup_linen_partitioning_scan_fsdp(worker_output):
  assert worker_case(worker_output, "mup_linen_fsdp_scan")["rel_error"] <= 1e-9


def test_mup_nnx_sharding_metadata_scan_fsdp(worker_output):
  assert worker_case(worker_output, "mup_nnx_fsdp_scan")["rel_error"] <= 1e-9


def test_worker_ran_every_case(worker_output):
  names = {
      line.split("(")[0][len("def case_"):]
      for line in WORKER.read_text().splitlines()
      if line.startswith("def case_")
  }
  assert names <= set(worker_output["results"]), sorted(names - set(worker_output["results"]))
