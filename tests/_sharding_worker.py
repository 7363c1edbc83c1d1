"""Multi-device cases of ``tests/test_sharding.py``, run in a process of their own.

JAX fixes its device count when it starts, so these cases run in a separate
Python process with 8 virtual CPU devices::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_sharding_worker.py [CASE ...]

(the flag is set here when absent). Each case prints one JSON line
``{"case": name, "ok": bool, "error": str, ...}`` with the numbers it measured;
no case name runs them all. Everything runs in float64 unless a case says
otherwise, so that a sharded run and a single-device run agree to 1e-9 (they
differ by reduction order only).
"""

from __future__ import annotations

import os
import sys

# 8 virtual CPU devices. They share one thread pool: multi-threaded Eigen kernels
# inside them can starve a device that a collective waits for (a deadlock, which
# XLA turns into an abort after 40 s), so they run single-threaded; and on a small
# busy machine a collective may legitimately wait long: 10 minutes.
_FLAGS = {
    "--xla_force_host_platform_device_count": "8",
    "--xla_cpu_multi_thread_eigen": "false",
    "--xla_cpu_collective_call_terminate_timeout_seconds": "600",
}
for _flag, _value in _FLAGS.items():
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_flag}={_value}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sf_optax  # noqa: E402
import _helpers  # noqa: E402

jax.config.update("jax_enable_x64", True)

TOLERANCE = 1e-9
STEPS = 3
N_DEVICES = 8

OPTIMIZERS = {
    "sgd": lambda: sf_optax.schedule_free_sgd(0.1, weight_decay=1e-3, warmup_steps=2),
    "adamw": lambda: sf_optax.schedule_free_adamw(1e-2, weight_decay=1e-3, warmup_steps=2),
    "adamw_paper": lambda: sf_optax.schedule_free_adamw_paper(1e-2, weight_decay=1e-3),
    "radam": lambda: sf_optax.schedule_free_radam(1e-2, weight_decay=1e-3),
    "wrapper_adam": lambda: sf_optax.schedule_free(optax.adam(1e-2, b1=0.0), 1e-2),
    "adamw_no_x": lambda: sf_optax.schedule_free_adamw(1e-2, store_x=False),
    "adamw_f32_state": lambda: sf_optax.schedule_free_adamw(1e-2, state_dtype=jnp.float32),
}
# The FSDP step runs these (the other ones share the engine and the z-step code).
FSDP_OPTIMIZERS = ("adamw", "wrapper_adam", "adamw_no_x")


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def fsdp_mesh(axis_type=AxisType.Auto):
  return jax.make_mesh((N_DEVICES,), ("fsdp",), axis_types=(axis_type,))


def sync(result):
  """Waits for a result. The 8 virtual devices are threads of this process, and
  collectives of several programs in flight at once can deadlock on them, so the
  loops here run one step at a time."""
  return jax.block_until_ready(result)


def rel_error(reference, other) -> float:
  """The largest relative difference over the leaves of two trees (0 for equal trees)."""
  worst = 0.0
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(other), strict=True):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(a), initial=0.0)), 1e-300)
    worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)) / scale)
  return worst


def _key(path) -> str:
  # Boxes (InfShapeBox, nn.Partitioned) add `.value` to a leaf's path.
  return jax.tree_util.keystr(path).replace(".value", "")


