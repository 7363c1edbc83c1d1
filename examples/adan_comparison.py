"""Schedule-Free Adan vs Adan + cosine vs Schedule-Free AdamW, on two small tasks.

* digits: the CNN of ``digits.py`` on scikit-learn's digits (train / val / test).
* char LM: the char-level Transformer of ``depth_transfer.py`` on the standard
  library's source (the held-out tail is split into a val half and a test half).

Each optimizer picks its learning rate on a log2 grid by the validation loss
at the end, averaged over the seeds (5 by default); the tables report the test
split, mean ± std over the seeds, and "A better than B" only where the gap
between the means exceeds the sum of the two standard deviations. Adan + cosine is the published
Adan (Xie et al., 2022; the official code's update with ``no_prox=True``,
i.e. decoupled weight decay) under warmup + cosine decay to zero at the last
step. It is written out below rather than taken from ``optax.adan``, whose
``scale_by_adan`` weights the gradient difference by ``1 - b2`` where the paper
and the official code use ``b2`` (0.08 instead of 0.92 at the default).
Schedule-Free runs are evaluated at x (``sf_optax.eval_params``); their curves
are valid at every step, the cosine curve only at its end.

Usage::

  python examples/adan_comparison.py          # defaults: 5 seeds, about 20 CPU-minutes
  python examples/adan_comparison.py --help

Writes ``adan_comparison.png`` and ``adan_comparison.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from depth_transfer import CharTransformer  # noqa: E402
from digits import CNN  # noqa: E402

import sf_optax  # noqa: E402

NAMES = ("schedule_free_adan", "adan_cosine", "schedule_free_adamw")
LABELS = {"schedule_free_adan": "Schedule-Free Adan", "adan_cosine": "Adan + cosine",
          "schedule_free_adamw": "Schedule-Free AdamW"}
COLORS = {"schedule_free_adan": "crimson", "adan_cosine": "tab:blue",
          "schedule_free_adamw": "tab:green"}


class PublishedAdanState(NamedTuple):
  count: jax.Array
  m: Any
  v: Any
  n: Any
  previous_gradient: Any


def published_adan(learning_rate, *, b1=0.98, b2=0.92, b3=0.99, eps=1e-8, weight_decay=0.0):
  """Adan as in the paper's Algorithm 1 and the official code (decays, no_prox=True)."""

  def init_fn(params):
    zeros = optax.tree.zeros_like(params)
    return PublishedAdanState(jnp.zeros([], jnp.int32), zeros, zeros, zeros, zeros)

  def update_fn(grads, state, params):
    t = state.count + 1
    first = state.count == 0
    diff = jax.tree.map(lambda g, p: jnp.where(first, 0.0, g - p), grads, state.previous_gradient)
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, grads)
    v = jax.tree.map(lambda v, d: b2 * v + (1 - b2) * d, state.v, diff)
    n = jax.tree.map(lambda n, g, d: b3 * n + (1 - b3) * (g + b2 * d) ** 2, state.n, grads, diff)
    lr = learning_rate(state.count)

    def step(m, v, n, p):
      direction = (m / (1 - b1**t) + b2 * v / (1 - b2**t)) / (jnp.sqrt(n / (1 - b3**t)) + eps)
      return -lr * (direction + weight_decay * p)

    updates = jax.tree.map(step, m, v, n, params)
    return updates, PublishedAdanState(optax.safe_increment(state.count), m, v, n, grads)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(name, lr, *, steps, warmup, weight_decay):
  if name == "schedule_free_adan":
    return sf_optax.schedule_free_adan(lr, b1=0.9, b2=0.92, b3=0.99, warmup_steps=warmup,
                                       weight_decay=weight_decay)
  if name == "schedule_free_adamw":
    return sf_optax.schedule_free_adamw(lr, b1=0.9, b2=0.999, warmup_steps=warmup,
                                        weight_decay=weight_decay)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, steps, end_value=0.0)
  return published_adan(lambda count: lr * schedule(count), weight_decay=weight_decay)


