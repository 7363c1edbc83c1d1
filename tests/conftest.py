"""Shared test configuration: strict numerics and a float64 switch."""

import os
import shutil
import tempfile

import jax
import pytest

# Implicit rank promotion hides shape bugs (a (n,) bias added to a (n, 1) column).
jax.config.update("jax_numpy_rank_promotion", "raise")

# One compilation cache for the test run, shared by the pytest-xdist workers: many
# tests compile the same small programs (eager primitives, the same steps), and
# each is then compiled once per run rather than once per worker and test. The
# controlling process creates it empty (a fresh machine's cost), its workers
# inherit it through the environment, and it is removed at the end of the run.
_CACHE_VARIABLE = "SF_OPTAX_TEST_COMPILATION_CACHE"
_OWNS_CACHE = _CACHE_VARIABLE not in os.environ
if _OWNS_CACHE:
  os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="sf_optax_test_compilation_cache_")
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VARIABLE])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  if _OWNS_CACHE:
    shutil.rmtree(os.environ.pop(_CACHE_VARIABLE), ignore_errors=True)


@pytest.fixture
def x64():
  """Runs a test in float64 (parity tests against the float64 references)."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def example_dependencies():
  """Skips a test of the examples without their extras (``pip install -e ".[examples]"``).

  A fixture rather than an import-time ``importorskip``: collecting the tests
  would otherwise import scikit-learn and matplotlib in every test process.
  """
  for name in ("matplotlib", "sklearn", "tqdm"):
    pytest.importorskip(name)


@pytest.fixture(autouse=True)
def _float64_does_not_leak(request):
  """A test that turns on float64 must turn it off: later tests and doctests assume float32."""
  yield
  if jax.config.jax_enable_x64 and "x64" not in request.fixturenames:
    jax.config.update("jax_enable_x64", False)
    pytest.fail(f"{request.node.nodeid} left jax_enable_x64 on")


# Never imported by the test process: the fixture generators import torch and the
# PyTorch references (run by hand, tests/reference/README.md), the sharding
# workers turn on float64 and 8 devices for their own subprocesses, and the
# multi-process worker connects to the other processes of its job.
# _helpers.py holds models and comparisons the test modules import.
collect_ignore = [
    "reference", "_helpers.py", "_sharding_worker.py", "_sharding_nnx_worker.py", "_sharding_plus_worker.py",
    "_multiprocess_worker.py",
]
