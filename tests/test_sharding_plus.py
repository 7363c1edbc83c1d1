"""ScheduleFree+ on 8 virtual CPU devices: its reductions over the model stay global.

The cases live in ``tests/_sharding_plus_worker.py`` and run in ONE child process
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (see
``tests/test_sharding.py``, whose worker helpers it reuses). Run alone:
``python -m pytest tests/test_sharding_plus.py -q``, or the worker itself:
``python tests/_sharding_plus_worker.py [CASE ...]``.
The worker's tests are in the slow tier (``-m slow``).
"""

from __future__ import annotations

import pathlib

import pytest

from _helpers import run_device_worker
from _helpers import worker_case

pytestmark = pytest.mark.slow  # a subprocess with 8 devices: the slow tier

WORKER = pathlib.Path(__file__).with_name("_sharding_plus_worker.py")
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def worker_output():
  return run_device_worker(WORKER, TIMEOUT_S)


def test_fsdp_named_sharding_equals_single_device(worker_output):
  record = worker_case(worker_output, "plus_fsdp")
  assert set(record["rel_error"]) == {"store_x", "no_x"}
  assert max(record["rel_error"].values()) <= 1e-12


def test_shard_map_sums_and_averages_over_axis_name(worker_output):
  record = worker_case(worker_output, "plus_shard_map")
  assert max(record["rel_error"].values()) <= 1e-12
  # Local sums instead of global ones give another run: the reduction is needed.
  assert not min(record["rel_error_without_axis_name"].values()) <= 1e-3


def test_pmap_sums_and_averages_over_axis_name(worker_output):
  record = worker_case(worker_output, "plus_pmap")
  assert max(record["rel_error"].values()) <= 1e-12


def test_worker_ran_every_case(worker_output):
  names = {line.split("(")[0][len("def case_"):]
           for line in WORKER.read_text().splitlines() if line.startswith("def case_")}
  assert names <= set(worker_output["results"]), sorted(names - set(worker_output["results"]))
