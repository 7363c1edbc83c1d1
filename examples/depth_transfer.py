"""Learning-rate transfer across depth: a char-level Transformer with 2..8 blocks (or more).

For each depth and each parametrization, AdamW (warmup + cosine) is trained at
every learning rate of a log2 grid; the plot shows the validation loss against
the learning rate, one curve per depth, and where the optimum sits:

* ``standard``: residual ``x + block(x)``, one learning rate and eps for all.
* ``depth-muP`` (alpha = 1/2) and ``CompleteP`` (alpha = 1): residual
  ``x + (L/L0)^-alpha * block(x)`` (``mup_flax.depth_multiplier``), and the
  blocks' learning rate times ``(L/L0)^(alpha-1)`` and eps times
  ``(L/L0)^-alpha`` (``mup_flax.depth_scales`` + ``mup_flax.depth_scaled``),
  with base depth L0 = ``--base-depth``.

Width is fixed, so μP's width rules play no part. Every learning rate of one
(parametrization, depth) trains at once (``jax.vmap``), its steps fused with
``lax.scan``; all runs see the same batches.

Usage::

  python examples/depth_transfer.py            # defaults (5 seeds, depths 2..8): ~8 CPU-minutes
  python examples/depth_transfer.py --help

Writes ``depth_transfer.png`` and ``depth_transfer.json`` under ``--out``.
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

import mup_flax  # noqa: E402

PARAMETRIZATIONS = {"standard": None, "depth-muP": 0.5, "CompleteP": 1.0}
BLOCKS = r"^blocks_\d+/"  # the parameters inside the residual blocks


class Block(nn.Module):
  """A pre-LayerNorm Transformer block whose two residual branches are multiplied."""

  width: int
  heads: int
  branch_multiplier: float = 1.0

  @nn.compact
  def __call__(self, x):
    batch, length, width = x.shape
    head_dim = width // self.heads
    h = nn.LayerNorm(name="attention_norm")(x)
    qkv = nn.Dense(3 * width, name="qkv")(h).reshape(batch, length, 3, self.heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bshd,bthd->bhst", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
    causal = jnp.tril(jnp.ones((length, length), bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    h = jnp.einsum("bhst,bthd->bshd", jax.nn.softmax(logits, -1), v).reshape(batch, length, width)
    x = x + self.branch_multiplier * nn.Dense(width, name="attention_out")(h)
    h = nn.LayerNorm(name="mlp_norm")(x)
    h = nn.Dense(width, name="mlp_out")(nn.gelu(nn.Dense(4 * width, name="mlp_in")(h)))
    return x + self.branch_multiplier * h


class CharTransformer(nn.Module):
  """Token and position embeddings, ``depth`` blocks ``blocks_i``, final norm, readout."""

  vocab_size: int = _common.VOCAB_SIZE
  width: int = 64
  depth: int = 2
  heads: int = 4
  max_length: int = 128
  branch_multiplier: float = 1.0

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(1.0),
                 name="embed")(tokens)
    positions = self.param("positions", nn.initializers.normal(0.02),
                           (self.max_length, self.width))
    x = x + positions[: tokens.shape[1]]
    for i in range(self.depth):
      x = Block(self.width, self.heads, self.branch_multiplier, name=f"blocks_{i}")(x)
    return nn.Dense(self.vocab_size, name="readout")(nn.LayerNorm(name="final_norm")(x))


def lm_loss(model, params, inputs, targets):
  logits = model.apply({"params": params}, inputs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_optimizer(lr, *, alpha, depth, base_depth, params, steps, warmup, eps, weight_decay):
  """AdamW with warmup + cosine; with the depth rules when ``alpha`` is not None."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, steps, end_value=0.1)
  adamw = optax.adamw(lambda count: lr * schedule(count), eps=eps, weight_decay=weight_decay)
  if alpha is None:
    return adamw
  scales = mup_flax.depth_scales(params, depth=depth, base_depth=base_depth, alpha=alpha,
                                 in_blocks=BLOCKS)
  return mup_flax.depth_scaled(adamw, scales)


