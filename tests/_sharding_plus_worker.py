"""Multi-device cases of ``tests/test_sharding_plus.py``: ScheduleFree+'s global reductions.

ScheduleFree+'s step size comes from three numbers of the whole model: the L1
norm of the gradient, the inner product <g, z - x> and the loss. These cases
check that they stay global when the parameters are split over 8 virtual CPU
devices, in a process of its own (JAX fixes its device count at start-up)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_sharding_plus_worker.py [CASE ...]

(the flags are set here when absent, as in ``_sharding_worker.py``, whose helpers
this reuses). Each case prints one JSON line ``{"case": name, "ok": bool,
"error": str, ...}``. Everything runs in float64: a sharded run and a
single-device run differ by reduction order only.
"""

from __future__ import annotations

import sys

import _sharding_worker as common  # noqa: I001 -- sets the XLA flags before jax starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sf_optax  # noqa: E402
import _helpers  # noqa: E402

jax.config.update("jax_enable_x64", True)

TOLERANCE = 1e-12
STEPS = 6
N_DEVICES = common.N_DEVICES
# Every feature of the step size on: an L1 EMA, the c warmup, the annealed
# momentum, AdamC decay, polynomial weights.
HYPERPARAMETERS = dict(weight_decay=2.0, polyak_b=0.9, c_warmup=2, sf_b1_anneal_steps=4, r=0.5)


def comparable(state):
  """The state without the Kahan compensation of the weight sum.

  The compensation holds the rounding error of the sum (about 1e-18 here), whose
  sign may differ between two runs that differ by reduction order only.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: (jnp.zeros_like(leaf)
                          if "weight_sum_compensation" in jax.tree_util.keystr(path) else leaf),
      state)


def make_plus_step(apply_fn, tx):
  def loss_fn(params, x, y):
    return jnp.mean((apply_fn({"params": params}, x) - y) ** 2)

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def case_plus_fsdp():
  """FSDP with NamedSharding under jit: the trajectory equals one device's (<= 1e-12).

  The reductions over sharded arrays are global by construction there: no
  ``axis_name``. Shardings of the state follow the params'.
  """
  mesh = common.fsdp_mesh()
  model, boxed, x, y = common.linen_setup()
  params = nn.meta.unbox(boxed)
  shardings = nn.get_sharding(boxed, mesh)
  assert common.sharded_leaves(common.place(params, shardings)) == 3
  errors = {}
  for store_x in (True, False):
    tx = sf_optax.schedule_free_plus(**HYPERPARAMETERS, store_x=store_x)
    step = make_plus_step(model.apply, tx)
    p1, s1 = common.run_single(step, params, tx.init(params), x, y, steps=STEPS)
    p2, s2, x2 = common.fsdp_run(step, tx, params, shardings, mesh, x, y, steps=STEPS)
    error = max(common.rel_error(p1, p2), common.rel_error(comparable(s1), comparable(s2)),
                common.rel_error(sf_optax.eval_params(s1, p1), x2))
    assert error <= TOLERANCE, (store_x, error)
    assert float(optax.tree.get(s2, "step_size")) > 0
    errors["store_x" if store_x else "no_x"] = error
  return {"rel_error": errors}


def _split_problem():
  """Params whose every leaf splits over 8 devices along its first axis, and a loss."""
  rng = np.random.default_rng(0)
  params = {
      "w": jnp.asarray(rng.normal(size=(16, 4)) / 4),
      "b": jnp.asarray(rng.normal(size=(8,)) / 4),
      "v": jnp.asarray(rng.normal(size=(8, 3)) / 3),
  }
  inputs = jnp.asarray(rng.normal(size=(N_DEVICES * 4, 16)))
  targets = jnp.asarray(rng.normal(size=(N_DEVICES * 4, 3)))

  def loss_fn(params, x, y):
    hidden = jnp.tanh(x @ params["w"] @ params["w"].T[:, :8] + params["b"])
    return jnp.mean((hidden @ params["v"] - y) ** 2)

  @jax.jit
  def values_and_grads(params):
    """The loss of each device's share of the batch, and the full-batch gradient."""
    xs = inputs.reshape(N_DEVICES, -1, inputs.shape[-1])
    ys = targets.reshape(N_DEVICES, -1, targets.shape[-1])
    values = jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, xs, ys)
    return values, jax.grad(loss_fn)(params, inputs, targets)

  return params, values_and_grads


def _single_device_run(tx, params, values_and_grads):
  """The reference: one device, the loss averaged over the devices' values."""

  @jax.jit
  def step(p, s):
    values, grads = values_and_grads(p)
    updates, s = tx.update(grads, s, p, value=jnp.mean(values))
    return optax.apply_updates(p, updates), s

  p, s = params, tx.init(params)
  for _ in range(STEPS):
    p, s = step(p, s)
  return p, s