def param_shardings_by_path(params):
  """{path: sharding} of the params' leaves."""
  return {_key(path): leaf.sharding
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def check_params_shardings(what, params, tree) -> int:
  """Asserts every params-shaped leaf of ``tree`` has the sharding of its param.

  A leaf of ``tree`` belongs to a param when its path ends with the param's path
  (``.z['Dense_0']['kernel']`` ends with ``['Dense_0']['kernel']``). Returns how
  many leaves were checked.
  """
  by_path = param_shardings_by_path(params)
  shapes = {_key(path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  checked = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = _key(path)
    matches = [p for p in by_path if key.endswith(p) and p]
    if not matches or np.ndim(leaf) == 0:
      continue
    param_path = max(matches, key=len)
    assert shapes[param_path] in (None, leaf.shape), (what, key, leaf.shape)
    expected = by_path[param_path]
    assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (
        f"{what}: {key} has sharding {leaf.sharding}, its param {param_path} has {expected}"
    )
    checked += 1
  assert checked, f"{what}: no params-shaped leaf found"
  return checked


def sharded_leaves(tree) -> int:
  """How many leaves are actually split over devices (not replicated)."""
  return sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(tree))


class MLP(nn.Module):
  """A small Linen model whose kernels are FSDP-sharded through partitioning metadata."""

  features: tuple[int, ...] = (32, 16)
  dtype: jnp.dtype = jnp.float64

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    x = nn.Dense(
        self.features[0],
        param_dtype=self.dtype,
        kernel_init=nn.with_partitioning(init, ("fsdp", None)),
    )(x)
    x = nn.LayerNorm(param_dtype=self.dtype)(nn.tanh(x))
    return nn.Dense(
        self.features[1],
        param_dtype=self.dtype,
        kernel_init=nn.with_partitioning(init, (None, "fsdp")),
        bias_init=nn.with_partitioning(nn.initializers.zeros_init(), ("fsdp",)),
    )(x)


def data(dtype=jnp.float64, n=64):
  x = jax.random.normal(jax.random.key(1), (n, 8), dtype)
  y = jax.random.normal(jax.random.key(2), (n, 16), dtype)
  return x, y


def linen_setup(dtype=jnp.float64):
  model = MLP(dtype=dtype)
  x, y = data(dtype)
  boxed = model.init(jax.random.key(0), x)["params"]
  return model, boxed, x, y


def make_step(apply_fn, tx):
  def loss_fn(params, x, y):
    return jnp.mean((apply_fn({"params": params}, x) - y) ** 2)

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def run_single(step, params, opt_state, x, y, steps=STEPS):
  step = jax.jit(step)
  for _ in range(steps):
    params, opt_state, _ = jax.block_until_ready(step(params, opt_state, x, y))
  return params, opt_state


# ---------------------------------------------------------------------------
# Cases.
# ---------------------------------------------------------------------------


def state_shardings(tx, params, param_shardings, mesh):
  """The state's shardings: each params-sized leaf like its param, the rest replicated.

  This is the recipe for ``jax.jit(tx.init, out_shardings=...)``.
  """
  return optax.tree_map_params(
      tx,
      lambda _, sharding: sharding,
      jax.eval_shape(tx.init, params),
      param_shardings,
      transform_non_params=lambda _: NamedSharding(mesh, P()),
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
  )


def place(params, shardings):
  """Fresh sharded copies (a replicated device_put may reuse the original buffer)."""
  return jax.jit(lambda p: p, out_shardings=shardings)(params)


def case_init_shardings():
  """init gives every params-sized leaf (z, x, moments) its param's sharding.

  Eagerly and under ``jax.jit(tx.init, out_shardings=...)`` for every leaf;
  under a plain ``jax.jit(tx.init)`` (shardings inferred by XLA on an Auto mesh)
  for z and x, which are copies of the params. Zero-initialised buffers (the
  second moments) have no data dependence on the params and come out
  replicated there: reported, not asserted.
  """
  mesh = fsdp_mesh()
  _, boxed, _, _ = linen_setup()
  shardings = nn.get_sharding(boxed, mesh)
  params = place(nn.meta.unbox(boxed), shardings)
  assert sharded_leaves(params) == 3, sharded_leaves(params)
  checked, replicated_under_plain_jit = {}, {}
  for name, make in OPTIMIZERS.items():
    tx = make()
    eager = tx.init(params)
    checked[f"{name}/eager"] = check_params_shardings(f"{name}/eager", params, eager)
    jitted = jax.jit(tx.init, out_shardings=state_shardings(tx, params, shardings, mesh))(params)
    checked[f"{name}/jit"] = check_params_shardings(f"{name}/jit", params, jitted)
    assert rel_error(eager, jitted) == 0.0
    inferred = jax.jit(tx.init)(params)
    for sf_state in sf_optax._eval_params.find_schedule_free_states(inferred):
      check_params_shardings(f"{name}/plain jit z", params, sf_state.z)
      if sf_state.x is not None:
        check_params_shardings(f"{name}/plain jit x", params, sf_state.x)
    replicated_under_plain_jit[name] = sharded_leaves(eager) - sharded_leaves(inferred)
  return {"leaves_checked": checked, "replicated_under_plain_jit": replicated_under_plain_jit}


def fsdp_run(step, tx, params, shardings, mesh, x, y, steps=STEPS):
  """The production form of an FSDP loop: state shardings derived from the params',
  init and step jitted with in/out shardings pinned, params and state donated.

  (With a plain ``jax.jit(step)`` on an Auto mesh XLA may choose other output
  shardings, e.g. shard a replicated bias like its kernel: pin them.)
  """
  full = jax.tree.map(lambda a: a.sharding, place(params, shardings))  # full tree (boxes too)
  state_sh = state_shardings(tx, params, full, mesh)
  batch = NamedSharding(mesh, P("fsdp"))
  p = place(params, full)
  s = jax.jit(tx.init, out_shardings=state_sh)(p)
  check_params_shardings("init", p, s)
  sharded_step = jax.jit(
      step,
      in_shardings=(full, state_sh, batch, batch),
      out_shardings=(full, state_sh, None),
      donate_argnums=(0, 1),
  )
  for _ in range(steps):
    # One program in flight at a time (see sync()).
    p, s, _ = sync(sharded_step(p, s, x, y))
  check_params_shardings("step", place(params, full), (p, s))
  x_eval = jax.jit(sf_optax.eval_params)(s, p)
  check_params_shardings("eval_params", place(params, full), x_eval)
  return p, s, x_eval


def case_fsdp_step():
  """A jitted FSDP training step equals the single-device one (<= 1e-9, float64).

  Shardings: every params-sized leaf of the state has its param's sharding after
  init and after the steps, and eval_params under jit keeps them.
  """
  mesh = fsdp_mesh()
  model, boxed, x, y = linen_setup()
  params = nn.meta.unbox(boxed)
  shardings = nn.get_sharding(boxed, mesh)
  errors = {}
  for name in FSDP_OPTIMIZERS:
    tx = OPTIMIZERS[name]()
    step = make_step(model.apply, tx)
    p1, s1 = run_single(step, params, tx.init(params), x, y)
    p2, s2, x2 = fsdp_run(step, tx, params, shardings, mesh, x, y)
    error = max(rel_error(p1, p2), rel_error(s1, s2),
                rel_error(sf_optax.eval_params(s1, p1), x2))
    assert error <= TOLERANCE, (name, error)
    errors[name] = error
  return {"rel_error": errors}


def case_checkpoint_sharded():
  """Orbax checkpoint of an FSDP-sharded state: restored bitwise, with the target's shardings."""
  import tempfile

  from sf_optax._checkpoint import restore_checkpoint
  from sf_optax._checkpoint import save_checkpoint

  mesh = fsdp_mesh()
  model, boxed, x, y = linen_setup()
  params = nn.meta.unbox(boxed)
  shardings = nn.get_sharding(boxed, mesh)
  tx = OPTIMIZERS["adamw"]()
  step = make_step(model.apply, tx)
  p, s, _ = fsdp_run(step, tx, params, shardings, mesh, x, y, steps=2)
  with tempfile.TemporaryDirectory() as tmp:
    save_checkpoint(os.path.join(tmp, "ckpt"), {"params": p, "opt_state": s})
    # A fresh process restores into its abstract sharded state.
    state_sh = state_shardings(tx, params, shardings, mesh)
    abstract = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        {"params": params, "opt_state": tx.init(params)},
        {"params": shardings, "opt_state": state_sh})
    restored = restore_checkpoint(os.path.join(tmp, "ckpt"), abstract)
  check_params_shardings("restored", p, restored)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves({"params": p, "opt_state": s})):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  return {"restored_sharded_leaves": sharded_leaves(restored)}