def sweep(depth, alpha, lrs, seeds, data, args, bar):
  """Final validation and training loss of every (learning rate, seed): shape (len(lrs), len(seeds)).

  Seed ``s`` fixes the initialization (key ``s``) and the batches (key ``s + 1``);
  every learning rate sees the same ones.
  """
  multiplier = 1.0 if alpha is None else mup_flax.depth_multiplier(depth, args.base_depth, alpha)
  model = CharTransformer(width=args.width, depth=depth, heads=args.heads,
                          max_length=args.seq_len, branch_multiplier=multiplier)
  train_tokens, val_inputs, val_targets = data
  example = jnp.zeros((1, args.seq_len), jnp.int32)
  structure = jax.eval_shape(lambda: model.init(jax.random.key(0), example)["params"])
  tx_for = lambda lr: make_optimizer(  # noqa: E731
      lr, alpha=alpha, depth=depth, base_depth=args.base_depth, params=structure, steps=args.steps,
      warmup=args.warmup, eps=args.eps, weight_decay=args.weight_decay)

  def train_one(lr, seed):
    tx = tx_for(lr)
    params = model.init(jax.random.key(seed), example)["params"]

    def step(carry, key):
      p, state = carry
      inputs, targets = _common.char_batch(key, train_tokens, args.batch_size, args.seq_len)
      loss, grads = jax.value_and_grad(lambda q: lm_loss(model, q, inputs, targets))(p)
      updates, state = tx.update(grads, state, p)
      return (optax.apply_updates(p, updates), state), loss

    keys = jax.random.split(jax.random.key(seed + 1), args.steps)
    (p, _), losses = jax.lax.scan(step, (params, tx.init(params)), keys)
    val = jax.vmap(lambda x, y: lm_loss(model, p, x, y))(val_inputs, val_targets).mean()
    return val, losses[-args.steps // 10:].mean()

  lr_flat = jnp.asarray([lr for lr in lrs for _ in seeds], jnp.float32)
  seed_flat = jnp.asarray([s for _ in lrs for s in seeds], jnp.uint32)
  val, train = jax.jit(jax.vmap(train_one))(lr_flat, seed_flat)
  shape = (len(lrs), len(seeds))
  val, train = np.asarray(val).reshape(shape), np.asarray(train).reshape(shape)  # waits
  bar.update(depth * len(lrs) * len(seeds) * args.steps)
  return val, train


def optimum(lrs, losses):
  """(lr, loss) of the lowest finite loss; (nan, nan) if every run diverged."""
  losses = np.where(np.isfinite(losses), losses, np.inf)
  if not np.isfinite(losses).any():
    return float("nan"), float("nan")
  i = int(np.argmin(losses))
  return float(lrs[i]), float(losses[i])


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description="LR sweep across depths of a char-level Transformer, with and without"
                  " depth-μP / CompleteP scaling (mup_flax.depth_scales).")
  _common.add_common_args(parser, "out/depth_transfer")
  parser.add_argument("--depths", default="2,4,8", help="blocks (default: %(default)s)")
  parser.add_argument("--base-depth", type=int, default=2, help="L0 (default: %(default)s)")
  parser.add_argument("--parametrizations", default="standard,CompleteP",
                      help=f"any of {','.join(PARAMETRIZATIONS)} (default: %(default)s)")
  parser.add_argument("--lrs", default=",".join(f"{2.0**k:g}" for k in range(-7, -3)),
                      help="learning-rate grid (default: 2^-7 .. 2^-4)")
  parser.add_argument("--steps", type=int, default=300, help="(default: %(default)s)")
  parser.add_argument("--warmup", type=int, default=30, help="(default: %(default)s)")
  parser.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
  parser.add_argument("--seq-len", type=int, default=32, help="(default: %(default)s)")
  parser.add_argument("--width", type=int, default=32, help="(default: %(default)s)")
  parser.add_argument("--heads", type=int, default=4, help="(default: %(default)s)")
  parser.add_argument("--eps", type=float, default=1e-8, help="AdamW eps at base depth (default: %(default)s)")
  parser.add_argument("--weight-decay", type=float, default=0.0, help="(default: %(default)s)")
  parser.add_argument("--val-batches", type=int, default=8, help="(default: %(default)s)")
  parser.add_argument("--seeds", type=int, default=5,
                      help="seeds 0..N-1 per (depth, lr); the optimum is chosen on their mean"
                           " (default: %(default)s)")
  return parser.parse_args(argv)


