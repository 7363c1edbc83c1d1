"""Multi-device NNX cases of ``tests/test_sharding_nnx.py``, run in a process of their own.

A Flax NNX model whose every param carries ``nnx.with_partitioning`` metadata,
annotated for muP (``mup_flax.nnx.set_base_shapes``), trained FSDP-style with a
Schedule-Free optimizer scaled by ``mup_flax.schedule_free_scales``, on 8
virtual CPU devices; compared with the same run on one device (float64); and
checkpointed, then restored into an abstract sharded model::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_sharding_nnx_worker.py [CASE ...]

(the flags are set by ``_sharding_worker``, whose helpers this reuses). Each case
prints one JSON line ``{"case": name, "ok": bool, "error": str, ...}``.
"""

from __future__ import annotations

import sys
import tempfile

# Sets the XLA flags (8 devices, single-threaded Eigen, long collective
# timeouts) and float64 before anything touches a device.
from _sharding_worker import check_params_shardings  # noqa: I001
from _sharding_worker import fsdp_mesh
from _sharding_worker import N_DEVICES
from _sharding_worker import pin_shardings
from _sharding_worker import rel_error
from _sharding_worker import sharded_leaves
from _sharding_worker import sync

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import mup_flax  # noqa: E402
import sf_optax  # noqa: E402
import _helpers  # noqa: E402

TOLERANCE = 1e-12
STEPS = 3
WIDTH = 64


class Net(nnx.Module):
  """Linear, Linear, MuReadout; kernels and one bias FSDP-sharded, the rest replicated."""

  def __init__(self, width, rngs):
    shard = nnx.with_partitioning
    kernel = nnx.initializers.lecun_normal()
    zeros = nnx.initializers.zeros_init()
    kw = dict(param_dtype=jnp.float64, rngs=rngs)
    # Every param carries sharding metadata ((None,) for a replicated one): the
    # train step pins Variables to it (see pin_shardings).
    self.inp = nnx.Linear(8, width, kernel_init=shard(kernel, (None, "fsdp")),
                          bias_init=shard(zeros, ("fsdp",)), **kw)
    self.hidden = nnx.Linear(width, width, kernel_init=shard(kernel, ("fsdp", None)),
                             bias_init=shard(zeros, (None,)), **kw)
    self.out = mup_flax.nnx.MuReadout(width, 4, kernel_init=shard(kernel, ("fsdp", None)),
                                      bias_init=shard(zeros, (None,)), **kw)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(jnp.tanh(self.inp(x)))))


def data():
  x = jax.random.normal(jax.random.key(1), (32, 8), jnp.float64)
  y = jax.random.normal(jax.random.key(2), (32, 4), jnp.float64)
  return x, y


def base_shapes():
  # Shapes only: no mesh, so no eager sharding.
  with nnx.use_eager_sharding(False):
    return mup_flax.make_base_shapes(lambda: Net(16, nnx.Rngs(0)), lambda: Net(32, nnx.Rngs(0)))


def make_optimizer(model, store_x):
  infshapes = mup_flax.get_infshapes(model)
  tx = optax.chain(
      optax.clip_by_global_norm(10.0),
      sf_optax.schedule_free_adamw(1e-2, weight_decay=1e-3, warmup_steps=2, store_x=store_x,
                                   **mup_flax.schedule_free_scales(infshapes)),
  )
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
  optimizer.update(model, grads)
  pin_shardings(model, optimizer)
  return loss


eval_model_jit = nnx.jit(sf_optax.eval_model)


def train(mesh, store_x, shapes):
  """STEPS steps; returns the model, its optimizer and the model at x (eager, under nnx.jit)."""
  model = mup_flax.nnx.set_base_shapes(Net(WIDTH, nnx.Rngs(0)), shapes, rescale_params=True)
  optimizer = make_optimizer(model, store_x)
  x, y = data()
  if mesh is not None:
    x, y = jax.device_put((x, y), NamedSharding(mesh, P("fsdp")))
  for _ in range(STEPS):
    sync(train_step(model, optimizer, x, y))
  return model, optimizer, sf_optax.eval_model(model, optimizer), eval_model_jit(model, optimizer)


def params_of(model):
  return nnx.as_pure(nnx.state(model, nnx.Param))


def _is_spec(x):
  return isinstance(x, P)


