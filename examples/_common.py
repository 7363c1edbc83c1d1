"""Shared helpers of the examples: data, models, output.

Data sets need no download: scikit-learn's bundled ``load_digits`` (8x8 images of
handwritten digits) and a character corpus made of the Python standard library's
own source files (present wherever Python is).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import mup_flax

# ---------------------------------------------------------------------------
# Digits.
# ---------------------------------------------------------------------------


def load_digits_splits(seed: int = 0, test_fraction: float = 0.3, val_fraction: float = 0.2):
  """scikit-learn's digits, split into train / val / test (stratified, fixed seed).

  The test split is held out from everything else; the validation split (taken
  out of the remaining data) is what learning rates are chosen on.

  Returns:
    A dict with ``x_train, y_train, x_val, y_val, x_test, y_test``: images as
    float32 arrays of shape (n, 8, 8, 1) scaled to [0, 1], labels as int32.
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  x_rest, x_test, y_rest, y_test = train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y
  )
  x_train, x_val, y_train, y_val = train_test_split(
      x_rest, y_rest, test_size=val_fraction, random_state=seed, stratify=y_rest
  )
  return dict(
      x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test
  )


TABULAR = ("breast_cancer", "wine")


def load_tabular_splits(name: str, seed: int = 0, test_fraction: float = 0.3,
                        val_fraction: float = 0.2):
  """A scikit-learn tabular data set (bundled, no download), split like the digits.

  ``name`` is ``"breast_cancer"`` (569 tumours, 30 features, 2 classes) or
  ``"wine"`` (178 wines, 13 features, 3 classes). Features are standardized with
  the training split's mean and standard deviation.

  Returns:
    The dict of :func:`load_digits_splits`, features of shape (n, d) and a
    ``num_classes`` entry.
  """
  from sklearn import datasets
  from sklearn.model_selection import train_test_split

  if name not in TABULAR:
    raise ValueError(f"name must be one of {TABULAR}, got {name!r}")
  bunch = getattr(datasets, f"load_{name}")()
  x = bunch.data.astype(np.float32)
  y = bunch.target.astype(np.int32)
  x_rest, x_test, y_rest, y_test = train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y
  )
  x_train, x_val, y_train, y_val = train_test_split(
      x_rest, y_rest, test_size=val_fraction, random_state=seed, stratify=y_rest
  )
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  out = dict(x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, x_test=x_test,
             y_test=y_test)
  out = {k: ((v - mean) / std).astype(np.float32) if k.startswith("x_") else v
         for k, v in out.items()}
  out["num_classes"] = int(y.max()) + 1
  return out


# ---------------------------------------------------------------------------
# Character corpus from the standard library's source.
# ---------------------------------------------------------------------------

# A fixed list of pure-Python standard library modules (present in 3.10 .. 3.13);
# the ones a given Python lacks are skipped.
STDLIB_FILES = (
    "argparse.py",
    "ast.py",
    "base64.py",
    "bisect.py",
    "calendar.py",
    "collections/__init__.py",
    "configparser.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "datetime.py",
    "difflib.py",
    "enum.py",
    "fractions.py",
    "functools.py",
    "glob.py",
    "gzip.py",
    "heapq.py",
    "inspect.py",
    "json/decoder.py",
    "json/encoder.py",
    "logging/__init__.py",
    "operator.py",
    "os.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "shutil.py",
    "statistics.py",
    "string.py",
    "tempfile.py",
    "textwrap.py",
    "threading.py",
    "typing.py",
    "weakref.py",
    "zipfile.py",
)

VOCAB_SIZE = 128  # ASCII; other characters map to "?"


def stdlib_corpus(max_chars: int | None = None) -> str:
  """The concatenated source of :data:`STDLIB_FILES` (ASCII), at most ``max_chars``."""
  root = pathlib.Path(os.__file__).parent
  parts = []
  for name in STDLIB_FILES:
    path = root / name
    if path.is_file():
      parts.append(path.read_text(encoding="utf-8", errors="replace"))
  text = "\n\n".join(parts)
  text = "".join(c if ord(c) < VOCAB_SIZE else "?" for c in text)
  return text[:max_chars] if max_chars else text


def encode(text: str) -> np.ndarray:
  return np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int32)


def decode(tokens: Iterable[int]) -> str:
  return "".join(chr(int(t)) for t in tokens)


def char_splits(max_chars: int | None = 400_000, val_fraction: float = 0.1):
  """Train / validation token arrays (the last ``val_fraction`` of the corpus is val)."""
  tokens = encode(stdlib_corpus(max_chars))
  n_val = int(len(tokens) * val_fraction)
  return tokens[:-n_val], tokens[-n_val:]