class Task(NamedTuple):
  """A model, how to draw a training batch, and the fixed evaluation sets."""

  name: str
  model: Any
  example_input: Any
  sample: Any  # key -> (inputs, targets)
  splits: dict  # {"val": (inputs, targets), "test": (inputs, targets)}, batched on axis 0
  classification: bool


def cross_entropy(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def digits_task(args):
  data = _common.load_digits_splits()
  x_train, y_train = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])

  def sample(key):
    idx = jax.random.randint(key, (args.digits_batch_size,), 0, x_train.shape[0])
    return x_train[idx], y_train[idx]

  splits = {s: (jnp.asarray(data[f"x_{s}"])[None], jnp.asarray(data[f"y_{s}"])[None])
            for s in ("val", "test")}
  return Task("digits", CNN(), x_train[:1], sample, splits, True)


def char_task(args):
  train_tokens, held_out = _common.char_splits()
  half = len(held_out) // 2
  train_tokens = jnp.asarray(train_tokens)

  def sample(key):
    return _common.char_batch(key, train_tokens, args.lm_batch_size, args.seq_len)

  splits = {}
  for i, (split, tokens) in enumerate((("val", held_out[:half]), ("test", held_out[half:]))):
    x, y = _common.fixed_char_batches(tokens, args.eval_batches, args.lm_batch_size, args.seq_len,
                                      seed=i)
    splits[split] = (jnp.asarray(x), jnp.asarray(y))
  model = CharTransformer(width=args.width, depth=args.depth, heads=4, max_length=args.seq_len)
  return Task("char_lm", model, jnp.zeros((1, args.seq_len), jnp.int32), sample, splits, False)


