"""Guards on the compiled training update: bytes moved and temporaries.

An optimizer step is bound by memory bandwidth: what it costs is the bytes its
kernels read and write, and the buffers it allocates. Here the update + apply
step of every sf_optax optimizer is compiled the way a training loop runs it
(``jax.jit(step, donate_argnums=(0, 1))``, on CPU, float32) and XLA's own
account of the compiled program is checked (``sf_optax._compiled_program``, the
reading the benchmark uses too):

(a) no params-sized temporary: the program allocates nothing beyond its donated
    inputs but scalars (``memory_analysis()``: temporaries plus outputs that
    alias no input);
(b) the bytes moved (``cost_analysis()["bytes accessed"]``) are at most
    ``TRAFFIC_BOUND`` times the bytes by construction (read g, y and every
    params-sized state buffer once; write y and every params-sized state buffer
    once).

Both hold on every JAX release ``pyproject.toml`` accepts. Why the bound is 2:
XLA:CPU forms no multi-output fusions, so every params-sized output (y and each
state buffer) is a loop of its own that reads every params-sized input it needs,
and the steps move more than their construction bytes (today 1.43x for
optax.adamw, 1.55-1.89x for sf_optax, see ``KERNELS``). What a regression adds
is a whole pass over the parameters: updates written and read back (update and
apply in two programs), an extra output, a copy of a donated buffer. The first
two take a step past 2x, the last two allocate: the tests at the end show that
the guard catches each of them.

(c) The exact kernel counts and bytes depend on how one XLA release fuses; they
    are pinned for the jaxlib releases they were measured with (``KERNELS``,
    skipped elsewhere). Per leaf (units of one leaf's bytes; g the gradient, y
    the params, u the z-step direction; weight decay on, so the z kernel reads
    y), jaxlib 0.10, XLA:CPU:

=================== ======= ================================================ ========
optimizer           store_x kernels: params-sized inputs -> output            traffic
=================== ======= ================================================ ========
schedule_free_sgd   False   z,g,y->z' ; y,z',g->y'                            8
schedule_free_sgd   True    z,g,y->z' ; x,z'->x' ; y,z',x'->y'                11
adamw / adamw_paper False   g,v->v' ; z,y,g,v'->z' ; y,z',g,v'->y'            13
adamw / adamw_paper True    g,v->v' ; z,y,g,v'->z' ; x,z'->x' ; y,z',x'->y'   15
schedule_free_radam False   as adamw                                          13
schedule_free_radam True    as adamw                                          15
schedule_free(adam) False   g,m->m' ; g,v->v' ; z,g,m',v'->z' ;               15
                            y,z',g,m',v'->y'
schedule_free(adam) True    g,m->m' ; g,v->v' ; z,m',v'->z' ; x,z'->x' ;      17
                            y,z',x'->y'
=================== ======= ================================================ ========

The shared step u = g / (sqrt(v') + eps) (store_x=False, adaptive z-steps)
feeds both the z' and the y' kernels and holds a divide and a square root,
which XLA does not duplicate into two consumers: left alone it writes u to a
params-sized float32 temporary, which XLA:CPU allocates and faults in on every
call. The engine therefore recomputes u for the y' kernel on CPU from the
gradient and the new state: the built-in z-steps by their own formula, a
wrapped Optax base by replaying the equations of its own program from its new
state (``sf_optax._replay``). Where a base's step reads its old state other
than through the new state (Lion), the step is shared; those bases copy their
state on XLA:CPU on their own already (``BASES_WITH_OWN_COPY``), and the
wrapper adds nothing to what they allocate.
"""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest

import mup_flax
import sf_optax
from sf_optax import _compiled_program as program
from _helpers import default_tier

CPU = jax.devices("cpu")[0]

FACTORIES = {
    "sgd": lambda store_x: sf_optax.schedule_free_sgd(
        1e-2, weight_decay=1e-4, store_x=store_x),
    "adamw": lambda store_x: sf_optax.schedule_free_adamw(
        1e-2, weight_decay=1e-4, store_x=store_x),
    "adamw_paper": lambda store_x: sf_optax.schedule_free_adamw_paper(
        1e-2, weight_decay=1e-4, store_x=store_x),
    "radam": lambda store_x: sf_optax.schedule_free_radam(
        1e-2, weight_decay=1e-4, store_x=store_x),
    "wrapped_adam": lambda store_x: sf_optax.schedule_free(
        optax.adam(1e-2, b1=0.0), 1e-2, store_x=store_x),
}