def main(argv=None):
  record = _common.run_record(__file__, argv)
  args = parse_args(argv)
  elapsed, cpu = _common.timer(), _common.cpu_timer()
  depths = _common.parse_ints(args.depths)
  lrs = np.asarray(_common.parse_floats(args.lrs))
  names = [n for n in args.parametrizations.split(",") if n]
  unknown = set(names) - set(PARAMETRIZATIONS)
  if unknown:
    raise SystemExit(f"--parametrizations: unknown {sorted(unknown)}; choose from {list(PARAMETRIZATIONS)}")
  train_tokens, val_tokens = _common.char_splits()
  val_inputs, val_targets = _common.fixed_char_batches(val_tokens, args.val_batches,
                                                       args.batch_size, args.seq_len)
  data = (jnp.asarray(train_tokens), jnp.asarray(val_inputs), jnp.asarray(val_targets))
  seeds = list(range(args.seeds))
  total = sum(depths) * len(names) * len(lrs) * len(seeds) * args.steps
  results = {}
  ddof = 1 if len(seeds) > 1 else 0
  with _common.progress(total, "depth sweep (block-steps)", args.no_progress) as bar:
    for name in names:
      results[name] = {}
      for depth in depths:
        val, train = sweep(depth, PARAMETRIZATIONS[name], lrs, seeds, data, args, bar)
        mean = val.mean(-1)  # a diverged seed makes its learning rate's mean inf/nan
        best_lr, best_loss = optimum(lrs, mean)
        pick = int(np.argmin(np.where(np.isfinite(mean), mean, np.inf)))
        results[name][str(depth)] = dict(
            val_loss=mean, val_loss_std=val.std(-1, ddof=ddof), val_loss_seeds=val,
            train_loss=train.mean(-1), best_lr=best_lr, best_val_loss=best_loss,
            best_val_loss_std=float(val[pick].std(ddof=ddof)),
            best_lr_per_seed=[optimum(lrs, val[:, i])[0] for i in range(len(seeds))])

  print(f"\nOptimal learning rate per depth, chosen on the validation loss averaged over"
        f" {len(seeds)} seeds (mean ± std there):")
  print("  parametrization | " + " | ".join(f"L={d:<2d}" + " " * 22 for d in depths))
  for name in names:
    cells = [f"{r['best_lr']:.2e} ({r['best_val_loss']:.3f} ± {r['best_val_loss_std']:.3f})"
             for r in (results[name][str(d)] for d in depths)]
    print(f"  {name:15s} | " + " | ".join(cells))
  shifts, seed_shifts = {}, {}
  for name in names:
    best = [results[name][str(d)]["best_lr"] for d in depths]
    shifts[name] = float(np.log2(np.nanmax(best) / np.nanmin(best))) if np.all(np.isfinite(best)) else None
    per_seed = np.asarray([results[name][str(d)]["best_lr_per_seed"] for d in depths])  # (depths, seeds)
    seed_shifts[name] = [float(np.log2(np.nanmax(c) / np.nanmin(c))) if np.all(np.isfinite(c)) else None
                         for c in per_seed.T]
    print(f"  {name}: optimum of the mean spans {shifts[name]} octaves over depths {depths};"
          f" per seed: {seed_shifts[name]}")

  summary = dict(
      config=vars(args) | dict(depths=depths, lrs=lrs, parametrizations=names),
      **record,
      results=results,
      optimum_span_octaves=shifts,
      optimum_span_octaves_per_seed=seed_shifts,
      protocol=(f"AdamW + warmup-cosine, {args.steps} steps; seeds 0..{len(seeds) - 1} (init and"
                " batches); validation loss at the end; each depth's optimum is the grid point"
                " with the lowest validation loss averaged over the seeds"),
      seconds=elapsed(),
      cpu_seconds=cpu(),
  )
  os.makedirs(args.out, exist_ok=True)
  _common.write_json(os.path.join(args.out, "depth_transfer.json"), summary)
  plot(summary, args.out)
  print(f"wrote {args.out}/depth_transfer.png, depth_transfer.json")
  print(_common.elapsed_line(elapsed, cpu, record))
  return summary


def plot(summary, out):
  plt = _common.pyplot()
  names = summary["config"]["parametrizations"]
  depths = summary["config"]["depths"]
  lrs = np.asarray(summary["config"]["lrs"], float)
  fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), sharey=True, squeeze=False)
  colors = plt.cm.viridis(np.linspace(0.1, 0.9, len(depths)))
  finite = [v for n in names for d in depths
            for v in np.asarray(summary["results"][n][str(d)]["val_loss"], float) if np.isfinite(v)]
  low = min(finite) if finite else 0.0
  for ax, name in zip(axes[0], names):
    for depth, color in zip(depths, colors):
      run = summary["results"][name][str(depth)]
      val = np.asarray(run["val_loss"], float)
      std = np.asarray(run.get("val_loss_std", np.zeros_like(val)), float)
      ax.errorbar(lrs, val, yerr=std, fmt="o-", color=color, ms=4, capsize=2, label=f"{depth} blocks")
      if np.isfinite(run["best_lr"]):
        ax.plot([run["best_lr"]], [run["best_val_loss"]], "*", color=color, ms=14, mec="black")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("learning rate")
    ax.set_title(f"{name}" + ("" if name == "standard" else f" (base depth {summary['config']['base_depth']})"))
    ax.grid(alpha=0.3)
    ax.set_ylim(low - 0.03, low + 0.7)
  axes[0][0].set_ylabel("validation loss (nats/char)")
  axes[0][0].legend(fontsize=8)
  seeds = summary["config"]["seeds"]
  fig.suptitle(f"char-level Transformer, AdamW + cosine: mean ± std over {seeds} seeds;"
               " stars mark each depth's optimum (of the mean)", fontsize=10)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "depth_transfer.png"), dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
