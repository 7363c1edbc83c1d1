"""Where the compile time of a many-leaf step goes: program sizes per leaf, and time per stage.

The compile suite of ``step_time.py`` times lower + compile; this says why one
entry takes longer than another. For each entry of that suite, on the same tree
(float32 leaves of 64 x 32..38), in a fresh process per entry::

    python benchmarks/compile_breakdown.py --leaves 1000

prints, per leaf, the jaxpr equations (what tracing costs), the StableHLO ops
and the HLO instructions before optimization (what XLA's passes before fusion
walk), and after compiling the fusions and the instructions inside them, array-
and scalar-shaped apart (what the passes after fusion and the code generator
walk); then the CPU seconds (all threads) of trace, lower and compile. XLA's
compile time follows the instruction counts, so the counts are the load-free
measure; the seconds are one run each on a shared machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from step_time import COMPILE_ENTRIES, LEARNING_RATE, WEIGHT_DECAY, abstract_step

HAND_WRITTEN = "hand-written SF-AdamW store_x=False"


class _HandWrittenState(NamedTuple):
  count: jax.Array
  z: Any
  nu: Any
  weight_sum: jax.Array


def hand_written_schedule_free_adamw(learning_rate: float = LEARNING_RATE,
                                     weight_decay: float = WEIGHT_DECAY, b1: float = 0.9,
                                     b2: float = 0.999, eps: float = 1e-8):
  """SF-AdamW, store_x=False, constant learning rate: the engine's per-element arithmetic.

  Per leaf, as ``sf_optax._schedule_free`` computes it: v' = b2 v + (1 - b2) g g;
  u = g / (sqrt(v' / (1 - b2^(k+1))) + eps); z' = z + (-lr u - lr wd y);
  y' - y = c (z' - y) + (1 - c)(1 - b1)(-lr u - lr wd y), with u evaluated again for
  y' from g and v' behind an optimization barrier. The weights lr**2 are summed
  plainly (the engine's sum is compensated and rescaled: scalars, once per step).
  """

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return _HandWrittenState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.copy, params), zeros,
                             jnp.zeros([], jnp.float32))

  def update(grads, state, params):
    count = state.count
    bias_correction = -jnp.expm1((count + 1).astype(jnp.float32) * jnp.log1p(
        jnp.float32(b2) - 1))
    weight = jnp.float32(learning_rate) ** 2
    weight_sum = state.weight_sum + weight
    c = weight / weight_sum
    y_coefficient = (1 - c) * (1 - jnp.float32(b1))
    treedef = jax.tree.structure(params)
    ys, zs, nus, gs = (treedef.flatten_up_to(t) for t in (params, state.z, state.nu, grads))

    def step(g, nu):
      return -learning_rate * (g / (jnp.sqrt(nu / bias_correction) + eps))

    nus = [b2 * nu + (1 - b2) * g * g for nu, g in zip(nus, gs)]
    decays = [learning_rate * weight_decay * y for y in ys]
    zs = [z + (step(g, nu) - d) for z, g, nu, d in zip(zs, gs, nus, decays)]
    gs_y, nus_y = jax.lax.optimization_barrier((gs, nus))
    updates = [c * (z - y) + y_coefficient * (step(g, nu) - d)
               for y, z, g, nu, d in zip(ys, zs, gs_y, nus_y, decays)]
    return treedef.unflatten(updates), _HandWrittenState(
        count + 1, treedef.unflatten(zs), treedef.unflatten(nus), weight_sum)

  return optax.GradientTransformation(init, update)


ENTRIES = {**COMPILE_ENTRIES, HAND_WRITTEN: hand_written_schedule_free_adamw}
_PASS_TIME = re.compile(r"HLO pass: (\S+) time: [^(]*\((\d+) us\)")

_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?\S+ = (\S+) ([a-z][a-z0-9\-]*)\(", re.M)


def _instructions(hlo_text: str, fused: bool) -> list[tuple[str, str]]:
  """(shape, opcode) of each instruction inside fused computations, or outside them."""
  result = []
  for computation in re.split(r"\n(?=\S)", hlo_text):
    if computation.startswith("HloModule"):
      continue
    if computation.lstrip("%").startswith("fused_computation") == fused:
      result += _INSTRUCTION.findall(computation)
  return result


def measure(name: str, leaves: int) -> dict[str, float]:
  """Sizes and CPU seconds of one entry's step, in this process."""
  step, params, state = abstract_step(ENTRIES[name](), leaves)
  start = time.process_time()
  traced = step.trace(params, state, params)
  traced_at = time.process_time()
  lowered = traced.lower()
  lowered_at = time.process_time()
  compile_wall = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.process_time()
  compile_wall = time.perf_counter() - compile_wall
  stablehlo = lowered.as_text()
  hlo = lowered.as_text(dialect="hlo")
  optimized = compiled.as_text()
  fused = _instructions(optimized, fused=True)
  entry = _instructions(optimized, fused=False)
  return {
      "jaxpr_eqns": len(traced.jaxpr.eqns),
      "stablehlo_ops": len(re.findall(r"(?:= |\")stablehlo\.[a-z_]+", stablehlo)),
      "hlo_instructions": len(_instructions(hlo, fused=False)),
      "fusions": sum(opcode == "fusion" for _, opcode in entry),
      "fusion_operands": _fusion_operands(optimized),
      "fused_array": sum(not shape.startswith(("f32[]", "f64[]", "s32[]", "pred[]", "u32[]"))
                         for shape, _ in fused),
      "fused_scalar": sum(shape.startswith(("f32[]", "f64[]", "s32[]", "pred[]", "u32[]"))
                          for shape, _ in fused),
      "trace_cpu_s": traced_at - start,
      "lower_cpu_s": lowered_at - traced_at,
      "compile_cpu_s": compiled_at - lowered_at,
      "compile_wall_s": compile_wall,
  }


def _fusion_operands(hlo_text: str) -> int:
  """Operands of the fusions of the entry computation (buffers each kernel reads)."""
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  return sum(len(re.findall(r"%[\w.\-]+", line.split(" fusion(", 1)[1].split("), kind=")[0]))
             for line in entry.splitlines() if " fusion(" in line)


def _pass_seconds(log: str) -> dict[str, float]:
  """XLA's wall seconds per pass name (summed over the pipelines that run it)."""
  seconds: dict[str, float] = collections.Counter()
  for name, microseconds in _PASS_TIME.findall(log):
    seconds[name] += int(microseconds) / 1e6
  return dict(seconds)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--leaves", type=int, default=1000)
  parser.add_argument("--passes", type=int, default=0, metavar="N",
                      help="also print XLA's N longest passes (wall seconds, from its log)")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child is not None:
    print(json.dumps(measure(args.child, args.leaves)))
    return
  rows, passes = {}, {}
  env = dict(os.environ)
  if args.passes:
    env.update(TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="hlo_pass_pipeline=1")
  for name in ENTRIES:
    out = subprocess.run([sys.executable, __file__, "--child", name, "--leaves", str(args.leaves)],
                         check=True, capture_output=True, text=True, env=env)
    rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    passes[name] = _pass_seconds(out.stderr)
  ref = rows["optax.adamw"]
  counts = ("jaxpr_eqns", "stablehlo_ops", "hlo_instructions", "fusions", "fusion_operands",
            "fused_array", "fused_scalar")
  seconds = ("trace_cpu_s", "lower_cpu_s", "compile_cpu_s")
  print(f"{args.leaves} leaves; per leaf, and in parentheses over optax.adamw")
  print("| entry | " + " | ".join(counts + seconds) + " |")
  print("|---" * (1 + len(counts) + len(seconds)) + "|")
  for name, row in rows.items():
    cells = [f"{row[k] / args.leaves:.1f} ({row[k] / max(ref[k], 1):.2f})" for k in counts]
    cells += [f"{row[k]:.2f} ({row[k] / ref[k]:.2f})" for k in seconds]
    print(f"| {name} | " + " | ".join(cells) + " |")
  if args.passes:
    _print_passes(rows, passes, args.passes)


def _print_passes(rows: dict, passes: dict, top: int) -> None:
  """XLA's longest passes per entry, wall seconds and over optax.adamw's."""
  ref = passes["optax.adamw"]
  longest = sorted({p for entry in passes.values() for p in entry},
                   key=lambda p: -max(entry.get(p, 0.0) for entry in passes.values()))[:top]
  names = list(passes)
  print("\nXLA's passes, wall seconds (over optax.adamw's); 'rest' is the compile's wall time"
        " outside them (code generation, invariant checks)")
  print("| pass | " + " | ".join(names) + " |")
  print("|---" * (1 + len(names)) + "|")
  for name in longest + ["all passes", "rest"]:
    cells = []
    for entry in names:
      total = sum(passes[entry].values())
      value = {"all passes": total, "rest": rows[entry]["compile_wall_s"] - total}.get(
          name, passes[entry].get(name, 0.0))
      base = {"all passes": sum(ref.values()),
              "rest": rows["optax.adamw"]["compile_wall_s"] - sum(ref.values())}.get(
          name, ref.get(name, 0.0))
      cells.append(f"{value:.2f} ({value / base:.2f})" if base > 0 else f"{value:.2f}")
    print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
