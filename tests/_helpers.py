"""Models and comparisons shared by the test modules (``from _helpers import ...``).

Not a test module: tests/conftest.py lists it in ``collect_ignore``. pytest's
default import mode puts tests/ on ``sys.path`` (tests/ has no ``__init__.py``),
and the worker scripts run from tests/, so both import it as ``_helpers``.

The models keep the layer names, shapes and initializers their tests used
before they moved here, so every parity number is unchanged:

- ``MLP`` / ``MuMLP``: Linen, ``relu(Dense) -> relu(Dense) -> readout``, a
  ``Dense`` readout (``Dense_2``) or a ``mup_flax.MuReadout`` (``MuReadout_0``).
- ``NNXMLP``: NNX, ``inp -> hidden -> out`` with 5 inputs and 3 outputs.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import mup_flax

# ---------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------


class MLP(nn.Module):
  """Linen ``relu(Dense(width)) -> relu(Dense(width)) -> readout(out)``.

  The readout is ``mup_flax.MuReadout`` when ``mup`` (with ``output_mult`` and
  ``readout_zero_init``), else ``nn.Dense``; ``readout_name`` renames it (None:
  Flax's automatic name, ``MuReadout_0`` or ``Dense_2``).
  """

  width: int = 32
  out: int = 3
  mup: bool = False
  output_mult: float = 1.0
  readout_zero_init: bool = False
  readout_name: str | None = None

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.width)(x))
    x = nn.relu(nn.Dense(self.width)(x))
    if self.mup:
      return mup_flax.MuReadout(self.out, output_mult=self.output_mult,
                                readout_zero_init=self.readout_zero_init,
                                name=self.readout_name)(x)
    return nn.Dense(self.out, name=self.readout_name)(x)


class MuMLP(MLP):
  """``MLP`` with the μP readout ``mup_flax.MuReadout``."""

  mup: bool = True


class NNXMLP(nnx.Module):
  """NNX ``relu(inp) -> relu(hidden) -> out``: 5 inputs, ``width`` hidden units, 3 outputs.

  ``readout`` builds ``out`` (``nnx.Linear`` by default, e.g.
  ``mup_flax.nnx.MuReadout``) and also receives ``readout_kwargs``; ``dtype`` and
  ``kernel_init``, when given, go to every layer.
  """

  def __init__(self, width, rngs, readout=None, dtype=None, kernel_init=None,
               **readout_kwargs: Any):
    kw = dict(rngs=rngs)
    if dtype is not None:
      kw["param_dtype"] = dtype
    if kernel_init is not None:
      kw["kernel_init"] = kernel_init
    self.inp = nnx.Linear(5, width, **kw)
    self.hidden = nnx.Linear(width, width, **kw)
    self.out = (readout or nnx.Linear)(width, 3, **kw, **readout_kwargs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(nnx.relu(self.inp(x)))))


# ---------------------------------------------------------------------------
# Comparisons.
# ---------------------------------------------------------------------------


def relative_error(actual, reference, floor=0.0, float64=True):
  """``max |actual - reference| / max(max |reference|, floor)`` as a float.

  With ``float64`` (the parity tests), ``actual`` must be a float64 array;
  otherwise both are cast to float64 first. A zero scale gives the absolute
  error.
  """
  actual = np.asarray(actual)
  if float64:
    assert actual.dtype == np.float64, actual.dtype
  actual, reference = actual.astype(np.float64), np.asarray(reference, np.float64)
  scale = max(float(np.max(np.abs(reference))), floor)
  return float(np.max(np.abs(actual - reference)) / (scale if scale > 0 else 1.0))


def trajectory_relative_error(actual, reference):
  """Per step, max |actual - reference| over a leaf, over max |reference|.

  The scale is the largest magnitude of the reference over the whole
  trajectory of that leaf, so entries that pass near zero do not inflate it.
  ``actual`` must be float64 and of the reference's shape.
  """
  actual = np.asarray(actual)
  assert actual.shape == reference.shape, (actual.shape, reference.shape)
  assert actual.dtype == np.float64, actual.dtype
  difference = np.abs(actual - reference).reshape(len(reference), -1)
  return difference.max(axis=1) / np.abs(reference).max()


def assert_trees_close(actual, expected, rtol=0.0, atol=0.0):
  """Same tree structure, then leafwise ``np.testing.assert_allclose``."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(
      lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol),
      actual,
      expected,
  )


