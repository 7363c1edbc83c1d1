"""BatchNorm and Schedule-Free: recompute the running statistics at x.

Schedule-Free trains at y and evaluates at x (``sf_optax.eval_params``). A
BatchNorm layer's running mean and variance are accumulated during training, at
y, as an exponential moving average that also remembers older params (and, early
on, the initial mean 0 / variance 1). Evaluating x with those stale statistics
can cost a lot of accuracy; ``sf_optax.recompute_batch_stats`` (Linen) and
``sf_optax.recompute_batch_stats_nnx`` (NNX) recompute them at x over N training
batches, one jitted forward pass each.

A small BatchNorm CNN on scikit-learn's digits is trained with Schedule-Free
AdamW; after every epoch the test accuracy at x is measured with the stale
running statistics and with statistics recomputed over ``--num-batches``
training batches.

Usage::

  python examples/batch_norm_digits.py               # Linen, 5 seeds, a few CPU-minutes
  python examples/batch_norm_digits.py --api nnx     # the same with flax.nnx
  python examples/batch_norm_digits.py --help

Writes ``batch_norm_digits_<api>.json`` under ``--out`` (every seed's rows and
the final accuracies, mean ± std over ``--seeds`` runs).
"""

from __future__ import annotations

import argparse
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
  """Two 3x3 convolutions with BatchNorm, global average pooling, the readout."""

  channels: tuple[int, ...] = (16, 32)
  momentum: float = 0.99  # Flax's default
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool):
    for features in self.channels:
      x = nn.Conv(features, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)
      x = nn.relu(x)
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class NNXCNN(nnx.Module):
  """The same CNN in flax.nnx."""

  def __init__(self, channels=(16, 32), momentum=0.99, num_classes=10, *, rngs):
    layers, previous = [], 1
    for features in channels:
      layers.append(nnx.Conv(previous, features, (3, 3), rngs=rngs))
      layers.append(nnx.BatchNorm(features, momentum=momentum, rngs=rngs))
      previous = features
    self.layers = nnx.List(layers)
    self.head = nnx.Linear(previous, num_classes, rngs=rngs)

  def __call__(self, x):
    for conv, bn in zip(self.layers[::2], self.layers[1::2]):
      x = nnx.relu(bn(conv(x)))
    return self.head(x.mean(axis=(1, 2)))


def epochs_of_batches(x, y, batch_size, epochs, seed):
  """Per epoch: a shuffled list of full (images, labels) batches."""
  rng = np.random.default_rng(seed)
  n = len(x) - len(x) % batch_size
  for _ in range(epochs):
    order = rng.permutation(len(x))[:n].reshape(-1, batch_size)
    yield [(x[idx], y[idx]) for idx in order]


