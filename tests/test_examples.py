"""Smoke tests of the examples: their main() runs end to end with tiny settings (slow tier) and writes its files."""

import importlib
import json
import pathlib
import sys

import pytest

pytestmark = pytest.mark.usefixtures("example_dependencies")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
  if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
  return importlib.import_module(name)


def _run(name, tmp_path, *args):
  out = tmp_path / name
  results = _load(name).main([*args, "--out", str(out), "--no-progress"])
  return out, results


@pytest.mark.slow  # an end-to-end run of the example: CI runs it in the slow tier
def test_digits(tmp_path):
  out, results = _run(
      "digits", tmp_path, "--horizons", "10,20", "--lrs", "0.003,0.01", "--seeds", "2",
      "--eval-every", "10", "--warmup", "5", "--channels", "4", "--hidden", "8")
  assert {p.name for p in out.iterdir()} == {"digits.png", "digits_lr.png", "digits.json"}
  saved = json.loads((out / "digits.json").read_text())
  assert saved["command"].startswith("python examples/digits.py --horizons 10,20")
  assert {"jax", "jaxlib", "flax", "optax", "cpu_model", "cpu_count"} <= set(saved["environment"])
  assert [row["steps"] for row in saved["table"]] == [10, 20]
  for protocol in ("cosine", "schedule_free_per_horizon", "schedule_free_one_lr"):
    assert set(saved["chosen_lrs"][protocol].values()) <= {0.003, 0.01}
    assert len(saved["table"][-1][protocol]["test_loss"]["per_seed"]) == 2
  # "One lr" reads the run chosen at the longest horizon at every horizon.
  assert len(set(saved["chosen_lrs"]["schedule_free_one_lr"].values())) == 1
  assert saved["chosen_lrs"]["schedule_free_one_lr"]["20"] == saved["chosen_lrs"]["schedule_free_per_horizon"]["20"]
  assert saved["table"][-1]["schedule_free_one_lr_vs_cosine"]["test_loss"] in ("schedule_free", "cosine", "tie")
  assert 0.0 <= results["table"][-1]["schedule_free_one_lr"]["test_acc"]["mean"] <= 1.0


def test_digits_verdict():
  digits = _load("digits")
  a, b = dict(mean=1.0, std=0.1), dict(mean=1.3, std=0.1)
  assert digits.verdict(a, b, True, ("a", "b")) == "a"
  assert digits.verdict(a, b, False, ("a", "b")) == "b"
  assert digits.verdict(a, dict(mean=1.15, std=0.1), True, ("a", "b")) == "tie"


def test_digits_warmup_cosine_is_optax_schedule():
  import numpy as np
  import optax

  digits = _load("digits")
  reference = optax.warmup_cosine_decay_schedule(0.0, 0.5, 10, 100, 0.0)
  counts = np.arange(0, 120, 7)
  np.testing.assert_allclose(
      [float(digits.warmup_cosine(c, 0.5, 10, 100.0)) for c in counts],
      [float(reference(c)) for c in counts], rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # an end-to-end run of the example: CI runs it in the slow tier
def test_char_lm(tmp_path, capsys):
  out, results = _run(
      "char_lm", tmp_path, "--width", "16", "--base-width", "8", "--depth", "1", "--heads", "2",
      "--seq-len", "16", "--batch-size", "4", "--steps", "4", "--eval-every", "2",
      "--eval-batches", "1", "--sample-chars", "8", "--corpus-chars", "20000", "--warmup", "2")
  assert {p.name for p in out.iterdir()} == {"char_lm.png", "char_lm.json"}
  assert results["history"]["step"] == [0, 2, 4]
  assert results["sample"].startswith("def ") and len(results["sample"]) == 4 + 8
  assert "final validation loss" in capsys.readouterr().out


@pytest.mark.slow  # an end-to-end run of the example: CI runs it in the slow tier
def test_mutransfer(tmp_path):
  out, results = _run(
      "mutransfer", tmp_path, "--mlp-widths", "8,16", "--mlp-log2-lrs=-8,-6", "--fixed-log2-lr=-8",
      "--mlp-steps", "3", "--transformer-widths", "8,16", "--transformer-log2-lrs=-8,-6",
      "--transformer-steps", "3", "--seq-len", "8", "--heads", "2", "--corpus-chars", "20000",
      "--warmup", "2")
  assert {p.name for p in out.iterdir()} == {"mutransfer.png", "mutransfer.json"}
  for name in ("mlp", "transformer"):
    entry = results["models"][name]
    for param in ("sp", "mup"):
      assert set(entry[param]["best_log2_lr"]) == {8, 16}
      assert entry[param]["losses"].shape == (2, 2)


@pytest.mark.slow  # an end-to-end run of the example: CI runs it in the slow tier
def test_mutransfer_at_base_width_sp_equals_mup(tmp_path):
  # The MLPs coincide at the base width: same init, same optimizer.
  _, results = _run(
      "mutransfer", tmp_path, "--models", "mlp", "--mlp-widths", "8,16",
      "--mlp-log2-lrs=-6", "--fixed-log2-lr=-6", "--mlp-steps", "3", "--warmup", "2")
  entry = results["models"]["mlp"]
  assert entry["sp"]["losses"][0, 0] == pytest.approx(entry["mup"]["losses"][0, 0], rel=1e-5)
  # With the widest model as the base, μP equals SP at the widest width instead.
  assert entry["sp"]["losses"][1, 0] == pytest.approx(entry["mup_wide_base"]["losses"][1, 0], rel=1e-5)
  assert entry["mup_wide_base"]["base_width"] == 16


@pytest.mark.slow  # an end-to-end run of the example: CI runs it in the slow tier
def test_coord_check(tmp_path):
  out, results = _run(
      "coord_check", tmp_path, "--mlp-widths", "8,16", "--transformer-widths", "8,16",
      "--nsteps", "2", "--nseeds", "1", "--seq-len", "8", "--batch-size", "8")
  assert {p.name for p in out.iterdir()} == {
      "coord_check_mlp.png", "coord_check_transformer.png", "coord_check.json"}
  assert set(results["models"]) == {"mlp", "transformer"}