def char_batch(key, tokens, batch_size: int, seq_len: int):
  """A random batch of (inputs, targets) windows, inside jit."""
  tokens = jnp.asarray(tokens)
  starts = jax.random.randint(key, (batch_size,), 0, tokens.shape[0] - seq_len - 1)
  idx = starts[:, None] + jnp.arange(seq_len + 1)[None, :]
  windows = tokens[idx]
  return windows[:, :-1], windows[:, 1:]


def fixed_char_batches(tokens, n_batches: int, batch_size: int, seq_len: int, seed: int = 0):
  """Deterministic evaluation windows: arrays (n_batches, batch_size, seq_len)."""
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(tokens) - seq_len - 1, size=(n_batches, batch_size))
  idx = starts[..., None] + np.arange(seq_len + 1)
  windows = np.asarray(tokens)[idx]
  return windows[..., :-1], windows[..., 1:]


# ---------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, np.ndarray) or hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
    return to_jsonable(np.asarray(value).tolist())
  if isinstance(value, (np.floating, float)):
    value = float(value)
    return float(f"{value:.7g}") if np.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def write_json(path: str | os.PathLike, data: dict) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(to_jsonable(data), indent=1) + "\n")


def pyplot():
  """matplotlib.pyplot with a file-only backend."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def add_common_args(parser: argparse.ArgumentParser, default_out: str) -> None:
  parser.add_argument("--out", default=default_out, help="output directory (default: %(default)s)")
  parser.add_argument(
      "--no-progress", action="store_true", help="hide the tqdm progress bar"
  )


def progress(total: int, desc: str, disable: bool = False):
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True, file=sys.stderr)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform

  return platform.processor() or platform.machine()


def environment() -> dict:
  """Versions, CPU and load of this machine: what a number measured here depends on."""
  import flax
  import jaxlib
  import optax

  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count()
  try:
    load = os.getloadavg()[0]
  except OSError:
    load = None
  return dict(
      python=sys.version.split()[0],
      jax=jax.__version__,
      jaxlib=jaxlib.__version__,
      flax=flax.__version__,
      optax=optax.__version__,
      numpy=np.__version__,
      backend=jax.default_backend(),
      devices=str(jax.devices()),
      cpu_model=_cpu_model(),
      cpu_count=os.cpu_count(),
      usable_cores=cores,
      load_average_1min_at_start=load,
      time_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
  )


def run_record(script: str, argv: Sequence[str] | None) -> dict:
  """``{"command": ..., "environment": ...}`` for the JSON an example writes.

  Every example calls this once at the start of ``main(argv)`` and stores both
  entries, so each JSON names the exact command that reproduces it (relative to
  the repository root) and the machine it ran on.
  """
  import shlex

  args = sys.argv[1:] if argv is None else list(argv)
  command = shlex.join(["python", f"examples/{os.path.basename(script)}", *args])
  return dict(command=command, environment=environment())


def log2_grid(center: float, half_width: int) -> list[float]:
  """Powers of two: center * 2**k for k in -half_width..half_width."""
  return [float(center * 2.0**k) for k in range(-half_width, half_width + 1)]


def parse_floats(text: str) -> list[float]:
  return [float(t) for t in text.split(",") if t]


def parse_ints(text: str) -> list[int]:
  return [int(t) for t in text.split(",") if t]


def stack_trees(trees: Sequence[Any]):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def timer() -> Callable[[], float]:
  start = time.perf_counter()
  return lambda: time.perf_counter() - start


def cpu_timer() -> Callable[[], float]:
  """Seconds of CPU time this process (all its threads) used since the call.

  On a shared machine the wall time grows with the load; the CPU time does not
  (much): on an idle machine the wall time is about the CPU time / the cores used.
  """
  start = time.process_time()
  return lambda: time.process_time() - start


def elapsed_line(wall: Callable[[], float], cpu: Callable[[], float], record: dict) -> str:
  """"elapsed ... s wall, ... s CPU (load average ...)" for the end of an example's run."""
  start = record["environment"]["load_average_1min_at_start"]
  return (f"elapsed {wall():.0f} s wall, {cpu():.0f} s CPU ({os.cpu_count()} cores; load average"
          f" {start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)")


# ---------------------------------------------------------------------------
# Models shared by the examples (Linen). ``mup=True`` gives the μP version
# (MuReadout, 1/d attention, zero-initialized query); wrap it in
# ``mup_flax.MuP`` (see :func:`mup_model`). ``mup=False`` is the standard
# parametrization (SP) with Flax's default initializers.
# ---------------------------------------------------------------------------

