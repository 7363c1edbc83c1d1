"""Smoke tests for the examples of issues 6 and 7, with tiny settings.

Each runs its example as a script in a fresh process (the sharded one needs 8
virtual devices set before JAX starts): a minute or more on 2 cores, so they are
marked slow (``python -m pytest -m slow``). The library pieces they exercise
have their own fast tests.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("example_dependencies")]

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _run(script, tmp_path, *args, env=None):
  out = tmp_path / script
  result = subprocess.run(
      [sys.executable, str(EXAMPLES / f"{script}.py"), *args, "--out", str(out), "--no-progress"],
      capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
  )
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  assert any(out.iterdir()), f"{script} wrote nothing under {out}"
  return result.stdout


def test_adan_comparison(tmp_path):
  _run("adan_comparison", tmp_path, "--digits-steps", "4", "--lm-steps", "4", "--eval-every", "2",
       "--digits-lrs", "0.01", "--lm-lrs", "0.01", "--width", "8", "--depth", "1",
       "--seq-len", "8", "--lm-batch-size", "2", "--eval-batches", "1", "--warmup", "2",
       "--digits-batch-size", "4", "--digits-seeds", "2", "--lm-seeds", "2")
  result = json.loads((tmp_path / "adan_comparison" / "adan_comparison.json").read_text())
  digits = result["results"]["digits"]
  assert digits["seeds"] == 2 and len(digits["optimizers"]["adan_cosine"]["test_loss_seeds"]) == 2
  assert set(digits["verdicts"]["schedule_free_adan_vs_adan_cosine"]) == {"test_loss", "test_acc"}
  assert result["command"].startswith("python examples/adan_comparison.py")


def test_depth_transfer(tmp_path):
  _run("depth_transfer", tmp_path, "--depths", "1,2", "--base-depth", "1", "--lrs", "0.001,0.01",
       "--steps", "4", "--warmup", "2", "--width", "8", "--heads", "2", "--seq-len", "8",
       "--batch-size", "2", "--val-batches", "1", "--seeds", "2")
  result = json.loads((tmp_path / "depth_transfer" / "depth_transfer.json").read_text())
  run = result["results"]["standard"]["2"]
  assert len(run["val_loss_seeds"]) == 2 and len(run["val_loss_seeds"][0]) == 2  # (lrs, seeds)
  assert len(run["best_lr_per_seed"]) == 2


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_batch_norm_digits(tmp_path, api):
  _run("batch_norm_digits", tmp_path, "--api", api, "--epochs", "1", "--num-batches", "2",
       "--seeds", "2")
  result = json.loads((tmp_path / "batch_norm_digits" / f"batch_norm_digits_{api}.json").read_text())
  assert [run["seed"] for run in result["runs"]] == [0, 1]
  assert len(result["final"]["acc_x_recomputed"]["seeds"]) == 2


def test_sharded_training(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  stdout = _run("sharded_training", tmp_path, "--width", "16", "--depth", "1", "--heads", "2",
                "--seq-len", "8", "--batch-size", "8", "--steps", "3", "--eval-every", "3",
                "--warmup", "1", "--base-width", "8", "--compare-single-device", env=env)
  assert stdout


def test_sharded_training_two_processes(tmp_path):
  """The documented one-command multi-process run: 2 processes x 4 devices on loopback."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # each process gets 4 of the 8 virtual devices
  checkpoint = tmp_path / "ckpt"
  _run("sharded_training", tmp_path, "--num-processes", "2", "--width", "16", "--depth", "1",
       "--heads", "2", "--seq-len", "8", "--batch-size", "8", "--steps", "3",
       "--eval-every", "3", "--warmup", "1", "--base-width", "8", "--checkpoint",
       str(checkpoint), env=env)
  result = json.loads((tmp_path / "sharded_training" / "sharded_training.json").read_text())
  assert (result["processes"], result["devices"]) == (2, 8)
  assert sorted(os.listdir(checkpoint)) == ["3"]
  assert "sf_optax_manifest.json" in os.listdir(checkpoint / "3")  # committed
