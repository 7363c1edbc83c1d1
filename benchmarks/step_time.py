"""Step time and memory of sf_optax against its peers, and the distance to the bandwidth floor.

One command, one process, one run::

    python benchmarks/step_time.py                 # 1M and 16M params, float32 and bf16
    python benchmarks/step_time.py --full          # adds 64M
    python benchmarks/step_time.py --sizes 64K --repeats 5 --dtype float32   # a smoke test

What is timed is the jitted training update ``tx.update`` + ``optax.apply_updates``
with params and state donated (``jax.jit(step, donate_argnums=(0, 1))``), the
way a training loop runs it. An optimizer step is a few elementwise passes over
the parameters, so its cost is the bytes it moves: every entry is compared with
its floor, the bytes it must read and write by construction (the gradient, the
params and every params-sized state buffer are read once; the params and every
params-sized state buffer are written once) divided by the copy bandwidth
measured in the same run. XLA's own compiled program is parsed as well: the
kernels (fusions and copies) that touch params-sized buffers, the bytes they
actually move, and the temporaries the compiled program allocates.

The entries of one configuration (size, tree shape, dtype) are timed
round-robin: round r runs every entry once, so drift and noise from other
processes fall on all entries alike, and no entry keeps its buffers in the
cache between its own steps (a training step's forward and backward passes
would evict them too).

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
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

import sf_optax

MiB = float(1 << 20)
PAGE = resource.getpagesize()
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
DTYPES = {"float32": (jnp.float32, None), "bf16": (jnp.bfloat16, jnp.float32)}


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


def transformer_shapes(n: int, layers: int = 8, seq: int = 128) -> dict[str, Any]:
  """A GPT-shaped tree of 100 leaves with about n parameters.

  Token and position embeddings, ``layers`` blocks of 12 leaves (two layer norms,
  fused qkv, attention output, two MLP matrices with 4x width, their biases) and a
  final layer norm. The width d takes about 3/4 of the parameters in the blocks,
  the vocabulary the rest.
  """
  d = max(32, int(round(math.sqrt(0.75 * n / (12 * layers)) / 32)) * 32)
  block = 12 * d * d + 13 * d
  vocab = max(32, int(round((n - layers * block - (seq + 2) * d) / d)))
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


SHAPES = {"array": array_shapes, "tree": transformer_shapes}


def _is_shape(node: Any) -> bool:
  return isinstance(node, tuple) and all(isinstance(i, int) for i in node)


def make_tree(shapes: Any, dtype: Any, key: jax.Array, scale: float) -> Any:
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
      [(scale * jax.random.normal(k, s, jnp.float32)).astype(dtype) for k, s in zip(keys, leaves)]
  )


def tree_bytes(tree: Any, *, min_ndim: int = 0) -> int:
  return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if x.ndim >= min_ndim)


def tree_size(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- entries


class Entry(NamedTuple):
  name: str  # table label
  family: str  # "sf_optax" or "peer"
  store_x: bool | None
  buffers: str  # what one step reads and writes, by construction
  make: Callable[[Any], optax.GradientTransformation]  # state_dtype (or None) -> tx
  needs_value: bool = False  # its update takes the loss as the extra argument `value`


def entries() -> list[Entry]:
  result = []
  for store_x in (False, True):
    x = ", x" if store_x else ""
    result += [
        Entry(
            "sf_optax.schedule_free_sgd", "sf_optax", store_x, f"r: g, y, z{x}; w: y, z{x}",
            lambda sd, s=store_x: sf_optax.schedule_free_sgd(
                LEARNING_RATE, store_x=s, state_dtype=sd)),
        Entry(
            "sf_optax.schedule_free_adamw", "sf_optax", store_x,
            f"r: g, y, z{x}, v; w: y, z{x}, v",
            lambda sd, s=store_x: sf_optax.schedule_free_adamw(
                LEARNING_RATE, weight_decay=WEIGHT_DECAY, store_x=s, state_dtype=sd)),
        # ScheduleFree+: Adam's m and v, and before the per-leaf pass one
        # reduction pass over g, z and x (or y) for its global L1 norm and
        # inner product.
        Entry(
            "sf_optax.schedule_free_plus", "sf_optax", store_x,
            f"r: g, y, z{x}, m, v; w: y, z{x}, m, v",
            lambda sd, s=store_x: sf_optax.schedule_free_plus(
                weight_decay=WEIGHT_DECAY, store_x=s, state_dtype=sd), needs_value=True),
        Entry(
            "sf_optax.schedule_free_radam", "sf_optax", store_x,
            f"r: g, y, z{x}, v; w: y, z{x}, v",
            lambda sd, s=store_x: sf_optax.schedule_free_radam(
                LEARNING_RATE, weight_decay=WEIGHT_DECAY, store_x=s, state_dtype=sd)),
        Entry(
            "sf_optax.schedule_free(optax.adam(b1=0))", "sf_optax", store_x,
            f"r: g, y, z{x}, m, v; w: y, z{x}, m, v",
            lambda sd, s=store_x: sf_optax.schedule_free(
                optax.adam(LEARNING_RATE, b1=0.0), LEARNING_RATE, store_x=s, state_dtype=sd)),
    ]
  result += [
      Entry(
          "optax.sgd(momentum=0.9)", "peer", None, "r: g, y, m; w: y, m",
          lambda sd: optax.sgd(LEARNING_RATE, momentum=0.9, accumulator_dtype=sd)),
      Entry(
          "optax.adamw", "peer", None, "r: g, y, m, v; w: y, m, v",
          lambda sd: optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY, mu_dtype=sd)),
      Entry(
          "optax.contrib.schedule_free_sgd", "peer", None, "r: g, y, z; w: y, z",
          lambda sd: optax.contrib.schedule_free_sgd(LEARNING_RATE, state_dtype=sd)),
      Entry(
          "optax.contrib.schedule_free_adamw", "peer", None, "r: g, y, z, v; w: y, z, v",
          lambda sd: optax.contrib.schedule_free_adamw(
              LEARNING_RATE, weight_decay=WEIGHT_DECAY, state_dtype=sd)),
  ]
  return result


def label(entry: Entry) -> str:
  if entry.store_x is None:
    return entry.name
  return f"{entry.name} store_x={entry.store_x}"


# --------------------------------------------------------------------------- HLO


_ITEM_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "u64": 8, "s32": 4,
               "u32": 4, "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_ARRAY = re.compile(r"\b(f64|f32|bf16|f16|s64|u64|s32|u32|s16|u16|s8|u8|pred)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


def _arrays(type_text: str) -> list[tuple[int, int]]:
  """(elements, bytes) of every array in an HLO type (tuples included)."""
  result = []
  for dtype, dims in _ARRAY.findall(type_text):
    size = math.prod(int(d) for d in dims.split(",") if d)
    result.append((size, size * _ITEM_BYTES[dtype]))
  return result


def hlo_kernels(hlo_text: str) -> list[dict[str, Any]]:
  """The ENTRY instructions of a compiled module that read or write non-scalar buffers.

  In an optimizer update every non-scalar buffer has the shape of a parameter
  leaf. Each entry: name, opcode, bytes read (non-scalar operands) and written
  (non-scalar outputs). Fusions are opaque here, so this is the traffic between
  kernels, which is what memory bandwidth pays for.
  """
  start = hlo_text.index("\nENTRY")
  body = hlo_text[hlo_text.index("{", start) + 1: hlo_text.index("\n}", start)]
  shapes, instructions = {}, []
  for line in body.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, type_text, opcode, rest = match.groups()
    shapes[name] = _arrays(type_text)
    operands = [] if opcode == "parameter" else re.findall(r"%([\w.\-]+)", rest.split("),")[0])
    instructions.append((name, opcode, operands))
  kernels = []
  for name, opcode, operands in instructions:
    if opcode in _NO_TRAFFIC:
      continue
    written = sum(b for n, b in shapes[name] if n > 1)
    big = [o for o in operands if any(n > 1 for n, _ in shapes.get(o, []))]
    read = sum(b for o in big for n, b in shapes[o] if n > 1)
    if read or written:
      kernels.append({"name": name, "opcode": opcode, "read": read, "written": written,
                      "operands": big})
  return kernels


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

  def __init__(self, entry: Entry, params: Any, grads: Any, state_dtype: Any):
    self.entry = entry
    tx = entry.make(state_dtype)
    self.params = jax.tree.map(jnp.copy, params)
    self.state = jax.jit(tx.init)(self.params)

    extra_args = {"value": jnp.ones([], jnp.float32)} if entry.needs_value else {}

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params, **extra_args)
      return optax.apply_updates(params, updates), state

    start = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(self.params, self.state, grads)
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    self.grads = grads
    self.times: list[float] = []
    self.faults: list[int] = []
    params_bytes = tree_bytes(self.params)
    big_state = tree_bytes(self.state, min_ndim=1)
    self.state_bytes = tree_bytes(self.state)
    self.read_bytes = tree_bytes(grads) + params_bytes + big_state
    self.write_bytes = params_bytes + big_state
    kernels = hlo_kernels(self.compiled.as_text())
    self.n_leaves = len(jax.tree.leaves(params))
    self.hlo_kernels = len(kernels)
    self.hlo_bytes = sum(k["read"] + k["written"] for k in kernels)
    self.hlo_copies = sum(k["opcode"] == "copy" for k in kernels)
    memory = self.compiled.memory_analysis()
    self.temp_bytes = int(memory.temp_size_in_bytes) if memory is not None else None

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
    best_floor_s = moved / bandwidth["best_bytes_per_s"]
    return {
        "optimizer": self.entry.name, "family": self.entry.family,
        "store_x": self.entry.store_x, "buffers": self.entry.buffers, **stats,
        "state_bytes": self.state_bytes, "read_bytes": self.read_bytes,
        "write_bytes": self.write_bytes, "floor_ms": 1e3 * floor_s,
        "ratio_to_floor": stats["median_ms"] * 1e-3 / floor_s,
        "best_floor_ms": 1e3 * best_floor_s,
        "best_ratio_to_floor": stats["min_ms"] * 1e-3 / best_floor_s,
        "compile_s": self.compile_s, "hlo_kernels": self.hlo_kernels,
        "hlo_kernels_per_leaf": self.hlo_kernels / self.n_leaves,
        "hlo_copies": self.hlo_copies, "hlo_bytes": self.hlo_bytes,
        "hlo_bytes_over_floor": self.hlo_bytes / moved,
        "temp_bytes": self.temp_bytes,
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
    kernels = hlo_kernels(compiled.as_text())
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
        "hlo_kernels": len(kernels), "hlo_bytes": sum(k["read"] + k["written"] for k in kernels),
        "page_faults_per_call": float(np.median(faults)),
    })
  return results


def run_config(size: int, shape: str, dtype_name: str, args, log) -> dict:
  dtype, state_dtype = DTYPES[dtype_name]
  shapes = SHAPES[shape](size)
  key = jax.random.PRNGKey(size)
  params = make_tree(shapes, dtype, key, 0.02)
  grads = make_tree(shapes, dtype, jax.random.fold_in(key, 1), 1e-3)
  n_params, n_leaves = tree_size(params), len(jax.tree.leaves(params))
  log(f"\n## {size_label(n_params)} params, {shape} ({n_leaves} leaves), {dtype_name}")
  selected = [e for e in entries() if re.search(args.only, label(e))]
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
      p = Prepared(pending.pop(0), params, grads, state_dtype)
      log(f"  compiled {label(p.entry)} in {p.compile_s:.2f}s")
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
      log(f"  {label(p.entry):58s} {results[-1]['median_ms']:9.3f} ms"
          f"  x{results[-1]['ratio_to_floor']:.2f} floor")
    evals += time_eval_params(batch, args.repeats, bandwidth)
    del batch
    gc.collect()
  return {"params": n_params, "leaves": n_leaves, "shape": shape, "dtype": dtype_name,
          "params_bytes": tree_bytes(params), "size_arg": size, "bandwidth": bandwidths,
          "entries": results, "eval_params": evals}


# --------------------------------------------------------------------------- report


def find(config: dict, name: str, store_x: bool | None = None) -> dict | None:
  for r in config["entries"]:
    if r["optimizer"] == name and r["store_x"] == store_x:
      return r
  return None


def goals(config: dict) -> dict[str, Any]:
  """The issue's goals as ratios of medians (None where an entry was not run)."""

  def ratio(a, b):
    return None if a is None or b is None else a["median_ms"] / b["median_ms"]

  adamw_f = find(config, "sf_optax.schedule_free_adamw", False)
  adamw_t = find(config, "sf_optax.schedule_free_adamw", True)
  sgd_f = find(config, "sf_optax.schedule_free_sgd", False)
  sgd_t = find(config, "sf_optax.schedule_free_sgd", True)
  out = {
      "sf_plus_F / sf_adamw_F": ratio(find(config, "sf_optax.schedule_free_plus", False), adamw_f),
      "sf_plus_T / sf_adamw_T": ratio(find(config, "sf_optax.schedule_free_plus", True), adamw_t),
      "sf_adamw_F / contrib_sf_adamw": ratio(adamw_f, find(config, "optax.contrib.schedule_free_adamw")),
      "sf_adamw_F / optax_adamw": ratio(adamw_f, find(config, "optax.adamw")),
      "sf_sgd_F / contrib_sf_sgd": ratio(sgd_f, find(config, "optax.contrib.schedule_free_sgd")),
  }
  for tag, f, t in (("sgd", sgd_f, sgd_t), ("adamw", adamw_f, adamw_t)):
    if f and t:
      out[f"sf_{tag} store_x: extra time / extra bytes"] = (
          (t["median_ms"] / f["median_ms"] - 1)
          / ((t["read_bytes"] + t["write_bytes"]) / (f["read_bytes"] + f["write_bytes"]) - 1))
  peers = [r for r in config["entries"] if r["family"] == "peer"]
  ours = [r for r in config["entries"] if r["family"] == "sf_optax"]
  if ours:
    out["worst sf_optax ratio to floor"] = max(r["ratio_to_floor"] for r in ours)
  if peers:
    out["best peer ratio to floor"] = min(r["ratio_to_floor"] for r in peers)
  return out


