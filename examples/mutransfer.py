"""μTransfer: does the best learning rate stay put as the model gets wider?

For each model (an MLP on scikit-learn's digits, a character-level Transformer
on the standard library's source), each parametrization (standard = SP, μP
through ``mup_flax``) and each width, trains one model per learning rate on a
log2 grid and records the final loss. Under μP the optimum should stay (within a
grid step) where it is at the base width, and wider should be better; under SP
the optimum drifts as the width grows. The plot mirrors the μP paper's
(Tensor Programs V) Figure 1: loss against log2 learning rate, one curve per width.

SP and μP share everything else: at the base width (the smallest) the two MLPs
are the same model trained the same way. μP: ``mup_flax.MuP`` init,
``MuReadout``, per-parameter learning rates (``mup_flax.mu_adam``, or
``sf_optax.schedule_free_adamw`` with ``mup_flax.schedule_free_scales``) and,
for the Transformer, 1/d attention and zero-initialized queries.

**The base width.** μP makes the model at every width behave like the model at
the base width, scaled up: each width inherits the base model's balance of
per-layer learning rates and initialization scales. With a narrow base (the
smallest width, the default) the MLP's optimum stays put but its best loss does
not improve with width: every width is trained like the 64-wide model, whose
balance is not the best one for a wide model, while SP, retuned per width, ends
up lower. ``--mlp-wide-base`` (on by default) reruns the μP MLP sweep with the
widest model as the base: at that width μP equals SP, narrower models are the
scaled-down copies, and the loss improves with width again. The third panel row
shows the same runs at one fixed learning rate below every optimum
(``--fixed-log2-lr``): loss against width for SP, μP (narrow base) and μP (wide
base).

All learning rates (and seeds) of one width train at once (``jax.vmap``), the
steps fused with ``lax.scan``.

Usage::

  python examples/mutransfer.py --models mlp          # the MLP, narrow and wide base, 5 seeds
  python examples/mutransfer.py            # both models, Adam, 5 seeds (the Transformer dominates)
  python examples/mutransfer.py --optimizer schedule_free --models transformer
  python examples/mutransfer.py --help

Writes ``mutransfer.png`` and ``mutransfer.json`` under ``--out``
(``mutransfer_mlp.*`` or ``mutransfer_transformer.*`` for one model).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import mup_flax  # noqa: E402
import sf_optax  # noqa: E402


def make_optimizer(name: str, lr, infshapes, *, warmup: int):
  """Adam (constant after a linear warmup) or Schedule-Free AdamW; μP's when infshapes is given."""
  if name == "schedule_free":
    scales = mup_flax.schedule_free_scales(infshapes) if infshapes is not None else {}
    return sf_optax.schedule_free_adamw(lr, warmup_steps=warmup, **scales)
  schedule = lambda count: lr * jnp.minimum(1.0, (count + 1) / warmup)  # noqa: E731
  if infshapes is not None:
    return mup_flax.mu_adam(schedule, infshapes)
  return optax.adam(schedule)


class Task:
  """A model family, its data, and how a run is trained and scored."""

  name: str
  widths: list[int]
  metric: str

  def make(self, width: int, mup: bool):
    raise NotImplementedError

  def example(self):
    raise NotImplementedError

  def batch(self, key):
    raise NotImplementedError

  def score(self, apply, params):
    raise NotImplementedError


class DigitsMLP(Task):
  name = "mlp"
  metric = "training loss (full training split)"

  def __init__(self, args):
    self.widths = _common.parse_ints(args.mlp_widths)
    self.batch_size = args.mlp_batch_size
    self.steps = args.mlp_steps
    data = _common.load_digits_splits()
    self.x = jnp.asarray(data["x_train"].reshape(len(data["x_train"]), -1))
    self.y = jnp.asarray(data["y_train"])

  def make(self, width, mup):
    return _common.MLP(width, mup=mup)

  def example(self):
    return self.x[:1]

  def batch(self, key):
    idx = jax.random.randint(key, (self.batch_size,), 0, self.x.shape[0])
    return self.x[idx], self.y[idx]

  def score(self, apply, params):
    logits = apply(params, self.x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, self.y).mean()


