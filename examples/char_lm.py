"""A character-level Transformer language model on the Python standard library's source.

A small decoder-only Transformer (Flax Linen, or ``--api nnx``) in μP -- ``mup_flax.MuReadout``
for the logits, 1/d attention (``mup_flax.attention_scale``), zero-initialized
queries, width-corrected init through ``mup_flax.MuP`` -- trained with
``sf_optax.schedule_free_adamw`` whose per-parameter learning rates are μP's
(``mup_flax.schedule_free_scales``). No learning-rate schedule: the model is
evaluated at the Schedule-Free average (``sf_optax.eval_params``) whenever one
likes. The corpus is a fixed list of the standard library's own ``.py`` files,
present on every machine (no download).

With ``--api nnx`` the model is ``_common.NNXCharTransformer`` (``flax.nnx``,
``mup_flax.nnx.MuReadout``, annotated by ``mup_flax.nnx.set_base_shapes``),
started from the Linen model's initial arrays and trained on the same batches
through the functional NNX API (``nnx.merge`` inside ``jit``): the losses equal
the Linen run's to float32 rounding.

Usage::

  python examples/char_lm.py               # defaults: a few minutes on 2 CPU cores
  python examples/char_lm.py --width 256   # same hyperparameters, wider (that is μP's point)
  python examples/char_lm.py --api nnx     # the same model in flax.nnx, same init and batches
  python examples/char_lm.py --help

Prints the validation loss as it trains and a text sample at the end; writes
``char_lm.png`` (loss curves) and ``char_lm.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import math
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


def make_optimizer(lr: float, infshapes, *, warmup: int, weight_decay: float, b1: float):
  """Schedule-Free AdamW; with μP infshapes, each parameter's z-step takes μP's learning rate."""
  scales = mup_flax.schedule_free_scales(infshapes) if infshapes is not None else {}
  return sf_optax.schedule_free_adamw(
      lr, b1=b1, b2=0.999, warmup_steps=warmup, weight_decay=weight_decay, **scales
  )


def sample(apply, params, prompt: str, n: int, seq_len: int, temperature: float, key) -> str:
  """Autoregressive sampling with a sliding window of ``seq_len`` characters."""
  context = _common.encode(prompt)[-seq_len:]
  pad = np.full(seq_len - len(context), ord("\n"), np.int32)
  buffer = jnp.concatenate([jnp.asarray(pad), jnp.asarray(context), jnp.zeros(n, jnp.int32)])

  @jax.jit
  def generate(buffer, key):
    def body(i, carry):
      buffer, key = carry
      window = jax.lax.dynamic_slice(buffer, (i,), (seq_len,))
      logits = apply(params, window[None])[0, -1]
      key, sub = jax.random.split(key)
      token = jax.random.categorical(sub, logits / temperature)
      return buffer.at[i + seq_len].set(token.astype(buffer.dtype)), key

    return jax.lax.fori_loop(0, n, body, (buffer, key))[0]

  out = generate(buffer, key)
  return prompt + _common.decode(np.asarray(out[seq_len:]))


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog=os.path.basename(__file__),
      description=(
          "Character-level decoder-only Transformer (muP + Schedule-Free AdamW) on the"
          " Python standard library's own source files."
      )
  )
  _common.add_common_args(parser, "out/char_lm")
  parser.add_argument("--api", choices=("linen", "nnx"), default="linen",
                      help="write the model with flax.linen or flax.nnx (default: %(default)s)")
  parser.add_argument("--width", type=int, default=128, help="model width (default: %(default)s)")
  parser.add_argument("--base-width", type=int, default=32,
                      help="muP base width: hyperparameters are those of this width (default: %(default)s)")
  parser.add_argument("--depth", type=int, default=2, help="Transformer blocks (default: %(default)s)")
  parser.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
  parser.add_argument("--seq-len", type=int, default=64, help="context length (default: %(default)s)")
  parser.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
  parser.add_argument("--steps", type=int, default=1200, help="training steps (default: %(default)s)")
  parser.add_argument("--lr", type=float, default=2**-4,
                      help="learning rate, the best of a log2 sweep at the base width"
                           " (default: %(default)s)")
  parser.add_argument("--b1", type=float, default=0.9, help="Schedule-Free b1 (default: %(default)s)")
  parser.add_argument("--warmup", type=int, default=100, help="(default: %(default)s)")
  parser.add_argument("--weight-decay", type=float, default=0.0, help="(default: %(default)s)")
  parser.add_argument("--eval-every", type=int, default=100, help="(default: %(default)s)")
  parser.add_argument("--eval-batches", type=int, default=8, help="validation batches (default: %(default)s)")
  parser.add_argument("--corpus-chars", type=int, default=None,
                      help="use only the first N characters of the corpus (default: all, ~1.6M)")
  parser.add_argument("--sp", action="store_true",
                      help="standard parametrization instead of muP (nn.Dense readout, 1/sqrt(d) attention)")
  parser.add_argument("--prompt", default="def ", help="sampling prompt (default: %(default)r)")
  parser.add_argument("--sample-chars", type=int, default=400, help="(default: %(default)s)")
  parser.add_argument("--temperature", type=float, default=0.8, help="(default: %(default)s)")
  parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
  return parser.parse_args(argv)


def main(argv=None):
  record = _common.run_record(__file__, argv)
  args = parse_args(argv)
  if args.steps % args.eval_every:
    raise SystemExit("--steps must be a multiple of --eval-every")
  elapsed, cpu = _common.timer(), _common.cpu_timer()
  mup = not args.sp
  train_tokens, val_tokens = _common.char_splits(args.corpus_chars)
  print(f"corpus: {len(train_tokens):,} train / {len(val_tokens):,} validation characters"
        f" from {len(_common.STDLIB_FILES)} standard-library files")
  make = lambda width: _common.CharTransformer(  # noqa: E731
      width=width, depth=args.depth, heads=args.heads, seq_len=args.seq_len, mup=mup,
      base_width=args.base_width)
  init_key, data_key, sample_key = jax.random.split(jax.random.key(args.seed), 3)
  example = jnp.zeros((1, args.seq_len), jnp.int32)
  if args.api == "linen":
    apply, params, infshapes = _common.init_model(
        make, args.width, args.base_width, mup, init_key, example)
  else:
    make_nnx = lambda width, rngs: _common.NNXCharTransformer(  # noqa: E731
        width=width, depth=args.depth, heads=args.heads, seq_len=args.seq_len, mup=mup,
        base_width=args.base_width, rngs=rngs)
    apply, params, infshapes = _common.init_model_nnx(
        make, make_nnx, args.width, args.base_width, mup, init_key, example)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  print(f"model ({args.api}): width {args.width}, depth {args.depth}, heads {args.heads},"
        f" {n_params:,} parameters, {'muP (base width %d)' % args.base_width if mup else 'SP'}")
  tx = make_optimizer(args.lr, infshapes, warmup=args.warmup, weight_decay=args.weight_decay,
                      b1=args.b1)
  val_x, val_y = _common.fixed_char_batches(
      val_tokens, args.eval_batches, args.batch_size, args.seq_len)
  train_tokens = jnp.asarray(train_tokens)

  def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()

  @jax.jit
  def train_chunk(carry):
    def step(carry, _):
      params, opt_state, key = carry
      key, sub = jax.random.split(key)
      x, y = _common.char_batch(sub, train_tokens, args.batch_size, args.seq_len)
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state, key), loss

    carry, losses = jax.lax.scan(step, carry, None, length=args.eval_every)
    return carry, losses.mean()

  @jax.jit
  def val_loss(params, opt_state):
    x_params = sf_optax.eval_params(opt_state, params)
    losses = jax.lax.map(lambda b: loss_fn(x_params, b[0], b[1]), (val_x, val_y))
    return losses.mean()

  carry = (params, tx.init(params), data_key)
  history = dict(step=[0], train_loss=[float("nan")], val_loss=[float(val_loss(*carry[:2]))])
  with _common.progress(args.steps, "char_lm (steps)", args.no_progress) as bar:
    for _ in range(args.steps // args.eval_every):
      carry, train_loss = train_chunk(carry)
      history["step"].append(history["step"][-1] + args.eval_every)
      history["train_loss"].append(float(train_loss))
      history["val_loss"].append(float(val_loss(*carry[:2])))
      bar.update(args.eval_every)
      bar.set_postfix(train=f"{history['train_loss'][-1]:.3f}", val=f"{history['val_loss'][-1]:.3f}")
      bar.write(f"step {history['step'][-1]:5d}  train loss {history['train_loss'][-1]:.4f}"
                f"  val loss (at x) {history['val_loss'][-1]:.4f}"
                f"  ({history['val_loss'][-1] / math.log(2):.3f} bits/char)")

  params, opt_state, _ = carry
  x_params = sf_optax.eval_params(opt_state, params)
  text = sample(apply, x_params, args.prompt, args.sample_chars, args.seq_len, args.temperature,
                sample_key)
  final = history["val_loss"][-1]
  print(f"\nfinal validation loss {final:.4f} nats/char ({final / math.log(2):.3f} bits/char)")
  print(f"\nsample (temperature {args.temperature}):\n" + "-" * 60 + f"\n{text}\n" + "-" * 60)

  os.makedirs(args.out, exist_ok=True)
  results = dict(
      **record,
      config=vars(args),
      parameters=int(n_params),
      corpus=dict(train_chars=int(len(train_tokens)), val_chars=int(len(val_tokens)),
                  files=list(_common.STDLIB_FILES)),
      history=history,
      final_val_loss=final,
      final_val_bits_per_char=final / math.log(2),
      sample=text,
      seconds=elapsed(),
      cpu_seconds=cpu(),
  )
  _common.write_json(os.path.join(args.out, "char_lm.json"), results)
  plot(results, args.out)
  print(f"wrote {args.out}/char_lm.png, char_lm.json")
  print(_common.elapsed_line(elapsed, cpu, record))
  return results


def plot(results, out):
  plt = _common.pyplot()
  h = results["history"]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(h["step"][1:], h["train_loss"][1:], "o-", ms=3, label="train (at y, running mean)")
  ax.plot(h["step"], h["val_loss"], "s-", ms=3, label="validation (at x = eval_params)")
  c = results["config"]
  ax.set_title(f"char LM: width {c['width']}, {'SP' if c['sp'] else 'muP'},"
               f" Schedule-Free AdamW lr {c['lr']:g}", fontsize=9)
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/char)")
  ax.set_ylim(top=min(4.0, max(v for v in h["val_loss"] if v == v) + 0.1))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "char_lm.png"), dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