def _infshapes(params):
  """μP InfShapes with every dim infinite at a quarter of its size (width multiplier 4)."""
  return jax.tree.map(
      lambda p: mup_flax.InfShape([mup_flax.InfDim(max(1, d // 4), d) for d in p.shape]),
      params)


# Elementwise Optax bases of the wrapper: name -> params -> transformation.
WRAPPED_BASES = {
    "sgd": lambda params: optax.sgd(1e-2),
    "sgd_momentum": lambda params: optax.sgd(1e-2, momentum=0.9),
    "adam": lambda params: optax.adam(1e-2, b1=0.0),
    "adamw_no_decay": lambda params: optax.adamw(1e-2, b1=0.0, weight_decay=0.0),
    "lion": lambda params: optax.lion(1e-2, weight_decay=0.0),
    "rmsprop": lambda params: optax.rmsprop(1e-2),
    "adabelief": lambda params: optax.adabelief(1e-2, b1=0.0),
    "mu_adam": lambda params: mup_flax.mu_adam(1e-2, _infshapes(params), b1=0.0),
    "mu_sgd": lambda params: mup_flax.mu_sgd(1e-2, _infshapes(params)),
    "chain": lambda params: optax.chain(
        optax.scale_by_adam(b1=0.0), optax.scale_by_learning_rate(1e-2)),
}

# Bases that copy a state buffer on XLA:CPU on their own (optax.apply_updates
# alone, no wrapper): their step reads the old m after the new m overwrote it
# in place. The wrapper keeps that copy and adds none.
BASES_WITH_OWN_COPY = {"lion", "adabelief"}

# Bytes moved over the bytes by construction, on every accepted JAX release.
TRAFFIC_BOUND = 2.0

# (optimizer, store_x) -> (kernels per leaf, bytes moved in units of the params'
# bytes, params-sized temporaries), measured with the jaxlib releases of
# program.EXACT_COUNTS_JAXLIB on XLA:CPU; see the module docstring.
KERNELS = {
    ("sgd", False): (2, 8, 0),
    ("sgd", True): (3, 11, 0),
    ("adamw", False): (3, 13, 0),
    ("adamw", True): (4, 15, 0),
    ("adamw_paper", False): (3, 13, 0),
    ("adamw_paper", True): (4, 15, 0),
    ("radam", False): (3, 13, 0),
    ("radam", True): (4, 15, 0),
    ("wrapped_adam", False): (4, 15, 0),
    ("wrapped_adam", True): (5, 17, 0),
}

# Scalars (count, weight sums, lr_max, b1, flags) may be allocated and moved;
# nothing params-sized. Every leaf below is at least 4 KiB, so one leaf-sized
# buffer always exceeds this slack.
SCALAR_SLACK = 1024

SHAPES = {
    "single": {"w": (64, 128)},
    "three": {"a": (64, 128), "b": (1024,), "c": (32, 64)},
}


def _tree(shapes, seed):
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.device_put(
      treedef.unflatten([jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)]),
      CPU,
  )


def compile_step(tx, params):
  """The fused training step, params and state donated, compiled for CPU."""
  return program.compile_step(tx, params, state=jax.device_put(tx.init(params), CPU))


@functools.cache
def built_in_step(name, store_x, shape):
  """(tx, params, compiled step) of a built-in: compiled once for both tests below."""
  params = _tree(SHAPES[shape], 0)
  tx = FACTORIES[name](store_x)
  return tx, params, compile_step(tx, params)


def violations(programs, tx, params):
  """What exceeds the version-independent bounds (empty when the step is within them)."""
  profile = program.Profile(programs, params)
  read, written = program.construction_bytes(params, jax.eval_shape(tx.init, params))
  found = []
  if profile.allocated > SCALAR_SLACK:
    found.append(f"allocates {profile.allocated} bytes beyond its donated inputs"
                 f" (params: {profile.params_bytes})")
  if profile.bytes_accessed > TRAFFIC_BOUND * (read + written) + SCALAR_SLACK:
    found.append(f"moves {profile.bytes_accessed / (read + written):.2f}x its bytes by"
                 f" construction > {TRAFFIC_BOUND}")
  return found


# ------------------------------------------------------------------ the guards


@pytest.mark.parametrize("shape", default_tier(sorted(SHAPES), {"three"}))
@pytest.mark.parametrize("store_x", [False, True], ids=["store_x=False", "store_x=True"])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_compiled_step_within_bounds(name, store_x, shape):
  tx, params, compiled = built_in_step(name, store_x, shape)
  assert violations([compiled], tx, params) == []


@pytest.mark.skipif(not program.exact_counts_measured(),
                    reason="kernel counts are pinned for the jaxlib releases they were measured with")
@pytest.mark.parametrize("shape", default_tier(sorted(SHAPES), {"three"}))
@pytest.mark.parametrize("store_x", [False, True], ids=["store_x=False", "store_x=True"])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_exact_kernels_and_bytes(name, store_x, shape):
  _, params, compiled = built_in_step(name, store_x, shape)
  profile = program.Profile([compiled], params)
  per_leaf, traffic, temporaries = KERNELS[name, store_x]
  # Exact: a bound left loose would let a regression through. If the step got
  # better, lower its numbers here.
  assert profile.kernels == per_leaf * profile.leaves
  assert profile.copies == 0
  assert 0 <= profile.bytes_accessed - traffic * profile.params_bytes <= SCALAR_SLACK
  assert 0 <= profile.temp - temporaries * profile.params_bytes <= SCALAR_SLACK


@pytest.mark.parametrize("store_x", [False, True], ids=["store_x=False", "store_x=True"])
@pytest.mark.parametrize("name", default_tier(sorted(WRAPPED_BASES), {"adam", "lion", "mu_adam"}))
def test_wrapper_adds_no_params_sized_temporary(name, store_x):
  """schedule_free(base): the base's state plus z (plus x), nothing allocated beyond the base's own."""
  params = _tree(SHAPES["three"], 0)
  base = WRAPPED_BASES[name](params)
  tx = sf_optax.schedule_free(base, 1e-2, store_x=store_x)
  state = jax.eval_shape(tx.init, params)
  params_bytes = program.tree_bytes(params)
  assert (program.tree_bytes(state, min_ndim=1)
          == program.tree_bytes(jax.eval_shape(base.init, params), min_ndim=1)
          + (2 if store_x else 1) * params_bytes)
  wrapped = program.Profile([compile_step(tx, params)], params)
  alone = program.Profile([compile_step(base, params)], params)
  assert wrapped.allocated <= alone.allocated + SCALAR_SLACK
  if name not in BASES_WITH_OWN_COPY:
    assert alone.allocated <= SCALAR_SLACK
    assert violations([compile_step(tx, params)], tx, params) == []


@pytest.mark.parametrize("dtype", default_tier([jnp.float32, jnp.bfloat16], {"bfloat16"},
                                               ids=lambda d: jnp.dtype(d).name))
@pytest.mark.parametrize("store_x", [False, True], ids=["store_x=False", "store_x=True"])
def test_schedule_free_plus_allocates_nothing(store_x, dtype):
  """ScheduleFree+'s reduction pass (L1 norm and <g, z - x>) shares no widened buffer.

  As two reductions, XLA:CPU wrote the float32 copy of bf16 g (and of y) to
  params-sized temporaries that both read.
  """
  params = jax.tree.map(lambda p: p.astype(dtype), _tree(SHAPES["three"], 0))
  tx = sf_optax.schedule_free_plus(weight_decay=1e-4, store_x=store_x)
  step = jax.jit(program.training_step(tx, value=jnp.float32(1.0)), donate_argnums=(0, 1))
  compiled = step.lower(params, jax.device_put(tx.init(params), CPU), params).compile()
  profile = program.Profile([compiled], params)
  assert profile.allocated <= SCALAR_SLACK, profile.allocated


# ------------------------------------------------------------------ the guards can fail


@pytest.mark.parametrize("name,store_x", [("sgd", False), ("adamw", False), ("adamw", True)])
def test_guard_catches_update_and_apply_in_two_jits(name, store_x):
  """Computing the updates in one jit and applying them in another is a worse step.

  The updates leave the first program as a fresh params-sized buffer and the
  second program reads them back: two more passes, one more allocation.
  """
  params = _tree(SHAPES["three"], 0)
  tx = FACTORIES[name](store_x)
  state = jax.device_put(tx.init(params), CPU)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(1,))
  updates, _ = jax.eval_shape(update, params, state, params)
  apply = jax.jit(optax.apply_updates, donate_argnums=(0,))
  programs = [
      update.lower(params, state, params).compile(),
      apply.lower(params, jax.tree.map(lambda u: jnp.zeros(u.shape, u.dtype), updates)).compile(),
  ]
  found = violations(programs, tx, params)
  assert any("allocates" in v for v in found), found
  if (name, store_x) != ("adamw", True):  # 15 + 3 units: exactly 2x its construction bytes
    assert any("moves" in v for v in found), found


@pytest.mark.parametrize("name,store_x", [("sgd", False), ("adamw", True)])
def test_guard_catches_materialized_updates(name, store_x):
  """A step that also returns its updates (say, to log their norm) materializes them.

  (``jax.lax.optimization_barrier`` would be the textbook way to force a
  temporary, but XLA:CPU drops it before fusion: it trips nothing.)
  """
  params = _tree(SHAPES["three"], 0)
  tx = FACTORIES[name](store_x)
  state = jax.device_put(tx.init(params), CPU)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
  found = violations([compiled], tx, params)
  assert any("allocates" in v for v in found), found


def test_guard_catches_a_donation_copy():
  """optax.contrib.schedule_free_sgd reads the old z after writing z' in place: a copy."""
  params = _tree(SHAPES["three"], 0)
  tx = optax.contrib.schedule_free_sgd(1e-2)
  found = violations([compile_step(tx, params)], tx, params)
  assert any("allocates" in v for v in found), found


@pytest.mark.skipif(not program.exact_counts_measured(),
                    reason="the HLO text is read for the jaxlib releases it was checked with")
def test_cost_analysis_agrees_with_the_kernels():
  """``bytes accessed`` is the traffic between kernels that the HLO text shows."""
  params = _tree(SHAPES["three"], 0)
  compiled = compile_step(FACTORIES["adamw"](True), params)
  traffic = sum(k["read"] + k["written"] for k in program.kernels(compiled.as_text()))
  assert 0 <= program.bytes_accessed(compiled) - traffic <= SCALAR_SLACK