def readout(features: int, mup: bool, **kwargs):
  if mup:
    return mup_flax.MuReadout(features, name="readout", **kwargs)
  return nn.Dense(features, name="readout")


class MLP(nn.Module):
  """input -> relu -> hidden -> relu -> readout, two width-sized layers."""

  width: int
  num_classes: int = 10
  mup: bool = True
  output_mult: float = 1.0
  readout_zero_init: bool = False  # μP only

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.width, name="input")(x))
    x = nn.relu(nn.Dense(self.width, name="hidden")(x))
    kwargs = (dict(output_mult=self.output_mult, readout_zero_init=self.readout_zero_init)
              if self.mup else {})
    return readout(self.num_classes, self.mup, **kwargs)(x)


def causal_attention(q, k, v, mup: bool, base_head_dim: int):
  """Causal multi-head attention of split ``(batch, time, heads, head_dim)`` inputs.

  Shared by the Linen and NNX Transformers; returns ``(batch, time, heads * head_dim)``.
  """
  b, t, heads, head_dim = q.shape
  if mup:  # 1/d: logits stay O(1) as the head dimension grows
    scale = mup_flax.attention_scale(head_dim, base_head_dim=base_head_dim)
  else:
    scale = 1.0 / math.sqrt(head_dim)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
  logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  attn = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, heads * head_dim)

class CausalSelfAttention(nn.Module):
  width: int
  heads: int
  mup: bool
  base_head_dim: int

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    head_dim = self.width // self.heads
    query_init = nn.initializers.zeros_init() if self.mup else nn.linear.default_kernel_init
    split = lambda y: y.reshape(b, t, self.heads, head_dim)  # noqa: E731
    q = split(nn.Dense(self.width, kernel_init=query_init, name="query")(x))
    k = split(nn.Dense(self.width, name="key")(x))
    v = split(nn.Dense(self.width, name="value")(x))
    y = causal_attention(q, k, v, self.mup, self.base_head_dim)
    return nn.Dense(self.width, name="out")(y)


class FeedForward(nn.Module):
  width: int
  ff_mult: int = 4

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(self.ff_mult * self.width, name="fc1")(x))
    return nn.Dense(self.width, name="fc2")(x)


class Block(nn.Module):
  width: int
  heads: int
  mup: bool
  base_head_dim: int

  @nn.compact
  def __call__(self, x):
    x = x + CausalSelfAttention(self.width, self.heads, self.mup, self.base_head_dim,
                                name="attn")(nn.LayerNorm(name="ln1")(x))
    return x + FeedForward(self.width, name="mlp")(nn.LayerNorm(name="ln2")(x))


class CharTransformer(nn.Module):
  """A decoder-only (GPT-style, pre-LayerNorm) Transformer over ASCII characters.

  ``heads`` is fixed, so the head dimension grows with ``width``;
  ``base_width`` is the width at which μP's 1/d attention equals the standard
  1/sqrt(d) (``mup_flax.attention_scale(d, base_head_dim=base_width // heads)``).
  """

  width: int = 128
  depth: int = 2
  heads: int = 4
  seq_len: int = 64
  vocab: int = VOCAB_SIZE
  mup: bool = True
  base_width: int = 32
  output_mult: float = 1.0
  readout_zero_init: bool = False  # μP only

  @nn.compact
  def __call__(self, tokens):
    t = tokens.shape[1]
    x = nn.Embed(self.vocab, self.width, name="embed")(tokens)
    x = x + nn.Embed(self.seq_len, self.width, name="pos_embed")(jnp.arange(t))[None]
    for i in range(self.depth):
      x = Block(self.width, self.heads, self.mup, self.base_width // self.heads,
                name=f"block_{i}")(x)
    x = nn.LayerNorm(name="ln_f")(x)
    kwargs = (dict(output_mult=self.output_mult, readout_zero_init=self.readout_zero_init)
              if self.mup else {})
    return readout(self.vocab, self.mup, **kwargs)(x)


def mup_model(make: Callable[[int], nn.Module], width: int, base_width: int) -> mup_flax.MuP:
  """``mup_flax.MuP(make(width), base=make(base_width), delta=make(2 * base_width))``."""
  return mup_flax.MuP(make(width), base=make(base_width), delta=make(2 * base_width))


def init_model(make: Callable[[int], nn.Module], width: int, base_width: int, mup: bool,
               key, example):
  """(apply_fn, plain params, infshapes or None) of a width-``width`` model.

  μP: ``make`` builds the μP model, wrapped in :class:`mup_flax.MuP` with base
  width ``base_width``; parameters come back unboxed (the wrapper re-annotates
  them in ``apply``) with their infshapes for the optimizer. SP: Flax's init.
  """
  if mup:
    model = mup_model(make, width, base_width)
    boxed = model.init(key, example)["params"]
    infshapes = mup_flax.get_infshapes(boxed)
    params = nn.unbox(boxed)
  else:
    model = make(width)
    params = model.init(key, example)["params"]
    infshapes = None
  apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  return apply, params, infshapes