def case_fsdp_float32():
  """In float32 the sharded and single-device runs differ by reduction order only.

  This one uses a plain ``jax.jit(step)``: shardings left to XLA.
  """
  mesh = fsdp_mesh()
  model, boxed, x, y = linen_setup(jnp.float32)
  params = nn.meta.unbox(boxed)
  shardings = nn.get_sharding(boxed, mesh)
  tx = OPTIMIZERS["adamw"]()
  step = make_step(model.apply, tx)
  p1, s1 = run_single(step, params, tx.init(params), x, y)
  p2 = place(params, shardings)
  s2 = tx.init(p2)
  p2, s2 = run_single(step, p2, s2, *jax.device_put((x, y), NamedSharding(mesh, P("fsdp"))))
  error = max(rel_error(p1, p2), rel_error(s1, s2))
  assert error <= 1e-5, error
  return {"rel_error": error}


def case_explicit_mesh():
  """Sharding in types (AxisType.Explicit): init, update and eval_params keep the types."""
  mesh = fsdp_mesh(AxisType.Explicit)
  params = {
      "w": jnp.arange(64.0).reshape(16, 4) / 64,
      "b": jnp.linspace(-1.0, 1.0, 8),
      "s": jnp.asarray(0.5),
  }
  specs = {"w": P("fsdp", None), "b": P("fsdp"), "s": P()}
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
  results = {}
  for name in ("adamw", "adamw_no_x"):
    tx = OPTIMIZERS[name]()

    def step(p, s):
      grads = jax.grad(lambda q: sum(jnp.sum(jnp.sin(v) * v) for v in jax.tree.leaves(q)))(p)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    p1, s1 = params, tx.init(params)
    for _ in range(STEPS):
      p1, s1 = jax.jit(step)(p1, s1)
    with jax.set_mesh(mesh):
      p2 = sharded
      s2 = jax.jit(tx.init)(p2)
      check_params_shardings(f"{name}/init", sharded, s2)
      for _ in range(STEPS):
        p2, s2 = sync(jax.jit(step)(p2, s2))
      check_params_shardings(f"{name}/step", sharded, (p2, s2))
      x2 = jax.jit(sf_optax.eval_params)(s2, p2)
      check_params_shardings(f"{name}/eval_params", sharded, x2)
    for leaf, spec in zip(jax.tree.leaves(x2), jax.tree.leaves(specs, is_leaf=_is_spec)):
      assert jax.typeof(leaf).sharding.spec == spec, (jax.typeof(leaf), spec)
    error = rel_error((p1, s1), (p2, s2))
    assert error <= TOLERANCE, (name, error)
    results[name] = error
  return {"rel_error": results}