def train(task, name, lrs, seeds, *, steps, eval_every, warmup, weight_decay, bar):
  """Curves of shape (evals, lrs, seeds) for val/test loss (and accuracy for digits)."""
  model = task.model
  schedule_free = name != "adan_cosine"

  def tx_for(lr):
    return make_optimizer(name, lr, steps=steps, warmup=warmup, weight_decay=weight_decay)

  def evaluate(params):
    out = {}
    for split, (xs, ys) in task.splits.items():
      logits = jax.lax.map(lambda xy: model.apply({"params": params}, xy[0]), (xs, ys))
      out[f"{split}_loss"] = cross_entropy(logits, ys)
      if task.classification:
        out[f"{split}_acc"] = (jnp.argmax(logits, -1) == ys).mean()
    return out

  def eval_point(carry):
    params, state, _ = carry
    return sf_optax.eval_params(state, params) if schedule_free else params

  def init(lr, seed):
    init_key, data_key = jax.random.split(jax.random.key(seed))
    params = model.init(init_key, task.example_input)["params"]
    return params, tx_for(lr).init(params), data_key

  def chunk(carry, lr):
    tx = tx_for(lr)

    def step(carry, _):
      params, state, key = carry
      key, sub = jax.random.split(key)
      inputs, targets = task.sample(sub)
      grads = jax.grad(lambda p: cross_entropy(model.apply({"params": p}, inputs), targets))(params)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state, key), None

    carry, _ = jax.lax.scan(step, carry, None, length=eval_every)
    return carry, evaluate(eval_point(carry))

  init, chunk = jax.jit(init), jax.jit(chunk, donate_argnums=0)
  evaluate_carry = jax.jit(lambda carry: evaluate(eval_point(carry)))
  runs = []
  for lr in lrs:
    for seed in seeds:
      lr_arr = jnp.asarray(lr, jnp.float32)
      carry = init(lr_arr, seed)
      history = [evaluate_carry(carry)]
      for _ in range(steps // eval_every):
        carry, metrics = chunk(carry, lr_arr)
        history.append(metrics)
        bar.update(eval_every)
      runs.append({k: np.stack([np.asarray(h[k]) for h in history]) for k in history[0]})
  return {k: np.stack([r[k] for r in runs], -1).reshape(-1, len(lrs), len(seeds)) for k in runs[0]}


def compare(task, lrs, seeds, args, steps, bar):
  results = {}
  for name in NAMES:
    curves = train(task, name, lrs, seeds, steps=steps, eval_every=args.eval_every,
                   warmup=args.warmup, weight_decay=args.weight_decay, bar=bar)
    final_val = np.nan_to_num(curves["val_loss"][-1].mean(-1), nan=np.inf)
    pick = int(np.argmin(final_val))
    ddof = 1 if len(seeds) > 1 else 0
    results[name] = dict(
        chosen_lr=lrs[pick],
        val_loss_at_end_per_lr=curves["val_loss"][-1].mean(-1),
        val_loss_at_end_per_lr_std=curves["val_loss"][-1].std(-1, ddof=ddof),
        curves={k: v[:, pick].mean(-1) for k, v in curves.items()},
        curves_std={k: v[:, pick].std(-1, ddof=ddof) for k, v in curves.items()},
        test_loss_seeds=curves["test_loss"][-1, pick],
    )
    results[name]["test_loss"] = float(results[name]["curves"]["test_loss"][-1])
    results[name]["test_loss_std"] = float(results[name]["curves_std"]["test_loss"][-1])
    if task.classification:
      results[name]["test_acc_seeds"] = curves["test_acc"][-1, pick]
      results[name]["test_acc"] = float(results[name]["curves"]["test_acc"][-1])
      results[name]["test_acc_std"] = float(results[name]["curves_std"]["test_acc"][-1])
  verdicts = {}
  for a, b in (("schedule_free_adan", "adan_cosine"), ("schedule_free_adan", "schedule_free_adamw"),
               ("schedule_free_adamw", "adan_cosine")):
    verdicts[f"{a}_vs_{b}"] = {
        metric: verdict(results[a][metric], results[a][f"{metric}_std"], a,
                        results[b][metric], results[b][f"{metric}_std"], b,
                        lower_is_better=metric.endswith("loss"))
        for metric in ("test_loss", "test_acc") if metric in results[a]}
  results["verdicts"] = verdicts
  return results


def verdict(mean_a, std_a, name_a, mean_b, std_b, name_b, *, lower_is_better):
  """``name_a``/``name_b`` where the gap between the means exceeds the sum of the std's, else "tie"."""
  if abs(mean_a - mean_b) <= std_a + std_b:
    return "tie"
  return name_a if (mean_a < mean_b) == lower_is_better else name_b


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description="Schedule-Free Adan vs Adan + cosine vs Schedule-Free AdamW on the digits CNN"
                  " and a char-level Transformer; learning rates chosen on validation splits.")
  _common.add_common_args(parser, "out/adan_comparison")
  parser.add_argument("--tasks", default="digits,char_lm", help="(default: %(default)s)")
  parser.add_argument("--digits-steps", type=int, default=150, help="(default: %(default)s)")
  parser.add_argument("--digits-lrs", default="0.008,0.016,0.032",
                      help="(default: %(default)s)")
  parser.add_argument("--digits-seeds", type=int, default=5, help="(default: %(default)s)")
  parser.add_argument("--digits-batch-size", type=int, default=32, help="(default: %(default)s)")
  parser.add_argument("--lm-steps", type=int, default=400, help="(default: %(default)s)")
  parser.add_argument("--lm-lrs", default="0.016,0.032,0.064",
                      help="(default: %(default)s)")
  parser.add_argument("--lm-seeds", type=int, default=5, help="(default: %(default)s)")
  parser.add_argument("--lm-batch-size", type=int, default=16, help="(default: %(default)s)")
  parser.add_argument("--seq-len", type=int, default=64, help="(default: %(default)s)")
  parser.add_argument("--width", type=int, default=64, help="Transformer width (default: %(default)s)")
  parser.add_argument("--depth", type=int, default=2, help="Transformer blocks (default: %(default)s)")
  parser.add_argument("--eval-batches", type=int, default=8, help="LM eval batches per split (default: %(default)s)")
  parser.add_argument("--warmup", type=int, default=30, help="every optimizer (default: %(default)s)")
  parser.add_argument("--weight-decay", type=float, default=1e-4, help="decoupled, every optimizer (default: %(default)s)")
  parser.add_argument("--eval-every", type=int, default=50, help="(default: %(default)s)")
  return parser.parse_args(argv)