def case_mup_fsdp_eval_model():
  """muP + Schedule-Free (under optax.chain), NNX FSDP: one device's numbers to 1e-12.

  The optimizer state's params-sized leaves have their params' shardings; the
  model at x (eager and under nnx.jit) keeps shardings and infshapes.
  """
  mesh = fsdp_mesh()
  shapes = base_shapes()
  errors, checked = {}, {}
  for store_x in (True, False):
    with nnx.use_eager_sharding(False):
      m1, o1, e1, j1 = train(None, store_x, shapes)
    with jax.set_mesh(mesh), nnx.use_eager_sharding(True):
      m2, o2, e2, j2 = train(mesh, store_x, shapes)
      specs = nnx.as_pure(nnx.get_partition_spec(nnx.state(m2, nnx.Param)))
    params = params_of(m2)
    # Every param has the sharding its metadata asks for, after the steps.
    assert sharded_leaves(params) == 4, jax.tree.map(lambda a: a.sharding.spec, params)
    for spec, leaf in zip(jax.tree.leaves(specs, is_leaf=_is_spec), jax.tree.leaves(params),
                          strict=True):
      assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), (spec, leaf)
    name = f"store_x={store_x}"
    checked[name] = check_params_shardings(f"{name} opt_state", params, nnx.as_pure(o2.opt_state))
    for what, model_x in (("eager", e2), ("nnx.jit", j2)):
      check_params_shardings(f"{name} eval_model {what}", params, params_of(model_x))
      for a, b in zip(jax.tree.leaves(params_of(model_x)), jax.tree.leaves(params), strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (what, a.sharding, b.sharding)
      assert mup_flax.get_infshapes(model_x) == mup_flax.get_infshapes(m1), what
      assert model_x.hidden.kernel.get_metadata("out_sharding") == ("fsdp", None), what
    expected_x = sf_optax.eval_params(nnx.as_pure(o1.opt_state), params_of(m1))
    errors[name] = max(
        rel_error(params_of(m1), params),
        rel_error(nnx.as_pure(o1.opt_state), nnx.as_pure(o2.opt_state)),
        rel_error(expected_x, params_of(e1)),
        rel_error(expected_x, params_of(j1)),
        rel_error(expected_x, params_of(e2)),
        rel_error(expected_x, params_of(j2)),
    )
    assert errors[name] <= TOLERANCE, (name, errors[name])
  return {"rel_error": errors, "state_leaves_checked": checked}


def _bitwise_equal(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return all(np.array_equal(np.asarray(u), np.asarray(v), equal_nan=True)
             for u, v in zip(leaves_a, leaves_b, strict=True))


def case_checkpoint_resume_sharded():
  """A sharded NNX model and optimizer restored into an abstract sharded target.

  ``nnx.get_abstract_model`` builds the target (no arrays, the metadata's
  shardings); the restored leaves have the running ones' shardings and values
  (bitwise), and the resumed run equals the uninterrupted one bitwise.
  """
  mesh = fsdp_mesh()
  shapes = base_shapes()

  def build(seed):
    model = mup_flax.nnx.set_base_shapes(Net(WIDTH, nnx.Rngs(seed)), shapes, rescale_params=True)
    return model, make_optimizer(model, store_x=True)

  with jax.set_mesh(mesh), nnx.use_eager_sharding(True), \
      tempfile.TemporaryDirectory() as directory:
    model, optimizer = build(0)
    x, y = jax.device_put(data(), NamedSharding(mesh, P("fsdp")))
    for _ in range(2):
      sync(train_step(model, optimizer, x, y))
    saved = nnx.as_pure(nnx.state((model, optimizer)))
    with sf_optax.CheckpointManager(directory) as manager:
      manager.save(2, nnx.state((model, optimizer)))
    for _ in range(2):
      sync(train_step(model, optimizer, x, y))

    graphdef, abstract = nnx.get_abstract_model(lambda: build(1), mesh)
    with sf_optax.CheckpointManager(directory) as manager:
      fresh, fresh_optimizer = nnx.merge(graphdef, manager.restore(abstract))
    restored = nnx.as_pure(nnx.state((fresh, fresh_optimizer)))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
      assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
    assert _bitwise_equal(restored, saved)
    params = params_of(fresh)
    assert sharded_leaves(params) == 4
    checked = check_params_shardings("restored opt_state", params,
                                     nnx.as_pure(fresh_optimizer.opt_state))
    assert mup_flax.get_infshapes(fresh) == mup_flax.get_infshapes(model)
    for _ in range(2):
      sync(train_step(fresh, fresh_optimizer, x, y))
    assert _bitwise_equal(nnx.as_pure(nnx.state((fresh, fresh_optimizer))),
                          nnx.as_pure(nnx.state((model, optimizer))))
    assert _bitwise_equal(params_of(eval_model_jit(fresh, fresh_optimizer)),
                          params_of(eval_model_jit(model, optimizer)))
  return {"state_leaves_checked": checked}


CASES = {
    name[len("case_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")
}


def main(argv):
  return _helpers.run_worker_cases(CASES, argv, N_DEVICES)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