def pin_shardings(*nodes):
  """Constrains every Variable of ``nodes`` to its annotated sharding (no-op without a mesh).

  nnx.jit does not keep the shardings of updated Variables by itself: XLA's
  propagation may e.g. shard a replicated bias like its kernel. Calling this at
  the end of a train step pins params and optimizer state (its Variables copy
  the params' sharding metadata; the scalars are replicated).
  """
  if jax.sharding.get_abstract_mesh().empty:
    return
  state = nnx.state(nodes)
  nnx.update(nodes, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))


def case_nnx_fsdp():
  """NNX: sharding metadata, nnx.Optimizer and nnx.jit; same numbers as one device."""
  mesh = fsdp_mesh()

  class Model(nnx.Module):

    def __init__(self, rngs):
      init = nnx.initializers.lecun_normal()
      zeros = nnx.initializers.zeros_init()
      # Every param carries sharding metadata: under nnx.jit, Variables with it
      # keep their sharding; the others get whatever XLA's propagation picks.
      self.l1 = nnx.Linear(
          8, 32, param_dtype=jnp.float64, rngs=rngs,
          kernel_init=nnx.with_partitioning(init, ("fsdp", None)),
          bias_init=nnx.with_partitioning(zeros, (None,)),
      )
      self.l2 = nnx.Linear(
          32, 16, param_dtype=jnp.float64, rngs=rngs,
          kernel_init=nnx.with_partitioning(init, (None, "fsdp")),
          bias_init=nnx.with_partitioning(zeros, ("fsdp",)),
      )

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  x, y = data()

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    pin_shardings(model, optimizer)
    return loss

  @nnx.jit
  def evaluate(model, optimizer):
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    return sf_optax.eval_params(nnx.as_pure(optimizer.opt_state), params)

  def run(mesh_or_none):
    if mesh_or_none is None:
      with nnx.use_eager_sharding(False):
        model = Model(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, OPTIMIZERS["adamw"](), wrt=nnx.Param)
        for _ in range(STEPS):
          train_step(model, optimizer, x, y)
        return model, optimizer, evaluate(model, optimizer)
    # Variables with sharding metadata are created (Model, and the optimizer's
    # copies of them) inside the mesh context: eager sharding places them.
    with jax.set_mesh(mesh_or_none), nnx.use_eager_sharding(True):
      model = Model(nnx.Rngs(0))
      optimizer = nnx.Optimizer(model, OPTIMIZERS["adamw"](), wrt=nnx.Param)
      xs, ys = jax.device_put((x, y), NamedSharding(mesh_or_none, P("fsdp")))
      for _ in range(STEPS):
        sync(train_step(model, optimizer, xs, ys))
      return model, optimizer, evaluate(model, optimizer)

  m1, o1, x1 = run(None)
  m2, o2, x2 = run(mesh)
  params = nnx.as_pure(nnx.state(m2, nnx.Param))
  assert sharded_leaves(params) == 3, jax.tree.map(lambda a: a.sharding.spec, params)
  specs = nnx.get_partition_spec(nnx.state(m2, nnx.Param))
  for spec, leaf in zip(jax.tree.leaves(nnx.as_pure(specs), is_leaf=_is_spec),
                        jax.tree.leaves(params)):
    assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), (spec, leaf)
  check_params_shardings("nnx/opt_state", params, nnx.as_pure(o2.opt_state))
  check_params_shardings("nnx/eval_params", params, x2)
  error = max(
      rel_error(nnx.as_pure(nnx.state(m1, nnx.Param)), params),
      rel_error(nnx.as_pure(o1.opt_state), nnx.as_pure(o2.opt_state)),
      rel_error(x1, x2),
  )
  assert error <= TOLERANCE, error
  return {"rel_error": error}