class CharTransformer(Task):
  name = "transformer"
  metric = "validation loss (nats/char)"

  def __init__(self, args):
    self.widths = _common.parse_ints(args.transformer_widths)
    self.steps = args.transformer_steps
    self.batch_size = args.transformer_batch_size
    self.seq_len = args.seq_len
    self.depth = args.depth
    self.heads = args.heads
    train, val = _common.char_splits(args.corpus_chars)
    self.train = jnp.asarray(train)
    self.val_x, self.val_y = (jnp.asarray(a) for a in _common.fixed_char_batches(
        val, 4, 32, self.seq_len))

  def make(self, width, mup):
    return _common.CharTransformer(
        width=width, depth=self.depth, heads=self.heads, seq_len=self.seq_len, mup=mup,
        base_width=self.widths[0])

  def example(self):
    return jnp.zeros((1, self.seq_len), jnp.int32)

  def batch(self, key):
    return _common.char_batch(key, self.train, self.batch_size, self.seq_len)

  def score(self, apply, params):
    losses = jax.lax.map(
        lambda b: optax.softmax_cross_entropy_with_integer_labels(apply(params, b[0]), b[1]).mean(),
        (self.val_x, self.val_y))
    return losses.mean()


def sweep_width(task: Task, width: int, mup: bool, lrs, seeds, args, base: int):
  """Final scores, shape (len(lrs), len(seeds)), of every run at this width (μP base ``base``)."""
  make = lambda w: task.make(w, mup)  # noqa: E731
  inits = [_common.init_model(make, width, base, mup, jax.random.key(s), task.example())
           for s in seeds]
  apply, _, infshapes = inits[0]
  params = _common.stack_trees([p for _ in lrs for _, p, _ in inits])
  lr_flat = jnp.asarray([lr for lr in lrs for _ in seeds], jnp.float32)
  keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(1234), s))(
      jnp.asarray([s for _ in lrs for s in seeds], jnp.uint32))
  schedule_free = args.optimizer == "schedule_free"

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

  def train(params, lr, key):
    tx = make_optimizer(args.optimizer, lr, infshapes, warmup=args.warmup)

    def step(carry, _):
      params, opt_state, key = carry
      key, sub = jax.random.split(key)
      grads = jax.grad(loss_fn)(params, *task.batch(sub))
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state, key), None

    (params, opt_state, _), _ = jax.lax.scan(
        step, (params, tx.init(params), key), None, length=task.steps)
    if schedule_free:
      params = sf_optax.eval_params(opt_state, params)
    return task.score(apply, params)

  scores = jax.jit(jax.vmap(train))(params, lr_flat, keys)
  return np.asarray(scores, np.float64).reshape(len(lrs), len(seeds))


def summarize(losses: np.ndarray, lrs: list[float], widths: list[int]):
  """Per width: the best log2 lr (non-finite losses count as infinitely bad) and its loss."""
  mean = np.nan_to_num(losses.mean(-1), nan=np.inf, posinf=np.inf)  # (widths, lrs)
  best = mean.argmin(-1)
  log2 = np.log2(lrs)
  return dict(
      best_log2_lr={w: float(log2[i]) for w, i in zip(widths, best)},
      best_lr={w: float(lrs[i]) for w, i in zip(widths, best)},
      best_loss={w: float(mean[k, i]) for k, (w, i) in enumerate(zip(widths, best))},
      best_loss_std={w: float(losses[k, i].std(ddof=1)) if losses.shape[-1] > 1 else 0.0
                     for k, (w, i) in enumerate(zip(widths, best))},
      optimum_shift_in_grid_steps=int(best.max() - best.min()),
      optimum_drift_smallest_to_largest=int(best[-1] - best[0]),
      best_loss_improves_with_width=bool(np.all(np.diff([mean[k, i] for k, i in enumerate(best)]) < 0)),
  )


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog=os.path.basename(__file__),
      description="Learning-rate sweeps x widths, SP vs muP, on an MLP (digits) and a"
                  " character-level Transformer (standard-library source).")
  _common.add_common_args(parser, "out/mutransfer")
  parser.add_argument("--models", default="mlp,transformer", help="(default: %(default)s)")
  parser.add_argument("--optimizer", choices=("adam", "schedule_free"), default="adam",
                      help="Adam (mu_adam under muP) or Schedule-Free AdamW (default: %(default)s)")
  parser.add_argument("--seeds", type=int, default=5, help="seeds per point, averaged (default: %(default)s)")
  parser.add_argument("--warmup", type=int, default=20, help="linear warmup steps (default: %(default)s)")
  parser.add_argument("--mlp-widths", default="64,128,256,512,1024",
                      help="the first is muP's base width (default: %(default)s)")
  parser.add_argument("--no-mlp-wide-base", dest="mlp_wide_base", action="store_false",
                      help="skip the muP MLP sweep whose base width is the widest model")
  parser.add_argument("--fixed-log2-lr", type=float, default=-9,
                      help="the MLP's fixed learning rate for loss against width (default: %(default)s)")
  parser.add_argument("--mlp-log2-lrs", default="-12,-11,-10,-9,-8,-7,-6,-5,-4",
                      help="log2 learning rates; negative values need the = form, --flag=-8,-7 (default: %(default)s)")
  parser.add_argument("--mlp-steps", type=int, default=200, help="(default: %(default)s)")
  parser.add_argument("--mlp-batch-size", type=int, default=64, help="(default: %(default)s)")
  parser.add_argument("--transformer-widths", default="16,32,64,128,256",
                      help="the first is muP's base width (default: %(default)s)")
  parser.add_argument("--transformer-log2-lrs", default="-12,-11,-10,-9,-8,-7,-6,-5,-4",
                      help="log2 learning rates; negative values need the = form, --flag=-8,-7 (default: %(default)s)")
  parser.add_argument("--transformer-steps", type=int, default=200, help="(default: %(default)s)")
  parser.add_argument("--transformer-batch-size", type=int, default=8, help="(default: %(default)s)")
  parser.add_argument("--seq-len", type=int, default=32, help="(default: %(default)s)")
  parser.add_argument("--depth", type=int, default=1, help="(default: %(default)s)")
  parser.add_argument("--heads", type=int, default=4, help="(default: %(default)s)")
  parser.add_argument("--corpus-chars", type=int, default=400_000, help="(default: %(default)s)")
  return parser.parse_args(argv)


