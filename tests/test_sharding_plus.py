"""ScheduleFree+ on 8 virtual CPU devices: its reductions over the model stay global.

The cases live in ``tests/_sharding_plus_worker.py`` and run in ONE child process
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (see
``tests/test_sharding.py``, whose worker helpers it reuses). Run alone:
``python -m pytest tests/test_sharding_plus.py -q``, or the worker itself:
``python tests/_sharding_plus_worker.py [CASE ...]``.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

WORKER = pathlib.Path(__file__).with_name("_sharding_plus_worker.py")
ROOT = WORKER.parent.parent
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def worker_output():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  completed = subprocess.run(
      [sys.executable, str(WORKER)], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=TIMEOUT_S, check=False)
  results = {}
  for line in completed.stdout.splitlines():
    if line.startswith("{"):
      record = json.loads(line)
      results[record["case"]] = record
  return {"results": results, "returncode": completed.returncode,
          "stderr": completed.stderr[-4000:]}


def case(worker_output, name):
  record = worker_output["results"].get(name)
  if record is None:
    pytest.fail(f"the worker printed no result for {name!r} (exit code"
                f" {worker_output['returncode']}):\n{worker_output['stderr']}")
  assert record["ok"], f"{name} failed in the worker:\n{record.get('error')}"
  return record


def test_fsdp_named_sharding_equals_single_device(worker_output):
  record = case(worker_output, "plus_fsdp")
  assert set(record["rel_error"]) == {"store_x", "no_x"}
  assert max(record["rel_error"].values()) <= 1e-12


def test_shard_map_sums_and_averages_over_axis_name(worker_output):
  record = case(worker_output, "plus_shard_map")
  assert max(record["rel_error"].values()) <= 1e-12
  # Local sums instead of global ones give another run: the reduction is needed.
  assert not min(record["rel_error_without_axis_name"].values()) <= 1e-3


def test_pmap_sums_and_averages_over_axis_name(worker_output):
  record = case(worker_output, "plus_pmap")
  assert max(record["rel_error"].values()) <= 1e-12


def test_worker_ran_every_case(worker_output):
  names = {line.split("(")[0][len("def case_"):]
           for line in WORKER.read_text().splitlines() if line.startswith("def case_")}
  assert names <= set(worker_output["results"]), sorted(names - set(worker_output["results"]))
