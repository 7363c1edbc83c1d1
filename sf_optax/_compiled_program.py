"""What a compiled training step moves and allocates, read from XLA's compiled program.

Private: the one reading of compiled programs shared by the guard
(``tests/test_compiled_update.py``) and the benchmark
(``benchmarks/step_time.py``). It lives in the package, not under ``tests/`` or
``benchmarks/``, because both already import ``sf_optax`` and the test suite
must not import the benchmarks: no ``sys.path`` manipulation, and it works from
an installed copy too.

Two kinds of answers, with different guarantees:

* What JAX keeps across versions: ``compiled.cost_analysis()["bytes accessed"]``
  (XLA's count of the bytes every instruction of the entry computation reads
  and writes; fusions are opaque, so it is the traffic between kernels) and
  ``compiled.memory_analysis()`` (temporaries, outputs, aliased outputs).
  :func:`bytes_accessed`, :func:`temp_bytes` and :func:`allocated_bytes` read
  them on every JAX release ``pyproject.toml`` accepts (``cost_analysis``
  returned a list of one dict per program before JAX 0.4.32, a dict since).
* What depends on how one XLA release fuses: the kernels of the compiled HLO
  text (:func:`kernels`). Exact counts are only meaningful for the releases they
  were measured with (:func:`exact_counts_measured`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import jax
import jaxlib
import optax

# Releases of jaxlib whose XLA:CPU kernel counts the guard pins (major, minor).
EXACT_COUNTS_JAXLIB = ((0, 10),)


def training_step(tx: optax.GradientTransformation, **extra_args: Any):
  """``(params, state, grads) -> (params, state)``: update and apply, as a training loop runs it.

  ``extra_args`` (e.g. ScheduleFree+'s loss ``value``) are passed to every update.
  """

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params, **extra_args)
    return optax.apply_updates(params, updates), state

  return step


def compile_step(tx: optax.GradientTransformation, params: Any, grads: Any = None,
                 state: Any = None) -> Any:
  """The jitted training step with params and state donated, lowered and compiled."""
  grads = params if grads is None else grads
  state = tx.init(params) if state is None else state
  step = jax.jit(training_step(tx), donate_argnums=(0, 1))
  return step.lower(params, state, grads).compile()


def _cost(compiled: Any) -> Optional[dict]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # jax < 0.4.32: one dict per program
    cost = cost[0] if cost else None
  return cost


def bytes_accessed(compiled: Any) -> Optional[float]:
  """XLA's ``bytes accessed`` of a compiled program (None where the backend gives none)."""
  cost = _cost(compiled)
  if not cost or "bytes accessed" not in cost:
    return None
  return float(cost["bytes accessed"])


def temp_bytes(compiled: Any) -> Optional[int]:
  """Bytes of temporaries XLA allocates for one call (None where the backend gives none)."""
  stats = compiled.memory_analysis()
  return None if stats is None else int(stats.temp_size_in_bytes)


def allocated_bytes(compiled: Any) -> Optional[int]:
  """Bytes a call allocates beyond its donated inputs: temporaries + outputs that alias no input."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes)


def tree_bytes(tree: Any, *, min_ndim: int = 0) -> int:
  """Bytes of the arrays of a tree with at least ``min_ndim`` dimensions."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree)
             if len(x.shape) >= min_ndim)


def construction_bytes(params: Any, state: Any, grads: Any = None) -> tuple[int, int]:
  """(read, written) bytes of a step by construction.

  Read: the gradient, the params and every params-sized (non-scalar) state
  buffer once; written: the params and every params-sized state buffer once.
  """
  grads = params if grads is None else grads
  big_state = tree_bytes(state, min_ndim=1)
  params_bytes = tree_bytes(params)
  return tree_bytes(grads) + params_bytes + big_state, params_bytes + big_state


def exact_counts_measured() -> bool:
  """Whether this jaxlib is one the exact kernel counts were measured with."""
  major_minor = tuple(int(p) for p in re.findall(r"\d+", jaxlib.__version__)[:2])
  return major_minor in EXACT_COUNTS_JAXLIB


# --------------------------------------------------------------- the HLO text (version-bound)

_ITEM_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "u64": 8, "s32": 4,
               "u32": 4, "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_ARRAY = re.compile(r"\b(f64|f32|bf16|f16|s64|u64|s32|u32|s16|u16|s8|u8|pred)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


def _arrays(type_text: str) -> list[tuple[int, int]]:
  """(elements, bytes) of every array of an HLO type, tuples included."""
  result = []
  for dtype, dims in _ARRAY.findall(type_text):
    size = math.prod(int(d) for d in dims.split(",") if d)
    result.append((size, size * _ITEM_BYTES[dtype]))
  return result


def kernels(hlo_text: str) -> list[dict[str, Any]]:
  """The ENTRY instructions of a compiled module that read or write non-scalar buffers.

  In an optimizer step every non-scalar buffer has the shape of a parameter
  leaf. Each item: name, opcode, bytes read (non-scalar operands) and written
  (non-scalar outputs). Fusions are opaque here: this is the traffic between
  kernels, which memory bandwidth pays for. The format of the text is XLA's and
  changes between releases; use it for what :func:`exact_counts_measured` covers.
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
  result = []
  for name, opcode, operands in instructions:
    if opcode in _NO_TRAFFIC:
      continue
    written = sum(b for n, b in shapes[name] if n > 1)
    read = sum(b for o in operands for n, b in shapes.get(o, []) if n > 1)
    if read or written:
      result.append({"name": name, "opcode": opcode, "read": read, "written": written})
  return result


class Profile:
  """What the compiled programs making up one training step move and allocate.

  Attributes:
    params_bytes, leaves: of the params.
    bytes_accessed: XLA's ``bytes accessed``, summed over the programs (None if
      a backend gives none).
    allocated: bytes allocated beyond donated inputs, summed (None likewise).
    temp: bytes of temporaries, summed (None likewise).
    kernels, copies: from the HLO text (see :func:`kernels`).
  """

  def __init__(self, compiled_programs: list[Any], params: Any):
    self.params_bytes = tree_bytes(params)
    self.leaves = len(jax.tree.leaves(params))

    def total(values):
      return None if any(v is None for v in values) else sum(values)

    self.bytes_accessed = total([bytes_accessed(c) for c in compiled_programs])
    self.allocated = total([allocated_bytes(c) for c in compiled_programs])
    self.temp = total([temp_bytes(c) for c in compiled_programs])
    found = [k for c in compiled_programs for k in kernels(c.as_text())]
    self.kernels = len(found)
    self.copies = sum(k["opcode"] == "copy" for k in found)
