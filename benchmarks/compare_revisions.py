"""The built-in optimizers' compiled step at two revisions of sf_optax: same program, same time?

A refactoring of the engine must not cost step time. This script exports
``sf_optax/`` at a base revision (``git archive``) and at the working tree, and
for each built-in optimizer compares, in child processes that each import one
of the two copies:

- the compiled step (``update`` + ``apply_updates``, params and state donated):
  XLA's optimized HLO with names and metadata canonicalized, so "identical"
  means the same executable; bytes accessed and flops (``cost_analysis()``);
  temporaries (``memory_analysis()``);
- its step time: children of the two revisions alternate, round after round,
  each timing every optimizer (median of ``--steps`` steps after a warm-up);
  the table gives the median over rounds of head / base, with the spread of the
  per-round ratios.

Usage (from the repository root)::

  python benchmarks/compare_revisions.py --base 1baa5d0
  python benchmarks/compare_revisions.py --base 1baa5d0 --rounds 7 --size 4194304 --out results/x

Prints a Markdown table (and writes ``OUT.md`` / ``OUT.json`` with ``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# name -> expression building the optimizer (evaluated in the child with sf_optax imported).
OPTIMIZERS = {
    "schedule_free_sgd": "sf_optax.schedule_free_sgd(1e-3, weight_decay=1e-4)",
    "schedule_free_sgd store_x=False": "sf_optax.schedule_free_sgd(1e-3, weight_decay=1e-4, store_x=False)",
    "schedule_free_adamw": "sf_optax.schedule_free_adamw(1e-3, weight_decay=1e-4)",
    "schedule_free_adamw store_x=False": "sf_optax.schedule_free_adamw(1e-3, weight_decay=1e-4, store_x=False)",
    "schedule_free_adamw_paper": "sf_optax.schedule_free_adamw_paper(1e-3, weight_decay=1e-4)",
    "schedule_free_radam": "sf_optax.schedule_free_radam(1e-3, weight_decay=1e-4)",
    "schedule_free_adan": "sf_optax.schedule_free_adan(1e-3, weight_decay=1e-4)",
    "schedule_free(optax.adam(b1=0))": "sf_optax.schedule_free(optax.adam(1e-3, b1=0.0), 1e-3)",
}


def canonical_hlo(text: str) -> str:
  """Optimized HLO without metadata, with every name replaced by its order of appearance."""
  text = re.sub(r",?\s*metadata=\{[^}]*\}", "", text)
  text = re.sub(r"^HloModule [^,\n]*", "HloModule m", text, flags=re.M)
  names: dict[str, str] = {}

  def rename(match):
    return names.setdefault(match.group(0), f"%n{len(names)}")

  return re.sub(r"%[\w.\-]+", rename, text)


def child(args) -> None:
  """Runs in a child process whose ``sf_optax`` is one revision's copy.

  The step and XLA's accounts are read here, not through
  ``sf_optax._compiled_program``: the revisions compared with (1baa5d0) predate it.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import sf_optax

  shapes = [(args.size,)] if args.leaves == 1 else [
      (args.size // args.leaves,) for _ in range(args.leaves)]
  results = {}
  for name in args.only or OPTIMIZERS:
    tx = eval(OPTIMIZERS[name], {"sf_optax": sf_optax, "optax": optax})  # noqa: S307

    def step(params, state, grads, tx=tx):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    params = [jnp.full(s, 0.5, jnp.float32) for s in shapes]
    grads = [jnp.full(s, 1e-3, jnp.float32) for s in shapes]
    state = tx.init(params)
    jitted = jax.jit(step, donate_argnums=(0, 1))
    compiled = jitted.lower(params, state, grads).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    hlo = canonical_hlo(compiled.as_text())
    for _ in range(args.warmup):
      params, state = compiled(params, state, grads)
    jax.block_until_ready(params)
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      params, state = compiled(params, state, grads)
      jax.block_until_ready((params, state))
      times.append(time.perf_counter() - start)
    results[name] = {
        "ms": 1e3 * float(np.median(times)),
        "hlo_sha256": hashlib.sha256(hlo.encode()).hexdigest(),
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
        "flops": float(cost.get("flops", float("nan"))),
        "temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1)),
    }
  print(json.dumps(results))


def export(revision: str | None, into: pathlib.Path) -> pathlib.Path:
  """sf_optax/ of ``revision`` (None: the working tree) under ``into``; returns the folder to put on sys.path."""
  into.mkdir(parents=True)
  if revision is None:
    subprocess.run(["cp", "-r", str(ROOT / "sf_optax"), str(into)], check=True)
  else:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "sf_optax"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
  return into


def run_child(path: pathlib.Path, args) -> dict:
  env = dict(os.environ, PYTHONPATH=str(path), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  command = [sys.executable, __file__, "--child", "--size", str(args.size), "--leaves",
             str(args.leaves), "--steps", str(args.steps), "--warmup", str(args.warmup)]
  if args.only:
    command += ["--only", *args.only]
  completed = subprocess.run(command, env=env, capture_output=True, text=True, cwd="/")
  if completed.returncode:
    raise SystemExit(f"child for {path} failed:\n{completed.stderr[-3000:]}")
  return json.loads(completed.stdout.strip().splitlines()[-1])


def quartiles(values):
  values = sorted(values)
  q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
  return q[0], statistics.median(values), q[2]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--base", default="1baa5d0", help="git revision to compare with (default: %(default)s)")
  parser.add_argument("--size", type=int, default=4 * 2**20, help="float32 parameters (default: %(default)s)")
  parser.add_argument("--leaves", type=int, default=1, help="split into this many equal leaves (default: 1)")
  parser.add_argument("--rounds", type=int, default=5, help="alternating child pairs (default: %(default)s)")
  parser.add_argument("--steps", type=int, default=30, help="timed steps per child (default: %(default)s)")
  parser.add_argument("--warmup", type=int, default=3, help="(default: %(default)s)")
  parser.add_argument("--only", nargs="*", choices=sorted(OPTIMIZERS), help="a subset of optimizers")
  parser.add_argument("--out", help="write OUT.md and OUT.json")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    child(args)
    return

  started, load_start = time.time(), os.getloadavg()[0]
  base_sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base],
                            check=True, capture_output=True, text=True).stdout.strip()
  head_sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            check=True, capture_output=True, text=True).stdout.strip()
  dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "sf_optax"],
                              check=True, capture_output=True, text=True).stdout.strip())
  with tempfile.TemporaryDirectory() as tmp:
    base = export(args.base, pathlib.Path(tmp) / "base")
    head = export(None, pathlib.Path(tmp) / "head")
    rounds = []
    for r in range(args.rounds):
      order = [("base", base), ("head", head)] if r % 2 == 0 else [("head", head), ("base", base)]
      rounds.append({label: run_child(path, args) for label, path in order})
      print(f"round {r + 1}/{args.rounds} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
  names = list(rounds[0]["base"])
  rows = []
  for name in names:
    ratios = [rd["head"][name]["ms"] / rd["base"][name]["ms"] for rd in rounds]
    base_ms = [rd["base"][name]["ms"] for rd in rounds]
    head_ms = [rd["head"][name]["ms"] for rd in rounds]
    b, h = rounds[0]["base"][name], rounds[0]["head"][name]
    rows.append({
        "optimizer": name,
        "base_ms": quartiles(base_ms), "head_ms": quartiles(head_ms), "ratio": quartiles(ratios),
        "same_program": b["hlo_sha256"] == h["hlo_sha256"],
        "bytes_accessed": (b["bytes_accessed"], h["bytes_accessed"]),
        "flops": (b["flops"], h["flops"]),
        "temp_bytes": (b["temp_bytes"], h["temp_bytes"]),
    })
  import jax  # only for the record

  record = {
      "command": " ".join(["python", "benchmarks/compare_revisions.py", *(argv or sys.argv[1:])]),
      "base": base_sha, "head": head_sha + (" + uncommitted sf_optax changes" if dirty else ""),
      "jax": jax.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
      "load_average": [load_start, os.getloadavg()[0]], "minutes": (time.time() - started) / 60,
      "size": args.size, "leaves": args.leaves, "rounds": args.rounds, "steps": args.steps,
      "rows": rows,
  }
  lines = [
      f"# sf_optax {record['head']} against {base_sha}: the built-ins' compiled step",
      "",
      f"`{record['command']}`; jax {record['jax']}, {record['cpu_count']} CPU cores, load average"
      f" {load_start:.1f} at the start and {record['load_average'][1]:.1f} at the end;"
      f" {args.size:,} float32 parameters in {args.leaves} leaf/leaves; {args.rounds} rounds of"
      f" alternating child processes, each the median of {args.steps} steps;"
      f" {record['minutes']:.1f} min.",
      "",
      "| optimizer | same program | base ms [p25–p75] | head ms [p25–p75] | head / base, median [p25–p75] of the rounds | bytes accessed base → head | temp bytes base → head |",
      "|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    b, h, r = row["base_ms"], row["head_ms"], row["ratio"]
    lines.append(
        f"| {row['optimizer']} | {'yes' if row['same_program'] else 'no'} | {b[1]:.2f} [{b[0]:.2f}–{b[2]:.2f}]"
        f" | {h[1]:.2f} [{h[0]:.2f}–{h[2]:.2f}] | {r[1]:.3f} [{r[0]:.3f}–{r[2]:.3f}]"
        f" | {row['bytes_accessed'][0]:.0f} → {row['bytes_accessed'][1]:.0f}"
        f" | {row['temp_bytes'][0]} → {row['temp_bytes'][1]} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    pathlib.Path(args.out + ".md").write_text(text)
    pathlib.Path(args.out + ".json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
  main()