def run_linen(data, args):
  model = CNN(momentum=args.momentum)
  variables = model.init(jax.random.key(args.seed), data["x_train"][:1], train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = sf_optax.schedule_free_adamw(args.lr, warmup_steps=args.warmup)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, mutated = model.apply(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, mutated["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  @jax.jit
  def accuracy(params, batch_stats, images, labels):
    logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
    return jnp.mean(jnp.argmax(logits, -1) == labels)

  def forward(variables, images):  # defined once: compiled once
    return model.apply(variables, images, train=True, mutable=["batch_stats"])

  rows = []
  for epoch, batches in enumerate(epochs_of_batches(
      data["x_train"], data["y_train"], args.batch_size, args.epochs, args.seed)):
    for images, labels in batches:
      params, batch_stats, opt_state, loss = train_step(
          params, batch_stats, opt_state, images, labels)
    x = sf_optax.eval_params(opt_state, params)
    timer = _common.timer()
    recomputed = sf_optax.recompute_batch_stats(
        forward, {"params": x, "batch_stats": batch_stats},
        (images for images, _ in batches), num_batches=args.num_batches,
    )
    jax.block_until_ready(recomputed)
    seconds = timer()
    test = (data["x_test"], data["y_test"])
    rows.append(dict(
        epoch=epoch + 1,
        step=(epoch + 1) * len(batches),
        train_loss=float(loss),
        acc_y_stale=float(accuracy(params, batch_stats, *test)),
        acc_x_stale=float(accuracy(x, batch_stats, *test)),
        acc_x_recomputed=float(accuracy(x, recomputed, *test)),
        recompute_seconds=seconds,
    ))
    report(rows[-1], args)
  return rows


def run_nnx(data, args):
  model = NNXCNN(momentum=args.momentum, rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(
      model, sf_optax.schedule_free_adamw(args.lr, warmup_steps=args.warmup), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, images, labels):
    def loss_fn(model):
      logits = model(images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def accuracy(model, images, labels):
    return jnp.mean(jnp.argmax(model(images), -1) == labels)

  rows = []
  for epoch, batches in enumerate(epochs_of_batches(
      data["x_train"], data["y_train"], args.batch_size, args.epochs, args.seed)):
    model.train()
    for images, labels in batches:
      loss = train_step(model, optimizer, images, labels)
    eval_model = sf_optax.eval_model(model, optimizer)  # a copy at x; model stays at y
    eval_model.eval()
    test = (data["x_test"], data["y_test"])
    acc_x_stale = float(accuracy(eval_model, *test))
    timer = _common.timer()
    sf_optax.recompute_batch_stats_nnx(
        eval_model, (images for images, _ in batches), num_batches=args.num_batches)
    seconds = timer()
    model.eval()
    rows.append(dict(
        epoch=epoch + 1,
        step=(epoch + 1) * len(batches),
        train_loss=float(loss),
        acc_y_stale=float(accuracy(model, *test)),
        acc_x_stale=acc_x_stale,
        acc_x_recomputed=float(accuracy(eval_model, *test)),
        recompute_seconds=seconds,
    ))
    report(rows[-1], args)
  return rows


def report(row, args):
  if row["epoch"] == 1:
    print(f"{'epoch':>5} {'step':>5} {'loss':>7}  test accuracy: {'y, stale':>9}"
          f" {'x, stale':>9} {'x, recomputed':>14}   (N={args.num_batches} batches)")
  print(f"{row['epoch']:5d} {row['step']:5d} {row['train_loss']:7.4f}  {'':15}"
        f"{row['acc_y_stale']:9.4f} {row['acc_x_stale']:9.4f} {row['acc_x_recomputed']:14.4f}",
        flush=True)


def main(argv=None):
  record = _common.run_record(__file__, argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--api", choices=("linen", "nnx"), default="linen")
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=1e-2)
  parser.add_argument("--warmup", type=int, default=50)
  parser.add_argument("--momentum", type=float, default=0.99,
                      help="BatchNorm momentum (default: Flax's 0.99)")
  parser.add_argument("--num-batches", type=int, default=10,
                      help="training batches to recompute the statistics over")
  parser.add_argument("--seed", type=int, default=0, help="the first seed (default: %(default)s)")
  parser.add_argument("--seeds", type=int, default=5,
                      help="runs with seeds seed .. seed+N-1: each fixes the data split, the"
                           " initialization and the batch order (default: %(default)s)")
  _common.add_common_args(parser, default_out="out/batch_norm_digits")
  args = parser.parse_args(argv)
  elapsed, cpu = _common.timer(), _common.cpu_timer()

  runs = []
  for seed in range(args.seed, args.seed + args.seeds):
    seed_args = argparse.Namespace(**{**vars(args), "seed": seed})
    print(f"seed {seed}")
    data = _common.load_digits_splits(seed=seed)
    runs.append(dict(seed=seed, rows=(run_linen if args.api == "linen" else run_nnx)(data, seed_args)))
  ddof = 1 if len(runs) > 1 else 0
  final = {}
  for key in ("acc_y_stale", "acc_x_stale", "acc_x_recomputed"):
    values = np.asarray([run["rows"][-1][key] for run in runs])
    final[key] = dict(mean=float(values.mean()), std=float(values.std(ddof=ddof)),
                      seeds=values.tolist())
  stale, recomputed = final["acc_x_stale"], final["acc_x_recomputed"]
  gap = abs(recomputed["mean"] - stale["mean"])
  better = ("tie" if gap <= stale["std"] + recomputed["std"]
            else "recomputed" if recomputed["mean"] > stale["mean"] else "stale")
  path = os.path.join(args.out, f"batch_norm_digits_{args.api}.json")
  _common.write_json(path, dict(
      **record, args=vars(args), runs=runs, final=final, better_at_x=better,
      protocol=(f"{len(runs)} seeds; test accuracy after the last epoch, mean ± std over seeds"
                " (ddof=1); 'better' only where the gap between the means exceeds the sum of"
                " the two std's"),
      seconds=elapsed(), cpu_seconds=cpu()))
  steps = runs[0]["rows"][-1]["step"]
  print(f"after {steps} steps, {len(runs)} seeds: test accuracy at x {stale['mean']:.4f} ±"
        f" {stale['std']:.4f} with the stale running statistics, {recomputed['mean']:.4f} ±"
        f" {recomputed['std']:.4f} recomputed at x (better: {better}). Wrote {path}")
  print(_common.elapsed_line(elapsed, cpu, record))
  return runs


if __name__ == "__main__":
  main()