def fmt(value: Any, spec: str = ".2f") -> str:
  return "–" if value is None else format(value, spec)


def markdown(report: dict) -> str:
  m = report["machine"]
  bw = report["bandwidth"]
  lines = [
      f"# Optimizer step time: {m['device']} ({m['platform']}), {report['date']}",
      "",
      f"`{report['command']}`; jax {m['jax']}, jaxlib {m['jaxlib']}, optax {m['optax']},"
      f" {m['cpu_count']} CPU cores, load average {m['load_start']:.1f} at the start and"
      f" {report['load_end']:.1f} at the end. Copy bandwidth (a = a * s + 1 in place on"
      f" {bw['array_mib']:.0f} MiB, read + write): median {bw['start']['gbps']:.2f} GB/s at the"
      f" start and {bw['end']['gbps']:.2f} at the end (best {bw['start']['best_gbps']:.2f} and"
      f" {bw['end']['best_gbps']:.2f}); each configuration measures its own in the same"
      f" rounds as its entries and uses it for its floors. {report['repeats']} timed steps"
      f" per entry after {report['warmup']} warm-up rounds, entries of a configuration"
      " round-robin.",
      "",
      "Columns: **ms** median step time [p25–p75] and the fastest step; **state** MiB of"
      " optimizer state; **moves** what one step must read (r) and write (w) by construction"
      " and its MiB; **floor** those bytes over the configuration's median copy bandwidth;"
      " **×floor** = median / floor (the JSON also has best_ratio_to_floor: fastest step over"
      " the bytes at the best copy bandwidth); **kern/leaf** kernels touching params-sized buffers per leaf in XLA's"
      " compiled program; **HLO/floor** the bytes those kernels move over the construction"
      " bytes (the best this program can do is ×floor = HLO/floor); **temp** MiB of"
      " temporaries XLA allocates; **faults** MiB of fresh pages the step touches (minor page"
      " faults x page size, median): a params-sized temporary or output is a fresh allocation"
      " that the kernel faults in page by page on every call; **compile** lower + compile, s.",
  ]
  for config in report["configs"]:
    probes = ", ".join(f"{b['gbps']:.2f} (best {b['best_gbps']:.2f})" for b in config["bandwidth"])
    lines += ["", f"## {size_label(config['params'])} params ({config['params']:,}),"
              f" {config['shape']} ({config['leaves']} leaves), {config['dtype']}", "",
              f"Copy bandwidth in these rounds: {probes} GB/s.", "",
              "| optimizer | store_x | ms [p25–p75] | min ms | state MiB | moves (MiB) |"
              " floor ms | ×floor | kern/leaf | HLO/floor | temp MiB | faults MiB |"
              " compile s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in config["entries"]:
      temp = None if r["temp_bytes"] is None else r["temp_bytes"] / MiB
      lines.append(
          f"| {r['optimizer']} | {'' if r['store_x'] is None else r['store_x']} |"
          f" {r['median_ms']:.3f} [{r['p25_ms']:.3f}–{r['p75_ms']:.3f}] | {r['min_ms']:.3f} |"
          f" {r['state_bytes'] / MiB:.1f} |"
          f" {r['buffers']} ({(r['read_bytes'] + r['write_bytes']) / MiB:.0f}) |"
          f" {r['floor_ms']:.3f} | {r['ratio_to_floor']:.2f} |"
          f" {r['hlo_kernels_per_leaf']:.0f} | {r['hlo_bytes_over_floor']:.2f} |"
          f" {fmt(temp, '.1f')} | {r['page_faults_per_step'] * PAGE / MiB:.1f} |"
          f" {r['compile_s']:.2f} |")
    if config["eval_params"]:
      lines += ["", "| eval_params | store_x | jit ms [p25–p75] | eager ms | moves (MiB) |"
                " floor ms | kernels | HLO MiB | faults MiB | compile s |",
                "|---|---|---|---|---|---|---|---|---|---|"]
    for e in config["eval_params"]:
      lines.append(
          f"| sf_optax.eval_params | {e['store_x']} | {e['jit']['median_ms']:.3f}"
          f" [{e['jit']['p25_ms']:.3f}–{e['jit']['p75_ms']:.3f}] | {e['eager']['median_ms']:.3f} |"
          f" {e['buffers']} ({e['floor_bytes'] / MiB:.0f}) | {e['floor_ms']:.3f} |"
          f" {e['hlo_kernels']} | {e['hlo_bytes'] / MiB:.0f} |"
          f" {e['page_faults_per_call'] * PAGE / MiB:.1f} | {e['compile_s']:.2f} |")
  if report["configs"]:
    names = list(report["configs"][0]["goals"])
    lines += ["", "## Goals (ratios of medians within one configuration)", "",
              "| config | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for config in report["configs"]:
      lines.append(f"| {size_label(config['params'])} {config['shape']} {config['dtype']} | "
                   + " | ".join(fmt(config["goals"].get(n)) for n in names) + " |")
  return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
  device = jax.devices()[0]
  return {
      "platform": device.platform, "device": getattr(device, "device_kind", str(device)),
      "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__, "optax": optax.__version__,
      "sf_optax": sf_optax.__version__, "python": platform.python_version(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_start": os.getloadavg()[0],
  }


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="1M,16M",
                      help="comma-separated parameter counts (K/M = 2^10/2^20); default 1M,16M")
  parser.add_argument("--full", action="store_true", help="add 64M to --sizes")
  parser.add_argument("--shapes", default="array,tree", help="array (one leaf), tree (100 leaves)")
  parser.add_argument("--dtype", default="float32,bf16",
                      help="float32, bf16 (bf16 params + float32 optimizer state)")
  parser.add_argument("--repeats", type=int, default=20, help="timed steps per entry (>= 20)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
  parser.add_argument("--only", default="", help="regex on the entry labels")
  parser.add_argument("--bandwidth-mib", type=float, default=256,
                      help="size of the arrays of the copy-bandwidth measurement")
  parser.add_argument("--max-resident-gib", type=float, default=4.0,
                      help="entries timed round-robin together hold at most this much")
  parser.add_argument("--out", default=None,
                      help="output path without extension (default benchmarks/results/<platform>_<date>)")
  args = parser.parse_args(argv)
  sizes = [parse_size(s) for s in args.sizes.split(",") if s]
  if args.full and (1 << 26) not in sizes:
    sizes.append(1 << 26)
  shapes = [s for s in args.shapes.split(",") if s]
  dtypes = [d for d in args.dtype.split(",") if d]
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

  def log(text):
    print(text, file=sys.stderr, flush=True)

  bw_bytes = int(args.bandwidth_mib * MiB)
  start_bw = measure_bandwidth(bw_bytes, max(args.repeats, 20))
  log(f"copy bandwidth {start_bw['gbps']:.2f} GB/s (best {start_bw['best_gbps']:.2f})")
  configs = []
  for size in sizes:
    for shape in shapes:
      for dtype_name in dtypes:
        config = run_config(size, shape, dtype_name, args, log)
        config["goals"] = goals(config)
        configs.append(config)
  end_bw = measure_bandwidth(bw_bytes, max(args.repeats, 20))
  log(f"copy bandwidth at the end {end_bw['gbps']:.2f} GB/s (best {end_bw['best_gbps']:.2f})")
  report = {
      "command": "python " + " ".join([pathlib.Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
      "date": date, "machine": info, "load_end": os.getloadavg()[0],
      "repeats": args.repeats, "warmup": args.warmup,
      "learning_rate": LEARNING_RATE, "weight_decay_adamw": WEIGHT_DECAY,
      "bandwidth": {"array_mib": args.bandwidth_mib, "start": start_bw, "end": end_bw},
      "configs": configs,
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