def main(argv=None):
  record = _common.run_record(__file__, argv)
  args = parse_args(argv)
  elapsed, cpu = _common.timer(), _common.cpu_timer()
  tasks = [t for t in args.tasks.split(",") if t]
  plan = {"digits": (digits_task, args.digits_steps, args.digits_lrs, args.digits_seeds),
          "char_lm": (char_task, args.lm_steps, args.lm_lrs, args.lm_seeds)}
  for t in tasks:
    if t not in plan:
      raise SystemExit(f"--tasks: unknown {t!r}; choose from {list(plan)}")
    if plan[t][1] % args.eval_every:
      raise SystemExit(f"{t} steps must be a multiple of --eval-every")
  total = sum(plan[t][1] * len(_common.parse_floats(plan[t][2])) * plan[t][3] * len(NAMES)
              for t in tasks)
  results = {}
  with _common.progress(total, "adan comparison (steps)", args.no_progress) as bar:
    for t in tasks:
      make, steps, lrs, seeds = plan[t]
      lrs = _common.parse_floats(lrs)
      optimizers = compare(make(args), lrs, list(range(seeds)), args, steps, bar)
      results[t] = dict(steps=steps, lrs=lrs, seeds=seeds, verdicts=optimizers.pop("verdicts"),
                        optimizers=optimizers)

  print()
  for t in tasks:
    print(f"{t}: {results[t]['steps']} steps, {results[t]['seeds']} seeds; lr chosen by the mean"
          " val loss at the end; test split, mean ± std over seeds")
    for name in NAMES:
      r = results[t]["optimizers"][name]
      acc = (f", acc {100 * r['test_acc']:.2f} ± {100 * r['test_acc_std']:.2f}%"
             if "test_acc" in r else "")
      print(f"  {LABELS[name]:20s} lr {r['chosen_lr']:<7g} test loss"
            f" {r['test_loss']:.4f} ± {r['test_loss_std']:.4f}{acc}")
    for pair, by_metric in results[t]["verdicts"].items():
      print(f"  better ({pair}): " + ", ".join(f"{m} {v}" for m, v in by_metric.items()))
  summary = dict(**record, config=vars(args), results=results,
                 eval_every=args.eval_every, seconds=elapsed(), cpu_seconds=cpu())
  os.makedirs(args.out, exist_ok=True)
  _common.write_json(os.path.join(args.out, "adan_comparison.json"), summary)
  plot(summary, args.out)
  print(f"wrote {args.out}/adan_comparison.png, adan_comparison.json")
  print(_common.elapsed_line(elapsed, cpu, record))
  return summary


def plot(summary, out):
  plt = _common.pyplot()
  tasks = list(summary["results"])
  fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7.5), squeeze=False)
  for column, t in enumerate(tasks):
    result = summary["results"][t]
    steps = np.arange(result["steps"] // summary["eval_every"] + 1) * summary["eval_every"]
    ax = axes[0][column]
    for name in NAMES:
      r = result["optimizers"][name]
      y = np.asarray(r["curves"]["test_loss"], float)
      std = np.asarray(r["curves_std"]["test_loss"], float)
      style = dict(ls="--", lw=1.3) if name == "adan_cosine" else dict(lw=2)
      ax.plot(steps[1:], y[1:], color=COLORS[name], label=f"{LABELS[name]} (lr {r['chosen_lr']:g})",
              **style)
      ax.fill_between(steps[1:], (y - std)[1:], (y + std)[1:], color=COLORS[name], alpha=0.15)
      if name == "adan_cosine":
        ax.plot(steps[-1:], y[-1:], "o", color=COLORS[name], ms=7, mec="black")
    if "test_acc" in result["optimizers"][NAMES[0]]["curves"]:
      ax.set_yscale("log")  # digits: the loss spans a decade
    ax.set_xlabel("step")
    ax.set_ylabel("test loss")
    ax.set_title(f"{t}: test loss, mean ± std over {result['seeds']} seeds\n"
                 "(Schedule-Free at x; cosine valid at its end, dot)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1][column]
    for name in NAMES:
      r = result["optimizers"][name]
      ax.plot(result["lrs"], np.asarray(r["val_loss_at_end_per_lr"], float), "o-",
              color=COLORS[name], label=LABELS[name])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation loss at step {result['steps']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "adan_comparison.png"), dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