def _dp_setup():
  model = MLP()
  x, y = data()
  params = nn.meta.unbox(model.init(jax.random.key(0), x)["params"])

  def loss_fn(params, x, y):
    return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

  return loss_fn, params, x, y


def case_shard_map_dp():
  """Data parallel with shard_map: local grads pmean-ed, then the same update everywhere."""
  mesh = jax.make_mesh((N_DEVICES,), ("data",), axis_types=(AxisType.Auto,))
  loss_fn, params, x, y = _dp_setup()
  errors = {}
  for name in ("adamw", "sgd"):
    tx = OPTIMIZERS[name]()

    def single(p, s, x, y):
      grads = jax.grad(loss_fn)(p, x, y)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    def local(p, s, x, y):
      # Inside shard_map the replicated params are device-invariant: the gradient
      # of a device-varying loss with respect to them is summed over devices
      # already. Marking them varying first gives each device its local gradient,
      # which pmean then averages: the gradient of the global-batch mean loss.
      p_local = jax.lax.pcast(p, "data", to="varying")
      grads = jax.lax.pmean(jax.grad(loss_fn)(p_local, x, y), "data")
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    dp = jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())
        )
    )
    p1, s1 = params, tx.init(params)
    p2, s2 = params, tx.init(params)
    for _ in range(STEPS):
      p1, s1 = jax.jit(single)(p1, s1, x, y)
      p2, s2 = sync(dp(p2, s2, x, y))
    error = max(rel_error((p1, s1), (p2, s2)),
                rel_error(sf_optax.eval_params(s1, p1), sf_optax.eval_params(s2, p2)))
    assert error <= TOLERANCE, (name, error)
    errors[name] = error
  return {"rel_error": errors}


