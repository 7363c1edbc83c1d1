"""Step time, memory and compile time of sf_optax against its peers, on every path a user takes.

One command, one process (plus one subprocess per compile-time measurement), one run::

    python benchmarks/step_time.py            # every suite at its default sizes
    python benchmarks/step_time.py --quick    # every suite at small sizes: a few minutes
    python benchmarks/step_time.py --full     # adds 64M params to the built-ins suite
    python benchmarks/step_time.py --suites wrapper --wrapper-size 4M   # one suite

Suites (``--suites``, default all):

* ``builtins``: the built-in optimizers (SGD, AdamW, RAdam, each with store_x
  False and True) against ``optax.sgd(momentum)``, ``optax.adamw`` and
  ``optax.contrib``'s Schedule-Free, on one array and a 100-leaf GPT-shaped tree,
  float32 and bf16 params with float32 state (``--sizes``).
* ``wrapper``: ``sf_optax.schedule_free(base)`` around elementwise Optax bases
  (sgd with and without momentum, adam and adamw without decay, lion, rmsprop,
  adabelief, ``mup_flax.mu_adam``/``mu_sgd``, a chain), each next to the
  built-in that computes the same thing where one exists (``--wrapper-size``).
* ``mup``: the two μP compositions, ``schedule_free(mup_flax.mu_adam(b1=0))``
  and ``schedule_free_adamw(**mup_flax.schedule_free_scales(infshapes))`` (the
  same math), against ``optax.adamw`` on a GPT-like tree of 148 leaves
  (``--mup-size``), float32 and bf16 params with float32 state.
* ``compile``: lowering and compile time and the compiler's peak memory against
  the number of leaves (``--compile-leaves``), each measured in a fresh
  subprocess, ``optax.adamw`` against SF-AdamW on the same tree.

What is timed is the jitted training update ``tx.update`` + ``optax.apply_updates``
with params and state donated (``jax.jit(step, donate_argnums=(0, 1))``), the
way a training loop runs it. The entries of one configuration (and a copy
bandwidth probe) are timed round-robin: round r runs every entry once, so
drift and noise from other processes fall on all entries alike. Every table
reports medians with the interquartile range and the machine's load average
(``os.getloadavg``) at the start and end of the configuration. What XLA
compiled is read with ``sf_optax._compiled_program`` (the reading the guard
``tests/test_compiled_update.py`` uses): ``bytes accessed`` over the bytes by
construction, temporaries, peak bytes of one call.

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/<platform>_<date>``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import pathlib
import platform
import re
import resource
import subprocess
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

import mup_flax
import sf_optax
from sf_optax import _compiled_program as program

MiB = float(1 << 20)
PAGE = resource.getpagesize()
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
DTYPES = {"float32": (jnp.float32, None), "bf16": (jnp.bfloat16, jnp.float32)}
SUITES = ("builtins", "wrapper", "mup", "compile")


# --------------------------------------------------------------------------- params


def parse_size(text: str) -> int:
  """'64K' -> 65536, '16M' -> 16777216 (powers of two), '1000' -> 1000."""
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)\s*", text, re.IGNORECASE)
  if not match:
    raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 64K, 1M, 16M")
  factor = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2).upper()]
  return int(float(match.group(1)) * factor)


def size_label(n: int) -> str:
  for unit, factor in (("M", 1 << 20), ("K", 1 << 10)):
    if n >= factor:
      return f"{n / factor:.3g}{unit}"
  return str(n)


def array_shapes(n: int) -> dict[str, tuple[int, ...]]:
  """One big array of n parameters (rows of 1024)."""
  if n % 1024 == 0:
    return {"w": (n // 1024, 1024)}
  return {"w": (n,)}


def _gpt(d: int, vocab: int, layers: int, seq: int) -> dict[str, Any]:
  tree: dict[str, Any] = {"embed": (vocab, d), "pos_embed": (seq, d)}
  for i in range(layers):
    tree[f"block_{i:02d}"] = {
        "ln1": {"scale": (d,), "bias": (d,)},
        "attn": {
            "qkv": {"kernel": (d, 3 * d), "bias": (3 * d,)},
            "out": {"kernel": (d, d), "bias": (d,)},
        },
        "ln2": {"scale": (d,), "bias": (d,)},
        "mlp": {
            "fc_in": {"kernel": (d, 4 * d), "bias": (4 * d,)},
            "fc_out": {"kernel": (4 * d, d), "bias": (d,)},
        },
    }
  tree["ln_f"] = {"scale": (d,), "bias": (d,)}
  return tree


def _gpt_dims(n: int, layers: int, seq: int) -> tuple[int, int]:
  """Width d (a multiple of 32) and vocabulary of a GPT tree of about n parameters."""
  d = max(32, int(round(math.sqrt(0.75 * n / (12 * layers)) / 32)) * 32)
  block = 12 * d * d + 13 * d
  vocab = max(32, int(round((n - layers * block - (seq + 2) * d) / d)))
  return d, vocab


def transformer_shapes(n: int, layers: int = 8, seq: int = 128) -> dict[str, Any]:
  """A GPT-shaped tree of 12 * layers + 4 leaves (100 for 8 layers) with about n parameters.

  Token and position embeddings, ``layers`` blocks of 12 leaves (two layer norms,
  fused qkv, attention output, two MLP matrices with 4x width, their biases) and a
  final layer norm. The width d takes about 3/4 of the parameters in the blocks,
  the vocabulary the rest.
  """
  return _gpt(*_gpt_dims(n, layers, seq), layers, seq)


def gpt_shapes(n: int) -> dict[str, Any]:
  """The many-leaf GPT-like tree of the μP suite: 12 layers, 148 leaves."""
  return transformer_shapes(n, layers=12)


def _is_shape(node: Any) -> bool:
  return isinstance(node, tuple) and all(isinstance(i, int) for i in node)


def infshapes_of(shape_name: str, n: int) -> Any:
  """μP InfShapes for a tree of ``SHAPES[shape_name](n)``: base width a quarter of the width.

  A dim is infinite where the tree at width d and the tree at width d / 4
  differ (the model's width, 3d and 4d); vocabulary and sequence are finite.
  """
  if shape_name == "array":
    shapes = array_shapes(n)
    target = shapes["w"]
    base = tuple(max(1, s // 4) for s in target)
  else:
    layers = 12 if shape_name == "gpt" else 8
    d, vocab = _gpt_dims(n, layers, 128)
    shapes, base_tree = _gpt(d, vocab, layers, 128), _gpt(d // 4, vocab, layers, 128)
  if shape_name == "array":
    return {"w": mup_flax.InfShape([mup_flax.InfDim(b, t) for b, t in zip(base, target)])}
  return jax.tree.map(
      lambda t, b: mup_flax.InfShape(
          [mup_flax.InfDim(bb if bb != tt else None, tt) for tt, bb in zip(t, b)]),
      shapes, base_tree, is_leaf=_is_shape)


SHAPES = {"array": array_shapes, "tree": transformer_shapes, "gpt": gpt_shapes}


def make_tree(shapes: Any, dtype: Any, key: jax.Array, scale: float) -> Any:
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
      [(scale * jax.random.normal(k, s, jnp.float32)).astype(dtype) for k, s in zip(keys, leaves)]
  )


def tree_size(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


tree_bytes = program.tree_bytes


# --------------------------------------------------------------------------- entries


class Entry(NamedTuple):
  name: str  # table label
  family: str  # "sf_optax" or "peer"
  store_x: Optional[bool]
  make: Callable[[Any, Any], optax.GradientTransformation]  # (state_dtype, infshapes) -> tx
  reference: Optional[str] = None  # label of the entry its time is compared with
  note: str = ""
  needs_value: bool = False  # its update takes the loss as the extra argument `value`


def label(entry: Entry) -> str:
  if entry.store_x is None:
    return entry.name
  return f"{entry.name} store_x={entry.store_x}"


def builtin_entries() -> list[Entry]:
  result = []
  for store_x in (False, True):
    result += [
        Entry("sf_optax.schedule_free_sgd", "sf_optax", store_x,
              lambda sd, _, s=store_x: sf_optax.schedule_free_sgd(
                  LEARNING_RATE, store_x=s, state_dtype=sd), "optax.sgd(momentum=0.9)"),
        Entry("sf_optax.schedule_free_adamw", "sf_optax", store_x,
              lambda sd, _, s=store_x: sf_optax.schedule_free_adamw(
                  LEARNING_RATE, weight_decay=WEIGHT_DECAY, store_x=s, state_dtype=sd),
              "optax.adamw"),
        # ScheduleFree+: Adam's m and v, and before the per-leaf pass one
        # reduction pass over g, z and x (or y) for its global L1 norm and
        # inner product.
        Entry("sf_optax.schedule_free_plus", "sf_optax", store_x,
              lambda sd, _, s=store_x: sf_optax.schedule_free_plus(
                  weight_decay=WEIGHT_DECAY, store_x=s, state_dtype=sd),
              f"sf_optax.schedule_free_adamw store_x={store_x}", needs_value=True),
        Entry("sf_optax.schedule_free_radam", "sf_optax", store_x,
              lambda sd, _, s=store_x: sf_optax.schedule_free_radam(
                  LEARNING_RATE, weight_decay=WEIGHT_DECAY, store_x=s, state_dtype=sd),
              "optax.adamw"),
    ]
  result += [
      Entry("optax.sgd(momentum=0.9)", "peer", None,
            lambda sd, _: optax.sgd(LEARNING_RATE, momentum=0.9, accumulator_dtype=sd)),
      Entry("optax.adamw", "peer", None,
            lambda sd, _: optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY, mu_dtype=sd)),
      Entry("optax.contrib.schedule_free_sgd", "peer", None,
            lambda sd, _: optax.contrib.schedule_free_sgd(LEARNING_RATE, state_dtype=sd),
            "sf_optax.schedule_free_sgd store_x=False"),
      Entry("optax.contrib.schedule_free_adamw", "peer", None,
            lambda sd, _: optax.contrib.schedule_free_adamw(
                LEARNING_RATE, weight_decay=WEIGHT_DECAY, state_dtype=sd),
            "sf_optax.schedule_free_adamw store_x=False"),
  ]
  return result


# The wrapper suite: (label, base factory, built-in computing the same thing or None).
# Built-ins: SF-SGD is schedule_free(sgd); SF-AdamW without decay is
# schedule_free(adam(b1=0)) (Adam without momentum, bias-corrected v); with μP
# per-parameter learning rates both take mup_flax.schedule_free_scales.
def _wrapped_bases() -> list[tuple[str, Callable[[Any, Any], Any], Optional[str], str]]:
  """(label, base factory, built-in computing the same thing or None, note)."""
  lr = LEARNING_RATE
  own_copy = "step shared: reads the old m (optax.lion alone copies m on XLA:CPU too)"
  return [
      ("optax.sgd", lambda sd, _: optax.sgd(lr), "sgd", ""),
      ("optax.sgd(momentum=0.9)",
       lambda sd, _: optax.sgd(lr, momentum=0.9, accumulator_dtype=sd), None, "no built-in"),
      ("optax.adam(b1=0)", lambda sd, _: optax.adam(lr, b1=0.0, mu_dtype=sd), "adamw", ""),
      ("optax.adamw(b1=0, weight_decay=0)",
       lambda sd, _: optax.adamw(lr, b1=0.0, weight_decay=0.0, mu_dtype=sd), "adamw", ""),
      ("optax.chain(scale_by_adam(b1=0), scale_by_learning_rate)",
       lambda sd, _: optax.chain(optax.scale_by_adam(b1=0.0, mu_dtype=sd),
                                 optax.scale_by_learning_rate(lr)), "adamw", ""),
      ("optax.lion(weight_decay=0)",
       lambda sd, _: optax.lion(lr, weight_decay=0.0, mu_dtype=sd), None, own_copy),
      ("optax.rmsprop", lambda sd, _: optax.rmsprop(lr), None, "no built-in"),
      ("optax.adabelief(b1=0)", lambda sd, _: optax.adabelief(lr, b1=0.0), None,
       "no built-in; optax.adabelief alone copies m on XLA:CPU"),
      ("mup_flax.mu_adam(b1=0)",
       lambda sd, inf: mup_flax.mu_adam(lr, inf, b1=0.0, mu_dtype=sd), "mu_adamw", ""),
      ("mup_flax.mu_sgd", lambda sd, inf: mup_flax.mu_sgd(lr, inf), "mu_sgd", ""),
      ("optax.chain(scale_by_adam(b1=0), add_decayed_weights(1e-4), scale_by_learning_rate)",
       lambda sd, _: optax.chain(optax.scale_by_adam(b1=0.0, mu_dtype=sd),
                                 optax.add_decayed_weights(WEIGHT_DECAY),
                                 optax.scale_by_learning_rate(lr)), None,
       "step shared: reads the params (use the wrapper's weight_decay instead)"),
  ]


def _builtin(kind: str, store_x: bool) -> Entry:
  lr = LEARNING_RATE
  makers = {
      "sgd": ("sf_optax.schedule_free_sgd",
              lambda sd, _: sf_optax.schedule_free_sgd(lr, store_x=store_x, state_dtype=sd)),
      "adamw": ("sf_optax.schedule_free_adamw(weight_decay=0)",
                lambda sd, _: sf_optax.schedule_free_adamw(
                    lr, weight_decay=0.0, store_x=store_x, state_dtype=sd)),
      "mu_adamw": ("sf_optax.schedule_free_adamw(**schedule_free_scales(infshapes))",
                   lambda sd, inf: sf_optax.schedule_free_adamw(
                       lr, weight_decay=0.0, store_x=store_x, state_dtype=sd,
                       **mup_flax.schedule_free_scales(inf))),
      "mu_sgd": ("sf_optax.schedule_free_sgd(**schedule_free_scales(infshapes, rule='sgd'))",
                 lambda sd, inf: sf_optax.schedule_free_sgd(
                     lr, store_x=store_x, state_dtype=sd,
                     **mup_flax.schedule_free_scales(inf, rule="sgd"))),
  }
  name, make = makers[kind]
  return Entry(name, "sf_optax", store_x, make)


def wrapper_entries() -> list[Entry]:
  result = []
  for store_x in (False, True):
    seen = set()
    for base_label, base, kind, note in _wrapped_bases():
      if kind is not None and kind not in seen:
        seen.add(kind)
        result.append(_builtin(kind, store_x))
      reference = None if kind is None else label(_builtin(kind, store_x))
      result.append(Entry(
          f"sf_optax.schedule_free({base_label})", "sf_optax", store_x,
          lambda sd, inf, b=base, s=store_x: sf_optax.schedule_free(
              b(sd, inf), LEARNING_RATE, store_x=s, state_dtype=sd),
          reference, note))
  return result


def mup_entries() -> list[Entry]:
  result = [Entry("optax.adamw", "peer", None,
                  lambda sd, _: optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                                            mu_dtype=sd))]
  for store_x in (False, True):
    result += [
        _builtin("mu_adamw", store_x)._replace(reference="optax.adamw"),
        Entry("sf_optax.schedule_free(mup_flax.mu_adam(b1=0))", "sf_optax", store_x,
              lambda sd, inf, s=store_x: sf_optax.schedule_free(
                  mup_flax.mu_adam(LEARNING_RATE, inf, b1=0.0, mu_dtype=sd), LEARNING_RATE,
                  store_x=s, state_dtype=sd), label(_builtin("mu_adamw", store_x))),
    ]
  return result


# Compile suite: (label, factory of the transformation).
COMPILE_ENTRIES = {
    "optax.adamw": lambda: optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
    "sf_optax.schedule_free_adamw store_x=False": lambda: sf_optax.schedule_free_adamw(
        LEARNING_RATE, weight_decay=WEIGHT_DECAY, store_x=False),
    "sf_optax.schedule_free_adamw store_x=True": lambda: sf_optax.schedule_free_adamw(
        LEARNING_RATE, weight_decay=WEIGHT_DECAY, store_x=True),
}


# --------------------------------------------------------------------------- timing


def minor_faults() -> int:
  """Minor page faults of this process so far: a fresh buffer costs one per 4 KiB page touched."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def summary(seconds: list[float]) -> dict[str, float]:
  ms = sorted(1e3 * s for s in seconds)
  q = np.percentile(ms, [25, 50, 75])
  return {"median_ms": float(q[1]), "p25_ms": float(q[0]), "p75_ms": float(q[2]),
          "min_ms": ms[0], "max_ms": ms[-1], "runs": len(ms)}


class CopyProbe:
  """The copy bandwidth: a = a * s + 1 on a donated float32 array, in place; bytes = read + write.

  In place (donated) as the optimizer steps are: a fresh output would pay for page
  faults on every call, not for bandwidth.
  """

  def __init__(self, n_bytes: int):
    n = max(1024, n_bytes // 4 // 1024 * 1024)
    self.array = jnp.zeros((n // 1024, 1024), jnp.float32)
    self.scale = jnp.float32(0.5)
    self.compiled = jax.jit(lambda a, s: a * s + 1.0, donate_argnums=0).lower(
        self.array, self.scale).compile()
    self.bytes = 2 * n * 4
    self.times: list[float] = []

  def run(self, record: bool) -> None:
    start = time.perf_counter()
    self.array = self.compiled(self.array, self.scale)
    self.array.block_until_ready()
    if record:
      self.times.append(time.perf_counter() - start)

  def result(self) -> dict[str, Any]:
    stats = summary(self.times)
    stats.update(bytes=self.bytes, bytes_per_s=self.bytes / (stats["median_ms"] * 1e-3),
                 best_bytes_per_s=self.bytes / (stats["min_ms"] * 1e-3))
    stats.update(gbps=stats["bytes_per_s"] / 1e9, best_gbps=stats["best_bytes_per_s"] / 1e9)
    return stats


def measure_bandwidth(n_bytes: int, repeats: int) -> dict[str, Any]:
  probe = CopyProbe(n_bytes)
  for i in range(repeats + 3):
    probe.run(record=i >= 3)
  return probe.result()


class Prepared:
  """An entry of one configuration: compiled step, its live params and state."""

  def __init__(self, entry: Entry, params: Any, grads: Any, state_dtype: Any, infshapes: Any):
    self.entry = entry
    tx = entry.make(state_dtype, infshapes)
    self.params = jax.tree.map(jnp.copy, params)
    self.state = jax.jit(tx.init)(self.params)
    extra_args = {"value": jnp.ones([], jnp.float32)} if entry.needs_value else {}
    step = jax.jit(program.training_step(tx, **extra_args), donate_argnums=(0, 1))
    start = time.perf_counter()
    lowered = step.lower(self.params, self.state, grads)
    self.lower_s = time.perf_counter() - start
    start = time.perf_counter()
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    self.grads = grads
    self.times: list[float] = []
    self.faults: list[int] = []
    self.n_leaves = len(jax.tree.leaves(params))
    self.state_bytes = tree_bytes(self.state)
    self.read_bytes, self.write_bytes = program.construction_bytes(self.params, self.state, grads)
    self.bytes_accessed = program.bytes_accessed(self.compiled)
    self.temp_bytes = program.temp_bytes(self.compiled)
    memory = self.compiled.memory_analysis()
    # One call holds its arguments, its temporaries and the outputs that alias no argument.
    self.peak_bytes = None if memory is None else int(
        memory.argument_size_in_bytes + memory.temp_size_in_bytes
        + memory.output_size_in_bytes - memory.alias_size_in_bytes)
    try:
      kernels = program.kernels(self.compiled.as_text())
      self.kernels_per_leaf = len(kernels) / self.n_leaves
    except ValueError:  # an HLO text this reader does not know
      self.kernels_per_leaf = None

  def run(self, record: bool) -> None:
    faults, start = minor_faults(), time.perf_counter()
    self.params, self.state = self.compiled(self.params, self.state, self.grads)
    jax.block_until_ready((self.params, self.state))
    if record:
      self.times.append(time.perf_counter() - start)
      self.faults.append(minor_faults() - faults)

  def resident_bytes(self) -> int:
    return tree_bytes(self.params) + tree_bytes(self.state)

  def result(self, bandwidth: dict[str, Any]) -> dict[str, Any]:
    stats = summary(self.times)
    moved = self.read_bytes + self.write_bytes
    floor_s = moved / bandwidth["bytes_per_s"]
    return {
        "label": label(self.entry), "optimizer": self.entry.name,
        "family": self.entry.family, "store_x": self.entry.store_x,
        "reference": self.entry.reference, "note": self.entry.note, **stats,
        "state_bytes": self.state_bytes, "read_bytes": self.read_bytes,
        "write_bytes": self.write_bytes, "floor_ms": 1e3 * floor_s,
        "ratio_to_floor": stats["median_ms"] * 1e-3 / floor_s,
        "lower_s": self.lower_s, "compile_s": self.compile_s,
        "kernels_per_leaf": self.kernels_per_leaf,
        "bytes_accessed": self.bytes_accessed,
        "bytes_accessed_over_construction": (
            None if self.bytes_accessed is None else self.bytes_accessed / moved),
        "temp_bytes": self.temp_bytes, "peak_bytes": self.peak_bytes,
        "page_faults_per_step": float(np.median(self.faults)),
    }


def time_eval_params(prepared: list[Prepared], repeats: int,
                     bandwidth: dict[str, Any]) -> list[dict[str, Any]]:
  """Cost of sf_optax.eval_params (jitted, and eager) on the SF-SGD states of a config."""
  results = []
  for p in prepared:
    if p.entry.name != "sf_optax.schedule_free_sgd":
      continue
    fn = jax.jit(sf_optax.eval_params)
    start = time.perf_counter()
    compiled = fn.lower(p.state, p.params).compile()
    compile_s = time.perf_counter() - start
    kernels = program.kernels(compiled.as_text())
    jitted, eager, faults = [], [], []
    for i in range(repeats + 2):
      before, start = minor_faults(), time.perf_counter()
      x = compiled(p.state, p.params)
      jax.block_until_ready(x)
      if i >= 2:
        jitted.append(time.perf_counter() - start)
        faults.append(minor_faults() - before)
      del x
    for i in range(max(5, repeats // 4) + 1):
      start = time.perf_counter()
      x = sf_optax.eval_params(p.state, p.params)
      jax.block_until_ready(x)
      if i >= 1:
        eager.append(time.perf_counter() - start)
      del x
    params_bytes = tree_bytes(p.params)
    if p.entry.store_x:
      # x is in the state already; by construction nothing to do (a cast if dtypes differ).
      z_bytes = tree_bytes(p.state.x)
      floor = 0 if z_bytes == params_bytes else z_bytes + params_bytes
      buffers = "none" if floor == 0 else "r: x; w: x in params dtype"
    else:
      floor = params_bytes + tree_bytes(p.state.z) + params_bytes
      buffers = "r: y, z; w: x"
    results.append({
        "store_x": p.entry.store_x, "buffers": buffers, "floor_bytes": floor,
        "floor_ms": 1e3 * floor / bandwidth["bytes_per_s"],
        "jit": summary(jitted), "eager": summary(eager), "compile_s": compile_s,
        "hlo_kernels": len(kernels),
        "page_faults_per_call": float(np.median(faults)),
    })
  return results


def run_config(suite: str, entries: list[Entry], size: int, shape: str, dtype_name: str,
               args, log) -> dict:
  dtype, state_dtype = DTYPES[dtype_name]
  shapes = SHAPES[shape](size)
  infshapes = infshapes_of(shape, size)
  key = jax.random.PRNGKey(size)
  params = make_tree(shapes, dtype, key, 0.02)
  grads = make_tree(shapes, dtype, jax.random.fold_in(key, 1), 1e-3)
  n_params, n_leaves = tree_size(params), len(jax.tree.leaves(params))
  load_start = os.getloadavg()[0]
  log(f"\n## {suite}: {size_label(n_params)} params, {shape} ({n_leaves} leaves), {dtype_name},"
      f" load {load_start:.1f}")
  selected = [e for e in entries if re.search(args.only, label(e))]
  results, evals, bandwidths = [], [], []
  budget = int(args.max_resident_gib * (1 << 30))
  pending = list(selected)
  carried: Prepared | None = None
  while pending or carried:
    # A batch of entries whose buffers fit the budget together: timed round-robin.
    batch: list[Prepared] = []
    used = 0
    if carried is not None:
      batch, used, carried = [carried], carried.resident_bytes(), None
    while pending:
      p = Prepared(pending.pop(0), params, grads, state_dtype, infshapes)
      log(f"  compiled {label(p.entry)} in {p.lower_s:.2f}s + {p.compile_s:.2f}s")
      if batch and used + p.resident_bytes() > budget:
        carried = p
        break
      batch.append(p)
      used += p.resident_bytes()
    # The copy probe runs in the same rounds: the floor of these entries uses the
    # bandwidth measured under the same load as they were.
    probe = CopyProbe(int(args.bandwidth_mib * MiB))
    runners = [probe] + batch
    for r in range(args.warmup + args.repeats):
      for p in (runners if r % 2 == 0 else runners[::-1]):
        p.run(record=r >= args.warmup)
    bandwidth = probe.result()
    bandwidths.append(bandwidth)
    log(f"  copy bandwidth {bandwidth['gbps']:.2f} GB/s (best {bandwidth['best_gbps']:.2f})")
    del probe, runners
    for p in batch:
      results.append(p.result(bandwidth))
      log(f"  {label(p.entry):70s} {results[-1]['median_ms']:9.3f} ms"
          f"  x{results[-1]['ratio_to_floor']:.2f} floor")
    if suite == "builtins":
      evals += time_eval_params(batch, args.repeats, bandwidth)
    del batch
    gc.collect()
  by_label = {r["label"]: r for r in results}
  for r in results:
    ref = by_label.get(r["reference"]) if r["reference"] else None
    r["time_over_reference"] = None if ref is None else r["median_ms"] / ref["median_ms"]
    r["peak_over_reference"] = (
        None if ref is None or not ref["peak_bytes"] else r["peak_bytes"] / ref["peak_bytes"])
  return {"suite": suite, "params": n_params, "leaves": n_leaves, "shape": shape,
          "dtype": dtype_name, "params_bytes": tree_bytes(params), "size_arg": size,
          "load_start": load_start, "load_end": os.getloadavg()[0],
          "bandwidth": bandwidths, "entries": results, "eval_params": evals}


# --------------------------------------------------------------------------- compile time


def compile_leaf_shapes(leaves: int) -> dict[str, tuple[int, int]]:
  """``leaves`` float32 matrices of 64 x 32..38 (about 2,240 parameters each)."""
  return {f"p{i:05d}": (64, 32 + i % 7) for i in range(leaves)}


def _memory_status(field: str) -> int:
  """A field of /proc/self/status in bytes (VmRSS: now; VmHWM: peak since the last reset)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def abstract_step(tx, leaves: int):
  """(jitted donated training step, abstract params, abstract state) on the compile suite's tree."""
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
                        compile_leaf_shapes(leaves), is_leaf=_is_shape)
  state = jax.eval_shape(tx.init, params)
  return jax.jit(program.training_step(tx), donate_argnums=(0, 1)), params, state


def compile_child(name: str, leaves: int) -> dict[str, float]:
  """In a fresh process: lower and compile one entry's step on abstract params."""
  step, params, state = abstract_step(COMPILE_ENTRIES[name](), leaves)
  gc.collect()
  # Reset the peak RSS (Linux >= 4.0): the peak below is the lowering's and the compiler's.
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  rss = _memory_status("VmRSS")
  start, cpu = time.perf_counter(), time.process_time()
  lowered = step.lower(params, state, params)
  lower_s, lower_cpu_s = time.perf_counter() - start, time.process_time() - cpu
  start, cpu = time.perf_counter(), time.process_time()
  lowered.compile()
  compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - cpu
  peak = _memory_status("VmHWM")
  return {"lower_s": lower_s, "compile_s": compile_s, "lower_cpu_s": lower_cpu_s,
          "compile_cpu_s": compile_cpu_s, "peak_rss_bytes": peak,
          "rss_before_bytes": rss, "peak_growth_bytes": max(0, peak - rss)}


def compile_suite(leaf_counts: list[int], repeats: int, log,
                  entries: Optional[list[str]] = None) -> dict[str, Any]:
  """Lower/compile time and peak memory against leaf count, entries round-robin.

  Every measurement runs in a fresh subprocess (no warm caches, and the
  process's peak RSS is the compiler's); round r runs every entry once,
  alternating the order. Counts above 1,000 leaves are measured once.
  ``entries`` (default all) always includes ``optax.adamw``, the reference.
  """
  names = [name for name in COMPILE_ENTRIES if entries is None or name in entries
           or name == "optax.adamw"]
  rows = []
  for leaves in leaf_counts:
    load_start = os.getloadavg()[0]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(repeats if leaves <= 1000 else 1):
      for name in (names if r % 2 == 0 else names[::-1]):
        out = subprocess.run(
            [sys.executable, __file__, "--compile-child", name, str(leaves)],
            check=True, capture_output=True, text=True)
        runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        log(f"  compile {leaves} leaves {name}: lower {runs[name][-1]['lower_s']:.2f}s"
            f" compile {runs[name][-1]['compile_s']:.2f}s"
            f" (CPU {runs[name][-1]['lower_cpu_s'] + runs[name][-1]['compile_cpu_s']:.2f}s)"
            f" peak {runs[name][-1]['peak_rss_bytes'] / MiB:.0f} MiB")
    row = {"leaves": leaves, "params": tree_size(jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32), compile_leaf_shapes(leaves),
        is_leaf=_is_shape)), "load_start": load_start, "load_end": os.getloadavg()[0],
           "entries": {}}
    for name, measured in runs.items():
      total = [m["lower_s"] + m["compile_s"] for m in measured]
      row["entries"][name] = {
          "lower": summary([m["lower_s"] for m in measured]),
          "compile": summary([m["compile_s"] for m in measured]),
          "total": summary(total),
          "total_cpu": summary([m["lower_cpu_s"] + m["compile_cpu_s"] for m in measured]),
          "peak_rss_mib": float(np.median([m["peak_rss_bytes"] for m in measured])) / MiB,
          "peak_growth_mib": float(np.median([m["peak_growth_bytes"] for m in measured])) / MiB,
          "runs": measured,
      }
    ref = row["entries"]["optax.adamw"]
    for name, e in row["entries"].items():
      e["total_over_adamw"] = e["total"]["median_ms"] / ref["total"]["median_ms"]
      e["cpu_over_adamw"] = e["total_cpu"]["median_ms"] / ref["total_cpu"]["median_ms"]
      e["lower_over_adamw"] = e["lower"]["median_ms"] / ref["lower"]["median_ms"]
      e["compile_over_adamw"] = e["compile"]["median_ms"] / ref["compile"]["median_ms"]
      e["peak_over_adamw"] = e["peak_rss_mib"] / ref["peak_rss_mib"]
      e["growth_over_adamw"] = e["peak_growth_mib"] / max(ref["peak_growth_mib"], 1e-9)
    rows.append(row)
  return {"repeats": repeats, "rows": rows}


# --------------------------------------------------------------------------- report


def find(config: dict, name: str, store_x: bool | None = None) -> dict | None:
  for r in config["entries"]:
    if r["optimizer"] == name and r["store_x"] == store_x:
      return r
  return None


def goals(config: dict) -> dict[str, Any]:
  """The built-ins suite's goals as ratios of medians (None where an entry was not run)."""

  def ratio(a, b):
    return None if a is None or b is None else a["median_ms"] / b["median_ms"]

  adamw_f = find(config, "sf_optax.schedule_free_adamw", False)
  adamw_t = find(config, "sf_optax.schedule_free_adamw", True)
  sgd_f = find(config, "sf_optax.schedule_free_sgd", False)
  sgd_t = find(config, "sf_optax.schedule_free_sgd", True)
  out = {
      "sf_adamw_F / contrib_sf_adamw": ratio(adamw_f, find(config, "optax.contrib.schedule_free_adamw")),
      "sf_adamw_F / optax_adamw": ratio(adamw_f, find(config, "optax.adamw")),
      "sf_sgd_F / contrib_sf_sgd": ratio(sgd_f, find(config, "optax.contrib.schedule_free_sgd")),
  }
  for tag, f, t in (("sgd", sgd_f, sgd_t), ("adamw", adamw_f, adamw_t)):
    if f and t:
      out[f"sf_{tag} store_x: extra time / extra bytes"] = (
          (t["median_ms"] / f["median_ms"] - 1)
          / ((t["read_bytes"] + t["write_bytes"]) / (f["read_bytes"] + f["write_bytes"]) - 1))
  return out


def fmt(value: Any, spec: str = ".2f") -> str:
  return "–" if value is None else format(value, spec)


def entry_table(config: dict) -> list[str]:
  lines = ["| optimizer | store_x | ms [p25–p75] | × ref | state MiB | peak MiB (× ref) |"
           " moves MiB | ×floor | bytes accessed / moves | kern/leaf | temp MiB | faults MiB |"
           " lower + compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in config["entries"]:
    temp = None if r["temp_bytes"] is None else r["temp_bytes"] / MiB
    peak = None if r["peak_bytes"] is None else r["peak_bytes"] / MiB
    ref = fmt(r["time_over_reference"]) if r["reference"] else ""
    if r["note"]:
      ref = f"{ref} ({r['note']})" if ref else r["note"]
    peak_ref = f" ({fmt(r['peak_over_reference'])})" if r["peak_over_reference"] else ""
    lines.append(
        f"| {r['optimizer']} | {'' if r['store_x'] is None else r['store_x']} |"
        f" {r['median_ms']:.3f} [{r['p25_ms']:.3f}–{r['p75_ms']:.3f}] | {ref} |"
        f" {r['state_bytes'] / MiB:.1f} | {fmt(peak, '.0f')}{peak_ref} |"
        f" {(r['read_bytes'] + r['write_bytes']) / MiB:.0f} | {r['ratio_to_floor']:.2f} |"
        f" {fmt(r['bytes_accessed_over_construction'])} | {fmt(r['kernels_per_leaf'], '.0f')} |"
        f" {fmt(temp, '.1f')} | {r['page_faults_per_step'] * PAGE / MiB:.1f} |"
        f" {r['lower_s']:.2f} + {r['compile_s']:.2f} |")
  return lines


def markdown(report: dict) -> str:
  m = report["machine"]
  bw = report["bandwidth"]
  lines = [
      f"# Optimizer step time: {m['device']} ({m['platform']}), {report['date']}",
      "",
      f"`{report['command']}`; jax {m['jax']}, jaxlib {m['jaxlib']}, optax {m['optax']},"
      f" python {m['python']}, {m['cpu']} with {m['cpu_count']} CPU cores,"
      f" XLA_FLAGS={m['xla_flags'] or '(none)'}; load average {m['load_start']:.1f} at the start"
      f" and {report['load_end']:.1f} at the end (each configuration below has its own);"
      f" wall time {report['wall_s'] / 60:.1f} min. Copy bandwidth (a = a * s + 1 in place on"
      f" {bw['array_mib']:.0f} MiB, read + write): median {bw['start']['gbps']:.2f} GB/s at the"
      f" start and {bw['end']['gbps']:.2f} at the end. {report['repeats']} timed steps per entry"
      f" after {report['warmup']} warm-up rounds, entries of a configuration round-robin.",
      "",
      "Columns: **ms** median step time [p25–p75]; **× ref** median over the median of the"
      " entry it is compared with (the built-in that computes the same thing for a wrapper,"
      " `optax.adamw` for the μP compositions' built-in, the peer for the built-ins); **state**"
      " MiB of optimizer state; **peak** MiB one call of the compiled step holds (arguments,"
      " temporaries, outputs that alias no argument), and over the reference's; **moves** the"
      " MiB a step must read and write by construction (g, y and every params-sized state"
      " buffer read once; y and every state buffer written once); **×floor** median over those"
      " bytes at the copy bandwidth of the same rounds; **bytes accessed / moves** XLA's"
      " `cost_analysis()` bytes over the construction bytes; **kern/leaf** kernels touching"
      " params-sized buffers per leaf; **temp** MiB of temporaries XLA allocates; **faults**"
      " MiB of fresh pages the step touches (minor page faults × page size, median);"
      " **lower + compile** seconds.",
  ]
  for config in report["configs"]:
    probes = ", ".join(f"{b['gbps']:.2f}" for b in config["bandwidth"])
    lines += ["", f"## {config['suite']}: {size_label(config['params'])} params"
              f" ({config['params']:,}), {config['shape']} ({config['leaves']} leaves),"
              f" {config['dtype']}", "",
              f"Load average {config['load_start']:.1f} → {config['load_end']:.1f}; copy"
              f" bandwidth in these rounds: {probes} GB/s.", ""]
    lines += entry_table(config)
    if config["eval_params"]:
      lines += ["", "| eval_params | store_x | jit ms [p25–p75] | eager ms | moves MiB |"
                " floor ms | kernels | faults MiB | compile s |",
                "|---|---|---|---|---|---|---|---|---|"]
    for e in config["eval_params"]:
      lines.append(
          f"| sf_optax.eval_params | {e['store_x']} | {e['jit']['median_ms']:.3f}"
          f" [{e['jit']['p25_ms']:.3f}–{e['jit']['p75_ms']:.3f}] | {e['eager']['median_ms']:.3f} |"
          f" {e['floor_bytes'] / MiB:.0f} | {e['floor_ms']:.3f} | {e['hlo_kernels']} |"
          f" {e['page_faults_per_call'] * PAGE / MiB:.1f} | {e['compile_s']:.2f} |")
  builtins = [c for c in report["configs"] if c["suite"] == "builtins"]
  if builtins:
    names = list(builtins[0]["goals"])
    lines += ["", "## Built-ins: ratios of medians within one configuration", "",
              "| config | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for config in builtins:
      lines.append(f"| {size_label(config['params'])} {config['shape']} {config['dtype']} | "
                   + " | ".join(fmt(config["goals"].get(n)) for n in names) + " |")
  if report.get("compile"):
    table = report["compile"]
    lines += ["", "## Compile time against leaf count", "",
              "Float32 leaves of 64 × 32..38; each measurement in a fresh process (lower ="
              " trace + lower, compile = XLA), entries round-robin, median [p25–p75] of"
              f" {table['repeats']} runs up to 1,000 leaves, one run above; **CPU s** the"
              " process's CPU time for both (user + system: less sensitive to other processes"
              " on a shared machine than the wall time); **peak** the process's peak RSS during lowering and compiling, and in parentheses its growth"
              " over the RSS before lowering (what the compiler took); **×** over `optax.adamw`"
              " on the same tree.", "",
              "| leaves | optimizer | lower s | compile s | total s | × adamw (lower, compile) |"
              " CPU s (× adamw) | peak MiB (growth) | × adamw (peak, growth) | load |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
      for name, e in row["entries"].items():
        def span(s):
          return (f"{s['median_ms'] / 1e3:.2f}" if s["runs"] < 3 else
                  f"{s['median_ms'] / 1e3:.2f} [{s['p25_ms'] / 1e3:.2f}–{s['p75_ms'] / 1e3:.2f}]")
        lines.append(
            f"| {row['leaves']:,} | {name} | {span(e['lower'])} | {span(e['compile'])} |"
            f" {span(e['total'])} | {e['total_over_adamw']:.2f} ({e['lower_over_adamw']:.2f},"
            f" {e['compile_over_adamw']:.2f}) | {span(e['total_cpu'])} ({e['cpu_over_adamw']:.2f}) |"
            f" {e['peak_rss_mib']:.0f}"
            f" ({e['peak_growth_mib']:.0f}) | {e['peak_over_adamw']:.2f},"
            f" {e['growth_over_adamw']:.2f} | {row['load_start']:.1f}→{row['load_end']:.1f} |")
  return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
  device = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  return {
      "platform": device.platform, "device": getattr(device, "device_kind", str(device)),
      "cpu": cpu, "cpu_count": os.cpu_count(),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__, "optax": optax.__version__,
      "sf_optax": sf_optax.__version__, "python": platform.python_version(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_start": os.getloadavg()[0],
  }


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--suites", default=",".join(SUITES),
                      help="comma-separated: builtins, wrapper, mup, compile (default all)")
  parser.add_argument("--quick", action="store_true",
                      help="small sizes everywhere (1M; μP tree 4M; 100 and 1,000 leaves):"
                      " a few minutes")
  parser.add_argument("--sizes", default=None,
                      help="built-ins: parameter counts (K/M = 2^10/2^20); default 1M,16M")
  parser.add_argument("--full", action="store_true", help="built-ins: add 64M to --sizes")
  parser.add_argument("--shapes", default="array,tree",
                      help="built-ins: array (one leaf), tree (100 leaves)")
  parser.add_argument("--dtype", default=None,
                      help="float32, bf16 (bf16 params + float32 optimizer state);"
                      " default both (float32 with --quick)")
  parser.add_argument("--wrapper-size", default=None, help="wrapper suite, one array; default 16M")
  parser.add_argument("--mup-size", default=None, help="μP suite, 148-leaf tree; default 40M")
  parser.add_argument("--compile-leaves", default=None,
                      help="compile suite: leaf counts; default 100,1000,4000,10000")
  parser.add_argument("--compile-entries", default=None,
                      help="compile suite: entries, separated by ';' (default all;"
                           " optax.adamw, the reference, always)")
  parser.add_argument("--compile-repeats", type=int, default=3,
                      help="compile suite: runs per entry up to 1,000 leaves")
  parser.add_argument("--repeats", type=int, default=None, help="timed steps per entry (20)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
  parser.add_argument("--only", default="", help="regex on the entry labels")
  parser.add_argument("--bandwidth-mib", type=float, default=256,
                      help="size of the arrays of the copy-bandwidth measurement")
  parser.add_argument("--max-resident-gib", type=float, default=8.0,
                      help="entries timed round-robin together hold at most this much")
  parser.add_argument("--out", default=None,
                      help="output path without extension (default benchmarks/results/<platform>_<date>)")
  parser.add_argument("--compile-child", nargs=2, metavar=("ENTRY", "LEAVES"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.compile_child:
    print(json.dumps(compile_child(args.compile_child[0], int(args.compile_child[1]))))
    return {}
  quick = args.quick
  sizes = [parse_size(s) for s in (args.sizes or ("1M" if quick else "1M,16M")).split(",") if s]
  if args.full and (1 << 26) not in sizes:
    sizes.append(1 << 26)
  shapes = [s for s in (("array",) if quick and args.shapes == "array,tree"
                        else args.shapes.split(",")) if s]
  dtypes = [d for d in (args.dtype or ("float32" if quick else "float32,bf16")).split(",") if d]
  wrapper_size = parse_size(args.wrapper_size or ("1M" if quick else "16M"))
  mup_size = parse_size(args.mup_size or ("4M" if quick else "40M"))
  leaf_counts = [int(n) for n in (args.compile_leaves or (
      "100,1000" if quick else "100,1000,4000,10000")).split(",") if n]
  repeats = args.repeats or (10 if quick else 20)
  args.repeats = repeats
  suites = [s for s in args.suites.split(",") if s]
  for s in suites:
    if s not in SUITES:
      parser.error(f"unknown suite {s!r}")
  for s in shapes:
    if s not in SHAPES:
      parser.error(f"unknown shape {s!r}")
  for d in dtypes:
    if d not in DTYPES:
      parser.error(f"unknown dtype {d!r}")

  date = datetime.date.today().isoformat()
  info = machine()
  out = pathlib.Path(args.out) if args.out else (
      pathlib.Path(__file__).parent / "results" / f"{info['platform']}_{date}")
  out.parent.mkdir(parents=True, exist_ok=True)
  wall_start = time.perf_counter()

  def log(text):
    print(text, file=sys.stderr, flush=True)

  bw_bytes = int(args.bandwidth_mib * MiB)
  start_bw = measure_bandwidth(bw_bytes, max(repeats, 20))
  log(f"copy bandwidth {start_bw['gbps']:.2f} GB/s (best {start_bw['best_gbps']:.2f})")
  configs = []
  if "builtins" in suites:
    for size in sizes:
      for shape in shapes:
        for dtype_name in dtypes:
          config = run_config("builtins", builtin_entries(), size, shape, dtype_name, args, log)
          config["goals"] = goals(config)
          configs.append(config)
  if "wrapper" in suites:
    configs.append(run_config("wrapper", wrapper_entries(), wrapper_size, "array", "float32",
                              args, log))
  if "mup" in suites:
    for dtype_name in dtypes:
      configs.append(run_config("mup", mup_entries(), mup_size, "gpt", dtype_name, args, log))
  compile_entries = None
  if args.compile_entries:
    compile_entries = [e.strip() for e in args.compile_entries.split(";") if e.strip()]
    for name in compile_entries:
      if name not in COMPILE_ENTRIES:
        parser.error(f"unknown compile entry {name!r}; known: {'; '.join(COMPILE_ENTRIES)}")
  compile_table = compile_suite(leaf_counts, args.compile_repeats, log, compile_entries) if (
      "compile" in suites) else None
  end_bw = measure_bandwidth(bw_bytes, max(repeats, 20))
  log(f"copy bandwidth at the end {end_bw['gbps']:.2f} GB/s (best {end_bw['best_gbps']:.2f})")
  report = {
      "command": "python " + " ".join([pathlib.Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
      "date": date, "machine": info, "load_end": os.getloadavg()[0],
      "wall_s": time.perf_counter() - wall_start,
      "repeats": repeats, "warmup": args.warmup,
      "learning_rate": LEARNING_RATE, "weight_decay_adamw": WEIGHT_DECAY,
      "bandwidth": {"array_mib": args.bandwidth_mib, "start": start_bw, "end": end_bw},
      "configs": configs, "compile": compile_table,
  }
  json_path, md_path = out.parent / (out.name + ".json"), out.parent / (out.name + ".md")
  json_path.write_text(json.dumps(report, indent=1))
  text = markdown(report)
  md_path.write_text(text)
  print(text)
  log(f"wrote {json_path} and {md_path}")
  return report


if __name__ == "__main__":
  main()