def assert_trees_equal(actual, expected):
  """Same tree structure, then leafwise ``np.testing.assert_array_equal`` (bitwise)."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


# ---------------------------------------------------------------------------
# Test data.
# ---------------------------------------------------------------------------


def normal(rng, shape, dtype=np.float32):
  """Standard normal values from a NumPy ``Generator``, as a JAX array.

  Where random values are only data: an eager ``jax.random`` call compiles once
  per shape, and at a module's import in every test process.
  """
  return jax.numpy.asarray(np.asarray(rng.standard_normal(shape), np.dtype(dtype)))


# ---------------------------------------------------------------------------
# Test tiers.
# ---------------------------------------------------------------------------


def default_tier(cases, keep, ids=str, unpack=False) -> list:
  """``cases`` as ``pytest.param``s: those named in ``keep`` run in the default tier.

  Every other case is marked ``slow``, so it runs in the slow tier
  (``-m slow``) instead. CI runs both tiers, so the whole matrix still runs
  there; the default tier keeps a representative of each test for a fast loop
  (see README's Tests section). ``ids(case)`` names a case (its pytest id);
  ``keep`` is a collection of those names, or ``all``. With ``unpack``, each
  case is a tuple of the values of several arguments (``"name,width"``).

  >>> [p.id for p in default_tier([1, 2, 3], keep={"2"}) if not p.marks]
  ['2']
  """
  params = []
  for case in cases:
    name = ids(case)
    fast = keep is all or name in keep
    values = case if unpack else (case,)
    params.append(pytest.param(*values, id=name, marks=() if fast else pytest.mark.slow))
  unknown = set() if keep is all else set(keep) - {p.id for p in params}
  if unknown:
    raise ValueError(f"default_tier: keep names no case: {sorted(unknown)}")
  return params


# ---------------------------------------------------------------------------
# Worker scripts with 8 virtual CPU devices (tests/_sharding*_worker.py).
# ---------------------------------------------------------------------------


def run_device_worker(worker, timeout_s: float = 900, cases=()) -> dict:
  """Runs a worker script (all its cases, or those named) in its own process with 8 virtual CPU devices.

  JAX fixes its device count at start-up, so the flag is never set in the test
  process. Returns ``{"results": {case: record}, "returncode": ..., "stderr":
  ...}`` from the JSON lines the worker prints (see :func:`run_worker_cases`).
  """
  import json
  import os
  import pathlib
  import subprocess
  import sys

  worker = pathlib.Path(worker)
  root = worker.parent.parent
  env = dict(os.environ)
  # The worker adds the flags it needs (long collective timeouts) to these.
  env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
  completed = subprocess.run(
      [sys.executable, str(worker), *cases], cwd=root, env=env, capture_output=True, text=True,
      timeout=timeout_s, check=False)
  results = {}
  for line in completed.stdout.splitlines():
    if line.startswith("{"):
      record = json.loads(line)
      results[record["case"]] = record
  return {"results": results, "returncode": completed.returncode,
          "stderr": completed.stderr[-4000:]}


def worker_case(worker_output: dict, name: str) -> dict:
  """The record of case ``name`` from :func:`run_device_worker`; fails the test if it failed."""
  import pytest

  record = worker_output["results"].get(name)
  if record is None:
    pytest.fail(f"the worker printed no result for {name!r} (exit code"
                f" {worker_output['returncode']}):\n{worker_output['stderr']}")
  assert record["ok"], f"{name} failed in the worker:\n{record.get('error')}"
  return record


def run_worker_cases(cases: dict, argv: list, n_devices: int) -> int:
  """A worker script's main: runs ``cases`` (all, or those named in ``argv``).

  Prints one JSON line per case (``case``, ``ok``, what the case returned or
  its traceback, ``seconds``) for :func:`run_device_worker`; returns the exit code.
  """
  import json
  import sys
  import time
  import traceback

  names = argv or list(cases)
  unknown = [n for n in names if n not in cases]
  if unknown:
    print(f"unknown cases {unknown}; known: {sorted(cases)}", file=sys.stderr)
    return 2
  assert jax.device_count() == n_devices, jax.devices()
  failed = 0
  for name in names:
    start = time.perf_counter()
    try:
      result = {"case": name, "ok": True, **(cases[name]() or {})}
    except Exception:  # noqa: BLE001 -- reported to the parent test
      failed += 1
      result = {"case": name, "ok": False, "error": traceback.format_exc(limit=8)}
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result), flush=True)
  return 1 if failed else 0
