"""Sharded NNX: muP + Schedule-Free FSDP on 8 virtual CPU devices, and eval_model.

The cases live in ``tests/_sharding_nnx_worker.py`` and run in one child process
with 8 virtual CPU devices (JAX fixes its device count at start-up), as in
``tests/test_sharding.py``. Run alone: ``python -m pytest tests/test_sharding_nnx.py``.
The worker's tests are in the slow tier (``-m slow``).
"""

from __future__ import annotations

import pathlib

import pytest

from _helpers import run_device_worker
from _helpers import worker_case

pytestmark = pytest.mark.slow  # a subprocess with 8 devices: the slow tier

WORKER = pathlib.Path(__file__).with_name("_sharding_nnx_worker.py")
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def worker_output():
  return run_device_worker(WORKER, TIMEOUT_S)


def test_mup_schedule_free_fsdp_equals_one_device_and_eval_model_keeps_shardings(worker_output):
  record = worker_case(worker_output, "mup_fsdp_eval_model")
  assert set(record["rel_error"]) == {"store_x=True", "store_x=False"}
  assert max(record["rel_error"].values()) <= 1e-12
  # 6 params: z, x and the second moments (store_x=True), z and the second moments.
  assert record["state_leaves_checked"] == {"store_x=True": 18, "store_x=False": 12}


def test_sharded_checkpoint_restores_into_an_abstract_model_and_resumes_bitwise(worker_output):
  record = worker_case(worker_output, "checkpoint_resume_sharded")
  assert record["state_leaves_checked"] == 18