def _state_specs(tx, params, spec):
  """``spec`` for every params-sized leaf of the state, ``P()`` for the scalars."""
  return optax.tree_map_params(
      tx, lambda _: spec, jax.eval_shape(tx.init, params),
      transform_non_params=lambda _: P())


def case_plus_shard_map():
  """shard_map with each leaf split over the axis: sums and mean taken over ``axis_name``.

  Each device holds a slice of every parameter, gradient and state buffer (as
  the reference's DTensor shards) and the loss of its share of the batch. With
  ``axis_name`` the step equals the single-device step on the whole model with
  the mean loss; without it, the devices use their local sums and the run is
  another one.
  """
  mesh = jax.make_mesh((N_DEVICES,), ("shard",), axis_types=(AxisType.Auto,))
  params, values_and_grads = _split_problem()
  errors, without_axis = {}, {}
  for store_x in (True, False):
    single = sf_optax.schedule_free_plus(**HYPERPARAMETERS, store_x=store_x)
    p1, s1 = _single_device_run(single, params, values_and_grads)
    for axis_name in ("shard", None):
      tx = sf_optax.schedule_free_plus(**HYPERPARAMETERS, store_x=store_x, axis_name=axis_name)
      state_spec = _state_specs(tx, params, P("shard"))

      def local(p, s, g, values, tx=tx):
        updates, s = tx.update(g, s, p, value=values[0])
        return optax.apply_updates(p, updates), s

      sharded = jax.jit(jax.shard_map(
          local, mesh=mesh,
          in_specs=(P("shard"), state_spec, P("shard"), P("shard")),
          out_specs=(P("shard"), state_spec),
          # Without axis_name the scalar state differs per device (the run this
          # shows is wrong): only then is the replication check turned off.
          check_vma=axis_name is not None))
      p2, s2 = params, jax.jit(jax.shard_map(
          tx.init, mesh=mesh, in_specs=(P("shard"),), out_specs=state_spec))(params)
      for _ in range(STEPS):
        values, grads = values_and_grads(p2)
        p2, s2 = common.sync(sharded(p2, s2, grads, values))
      error = max(common.rel_error(p1, p2), common.rel_error(comparable(s1), comparable(s2)),
                  common.rel_error(sf_optax.eval_params(s1, p1), sf_optax.eval_params(s2, p2)))
      key = "store_x" if store_x else "no_x"
      if axis_name is None:
        without_axis[key] = error
      else:
        assert error <= TOLERANCE, (store_x, error)
        errors[key] = error
  # (A diverged run counts as different.)
  assert not min(without_axis.values()) <= 1e-3, without_axis
  return {"rel_error": errors, "rel_error_without_axis_name": without_axis}


def case_plus_pmap():
  """pmap over slices of every leaf, with ``axis_name``: equals the single-device step."""
  params, values_and_grads = _split_problem()
  split = lambda tree: jax.tree.map(lambda a: a.reshape(N_DEVICES, -1, *a.shape[1:]), tree)
  join = lambda tree: jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), tree)
  errors = {}
  for store_x in (True, False):
    single = sf_optax.schedule_free_plus(**HYPERPARAMETERS, store_x=store_x)
    p1, s1 = _single_device_run(single, params, values_and_grads)
    tx = sf_optax.schedule_free_plus(**HYPERPARAMETERS, store_x=store_x, axis_name="shard")

    def local(p, s, g, value, tx=tx):
      updates, s = tx.update(g, s, p, value=value)
      return optax.apply_updates(p, updates), s

    parallel = jax.pmap(local, axis_name="shard")
    p2 = split(params)
    s2 = jax.pmap(tx.init)(p2)
    for _ in range(STEPS):
      values, grads = jax.device_get(values_and_grads(join(p2)))
      p2, s2 = common.sync(parallel(p2, s2, split(grads), values))
    x2 = jax.pmap(sf_optax.eval_params)(s2, p2)
    error = max(common.rel_error(p1, join(p2)),
                common.rel_error(sf_optax.eval_params(s1, p1), join(x2)))
    # The scalar state is the same on every device.
    for name in ("step_size", "grad_l1_ema"):
      logged = np.asarray(optax.tree.get(s2, name))
      assert np.all(logged == logged[0]), (name, logged)
      error = max(error, abs(logged[0] / float(optax.tree.get(s1, name)) - 1))
    assert error <= TOLERANCE, (store_x, error)
    errors["store_x" if store_x else "no_x"] = error
  return {"rel_error": errors}


CASES = {
    name[len("case_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")
}


def main(argv):
  return _helpers.run_worker_cases(CASES, argv, N_DEVICES)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
