"""Shared test configuration: strict numerics and a float64 switch."""

import jax
import pytest

# Implicit rank promotion hides shape bugs (a (n,) bias added to a (n, 1) column).
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
  """Runs a test in float64 (parity tests against the float64 references)."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture(autouse=True)
def _float64_does_not_leak(request):
  """A test that turns on float64 must turn it off: later tests and doctests assume float32."""
  yield
  if jax.config.jax_enable_x64 and "x64" not in request.fixturenames:
    jax.config.update("jax_enable_x64", False)
    pytest.fail(f"{request.node.nodeid} left jax_enable_x64 on")


# Never imported by the test process: the fixture generators import torch and the
# PyTorch references (run by hand, tests/reference/README.md), and the sharding
# workers turn on float64 and 8 devices for their own subprocesses.
collect_ignore = ["reference", "_sharding_worker.py", "_sharding_nnx_worker.py"]
