"""The evidence examples at reduced size: stable selection, and Linen == NNX.

``examples/digits.py`` chooses learning rates on the validation loss averaged
over seeds; run twice with disjoint seeds (different inits and batch orders) the
choice must not move. ``--api nnx`` must reproduce ``--api linen`` (same initial
arrays, same batches) to float32 rounding, for digits and for the μP character
Transformer. A minute or more each on 2 cores: slow tier.
"""

import importlib
import sys
import pathlib

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("example_dependencies")]

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

# Reduced digits: a factor-4 learning-rate grid, short horizons, 5 seeds.
SMALL_DIGITS = ("--horizons", "50,150", "--lrs", "0.001,0.004,0.016,0.064", "--seeds", "5",
                "--eval-every", "25", "--warmup", "10", "--channels", "8", "--hidden", "32")


def _main(name, tmp_path, *args):
  if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
  return importlib.import_module(name).main(
      [*args, "--out", str(tmp_path / name), "--no-progress"])


def test_digits_selection_is_stable_across_seeds(tmp_path):
  first = _main("digits", tmp_path / "a", *SMALL_DIGITS, "--first-seed", "0")
  second = _main("digits", tmp_path / "b", *SMALL_DIGITS, "--first-seed", "100")
  assert first["chosen_lrs"] == second["chosen_lrs"]


def test_digits_nnx_equals_linen(tmp_path):
  args = ("--horizons", "20,40", "--lrs", "0.004,0.016", "--seeds", "2", "--eval-every", "10",
          "--warmup", "5", "--channels", "4", "--hidden", "16")
  linen = _main("digits", tmp_path / "linen", *args, "--api", "linen")
  nnx = _main("digits", tmp_path / "nnx", *args, "--api", "nnx")
  assert linen["chosen_lrs"] == nnx["chosen_lrs"]
  for key in ("test_loss", "test_acc"):
    np.testing.assert_allclose(nnx["schedule_free"]["curves_per_lr"][key],
                               linen["schedule_free"]["curves_per_lr"][key], rtol=1e-4, atol=1e-5)
  for row_linen, row_nnx in zip(linen["table"], nnx["table"]):
    np.testing.assert_allclose(row_nnx["cosine"]["test_loss"]["per_seed"],
                               row_linen["cosine"]["test_loss"]["per_seed"], rtol=1e-4)


def test_tabular_nnx_equals_linen(tmp_path):
  args = ("--dataset", "wine", "--horizons", "25,50", "--lrs", "0.004,0.016", "--seeds", "2")
  linen = _main("digits", tmp_path / "linen", *args, "--api", "linen")
  nnx = _main("digits", tmp_path / "nnx", *args, "--api", "nnx")
  np.testing.assert_allclose(nnx["schedule_free"]["curves_per_lr"]["test_loss"],
                             linen["schedule_free"]["curves_per_lr"]["test_loss"], rtol=1e-4)


@pytest.mark.parametrize("sp", [False, True], ids=["mup", "sp"])
def test_char_lm_nnx_equals_linen(tmp_path, sp):
  args = ["--width", "32", "--base-width", "16", "--depth", "2", "--heads", "2", "--seq-len", "16",
          "--batch-size", "8", "--steps", "40", "--eval-every", "10", "--eval-batches", "2",
          "--sample-chars", "8", "--corpus-chars", "50000", "--warmup", "5"] + (["--sp"] if sp else [])
  linen = _main("char_lm", tmp_path / "linen", *args, "--api", "linen")
  nnx = _main("char_lm", tmp_path / "nnx", *args, "--api", "nnx")
  np.testing.assert_allclose(nnx["history"]["val_loss"], linen["history"]["val_loss"], rtol=1e-4)
  np.testing.assert_allclose(nnx["history"]["train_loss"][1:], linen["history"]["train_loss"][1:],
                             rtol=1e-4)
