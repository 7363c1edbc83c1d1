"""Schedule-Free AdamW vs AdamW + warmup-cosine, over seeds, with the protocol stated.

A cosine schedule needs its horizon in advance: to know how good the model is
after T steps one trains a separate run with horizon T. Schedule-Free AdamW has
no horizon: one run, evaluated at its averaged point x
(``sf_optax.eval_params``) every few steps, gives the whole curve.

Protocol (the same for both optimizers, on the same learning-rate grid):

- Every (learning rate, seed) pair is one run; a seed fixes the init and the
  order of the minibatches. The learning rate is chosen by the validation loss
  **averaged over the seeds**, never on one run.
- **Cosine**: one run per horizon, its learning rate chosen per horizon at the end
  of that run.
- **Schedule-Free, lr per horizon**: the runs to the longest horizon, read at step
  T; the learning rate chosen per horizon T on the validation loss at step T.
- **Schedule-Free, one lr**: the learning rate chosen once, at the longest horizon,
  and that single run read at every horizon ("one run gives every stopping time").
- The test split is used for nothing but the reported numbers: mean and standard
  deviation over the seeds at the chosen learning rate. "A beats B" only where the
  gap between the means exceeds the sum of the two standard deviations; otherwise
  the verdict is "tie".

``--dataset digits`` (default): a small CNN on scikit-learn's 8x8 digits, images
shifted at random by up to one pixel. ``--dataset breast_cancer`` or ``wine``: an
MLP on a small tabular data set where overfitting dominates. ``--api nnx`` trains
the same model written with ``flax.nnx`` (initialized from the same arrays, the
same batches): the numbers agree with ``--api linen`` to float32 rounding.

The seeds of one learning rate train together (``jax.vmap``; for the CNN one
after the other, which is faster on CPU); the steps run five
at a time in one jitted, unrolled ``lax.scan``, compiled once per optimizer (the
learning rate and the horizon are traced arguments).

Usage::

  python examples/digits.py                       # 5 seeds: under 2 minutes on 2 idle CPU cores
  python examples/digits.py --full                # wider CNN, 10 seeds: about 6x longer
  python examples/digits.py --dataset breast_cancer
  python examples/digits.py --api nnx
  python examples/digits.py --help

Writes ``<dataset>.png`` (test loss and accuracy against steps),
``<dataset>_lr.png`` (validation loss against learning rate) and
``<dataset>.json`` (every number, the command and the environment) under ``--out``.
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
from flax import nnx  # noqa: E402

import sf_optax  # noqa: E402


class CNN(nn.Module):
  """Two 3x3 convolutions, 2x2 average pooling, a hidden dense layer, the readout."""

  channels: int = 16
  hidden: int = 64
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.channels, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(self.channels, (3, 3), name="conv2")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    return nn.Dense(self.num_classes, name="readout")(x)


class NNXCNN(nnx.Module):
  """:class:`CNN` in ``flax.nnx``: the same layers under the same names."""

  def __init__(self, channels: int, hidden: int, num_classes: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, channels, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
    self.hidden = nnx.Linear(16 * channels, hidden, rngs=rngs)
    self.readout = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    x = nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))
    return self.readout(x)


class NNXMLP(nnx.Module):
  """``_common.MLP(width, mup=False)`` in ``flax.nnx``: the same layers under the same names."""

  def __init__(self, in_features: int, width: int, num_classes: int, *, rngs: nnx.Rngs):
    self.input = nnx.Linear(in_features, width, rngs=rngs)
    self.hidden = nnx.Linear(width, width, rngs=rngs)
    self.readout = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.input(x.reshape(x.shape[0], -1)))
    return self.readout(nnx.relu(self.hidden(x)))


def build_model(args, data):
  """``(init_params(key), apply(params, x))`` of the run's model in the chosen API.

  Both APIs draw the initial params from the same Linen initializers (the NNX model
  receives them), so ``--api linen`` and ``--api nnx`` start from identical arrays.
  """
  example = jnp.asarray(data["x_train"][:1])
  num_classes = data["num_classes"]
  if args.dataset == "digits":
    linen = CNN(channels=args.channels, hidden=args.hidden, num_classes=num_classes)
    make_nnx = lambda rngs: NNXCNN(args.channels, args.hidden, num_classes, rngs=rngs)  # noqa: E731
  else:
    linen = _common.MLP(args.hidden, num_classes=num_classes, mup=False)
    make_nnx = lambda rngs: NNXMLP(example.shape[-1], args.hidden, num_classes, rngs=rngs)  # noqa: E731

  def init_params(key):
    return linen.init(key, example)["params"]

  if args.api == "linen":
    return init_params, lambda params, x: linen.apply({"params": params}, x)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make_nnx(nnx.Rngs(0))))
  expected = jax.tree.structure(nnx.to_pure_dict(state))
  got = jax.tree.structure(jax.eval_shape(init_params, jax.random.key(0)))
  if expected != got:
    raise ValueError(f"the NNX model's params {expected} differ from the Linen model's {got}")
  # The functional NNX API: a pure dict of params in, the module rebuilt inside jit.
  return init_params, lambda params, x: nnx.merge(graphdef, params)(x)


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
  """Jitted init / train-chunk / evaluate for one optimizer, all seeds at once, compiled once.

  The learning rate and the cosine horizon are traced arguments, so every run of
  a grid reuses the same compiled code. Evaluation (at ``eval_params`` for
  Schedule-Free, at the params otherwise) is on the validation and test splits.
  """

  def __init__(self, init_params, apply, data, name, *, eval_every, batch_size, warmup,
               weight_decay, augment=False, seeds_per_call=1):
    x_train, y_train = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
    splits = {s: (jnp.asarray(data[f"x_{s}"]), jnp.asarray(data[f"y_{s}"])) for s in ("val", "test")}
    n_train = x_train.shape[0]
    tx_for = functools.partial(make_optimizer, name, warmup=warmup, weight_decay=weight_decay)
    self.eval_every = eval_every
    self.seeds_per_call = seeds_per_call

    def loss_fn(params, x, y):
      return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()

    def evaluate_one(carry):
      params, opt_state, _ = carry
      if name == "schedule_free":
        params = sf_optax.eval_params(opt_state, params)
      out = {}
      for split, (x, y) in splits.items():
        logits = apply(params, x)
        out[f"{split}_loss"] = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        out[f"{split}_acc"] = (jnp.argmax(logits, -1) == y).mean()
      return out

    def init_one(seed, lr, horizon):
      init_key, data_key = jax.random.split(jax.random.key(seed))
      params = init_params(init_key)
      return params, tx_for(lr, horizon).init(params), data_key

    def steps_one(carry, lr, horizon):
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

    self.init = jax.jit(jax.vmap(init_one, in_axes=(0, None, None)))
    self.steps = jax.jit(jax.vmap(steps_one, in_axes=(0, None, None)), donate_argnums=0)
    self.evaluate = jax.jit(jax.vmap(evaluate_one))

  def run(self, lr: float, seeds, steps: int, bar=None, eval_every=None):
    """All seeds of one learning rate; returns {metric: array (steps // eval_every + 1, seeds)}.

    The seeds run ``seeds_per_call`` at a time (vmapped): all at once for the MLP;
    one at a time for the CNN, whose vmapped convolutions (grouped convolutions
    for XLA) cost twice as much per example on CPU.
    """
    eval_every = eval_every or self.eval_every
    assert steps % eval_every == 0 and eval_every % UNROLL == 0
    lr, horizon = jnp.float32(lr), jnp.float32(steps)
    groups = [seeds[i:i + self.seeds_per_call] for i in range(0, len(seeds), self.seeds_per_call)]
    out = []
    for group in groups:
      carry = self.init(jnp.asarray(group, jnp.uint32), lr, horizon)
      history = [self.evaluate(carry)]
      for _ in range(steps // eval_every):
        for _ in range(eval_every // UNROLL):
          carry = self.steps(carry, lr, horizon)
        history.append(self.evaluate(carry))
        if bar is not None:
          bar.update(eval_every * len(group))
      out.append({k: np.stack([np.asarray(h[k]) for h in history]) for k in history[0]})
    return {k: np.concatenate([o[k] for o in out], axis=1) for k in out[0]}

  def grid(self, lrs, seeds, steps: int, bar=None, eval_every=None):
    """Every (lr, seed) run; returns {metric: array (evals, len(lrs), len(seeds))}."""
    runs = [self.run(lr, seeds, steps, bar, eval_every) for lr in lrs]
    return {k: np.stack([r[k] for r in runs], axis=1) for k in runs[0]}


def select(curves, at: int) -> int:
  """Index of the learning rate with the lowest validation loss at eval ``at``, averaged over seeds.

  Non-finite losses (diverged runs) count as infinitely bad.
  """
  val = np.nan_to_num(curves["val_loss"][at].mean(-1), nan=np.inf, posinf=np.inf)
  return int(np.argmin(val))


def spread(values) -> dict:
  """Mean, standard deviation (ddof 1; 0 for one seed) and the per-seed values."""
  values = np.asarray(values, np.float64)
  std = values.std(ddof=1) if values.size > 1 else 0.0
  return dict(mean=float(values.mean()), std=float(std), per_seed=values)


def verdict(a: dict, b: dict, lower_is_better: bool, names=("A", "B")) -> str:
  """``names[0]``/``names[1]`` where its mean is better by more than the two std's summed, else "tie"."""
  gap = b["mean"] - a["mean"] if lower_is_better else a["mean"] - b["mean"]
  if abs(gap) <= a["std"] + b["std"]:
    return "tie"
  return names[0] if gap > 0 else names[1]


PRESETS = {
    # dataset: (default settings, what --full changes)
    "digits": (
        dict(horizons="100,300,900", lrs="0.004,0.008,0.016,0.032,0.064", seeds=5, batch_size=32,
             warmup=25, weight_decay=1e-4, eval_every=25, channels=16, hidden=64, augment=True),
        dict(seeds=10, channels=32, hidden=128, batch_size=64),
    ),
    "tabular": (
        dict(horizons="100,300,900", lrs="0.00025,0.0005,0.001,0.002,0.004,0.008,0.016", seeds=10,
             batch_size=32, warmup=25, weight_decay=1e-4, eval_every=25, channels=0, hidden=128,
             augment=False),
        dict(seeds=20, horizons="50,100,300,900,2700"),
    ),
}


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog=os.path.basename(__file__),
      description=(
          "Schedule-Free AdamW (one run, any stopping time) vs AdamW + warmup-cosine (one"
          " run per horizon) on scikit-learn's digits (CNN) or a tabular data set (MLP);"
          " learning rates chosen on a validation split, averaged over seeds."
      )
  )
  _common.add_common_args(parser, "out/digits")
  parser.add_argument("--dataset", choices=("digits", *_common.TABULAR), default="digits",
                      help="(default: %(default)s)")
  parser.add_argument("--api", choices=("linen", "nnx"), default="linen",
                      help="write the model with flax.linen or flax.nnx (default: %(default)s)")
  parser.add_argument("--full", action="store_true",
                      help="the longer run: more seeds (and, for digits, the wider CNN)")
  parser.add_argument("--horizons", help="cosine horizons in steps; Schedule-Free runs to the largest"
                      " (digits: 100,300,900)")
  parser.add_argument("--lrs", help="learning-rate grid shared by both optimizers"
                      " (digits: 0.004,...,0.064 in factors of 2)")
  parser.add_argument("--seeds", type=int, help="seeds per learning rate (digits: 5; --full: 10)")
  parser.add_argument("--first-seed", type=int, default=0,
                      help="seeds are first-seed, first-seed + 1, ...; each fixes the init and the"
                           " batch order (default: %(default)s)")
  parser.add_argument("--no-augment", action="store_true",
                      help="digits: train without random 1-pixel shifts of the images")
  parser.add_argument("--batch-size", type=int)
  parser.add_argument("--warmup", type=int, help="linear warmup steps, both optimizers")
  parser.add_argument("--weight-decay", type=float, help="decoupled, both optimizers")
  parser.add_argument("--eval-every", type=int)
  parser.add_argument("--channels", type=int, help="CNN channels (digits: 16; --full: 32)")
  parser.add_argument("--hidden", type=int, help="hidden units (digits: 64; --full: 128)")
  args = parser.parse_args(argv)
  defaults, full = PRESETS["digits" if args.dataset == "digits" else "tabular"]
  settings = defaults | (full if args.full else {})
  for key, value in settings.items():
    if key != "augment" and getattr(args, key) is None:
      setattr(args, key, value)
  args.augment = settings["augment"] and not args.no_augment
  return args


def main(argv=None):
  record = _common.run_record(__file__, argv)
  args = parse_args(argv)
  elapsed, cpu = _common.timer(), _common.cpu_timer()
  horizons = sorted(_common.parse_ints(args.horizons))
  lrs = _common.parse_floats(args.lrs)
  seeds = list(range(args.first_seed, args.first_seed + args.seeds))
  for h in horizons:
    if h % args.eval_every or args.eval_every % UNROLL:
      raise SystemExit(f"--horizons must be multiples of --eval-every, itself of {UNROLL}")
  if args.dataset == "digits":
    data = _common.load_digits_splits()
    data["num_classes"] = 10
  else:
    data = _common.load_tabular_splits(args.dataset)
  init_params, apply = build_model(args, data)
  trainers = {
      name: Trainer(init_params, apply, data, name, eval_every=args.eval_every,
                    batch_size=args.batch_size, warmup=args.warmup,
                    weight_decay=args.weight_decay, augment=args.augment,
                    seeds_per_call=1 if args.dataset == "digits" else len(seeds))
      for name in ("schedule_free", "cosine")
  }
  total = (sum(horizons) + horizons[-1]) * len(lrs) * len(seeds)
  print(f"{args.dataset} ({args.api}): train {len(data['y_train'])}, val {len(data['y_val'])},"
        f" test {len(data['y_test'])}; lrs {lrs}, seeds {seeds[0]}..{seeds[-1]}, horizons {horizons}")

  with _common.progress(total, f"{args.dataset} (example-steps)", args.no_progress) as bar:
    sf = trainers["schedule_free"].grid(lrs, seeds, horizons[-1], bar)
    # A cosine run is only read at its end (its horizon): evaluated there only.
    cosine = {h: trainers["cosine"].grid(lrs, seeds, h, bar, eval_every=h) for h in horizons}

  steps_axis = np.arange(horizons[-1] // args.eval_every + 1) * args.eval_every
  at = {h: h // args.eval_every for h in horizons}
  picks = dict(
      cosine={h: select(cosine[h], -1) for h in horizons},
      schedule_free_per_horizon={h: select(sf, at[h]) for h in horizons},
      schedule_free_one_lr={h: select(sf, -1) for h in horizons},
  )
  runs_of = dict(cosine=lambda h: (cosine[h], -1), schedule_free_per_horizon=lambda h: (sf, at[h]),
                 schedule_free_one_lr=lambda h: (sf, at[h]))
  table = []
  for h in horizons:
    row = dict(steps=h)
    for protocol, pick in picks.items():
      curves, index = runs_of[protocol](h)
      i = pick[h]
      row[protocol] = dict(lr=lrs[i], test_loss=spread(curves["test_loss"][index, i]),
                           test_acc=spread(curves["test_acc"][index, i]),
                           val_loss=spread(curves["val_loss"][index, i]))
    for protocol in ("schedule_free_per_horizon", "schedule_free_one_lr"):
      row[f"{protocol}_vs_cosine"] = dict(
          test_loss=verdict(row[protocol]["test_loss"], row["cosine"]["test_loss"], True,
                            ("schedule_free", "cosine")),
          test_acc=verdict(row[protocol]["test_acc"], row["cosine"]["test_acc"], False,
                           ("schedule_free", "cosine")))
    table.append(row)

  fmt = lambda s, scale=1.0, digits=4: f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"  # noqa: E731
  print(f"\ntest loss / accuracy (%), mean ± std over {len(seeds)} seeds; lr chosen on the"
        " validation loss averaged over the seeds; verdict: a gap larger than the two std's summed")
  for row in table:
    print(f"\n  {row['steps']} steps")
    for protocol, label in (("cosine", "AdamW + cosine (own run)"),
                            ("schedule_free_per_horizon", "Schedule-Free, lr per horizon"),
                            ("schedule_free_one_lr", "Schedule-Free, one lr, one run")):
      r = row[protocol]
      extra = ""
      if protocol != "cosine":
        v = row[f"{protocol}_vs_cosine"]
        extra = f"   vs cosine: loss {v['test_loss']}, acc {v['test_acc']}"
      print(f"    {label:31s} lr {r['lr']:<7g} {fmt(r['test_loss'])} / "
            f"{fmt(r['test_acc'], 100, 2)}{extra}")

  os.makedirs(args.out, exist_ok=True)
  results = dict(
      **record,
      config=vars(args) | dict(horizons=horizons, lrs=lrs, seeds=seeds),
      protocol=__doc__.split("Protocol")[1].split("``--dataset")[0].strip(),
      data_sizes={k: int(len(v)) for k, v in data.items() if k.startswith("y_")},
      table=table,
      chosen_lrs={p: {str(h): lrs[i] for h, i in pick.items()} for p, pick in picks.items()},
      eval_steps=steps_axis,
      schedule_free=dict(
          val_loss_per_lr={str(h): sf["val_loss"][at[h]].mean(-1) for h in horizons},
          curves_per_lr={k: sf[k].mean(-1).T for k in ("test_loss", "test_acc")},
          curves_std_per_lr={k: sf[k].std(-1).T for k in ("test_loss", "test_acc")},
      ),
      cosine={str(h): dict(val_loss_per_lr=cosine[h]["val_loss"][-1].mean(-1)) for h in horizons},
      seconds=elapsed(),
      cpu_seconds=cpu(),
      load_average_1min_at_end=os.getloadavg()[0],
  )
  name = args.dataset
  _common.write_json(os.path.join(args.out, f"{name}.json"), results)
  plot(results, args.out, name)
  print(f"\nwrote {args.out}/{name}.png, {name}_lr.png, {name}.json")
  print(_common.elapsed_line(elapsed, cpu, record))
  return results


def plot(results, out, name):
  plt = _common.pyplot()
  steps = np.asarray(results["eval_steps"])
  horizons = results["config"]["horizons"]
  lrs = results["config"]["lrs"]
  table = {row["steps"]: row for row in results["table"]}
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  colors = plt.cm.viridis(np.linspace(0.15, 0.85, len(horizons)))
  sf = results["schedule_free"]
  one = lrs.index(results["chosen_lrs"]["schedule_free_one_lr"][str(horizons[-1])])
  for ax, key, label in ((axes[0], "test_loss", "test loss"), (axes[1], "test_acc", "test accuracy")):
    y = np.asarray(sf["curves_per_lr"][key], float)[one]
    s = np.asarray(sf["curves_std_per_lr"][key], float)[one]
    ax.plot(steps[1:], y[1:], color="crimson", lw=2.2,
            label=f"Schedule-Free, one run (lr {lrs[one]:g}), mean ± std")
    ax.fill_between(steps[1:], (y - s)[1:], (y + s)[1:], color="crimson", alpha=0.15)
    for h, color in zip(horizons, colors):
      row = table[h]
      ax.errorbar([h * 0.97], [row["cosine"][key]["mean"]], [row["cosine"][key]["std"]], fmt="o",
                  color=color, mec="black", capsize=3,
                  label=f"AdamW + cosine, its own run of {h} steps (lr {row['cosine']['lr']:g})")
      p = row["schedule_free_per_horizon"]
      ax.errorbar([h * 1.03], [p[key]["mean"]], [p[key]["std"]], fmt="^", color="crimson",
                  mec="black", capsize=3,
                  label="Schedule-Free, lr chosen per horizon (same runs)" if h == horizons[0] else None)
    ax.set_xlabel("step")
    ax.set_xscale("log")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_yscale("log")
  lo = min(table[h]["cosine"]["test_acc"]["mean"] for h in horizons)
  axes[1].set_ylim(max(0.5, lo - 0.08), 1.0)
  axes[0].legend(fontsize=7)
  seeds = len(results["config"]["seeds"])
  fig.suptitle(f"{name}: Schedule-Free vs cosine tuned per horizon, {seeds} seeds, mean ± std"
               " (markers offset around each horizon)", fontsize=9.5)
  fig.tight_layout()
  fig.savefig(os.path.join(out, f"{name}.png"), dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5.5, 4))
  for h, color in zip(horizons, colors):
    ax.plot(lrs, np.asarray(sf["val_loss_per_lr"][str(h)], float), "o-", color=color,
            label=f"Schedule-Free at step {h}")
    ax.plot(lrs, np.asarray(results["cosine"][str(h)]["val_loss_per_lr"], float), "s--",
            color=color, label=f"cosine, horizon {h}")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("peak learning rate")
  ax.set_ylabel(f"validation loss, mean of {seeds} seeds")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, f"{name}_lr.png"), dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
