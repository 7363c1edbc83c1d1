"""Prints the Markdown tables of README.md and docs/EVIDENCE.md from the JSONs the examples wrote.

The README's numbers are not typed by hand: they are this script's output for
the JSONs under ``docs/`` (each JSON names the command that wrote it).

Usage::

  python examples/report.py            # reads docs/
  python examples/report.py out/digits # any folder with the examples' JSONs
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

PROTOCOLS = (
    ("cosine", "AdamW + cosine, lr per horizon"),
    ("schedule_free_per_horizon", "Schedule-Free, lr per horizon"),
    ("schedule_free_one_lr", "Schedule-Free, one lr for all horizons (one run)"),
)
VERDICT = dict(schedule_free="**Schedule-Free**", cosine="**cosine**", tie="tie")


def _pm(stats, scale=1.0, digits=4, unit=""):
  return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}{unit}"


def comparison_table(results: dict) -> str:
  """The digits / tabular table: test loss and accuracy, mean ± std over seeds, and the verdicts."""
  seeds = len(results["config"]["seeds"])
  lines = [
      f"`{results['command']}` ({seeds} seeds; test loss / accuracy, mean ± std; lr in brackets)",
      "",
      "| steps | " + " | ".join(label for _, label in PROTOCOLS)
      + " | better (loss, acc): per-horizon SF vs cosine | one-lr SF vs cosine |",
      "|---" * (len(PROTOCOLS) + 3) + "|",
  ]
  for row in results["table"]:
    cells = [f"({row[p]['lr']:g}) {_pm(row[p]['test_loss'])} / {_pm(row[p]['test_acc'], 100, 1, '%')}"
             for p, _ in PROTOCOLS]
    verdicts = [", ".join(VERDICT[row[f"{p}_vs_cosine"][k]] for k in ("test_loss", "test_acc"))
                for p in ("schedule_free_per_horizon", "schedule_free_one_lr")]
    lines.append(f"| {row['steps']} | " + " | ".join(cells + verdicts) + " |")
  return "\n".join(lines)


def mutransfer_table(results: dict) -> str:
  lines = [f"`{results['command']}` ({results['config']['seeds']} seeds)", ""]
  for name, entry in results["models"].items():
    params = [p for p in ("sp", "mup", "mup_wide_base") if p in entry]
    head = {"sp": "SP", "mup": f"μP, base {entry['mup']['base_width']}",
            "mup_wide_base": f"μP, base {entry.get('mup_wide_base', {}).get('base_width')}"}
    lines += [f"{name} ({entry['metric']}): best log2 lr and the mean loss there", "",
              "| width | " + " | ".join(head[p] for p in params) + " |",
              "|---" * (len(params) + 1) + "|"]
    for w in entry["widths"]:
      key = str(w)
      lines.append(f"| {w} | " + " | ".join(
          f"{entry[p]['best_log2_lr'][key]:g}: {entry[p]['best_loss'][key]:.4f}"
          f" ± {entry[p].get('best_loss_std', {}).get(key, float('nan')):.4f}" for p in params)
                   + " |")
    lines.append("| optimum moves (grid steps) | " + " | ".join(
        str(entry[p]["optimum_shift_in_grid_steps"]) for p in params) + " |")
    if "at_fixed_lr" in entry:
      fixed = entry["at_fixed_lr"]
      lines += ["", f"{name} at the fixed learning rate 2^{fixed['log2_lr']:g}: loss mean ± std",
                "", "| width | " + " | ".join(head[p] for p in params) + " |",
                "|---" * (len(params) + 1) + "|"]
      for k, w in enumerate(entry["widths"]):
        lines.append(f"| {w} | " + " | ".join(
            f"{fixed[p]['mean'][k]:.4f} ± {fixed[p]['std'][k]:.4f}" for p in params) + " |")
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  folder = pathlib.Path(argv[0] if argv else "docs")
  for path in sorted(folder.glob("*.json")):
    results = json.loads(path.read_text())
    if "command" not in results:
      print(f"## {path.name}: no command recorded\n")
      continue
    if "table" in results and "chosen_lrs" in results:
      print(f"## {path.name}\n\n{comparison_table(results)}\n")
    elif "models" in results and "mup" in next(iter(results["models"].values())):
      if "best_log2_lr" in next(iter(results["models"].values()))["mup"]:
        print(f"## {path.name}\n\n{mutransfer_table(results)}")
    else:
      print(f"## {path.name}\n\n`{results['command']}`"
            f" ({results.get('seconds', float('nan')):.0f} s wall)\n")
    env = results["environment"]
    print(f"{env.get('cpu_model')}, {env.get('cpu_count')} cores, load {env.get('load_average_1min_at_start')};"
          f" jax {env.get('jax')}, jaxlib {env.get('jaxlib')}, flax {env.get('flax')},"
          f" optax {env.get('optax')}; {results.get('seconds', float('nan')):.0f} s wall,"
          f" {results.get('cpu_seconds', float('nan')):.0f} s CPU\n")

  print(timing_table(folder))


def timing_table(folder: pathlib.Path) -> str:
  """Command, wall time, CPU time and load of every JSON that recorded its command."""
  lines = ["| command | wall | CPU | load average at the start |", "|---|---|---|---|"]
  for path in sorted(folder.glob("*.json")):
    results = json.loads(path.read_text())
    if "command" not in results:
      continue
    wall, cpu = results.get("seconds"), results.get("cpu_seconds")
    load = results["environment"].get("load_average_1min_at_start")
    lines.append(f"| `{results['command']}` | {wall:.0f} s | "
                 + (f"{cpu:.0f} s" if cpu is not None else "–") + f" | {load:.1f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