def main(argv=None):
  record = _common.run_record(__file__, argv)
  args = parse_args(argv)
  elapsed, cpu = _common.timer(), _common.cpu_timer()
  tasks = {"mlp": DigitsMLP, "transformer": CharTransformer}
  names = [m for m in args.models.split(",") if m]
  unknown = set(names) - set(tasks)
  if unknown:
    raise SystemExit(f"unknown --models {sorted(unknown)}; choose from {sorted(tasks)}")
  seeds = list(range(args.seeds))
  results = dict(**record, config=vars(args), models={})
  work = []
  for name in names:
    task = tasks[name](args)
    log2_lrs = _common.parse_floats(getattr(args, f"{name}_log2_lrs"))
    lrs = [2.0**k for k in log2_lrs]
    work.append((task, lrs))
  variants = {name: [("sp", False, None), ("mup", True, None)] for name in names}
  if "mlp" in variants and args.mlp_wide_base:
    variants["mlp"].append(("mup_wide_base", True, -1))
  total = sum(len(variants[t.name]) * len(t.widths) * len(lrs) * len(seeds) * t.steps
              for t, lrs in work)

  with _common.progress(total, "mutransfer (model-steps)", args.no_progress) as bar:
    for task, lrs in work:
      entry = dict(metric=task.metric, widths=task.widths, lrs=lrs, log2_lrs=list(np.log2(lrs)),
                   steps=task.steps)
      for param, mup, base_index in variants[task.name]:
        base = task.widths[0 if base_index is None else base_index]
        losses = []
        for width in task.widths:
          bar.set_postfix_str(f"{task.name} {param} width {width}")
          losses.append(sweep_width(task, width, mup, lrs, seeds, args, base))
          bar.update(len(lrs) * len(seeds) * task.steps)
        losses = np.stack(losses)  # (widths, lrs, seeds)
        entry[param] = dict(base_width=base if mup else None, losses=losses.mean(-1),
                            losses_std=losses.std(-1, ddof=1) if len(seeds) > 1 else 0 * losses[..., 0],
                            losses_per_seed=losses, **summarize(losses, lrs, task.widths))
      if task.name == "mlp":
        log2 = list(np.log2(lrs))
        if args.fixed_log2_lr not in log2:
          raise SystemExit(f"--fixed-log2-lr {args.fixed_log2_lr:g} is not on --mlp-log2-lrs")
        i = log2.index(args.fixed_log2_lr)
        entry["at_fixed_lr"] = dict(log2_lr=args.fixed_log2_lr, **{
            param: dict(mean=entry[param]["losses"][:, i], std=entry[param]["losses_std"][:, i])
            for param, _, _ in variants[task.name]})
      results["models"][task.name] = entry

  print(f"\noptimizer: {args.optimizer}; best learning rate per width (log2), its loss:")
  for name, entry in results["models"].items():
    print(f"\n{name} ({entry['metric']}, {entry['steps']} steps):")
    params = [p for p in ("sp", "mup", "mup_wide_base") if p in entry]
    print("  width | " + " | ".join(f"{p.upper():>16s}" for p in params))
    for w in entry["widths"]:
      cells = [f"2^{entry[p]['best_log2_lr'][w]:+5.1f}  {entry[p]['best_loss'][w]:.4f}"
               for p in params]
      print(f"  {w:5d} | " + " | ".join(f"{c:>16s}" for c in cells))
    if "at_fixed_lr" in entry:
      fixed = entry["at_fixed_lr"]
      print(f"  at log2 lr {fixed['log2_lr']:g}, loss mean ± std over seeds, per width:")
      for p in params:
        cells = ", ".join(f"{m:.4f} ± {s:.4f}" for m, s in zip(fixed[p]["mean"], fixed[p]["std"]))
        print(f"    {p.upper():13s}: {cells}")
    for p in params:
      e = entry[p]
      print(f"  {p.upper():3s}: optimum moves by {e['optimum_shift_in_grid_steps']} grid step(s)"
            f" (smallest -> largest width: {e['optimum_drift_smallest_to_largest']:+d}); best loss"
            f" {'improves' if e['best_loss_improves_with_width'] else 'does not always improve'}"
            " with width")

  results["seconds"] = elapsed()
  results["cpu_seconds"] = cpu()
  os.makedirs(args.out, exist_ok=True)
  # Both models: mutransfer.*; one: mutransfer_mlp.* or mutransfer_transformer.*
  stem = "mutransfer" if set(names) == set(tasks) else "mutransfer_" + "_".join(names)
  _common.write_json(os.path.join(args.out, f"{stem}.json"), results)
  plot(results, args.out, stem)
  print(f"\nwrote {args.out}/{stem}.png, {stem}.json")
  print(_common.elapsed_line(elapsed, cpu, record))
  return results


