"""Schedule-Free AdamW vs AdamW + warmup-cosine: a small CNN on scikit-learn's digits.

A cosine schedule needs its horizon in advance: to know how good the model is
after T steps one trains a separate run with horizon T. Schedule-Free AdamW has
no horizon: one run, evaluated at its averaged point x
(``sf_optax.eval_params``) every few steps, gives the whole curve.

Both optimizers choose their learning rate on the same grid by the loss on a
validation split (cosine: separately for every horizon, at its end; Schedule-Free:
once, at the end of the longest horizon, and that single run is then read at
every horizon). The test split is used for nothing but the reported numbers.
Training images are shifted at random by up to one pixel (``--no-augment`` turns
it off). Training steps run five at a time in one jitted, unrolled
``lax.scan``, compiled once per optimizer (the learning rate and the horizon are
arguments).

Usage::

  python examples/digits.py                 # defaults: about 2-3 minutes on 2 CPU cores
  python examples/digits.py --help

Writes ``digits.png`` (test loss and accuracy against steps), ``digits_lr.png``
(validation loss against learning rate) and ``digits.json`` (every number)
under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import sf_optax  # noqa: E402


class CNN(nn.Module):
  """Two 3x3 convolutions, 2x2 average pooling, a hidden dense layer, the readout."""

  channels: int = 32
  hidden: int = 128
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.channels, (3, 3))(x))
    x = nn.relu(nn.Conv(self.channels, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


def warmup_cosine(count, peak, warmup: int, horizon):
  """optax.warmup_cosine_decay_schedule(0, peak, warmup, horizon, 0), traceable in peak and horizon."""
  count = jnp.asarray(count, jnp.float32)
  frac = jnp.clip((count - warmup) / jnp.maximum(horizon - warmup, 1), 0.0, 1.0)
  return jnp.where(count < warmup, peak * count / warmup, peak * 0.5 * (1 + jnp.cos(jnp.pi * frac)))


def make_optimizer(name: str, lr, horizon, *, warmup: int, weight_decay: float):
  """The optimizer of run ``name`` at learning rate ``lr`` (both may be traced)."""
  if name == "schedule_free":
    del horizon  # there is none
    return sf_optax.schedule_free_adamw(
        lr, b1=0.9, b2=0.999, warmup_steps=warmup, weight_decay=weight_decay
    )
  return optax.adamw(
      lambda count: warmup_cosine(count, lr, warmup, horizon),
      b1=0.9, b2=0.999, weight_decay=weight_decay,
  )


def random_shift(key, images, pad: int = 1):
  """Translates each image by up to ``pad`` pixels (zero padding), a standard augmentation."""
  n, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(key, (n, 2), 0, 2 * pad + 1)
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c))  # noqa: E731
  return jax.vmap(crop)(padded, offsets)


UNROLL = 5  # training steps per jitted call


class Trainer:
  """Jitted init / train-chunk / evaluate for one optimizer, compiled once.

  The learning rate and the cosine horizon are traced arguments, so every run of
  a grid reuses the same compiled code. Evaluation (at ``eval_params`` for
  Schedule-Free, at the params otherwise) is on the validation and test splits.
  """

  def __init__(self, model, data, name, *, eval_every, batch_size, warmup, weight_decay,
               augment=False):
    x_train, y_train = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    splits = {s: (jnp.asarray(data[f"x_{s}"]), jnp.asarray(data[f"y_{s}"])) for s in ("val", "test")}
    n_train = x_train.shape[0]
    tx_for = functools.partial(make_optimizer, name, warmup=warmup, weight_decay=weight_decay)
    self.eval_every = eval_every

    def loss_fn(params, x, y):
      logits = model.apply({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def evaluate(carry):
      params, opt_state, _ = carry
      if name == "schedule_free":
        params = sf_optax.eval_params(opt_state, params)
      out = {}
      for split, (x, y) in splits.items():
        logits = model.apply({"params": params}, x)
        out[f"{split}_loss"] = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        out[f"{split}_acc"] = (jnp.argmax(logits, -1) == y).mean()
      return out

    def init(lr, horizon, seed):
      init_key, data_key = jax.random.split(jax.random.key(seed))
      params = model.init(init_key, x_train[:1])["params"]
      return params, tx_for(lr, horizon).init(params), data_key

    def steps(carry, lr, horizon):
      tx = tx_for(lr, horizon)

      def step(carry, _):
        params, opt_state, key = carry
        key, sub, shift_key = jax.random.split(key, 3)
        idx = jax.random.randint(sub, (batch_size,), 0, n_train)
        x = random_shift(shift_key, x_train[idx]) if augment else x_train[idx]
        grads = jax.grad(loss_fn)(params, x, y_train[idx])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), None

      # Unrolled: XLA's CPU convolutions run ~15x slower inside a while loop.
      return jax.lax.scan(step, carry, None, length=UNROLL, unroll=True)[0]

    self.init = jax.jit(init)
    self.steps = jax.jit(steps, donate_argnums=0)
    self.evaluate = jax.jit(evaluate)

  def run(self, lr: float, seed: int, steps: int, bar=None):
    """One run of ``steps`` steps; returns {metric: array (steps // eval_every + 1,)}."""
    assert steps % self.eval_every == 0 and self.eval_every % UNROLL == 0
    lr, horizon = jnp.float32(lr), jnp.float32(steps)
    carry = self.init(lr, horizon, jnp.uint32(seed))
    history = [self.evaluate(carry)]
    for _ in range(steps // self.eval_every):
      for _ in range(self.eval_every // UNROLL):
        carry = self.steps(carry, lr, horizon)
      history.append(self.evaluate(carry))
      if bar is not None:
        bar.update(self.eval_every)
    return {k: np.stack([np.asarray(h[k]) for h in history]) for k in history[0]}

  def grid(self, lrs, seeds, steps: int, bar=None):
    """Every (lr, seed) run; returns {metric: array (evals, len(lrs), len(seeds))}."""
    runs = [self.run(lr, seed, steps, bar) for lr in lrs for seed in seeds]
    return {
        k: np.stack([r[k] for r in runs], axis=-1).reshape(-1, len(lrs), len(seeds))
        for k in runs[0]
    }


def select(curves, at: int):
  """Index of the learning rate with the lowest mean validation loss at eval ``at``.

  Non-finite losses (diverged runs) count as infinitely bad.
  """
  val = np.nan_to_num(curves["val_loss"][at].mean(-1), nan=np.inf, posinf=np.inf)
  return int(np.argmin(val))


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog=os.path.basename(__file__),
      description=(
          "Schedule-Free AdamW (one run, any stopping time) vs AdamW + warmup-cosine (one"
          " run per horizon) on scikit-learn's digits with a small CNN; learning rates"
          " chosen on a validation split."
      )
  )
  _common.add_common_args(parser, "out/digits")
  parser.add_argument("--horizons", default="100,300,900",
                      help="cosine horizons in steps; Schedule-Free runs to the largest (default: %(default)s)")
  parser.add_argument("--lrs", default="0.004,0.008,0.016,0.032,0.064",
                      help="learning-rate grid shared by both optimizers (default: %(default)s)")
  parser.add_argument("--seeds", type=int, default=2, help="seeds per learning rate, averaged (default: %(default)s)")
  parser.add_argument("--no-augment", action="store_true",
                      help="train without random 1-pixel shifts of the images")
  parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
  parser.add_argument("--warmup", type=int, default=25, help="linear warmup steps, both optimizers (default: %(default)s)")
  parser.add_argument("--weight-decay", type=float, default=1e-4, help="decoupled, both optimizers (default: %(default)s)")
  parser.add_argument("--eval-every", type=int, default=25, help="(default: %(default)s)")
  parser.add_argument("--channels", type=int, default=32, help="CNN channels (default: %(default)s)")
  parser.add_argument("--hidden", type=int, default=128, help="CNN hidden units (default: %(default)s)")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  elapsed = _common.timer()
  horizons = sorted(_common.parse_ints(args.horizons))
  lrs = _common.parse_floats(args.lrs)
  seeds = list(range(args.seeds))
  for h in horizons:
    if h % args.eval_every or args.eval_every % UNROLL:
      raise SystemExit(f"--horizons must be multiples of --eval-every, itself of {UNROLL}")
  data = _common.load_digits_splits()
  model = CNN(channels=args.channels, hidden=args.hidden)
  trainers = {
      name: Trainer(model, data, name, eval_every=args.eval_every, batch_size=args.batch_size,
                    warmup=args.warmup, weight_decay=args.weight_decay,
                    augment=not args.no_augment)
      for name in ("schedule_free", "cosine")
  }
  total = (sum(horizons) + horizons[-1]) * len(lrs) * len(seeds)
  print(f"digits: train {len(data['y_train'])}, val {len(data['y_val'])}, test {len(data['y_test'])};"
        f" lrs {lrs}, seeds {len(seeds)}, horizons {horizons}")

  with _common.progress(total, "digits (example-steps)", args.no_progress) as bar:
    sf = trainers["schedule_free"].grid(lrs, seeds, horizons[-1], bar)
    cosine = {h: trainers["cosine"].grid(lrs, seeds, h, bar) for h in horizons}

  steps_axis = np.arange(horizons[-1] // args.eval_every + 1) * args.eval_every
  sf_pick = select(sf, -1)
  cos_pick = {h: select(cosine[h], -1) for h in horizons}
  mean = lambda curves, k, i: curves[k][:, i].mean(-1)  # noqa: E731

  table = []
  for h in horizons:
    at = h // args.eval_every
    c, i = cosine[h], cos_pick[h]
    table.append(dict(
        steps=h,
        cosine_lr=lrs[i],
        cosine_test_loss=float(mean(c, "test_loss", i)[-1]),
        cosine_test_acc=float(mean(c, "test_acc", i)[-1]),
        schedule_free_lr=lrs[sf_pick],
        schedule_free_test_loss=float(mean(sf, "test_loss", sf_pick)[at]),
        schedule_free_test_acc=float(mean(sf, "test_acc", sf_pick)[at]),
    ))

  print(f"\nSchedule-Free AdamW: one run of {horizons[-1]} steps, lr {lrs[sf_pick]:g} (by val loss at the end)")
  print("  steps | cosine lr | cosine test loss / acc | Schedule-Free test loss / acc (same run)")
  for row in table:
    print(f"  {row['steps']:5d} | {row['cosine_lr']:9.4g} | {row['cosine_test_loss']:.4f} / {100 * row['cosine_test_acc']:.2f}%"
          f"       | {row['schedule_free_test_loss']:.4f} / {100 * row['schedule_free_test_acc']:.2f}%")

  os.makedirs(args.out, exist_ok=True)
  results = dict(
      config=vars(args) | dict(horizons=horizons, lrs=lrs),
      environment=_common.environment(),
      data_sizes={k: int(len(v)) for k, v in data.items() if k.startswith("y_")},
      table=table,
      eval_steps=steps_axis,
      schedule_free=dict(
          chosen_lr=lrs[sf_pick],
          val_loss_at_end_per_lr=sf["val_loss"][-1].mean(-1),
          curves={k: mean(sf, k, sf_pick) for k in sf},
      ),
      cosine={
          str(h): dict(
              chosen_lr=lrs[cos_pick[h]],
              val_loss_at_end_per_lr=cosine[h]["val_loss"][-1].mean(-1),
              curves={k: mean(cosine[h], k, cos_pick[h]) for k in cosine[h]},
          )
          for h in horizons
      },
      seconds=elapsed(),
  )
  _common.write_json(os.path.join(args.out, "digits.json"), results)
  plot(results, args.out)
  print(f"wrote {args.out}/digits.png, digits_lr.png, digits.json ({elapsed():.0f} s)")
  return results


def plot(results, out):
  plt = _common.pyplot()
  steps = np.asarray(results["eval_steps"])
  horizons = results["config"]["horizons"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  colors = plt.cm.viridis(np.linspace(0.15, 0.85, len(horizons)))
  sf = results["schedule_free"]
  for ax, key, label in ((axes[0], "test_loss", "test loss"), (axes[1], "test_acc", "test accuracy")):
    y = np.asarray(sf["curves"][key], float)
    ax.plot(steps[1:], y[1:], color="crimson", lw=2.2,
            label=f"Schedule-Free AdamW, one run (lr {sf['chosen_lr']:g})")
    for h, color in zip(horizons, colors):
      run = results["cosine"][str(h)]
      n = h // (steps[1] - steps[0]) + 1
      yc = np.asarray(run["curves"][key], float)[:n]
      ax.plot(steps[1:n], yc[1:], color=color, lw=1.3, ls="--",
              label=f"AdamW + cosine, horizon {h} (lr {run['chosen_lr']:g})")
      ax.plot([h], [yc[-1]], "o", color=color, ms=7, mec="black")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_yscale("log")
  lo = min(np.nanmin(np.asarray(results["cosine"][str(h)]["curves"]["test_acc"], float)[-1]) for h in horizons)
  axes[1].set_ylim(max(0.8, lo - 0.05), 1.0)
  axes[0].legend(fontsize=7.5)
  fig.suptitle("digits CNN: Schedule-Free gives every stopping time from one run;"
               " cosine needs one run per horizon (dots: end of each cosine run)", fontsize=9.5)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "digits.png"), dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5.5, 4))
  lrs = results["config"]["lrs"]
  ax.plot(lrs, np.asarray(sf["val_loss_at_end_per_lr"], float), "o-", color="crimson",
          label=f"Schedule-Free, step {horizons[-1]}")
  for h, color in zip(horizons, colors):
    ax.plot(lrs, np.asarray(results["cosine"][str(h)]["val_loss_at_end_per_lr"], float), "s--",
            color=color, label=f"cosine, horizon {h}")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("peak learning rate")
  ax.set_ylabel("validation loss at the end")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "digits_lr.png"), dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
