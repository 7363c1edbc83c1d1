"""Coordinate checks: SP vs μP, for the digits MLP and the character-level Transformer.

``mup_flax.coord_check.get_coord_data`` trains each model at several widths for
a few Adam steps and records the mean absolute value (l1) of every submodule's
output; ``plot_coord_data`` draws l1 against width (log-log), one panel per
step. Under μP the curves are flat from the first update on; under the
standard parametrization (SP) some grow with width: at larger widths those
activations blow up, which is why SP's best learning rate shrinks with width.
The largest |slope| of log l1 against log width after init (t >= 2) is printed
(μP: near 0). The μP readouts start at zero here (``MuReadout(...,
readout_zero_init=True)``, the μP paper's recommendation), so they have no
t = 1 point; ``--random-readout-init`` starts them random instead.

Usage::

  python examples/coord_check.py           # defaults: about a minute on 2 CPU cores
  python examples/coord_check.py --help

Writes ``coord_check_mlp.png``, ``coord_check_transformer.png`` and
``coord_check.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mup_flax import coord_check  # noqa: E402


def models_for(make, widths, mup: bool):
  """{width: factory} for get_coord_data; μP models are wrapped with base width widths[0]."""
  if mup:
    return {w: (lambda w=w: _common.mup_model(lambda v: make(v, True), w, widths[0])) for w in widths}
  return {w: (lambda w=w: make(w, False)) for w in widths}


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog=os.path.basename(__file__),
      description="Coordinate checks (activation size vs width over a few Adam steps), SP vs"
                  " muP, for an MLP on digits and a character-level Transformer.")
  _common.add_common_args(parser, "out/coord_check")
  parser.add_argument("--models", default="mlp,transformer", help="(default: %(default)s)")
  parser.add_argument("--optimizer", default="adam", choices=("adam", "sgd", "schedule_free_adamw"),
                      help="(default: %(default)s)")
  parser.add_argument("--nsteps", type=int, default=4, help="recorded steps, t = 1 is init (default: %(default)s)")
  parser.add_argument("--nseeds", type=int, default=1, help="seeds averaged (default: %(default)s)")
  parser.add_argument("--mlp-widths", default="64,128,256,512,1024", help="(default: %(default)s)")
  parser.add_argument("--mlp-lr", type=float, default=0.01, help="(default: %(default)s)")
  parser.add_argument("--transformer-widths", default="32,64,128,256,512", help="(default: %(default)s)")
  parser.add_argument("--transformer-lr", type=float, default=0.01, help="(default: %(default)s)")
  parser.add_argument("--random-readout-init", action="store_true",
                      help="muP readouts start random (as in mutransfer.py and char_lm.py), not at"
                           " zero: their output then starts small and vanishes like"
                           " width**-0.5 at init, by design, until the updates dominate")
  parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
  parser.add_argument("--seq-len", type=int, default=32, help="(default: %(default)s)")
  return parser.parse_args(argv)


def main(argv=None):
  record = _common.run_record(__file__, argv)
  args = parse_args(argv)
  elapsed, cpu = _common.timer(), _common.cpu_timer()
  names = [m for m in args.models.split(",") if m]
  setups = {}
  zero = not args.random_readout_init
  if "mlp" in names:
    data = _common.load_digits_splits()
    x = jnp.asarray(data["x_train"][: args.batch_size].reshape(args.batch_size, -1))
    y = jnp.asarray(data["y_train"][: args.batch_size])
    setups["mlp"] = dict(
        make=lambda w, mup: _common.MLP(w, mup=mup, readout_zero_init=zero),
        widths=_common.parse_ints(args.mlp_widths), lr=args.mlp_lr, batches=[(x, y)])
  if "transformer" in names:
    train, _ = _common.char_splits()
    xs, ys = _common.fixed_char_batches(train, 1, max(1, args.batch_size // 8), args.seq_len)
    widths = _common.parse_ints(args.transformer_widths)
    setups["transformer"] = dict(
        make=lambda w, mup, base=widths[0]: _common.CharTransformer(
            width=w, depth=2, heads=4, seq_len=args.seq_len, mup=mup, base_width=base,
            readout_zero_init=zero),
        widths=widths, lr=args.transformer_lr,
        batches=[(jnp.asarray(xs[0]), jnp.asarray(ys[0]))])
  if not setups or set(names) - {"mlp", "transformer"}:
    raise SystemExit("--models: a comma-separated subset of mlp,transformer")

  results = dict(**record, config=vars(args), models={})
  total = sum(2 * len(s["widths"]) * args.nseeds for s in setups.values())
  os.makedirs(args.out, exist_ok=True)
  with _common.progress(total, "coord check (model inits)", args.no_progress) as bar:
    for name, setup in setups.items():
      entry = dict(widths=setup["widths"], lr=setup["lr"])
      for param in ("sp", "mup"):
        records = []
        for w, factory in models_for(setup["make"], setup["widths"], param == "mup").items():
          # One width at a time, for the progress bar; same as passing all widths at once.
          records += coord_check.get_coord_data(
              {w: factory}, setup["batches"], optimizer=args.optimizer, lr=setup["lr"],
              nsteps=args.nsteps, nseeds=args.nseeds, as_dataframe=False)
          bar.update(args.nseeds)
        slopes = coord_check.coord_slopes(records)
        after_init = {k: v for k, v in slopes.items() if k[1] >= 2 and np.isfinite(v)}
        worst = max(after_init, key=lambda k: abs(after_init[k]))
        entry[param] = dict(
            records=records,
            slopes={f"{m}@t={t}": s for (m, t), s in slopes.items()},
            max_abs_slope_after_init=abs(after_init[worst]),
            steepest_module_after_init=f"{worst[0]}@t={worst[1]}",
        )
      results["models"][name] = entry
      plot(name, entry, args, os.path.join(args.out, f"coord_check_{name}.png"))

  print(f"\nslope of log l1 vs log width, t >= 2 ({args.optimizer}; muP: flat is ~0):")
  print("  model       |  SP max |slope| (module)                  | muP max |slope| (module)")
  for name, entry in results["models"].items():
    cells = [f"{entry[p]['max_abs_slope_after_init']:5.2f} ({entry[p]['steepest_module_after_init']})"
             for p in ("sp", "mup")]
    print(f"  {name:11s} | {cells[0]:40s} | {cells[1]}")
  results["seconds"] = elapsed()
  summary = {n: {p: {k: e[p][k] for k in ("slopes", "max_abs_slope_after_init",
                                           "steepest_module_after_init")}
                 for p in ("sp", "mup")} | dict(widths=e["widths"], lr=e["lr"])
             for n, e in results["models"].items()}
  _common.write_json(os.path.join(args.out, "coord_check.json"),
                     dict(command=record["command"], environment=record["environment"],
                          config=results["config"],
                          models=summary, records={n: {p: e[p]["records"] for p in ("sp", "mup")}
                                                   for n, e in results["models"].items()},
                          seconds=results["seconds"], cpu_seconds=cpu()))
  print(f"wrote {args.out}/coord_check_*.png, coord_check.json")
  print(_common.elapsed_line(elapsed, cpu, record))
  return results


def plot(name, entry, args, path):
  plt = _common.pyplot()
  fig, axes = plt.subplots(2, args.nsteps, figsize=(3.0 * args.nsteps + 1.6, 6.2), squeeze=False,
                           sharey=True)
  for row, param in zip(axes, ("sp", "mup")):
    coord_check.plot_coord_data(entry[param]["records"], None, axes=row, legend=param == "mup")
    label = "SP" if param == "sp" else "muP"
    for ax in row:
      ax.set_title(f"{label}, {ax.get_title()}", fontsize=9)
  handles, labels = axes[1][-1].get_legend_handles_labels()
  if axes[1][-1].get_legend() is not None:
    axes[1][-1].get_legend().remove()
  fig.legend(handles, labels, loc="center right", fontsize=6.5, frameon=False)
  readout = "random" if args.random_readout_init else "zero"
  fig.suptitle(f"coordinate check, {name} ({args.optimizer}, lr {entry['lr']:g}, muP readout init:"
               f" {readout}): l1 of each module's output vs width", fontsize=10)
  right = 0.97 - 0.0065 * max((len(label) for label in labels), default=0)
  fig.tight_layout(rect=(0, 0, right, 0.96))
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