def plot(results, out, stem="mutransfer"):
  plt = _common.pyplot()
  models = results["models"]
  ncols = max(len([p for p in ("sp", "mup", "mup_wide_base") if p in e]) + ("at_fixed_lr" in e)
              for e in models.values())
  fig, axes = plt.subplots(len(models), ncols, figsize=(4.6 * ncols, 3.8 * len(models)),
                           squeeze=False)
  opt = results["config"]["optimizer"]
  titles = dict(sp="standard parametrization", mup="muP, base = narrowest",
                mup_wide_base="muP, base = widest")
  for row, (name, entry) in zip(axes, models.items()):
    params = [p for p in ("sp", "mup", "mup_wide_base") if p in entry]
    widths = entry["widths"]
    log2 = np.asarray(entry["log2_lrs"])
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, len(widths)))
    all_losses = np.concatenate([np.asarray(entry[p]["losses"], float).ravel() for p in params])
    finite = all_losses[np.isfinite(all_losses)]
    log_y = finite.max() / finite.min() > 30  # e.g. training losses going to ~0
    lo, hi = finite.min(), min(finite.max(), 3 * np.median(finite) - 2 * finite.min() + 0.5)
    for ax, param in zip(row, params):
      e = entry[param]
      losses = np.asarray(e["losses"], float)
      for k, (w, color) in enumerate(zip(widths, colors)):
        ax.plot(log2, losses[k], "o-", ms=3, color=color, label=f"width {w}")
        ax.plot([e["best_log2_lr"][w]], [e["best_loss"][w]], "*", ms=11, color=color, mec="black")
      if log_y:
        ax.set_yscale("log")
        ax.set_ylim(lo / 1.5, finite.max() * 1.5)
      else:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi)
      ax.set_xlabel("log2 learning rate")
      ax.set_ylabel(entry["metric"], fontsize=8)
      ax.set_title(f"{name}: {titles[param]} ({opt}); optimum moves"
                   f" {e['optimum_shift_in_grid_steps']} step(s)", fontsize=8)
      ax.grid(alpha=0.3)
    row[len(params) - 1].legend(fontsize=7)
    used = len(params)
    if "at_fixed_lr" in entry:
      ax = row[used]
      fixed = entry["at_fixed_lr"]
      for param, color in zip(params, ("tab:gray", "tab:blue", "tab:orange")):
        mean, std = np.asarray(fixed[param]["mean"], float), np.asarray(fixed[param]["std"], float)
        ax.errorbar(widths, mean, std, fmt="o-", color=color, capsize=3, label=titles[param])
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("width")
      ax.set_ylabel(entry["metric"], fontsize=8)
      ax.set_title(f"{name}: loss against width at lr 2^{fixed['log2_lr']:g}", fontsize=8)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
      used += 1
    for ax in row[used:]:
      ax.axis("off")
  fig.tight_layout()
  fig.savefig(os.path.join(out, f"{stem}.png"), dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  main()