def case_shard_map_psum_loss():
  """shard_map without pcast: a loss divided by the device count, grads already summed."""
  mesh = jax.make_mesh((N_DEVICES,), ("data",), axis_types=(AxisType.Auto,))
  loss_fn, params, x, y = _dp_setup()
  tx = OPTIMIZERS["adamw"]()

  def local(p, s, x, y):
    grads = jax.grad(lambda q: loss_fn(q, x, y) / N_DEVICES)(p)  # psum-ed by shard_map's AD
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  def single(p, s, x, y):
    updates, s = tx.update(jax.grad(loss_fn)(p, x, y), s, p)
    return optax.apply_updates(p, updates), s

  dp = jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())))
  p1, s1 = params, tx.init(params)
  p2, s2 = params, tx.init(params)
  for _ in range(STEPS):
    p1, s1 = jax.jit(single)(p1, s1, x, y)
    p2, s2 = sync(dp(p2, s2, x, y))
  error = rel_error((p1, s1), (p2, s2))
  assert error <= TOLERANCE, error
  return {"rel_error": error}


def case_pmap_dp():
  """Data parallel with pmap: replicated params and state, grads pmean-ed."""
  loss_fn, params, x, y = _dp_setup()
  errors = {}
  for name in ("adamw",):
    tx = OPTIMIZERS[name]()

    def step(p, s, x, y, reduce):
      grads = reduce(jax.grad(loss_fn)(p, x, y))
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    parallel = jax.pmap(lambda p, s, x, y: step(p, s, x, y, lambda g: jax.lax.pmean(g, "batch")),
                        axis_name="batch")
    replicate = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * N_DEVICES), tree)
    p1, s1 = params, tx.init(params)
    p2, s2 = replicate(params), replicate(tx.init(params))
    xs = x.reshape(N_DEVICES, -1, x.shape[-1])
    ys = y.reshape(N_DEVICES, -1, y.shape[-1])
    for _ in range(STEPS):
      p1, s1 = jax.jit(lambda p, s, x, y: step(p, s, x, y, lambda g: g))(p1, s1, x, y)
      p2, s2 = sync(parallel(p2, s2, xs, ys))
    x2 = jax.pmap(sf_optax.eval_params)(s2, p2)
    error = 0.0
    for device in range(N_DEVICES):
      pick = lambda tree: jax.tree.map(lambda a: a[device], tree)
      error = max(error, rel_error((p1, s1), (pick(p2), pick(s2))),
                  rel_error(sf_optax.eval_params(s1, p1), pick(x2)))
    assert error <= TOLERANCE, (name, error)
    errors[name] = error
  return {"rel_error": errors}


# ---------------------------------------------------------------------------
# muP: annotations beside partitioning metadata, stacked layers, FSDP.
# ---------------------------------------------------------------------------

LAYERS = 3


class MuBlock(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(self.width, param_dtype=jnp.float64,
                 kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("fsdp", None)))(x)
    return x + nn.tanh(h), None


