"""Smoke test of examples/lr_free.py (ScheduleFree+ untuned vs tuned SF-AdamW), tiny settings."""

import importlib
import json
import pathlib
import sys

import pytest

pytestmark = pytest.mark.usefixtures("example_dependencies")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
def test_lr_free(tmp_path):
  if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
  lr_free = importlib.import_module("lr_free")
  out = tmp_path / "lr_free"
  results = lr_free.main([
      "--steps", "4", "--eval-every", "2", "--seeds", "2", "--digits-lrs", "0.003,0.01",
      "--lm-lrs", "0.01", "--digits-width", "8", "--lm-width", "16", "--seq-len", "8",
      "--batch-size", "4", "--lm-chars", "20000", "--out", str(out), "--no-progress"])
  assert {p.name for p in out.iterdir()} == {"lr_free.png", "lr_free.json"}
  saved = json.loads((out / "lr_free.json").read_text())
  assert set(saved["tasks"]) == {"digits", "char_lm"}
  digits = results["tasks"]["digits"]
  assert digits["adamw_chosen_lr"] in (0.003, 0.01)
  assert len(digits["plus"]["final_test_loss"]) == 2
  assert len(digits["plus"]["test_loss_mean"]) == 3  # steps 0, 2, 4
  assert digits["better"] in ("tie", "schedule_free_adamw_tuned", "schedule_free_plus")
  assert saved["command"].startswith("python examples/lr_free.py")
  assert "cpu_model" in saved["environment"]
