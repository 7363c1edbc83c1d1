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