class MuNet(nn.Module):
  """Linen: Dense in, nn.scan over stacked blocks, MuReadout; kernels FSDP-partitioned."""

  width: int

  @nn.compact
  def __call__(self, x):
    import mup_flax

    lecun = nn.initializers.lecun_normal()
    x = nn.Dense(self.width, param_dtype=jnp.float64,
                 kernel_init=nn.with_partitioning(lecun, (None, "fsdp")))(x)
    stack = nn.scan(MuBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                    length=LAYERS, metadata_params={nn.PARTITION_NAME: None})
    x, _ = stack(self.width, name="layers")(x, None)
    return mup_flax.MuReadout(4, param_dtype=jnp.float64,
                              kernel_init=nn.with_partitioning(lecun, ("fsdp", None)))(x)


def _mup_data():
  x = jax.random.normal(jax.random.key(1), (32, 8), jnp.float64)
  y = jax.random.normal(jax.random.key(2), (32, 4), jnp.float64)
  return x, y


def case_mup_linen_fsdp_scan():
  """muP + Schedule-Free, Linen: InfShapeBox around nn.Partitioned, nn.scan, FSDP parity."""
  import mup_flax

  mesh = fsdp_mesh()
  x, y = _mup_data()
  model = mup_flax.MuP(MuNet(64), base=MuNet(16), delta=MuNet(32))
  params = model.init(jax.random.key(0), x)["params"]  # boxed: InfShapeBox(Partitioned(array))
  infshapes = mup_flax.get_infshapes(params)
  assert infshapes["layers"]["Dense_0"]["kernel"].shape == (LAYERS, 64, 64)
  assert infshapes["layers"]["Dense_0"]["kernel"].ninf() == 2
  specs = nn.get_partition_spec(params)
  assert specs["layers"]["Dense_0"]["kernel"] == P(None, "fsdp", None), specs
  assert specs["MuReadout_0"]["kernel"] == P("fsdp", None), specs
  shardings = nn.get_sharding(params, mesh)  # a prefix of the boxed tree
  assert sharded_leaves(place(params, shardings)) == 3

  tx = sf_optax.schedule_free_adamw(1e-2, weight_decay=1e-3, warmup_steps=2,
                                    **mup_flax.schedule_free_scales(infshapes))
  step = make_step(model.apply, tx)
  p1, s1 = run_single(step, params, tx.init(params), x, y)
  p2, s2, x2 = fsdp_run(step, tx, params, shardings, mesh, x, y)
  assert mup_flax.get_infshapes(p2) == infshapes and mup_flax.get_infshapes(x2) == infshapes
  assert nn.get_partition_spec(x2) == specs
  error = max(rel_error(p1, p2), rel_error(s1, s2),
              rel_error(sf_optax.eval_params(s1, p1), x2))
  assert error <= TOLERANCE, error
  return {"rel_error": error}


