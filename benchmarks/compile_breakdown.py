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
import json
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from sf_optax import _compiled_program as program
from step_time import COMPILE_ENTRIES, _is_shape, compile_leaf_shapes

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
  tx = COMPILE_ENTRIES[name]()
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
                        compile_leaf_shapes(leaves), is_leaf=_is_shape)
  state = jax.eval_shape(tx.init, params)
  step = jax.jit(program.training_step(tx), donate_argnums=(0, 1))
  start = time.process_time()
  traced = step.trace(params, state, params)
  traced_at = time.process_time()
  lowered = traced.lower()
  lowered_at = time.process_time()
  compiled = lowered.compile()
  compiled_at = time.process_time()
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
      "fused_array": sum(not shape.startswith(("f32[]", "f64[]", "s32[]", "pred[]", "u32[]"))
                         for shape, _ in fused),
      "fused_scalar": sum(shape.startswith(("f32[]", "f64[]", "s32[]", "pred[]", "u32[]"))
                          for shape, _ in fused),
      "trace_cpu_s": traced_at - start,
      "lower_cpu_s": lowered_at - traced_at,
      "compile_cpu_s": compiled_at - lowered_at,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--leaves", type=int, default=1000)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child is not None:
    print(json.dumps(measure(args.child, args.leaves)))
    return
  rows = {}
  for name in COMPILE_ENTRIES:
    out = subprocess.run([sys.executable, __file__, "--child", name, "--leaves", str(args.leaves)],
                         check=True, capture_output=True, text=True)
    rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
  ref = rows["optax.adamw"]
  counts = ("jaxpr_eqns", "stablehlo_ops", "hlo_instructions", "fusions", "fused_array",
            "fused_scalar")
  seconds = ("trace_cpu_s", "lower_cpu_s", "compile_cpu_s")
  print(f"{args.leaves} leaves; per leaf, and in parentheses over optax.adamw")
  print("| entry | " + " | ".join(counts + seconds) + " |")
  print("|---" * (1 + len(counts) + len(seconds)) + "|")
  for name, row in rows.items():
    cells = [f"{row[k] / args.leaves:.1f} ({row[k] / max(ref[k], 1):.2f})" for k in counts]
    cells += [f"{row[k]:.2f} ({row[k] / ref[k]:.2f})" for k in seconds]
    print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