# ---------------------------------------------------------------------------
# The same models in flax.nnx, attribute for attribute: their params have the
# Linen models' names and shapes, so both APIs start from the same arrays
# (see :func:`init_model_nnx`).
# ---------------------------------------------------------------------------


class NNXCausalSelfAttention(nnx.Module):
  def __init__(self, width: int, heads: int, mup: bool, base_head_dim: int, *, rngs: nnx.Rngs):
    self.heads, self.mup, self.base_head_dim = heads, mup, base_head_dim
    for name in ("query", "key", "value", "out"):
      setattr(self, name, nnx.Linear(width, width, rngs=rngs))

  def __call__(self, x):
    b, t, width = x.shape
    head_dim = width // self.heads
    split = lambda y: y.reshape(b, t, self.heads, head_dim)  # noqa: E731
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    return self.out(causal_attention(q, k, v, self.mup, self.base_head_dim))


class NNXFeedForward(nnx.Module):
  def __init__(self, width: int, ff_mult: int = 4, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(width, ff_mult * width, rngs=rngs)
    self.fc2 = nnx.Linear(ff_mult * width, width, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.gelu(self.fc1(x)))


class NNXBlock(nnx.Module):
  def __init__(self, width: int, heads: int, mup: bool, base_head_dim: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = NNXCausalSelfAttention(width, heads, mup, base_head_dim, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.mlp = NNXFeedForward(width, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class NNXCharTransformer(nnx.Module):
  """:class:`CharTransformer` in ``flax.nnx`` (μP readout: ``mup_flax.nnx.MuReadout``)."""

  def __init__(self, width: int = 128, depth: int = 2, heads: int = 4, seq_len: int = 64,
               vocab: int = VOCAB_SIZE, mup: bool = True, base_width: int = 32,
               output_mult: float = 1.0, *, rngs: nnx.Rngs):
    self.depth = depth
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.pos_embed = nnx.Embed(seq_len, width, rngs=rngs)
    for i in range(depth):
      setattr(self, f"block_{i}", NNXBlock(width, heads, mup, base_width // heads, rngs=rngs))
    self.ln_f = nnx.LayerNorm(width, rngs=rngs)
    if mup:
      self.readout = mup_flax.nnx.MuReadout(width, vocab, output_mult=output_mult, rngs=rngs)
    else:
      self.readout = nnx.Linear(width, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[1]))[None]
    for i in range(self.depth):
      x = getattr(self, f"block_{i}")(x)
    return self.readout(self.ln_f(x))


def _as_dict(tree):
  if isinstance(tree, Mapping):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def init_model_nnx(make_linen: Callable[[int], nn.Module],
                   make_nnx: Callable[[int, nnx.Rngs], nnx.Module], width: int,
                   base_width: int, mup: bool, key, example):
  """:func:`init_model` for the NNX twin of a Linen model: (apply_fn, params, infshapes).

  The params are the Linen model's initial arrays (so ``--api linen`` and
  ``--api nnx`` start identically), as the pure dict of the NNX model's
  ``nnx.Param`` state; ``apply_fn`` rebuilds the module with ``nnx.merge`` (the
  functional NNX API, usable inside ``jit``, ``vmap`` and ``scan``). μP: the NNX
  model is annotated with ``mup_flax.nnx.set_base_shapes`` and the infshapes come
  from it (``mup_flax.get_infshapes(model)``).
  """
  _, params, _ = init_model(make_linen, width, base_width, mup, key, example)
  model = make_nnx(width, nnx.Rngs(0))
  infshapes = None
  if mup:
    shapes = mup_flax.make_base_shapes(lambda: make_nnx(base_width, nnx.Rngs(0)),
                                       lambda: make_nnx(2 * base_width, nnx.Rngs(0)))
    # Annotate only: the values are replaced by the Linen model's (μP-initialized) arrays.
    model = mup_flax.nnx.set_base_shapes(model, shapes, rescale_params=False)
    # get_infshapes gives an nnx.State; the optimizer sees the pure dict of params.
    infshapes = _as_dict(mup_flax.get_infshapes(model))
  graphdef, state = nnx.split(model)
  expected, got = jax.tree.structure(nnx.to_pure_dict(state)), jax.tree.structure(params)
  if expected != got:
    raise ValueError(f"the NNX model's params {expected} differ from the Linen model's {got}")
  apply = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731
  return apply, params, infshapes
