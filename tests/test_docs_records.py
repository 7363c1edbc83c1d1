"""Every JSON under docs/ names the command that wrote it and the machine it ran on.

The numbers in README.md and docs/ are read from these JSONs (``examples/report.py``);
a JSON without its command and environment cannot be reproduced or judged, so it
does not belong under docs/. Reads files only: fast.
"""

import json
import pathlib

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
JSONS = sorted(DOCS.glob("*.json"))
ENVIRONMENT_KEYS = ("jax", "jaxlib", "flax", "optax", "cpu_model", "cpu_count")


def test_docs_has_jsons():
  assert JSONS, f"no JSON under {DOCS}"


@pytest.mark.parametrize("path", JSONS, ids=[p.name for p in JSONS])
def test_json_records_command_and_environment(path):
  record = json.loads(path.read_text())
  command = record.get("command", "")
  assert command.startswith("python examples/"), f"{path.name}: command {command!r}"
  environment = record.get("environment", {})
  missing = [k for k in ENVIRONMENT_KEYS if not environment.get(k)]
  assert not missing, f"{path.name}: environment lacks {missing}"
