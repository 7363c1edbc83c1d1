"""ScheduleFree+ at its default learning rate against Schedule-Free AdamW tuned on a grid.

ScheduleFree+ (``sf_optax.schedule_free_plus``) sets its own step size from the
loss (a Polyak rule): here it runs untouched, ``learning_rate=1.0`` and every
other argument at its default. Schedule-Free AdamW is given a learning-rate
grid and the rate with the lowest mean validation loss at the end is kept. Both
run the same steps, batches and seeds on two tasks:

* ``digits``: an MLP on scikit-learn's 8x8 digits (cross-entropy);
* ``char_lm``: a small character-level Transformer on the standard library's
  source (no download), cross-entropy in nats per character.

Both are evaluated at x (``sf_optax.eval_params``); the test split is used for
the reported numbers only. Each run is one jitted ``lax.scan``; the learning
rate and the seed are arguments, so each optimizer compiles once per task.

Usage::

  python examples/lr_free.py                # defaults: 5 seeds, about 10 CPU-minutes
  python examples/lr_free.py --seeds 10 --steps 600

Writes ``lr_free.png`` (test loss against steps, mean and spread over seeds)
and ``lr_free.json`` (every number) under ``--out``.
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

import sf_optax  # noqa: E402


def make_task(name: str, args):
  """(init(key) -> params, loss(params, batch), sample(key) -> batch, eval batches by split)."""
  if name == "digits":
    data = _common.load_digits_splits()
    model = _common.MLP(width=args.digits_width, mup=False)
    x_train, y_train = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    splits = {s: (jnp.asarray(data[f"x_{s}"]), jnp.asarray(data[f"y_{s}"])) for s in ("val", "test")}

    def sample(key):
      idx = jax.random.randint(key, (args.batch_size,), 0, x_train.shape[0])
      return x_train[idx], y_train[idx]

    example = x_train[:1]
  else:
    train, val = _common.char_splits(args.lm_chars)
    # The validation text is split in two halves: learning rates are chosen on
    # the first, the reported numbers come from the second.
    half = len(val) // 2
    model = _common.CharTransformer(width=args.lm_width, depth=2, heads=4, seq_len=args.seq_len,
                                    mup=False)
    splits = {
        s: tuple(jnp.asarray(a).reshape(-1, args.seq_len) for a in _common.fixed_char_batches(
            tokens, 4, args.batch_size, args.seq_len, seed=1))
        for s, tokens in (("val", val[:half]), ("test", val[half:]))
    }

    def sample(key):
      return _common.char_batch(key, train, args.batch_size, args.seq_len)

    example = jnp.zeros((1, args.seq_len), jnp.int32)

  def loss(params, batch):
    inputs, targets = batch
    logits = model.apply({"params": params}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  def init(key):
    return model.init(key, example)["params"]

  return init, loss, sample, splits


def make_optimizer(name: str, learning_rate, steps: int):
  if name == "plus":
    return sf_optax.schedule_free_plus()  # untuned: learning_rate=1.0, all defaults
  return sf_optax.schedule_free_adamw(learning_rate, warmup_steps=max(1, steps // 20))


def runner(task, name: str, steps: int, eval_every: int):
  """A jitted ``run(learning_rate, seed) -> {split_loss: (evals,)}`` for one optimizer."""
  init, loss, sample, splits = task

  def evaluate(params, state):
    x = sf_optax.eval_params(state, params)
    return {f"{split}_loss": loss(x, batch) for split, batch in splits.items()}

  @jax.jit
  def run(learning_rate, seed):
    tx = make_optimizer(name, learning_rate, steps)
    init_key, data_key = jax.random.split(jax.random.key(seed))
    params = init(init_key)

    def step(carry, key):
      params, state = carry
      value, grads = jax.value_and_grad(loss)(params, sample(key))
      updates, state = tx.update(grads, state, params, value=value)  # only plus reads value
      return (optax.apply_updates(params, updates), state), None

    def chunk(carry, keys):
      carry, _ = jax.lax.scan(step, carry, keys)
      return carry, evaluate(*carry)

    carry = (params, tx.init(params))
    keys = jax.random.split(data_key, steps).reshape(steps // eval_every, eval_every)
    start = evaluate(*carry)
    _, history = jax.lax.scan(chunk, carry, keys)
    return jax.tree.map(lambda a, h: jnp.concatenate([a[None], h]), start, history)

  return run


def parse_args(argv):
  parser = argparse.ArgumentParser(prog=os.path.basename(__file__), description=__doc__.split("\n\n")[0])
  _common.add_common_args(parser, "out/lr_free")
  parser.add_argument("--tasks", default="digits,char_lm", help="(default: %(default)s)")
  parser.add_argument("--seeds", type=int, default=5, help="seeds per run (default: %(default)s)")
  parser.add_argument("--steps", type=int, default=400, help="(default: %(default)s)")
  parser.add_argument("--eval-every", type=int, default=50, help="(default: %(default)s)")
  parser.add_argument("--digits-lrs", default="0.003,0.01,0.03,0.1",
                      help="Schedule-Free AdamW's grid on digits (default: %(default)s)")
  parser.add_argument("--lm-lrs", default="0.003,0.01,0.03,0.1",
                      help="Schedule-Free AdamW's grid on the LM (default: %(default)s)")
  parser.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
  parser.add_argument("--digits-width", type=int, default=128, help="(default: %(default)s)")
  parser.add_argument("--lm-width", type=int, default=64, help="(default: %(default)s)")
  parser.add_argument("--seq-len", type=int, default=64, help="(default: %(default)s)")
  parser.add_argument("--lm-chars", type=int, default=200_000, help="corpus size (default: %(default)s)")
  return parser.parse_args(argv)


def main(argv=None):
  record = _common.run_record(__file__, argv)
  args = parse_args(argv)
  if args.steps % args.eval_every:
    raise SystemExit("--steps must be a multiple of --eval-every")
  elapsed, cpu = _common.timer(), _common.cpu_timer()
  seeds = list(range(args.seeds))
  grids = {"digits": _common.parse_floats(args.digits_lrs),
           "char_lm": _common.parse_floats(args.lm_lrs)}
  results = dict(**record, config=vars(args), tasks={},
                 protocol=("Schedule-Free AdamW: the grid point with the lowest validation loss at the"
                           " end, averaged over the seeds; ScheduleFree+: its defaults; both read at x;"
                           " test loss mean ± std over the seeds (ddof=1); 'better' only where the gap"
                           " between the means exceeds the sum of the two std's"),
                 eval_steps=np.arange(args.steps // args.eval_every + 1) * args.eval_every)
  for name in args.tasks.split(","):
    task = make_task(name, args)
    tuned = runner(task, "adamw", args.steps, args.eval_every)
    plus = runner(task, "plus", args.steps, args.eval_every)
    grid = {lr: [jax.device_get(tuned(jnp.float32(lr), jnp.uint32(s))) for s in seeds]
            for lr in grids[name]}
    final_val = {lr: float(np.mean([r["val_loss"][-1] for r in runs])) for lr, runs in grid.items()}
    best = min(final_val, key=lambda lr: np.nan_to_num(final_val[lr], nan=np.inf))
    plus_runs = [jax.device_get(plus(jnp.float32(1.0), jnp.uint32(s))) for s in seeds]

    def summary(runs):
      test = np.stack([r["test_loss"] for r in runs])
      ddof = 1 if len(runs) > 1 else 0
      return dict(test_loss_mean=test.mean(0), test_loss_std=test.std(0, ddof=ddof),
                  final_test_loss=[float(t) for t in test[:, -1]])

    results["tasks"][name] = dict(
        adamw_grid_final_val_loss=final_val, adamw_chosen_lr=best,
        adamw=summary(grid[best]), plus=summary(plus_runs),
        adamw_per_lr={str(lr): summary(runs) for lr, runs in grid.items()},
    )
    r = results["tasks"][name]
    a, p = (float(r[k]["test_loss_mean"][-1]) for k in ("adamw", "plus"))
    sa, sp = (float(r[k]["test_loss_std"][-1]) for k in ("adamw", "plus"))
    r["better"] = "tie" if abs(a - p) <= sa + sp else ("schedule_free_adamw_tuned" if a < p
                                                       else "schedule_free_plus")
    print(f"{name}: Schedule-Free AdamW (lr {best:g} of {grids[name]}) test loss {a:.4f} ± {sa:.4f};"
          f" ScheduleFree+ (untuned) {p:.4f} ± {sp:.4f} ({len(seeds)} seeds, {args.steps} steps);"
          f" better: {r['better']}")
  results["seconds"] = elapsed()
  results["cpu_seconds"] = cpu()
  os.makedirs(args.out, exist_ok=True)
  _common.write_json(os.path.join(args.out, "lr_free.json"), results)
  plot(results, args.out)
  print(f"wrote {args.out}/lr_free.png, lr_free.json")
  print(_common.elapsed_line(elapsed, cpu, record))
  return results


def plot(results, out):
  plt = _common.pyplot()
  steps = np.asarray(results["eval_steps"])
  tasks = results["tasks"]
  fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
  for ax, (name, r) in zip(axes[0], tasks.items()):
    for key, label, color in (
        ("adamw", f"Schedule-Free AdamW, tuned lr {r['adamw_chosen_lr']:g}", "tab:blue"),
        ("plus", "ScheduleFree+, default lr (untuned)", "crimson")):
      mean = np.asarray(r[key]["test_loss_mean"], float)
      std = np.asarray(r[key]["test_loss_std"], float)
      ax.plot(steps[1:], mean[1:], color=color, label=label)
      ax.fill_between(steps[1:], (mean - std)[1:], (mean + std)[1:], color=color, alpha=0.2)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.set_ylabel("test loss at x")
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "lr_free.png"), dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