def case_mup_nnx_fsdp_scan():
  """muP + Schedule-Free, NNX: infshape beside out_sharding metadata, nnx.scan, FSDP parity."""
  import mup_flax

  mesh = fsdp_mesh()
  lecun = nnx.initializers.lecun_normal()

  # Every param carries sharding metadata: under nnx.jit, Variables with it keep
  # their sharding; the others get whatever XLA's propagation picks.
  zeros = nnx.initializers.zeros_init()

  class Block(nnx.Module):

    def __init__(self, width, rngs):
      self.linear = nnx.Linear(width, width, param_dtype=jnp.float64, rngs=rngs,
                               kernel_init=nnx.with_partitioning(lecun, ("fsdp", None)),
                               bias_init=nnx.with_partitioning(zeros, (None,)))

    def __call__(self, x):
      return x + jnp.tanh(self.linear(x))

  class Net(nnx.Module):

    def __init__(self, width, rngs):
      self.inp = nnx.Linear(8, width, param_dtype=jnp.float64, rngs=rngs,
                            kernel_init=nnx.with_partitioning(lecun, (None, "fsdp")),
                            bias_init=nnx.with_partitioning(zeros, (None,)))

      @nnx.split_rngs(splits=LAYERS)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
      def stack(rngs):
        return Block(width, rngs)

      self.blocks = stack(rngs)
      self.out = mup_flax.nnx.MuReadout(
          width, 4, param_dtype=jnp.float64, rngs=rngs,
          kernel_init=nnx.with_partitioning(lecun, ("fsdp", None)),
          bias_init=nnx.with_partitioning(zeros, (None,)))

    def __call__(self, x):
      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
                transform_metadata={nnx.PARTITION_NAME: None})
      def layers(block, h):
        return block(h)

      return self.out(layers(self.blocks, self.inp(x)))

  x, y = _mup_data()
  # Base shapes need shapes only: no mesh, no eager sharding.
  with nnx.use_eager_sharding(False):
    base_shapes = mup_flax.make_base_shapes(lambda: Net(16, nnx.Rngs(0)),
                                            lambda: Net(32, nnx.Rngs(0)))

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    pin_shardings(model, optimizer)
    return loss

  def run(sharded):
    model = mup_flax.nnx.set_base_shapes(Net(64, nnx.Rngs(0)), base_shapes, rescale_params=True)
    infshapes = mup_flax.get_infshapes(model)
    tx = sf_optax.schedule_free_adamw(1e-2, weight_decay=1e-3, warmup_steps=2,
                                      **mup_flax.schedule_free_scales(infshapes))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    xs, ys = (jax.device_put((x, y), NamedSharding(mesh, P("fsdp"))) if sharded else (x, y))
    for _ in range(STEPS):
      sync(train_step(model, optimizer, xs, ys))
    return model, optimizer, nnx.jit(sf_optax.eval_model)(model, optimizer), infshapes

  with nnx.use_eager_sharding(False):
    m1, o1, e1, inf1 = run(False)
  with jax.set_mesh(mesh), nnx.use_eager_sharding(True):
    m2, o2, e2, inf2 = run(True)
    kernel = m2.blocks.linear.kernel
    assert kernel.get_metadata("infshape").shape == (LAYERS, 64, 64)
    assert tuple(kernel.get_metadata("out_sharding")) == (None, "fsdp", None), (
        kernel.get_metadata())
    specs = nnx.as_pure(nnx.get_partition_spec(nnx.state(m2, nnx.Param)))
  assert inf1 == inf2 == mup_flax.get_infshapes(m2) == mup_flax.get_infshapes(e2)
  params = nnx.as_pure(nnx.state(m2, nnx.Param))
  # Every param has the sharding its metadata asks for, after the steps.
  assert sharded_leaves(params) == 3, jax.tree.map(lambda a: a.sharding.spec, params)
  for spec, leaf in zip(jax.tree.leaves(specs, is_leaf=_is_spec), jax.tree.leaves(params)):
    assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), (spec, leaf)
  check_params_shardings("mup nnx opt_state", params, nnx.as_pure(o2.opt_state))
  check_params_shardings("mup nnx eval model", params, nnx.as_pure(nnx.state(e2, nnx.Param)))
  error = max(
      rel_error(nnx.as_pure(nnx.state(m1, nnx.Param)), params),
      rel_error(nnx.as_pure(o1.opt_state), nnx.as_pure(o2.opt_state)),
      rel_error(nnx.as_pure(nnx.state(e1, nnx.Param)), nnx.as_pure(nnx.state(e2, nnx.Param))),
  )
  assert error <= TOLERANCE, error
  return {"rel_error": error}


# ---------------------------------------------------------------------------


def params_like(shardings):
  """A tree of stand-ins with the given shardings, for check_params_shardings."""

  class Stub:

    def __init__(self, sharding):
      self.sharding = sharding
      self.shape = None

  return jax.tree.map(Stub, shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


def _is_spec(x):
  return isinstance(x, P)


CASES = {
    name[len("case_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")
}


def main(argv):
  return _helpers.run_worker_cases(CASES, argv, N_DEVICES)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
