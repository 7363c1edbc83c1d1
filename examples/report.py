"""Prints the Markdown tables of README.md and docs/EVIDENCE.md from the JSONs the examples wrote.

The README's numbers are not typed by hand: they are this script's output for
the JSONs under ``docs/`` (each JSON names the command that wrote it).

Usage::

  python examples/report.py            # reads docs/
  python examples/report.py out/digits # any folder with the examples' JSONs
"""

from __future__ import annotations

import json
import math
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


ADAN_LABELS = {"schedule_free_adan": "Schedule-Free Adan", "adan_cosine": "Adan + cosine",
               "schedule_free_adamw": "Schedule-Free AdamW"}


def _verdict(name: str) -> str:
  return "tie" if name == "tie" else f"**{ADAN_LABELS.get(name, name)}**"


def adan_table(results: dict) -> str:
  """Per task: chosen lr, test loss (and accuracy) mean ± std over seeds, and the verdicts."""
  lines = [f"`{results['command']}`", ""]
  for task, result in results["results"].items():
    optimizers = result["optimizers"]
    acc = "test_acc" in optimizers["adan_cosine"]
    lines += [f"{task} ({result['steps']} steps, {result['seeds']} seeds; lr grid"
              f" {', '.join(f'{lr:g}' for lr in result['lrs'])}, chosen on the mean validation"
              " loss at the end; test split, mean ± std)", "",
              "| optimizer | lr | test loss" + (" | test accuracy" if acc else "") + " |",
              "|---|---|---" + ("|---" if acc else "") + "|"]
    for name, label in ADAN_LABELS.items():
      r = optimizers[name]
      cells = [label, f"{r['chosen_lr']:g}", f"{r['test_loss']:.4f} ± {r['test_loss_std']:.4f}"]
      if acc:
        cells.append(f"{100 * r['test_acc']:.2f} ± {100 * r['test_acc_std']:.2f}%")
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for pair, by_metric in result["verdicts"].items():
      a, b = pair.split("_vs_")
      lines.append(f"- {ADAN_LABELS[a]} vs {ADAN_LABELS[b]}: better "
                   + ", ".join(f"{m.replace('test_', '')} {_verdict(v)}" for m, v in by_metric.items()))
    lines.append("")
  return "\n".join(lines)


def depth_table(results: dict) -> str:
  """Per parametrization and depth: the optimum of the mean over seeds and its loss."""
  config = results["config"]
  depths, names = config["depths"], config["parametrizations"]
  lines = [f"`{results['command']}` ({config['seeds']} seeds, {config['steps']} steps; lr grid"
           f" {', '.join(f'2^{round(math.log2(lr))}' for lr in config['lrs'])};"
           " validation loss in nats/char, mean ± std over seeds)", "",
           "| parametrization | " + " | ".join(f"{d} blocks" for d in depths)
           + " | optimum spans (octaves): mean, per seed |",
           "|---" * (len(depths) + 2) + "|"]
  for name in names:
    cells = []
    for d in depths:
      r = results["results"][name][str(d)]
      cells.append(f"2^{round(math.log2(r['best_lr']))}: {r['best_val_loss']:.3f}"
                   f" ± {r['best_val_loss_std']:.3f}")
    per_seed = results.get("optimum_span_octaves_per_seed", {}).get(name, [])
    cells.append(f"{results['optimum_span_octaves'][name]:g}; "
                 + ", ".join(f"{v:g}" for v in per_seed))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def lr_free_table(results: dict) -> str:
  config = results["config"]
  lines = [f"`{results['command']}` ({config['seeds']} seeds, {config['steps']} steps; test loss at"
           " the end, mean ± std)", "",
           "| task | Schedule-Free AdamW, tuned: lr (grid) | test loss | ScheduleFree+, untuned"
           " | test loss | better |", "|---|---|---|---|---|---|"]
  grids = {"digits": config["digits_lrs"], "char_lm": config["lm_lrs"]}
  for task, r in results["tasks"].items():
    better = {"tie": "tie", "schedule_free_adamw_tuned": "**Schedule-Free AdamW, tuned**",
              "schedule_free_plus": "**ScheduleFree+**"}[r["better"]]
    lines.append(f"| {task} | {r['adamw_chosen_lr']:g} ({grids[task]}) |"
                 f" {r['adamw']['test_loss_mean'][-1]:.4f} ± {r['adamw']['test_loss_std'][-1]:.4f} |"
                 f" lr 1.0 | {r['plus']['test_loss_mean'][-1]:.4f} ± {r['plus']['test_loss_std'][-1]:.4f}"
                 f" | {better} |")
  return "\n".join(lines) + "\n"


def batch_norm_table(results: dict) -> str:
  final = results["final"]
  steps = results["runs"][0]["rows"][-1]["step"]
  return (f"`{results['command']}` ({len(results['runs'])} seeds, test accuracy after {steps}"
          " steps, mean ± std)\n\n| api | y, stale | x, stale | x, recomputed | better at x |\n"
          "|---|---|---|---|---|\n"
          f"| {results['args']['api']} | "
          + " | ".join(f"{final[k]['mean']:.3f} ± {final[k]['std']:.3f}"
                       for k in ("acc_y_stale", "acc_x_stale", "acc_x_recomputed"))
          + f" | {results['better_at_x']} |\n")


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
    elif path.stem == "adan_comparison":
      print(f"## {path.name}\n\n{adan_table(results)}")
    elif path.stem == "depth_transfer":
      print(f"## {path.name}\n\n{depth_table(results)}")
    elif path.stem == "lr_free":
      print(f"## {path.name}\n\n{lr_free_table(results)}")
    elif path.stem.startswith("batch_norm_digits"):
      print(f"## {path.name}\n\n{batch_norm_table(results)}")
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
