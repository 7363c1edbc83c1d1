"""Depth-μP / CompleteP (mup_flax._depth): closed forms and equivalences."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mup_flax
import sf_optax
from _helpers import default_tier


def params_tree():
  return {
      "embed": {"embedding": jnp.full((5, 4), 0.1)},
      "blocks_0": {"Dense_0": {"kernel": jnp.full((4, 4), 0.2), "bias": jnp.zeros(4)},
                   "LayerNorm_0": {"scale": jnp.ones(4)}},
      "blocks_1": {"Dense_0": {"kernel": jnp.full((4, 4), -0.3), "bias": jnp.zeros(4)},
                   "LayerNorm_0": {"scale": jnp.ones(4)}},
      "head": {"kernel": jnp.full((4, 5), 0.05)},
  }


def in_block_tree(value_in, value_out):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: value_in if str(path[0].key).startswith("blocks_") else value_out,
      params_tree())


@pytest.mark.parametrize("depth, base_depth, alpha, expected", [
    (2, 2, 0.5, 1.0), (8, 2, 0.5, 0.5), (8, 2, 1.0, 0.25), (2, 8, 1.0, 4.0), (16, 4, 0.75, 4**-0.75),
])
def test_depth_multiplier_closed_form(depth, base_depth, alpha, expected):
  assert mup_flax.depth_multiplier(depth, base_depth, alpha) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("alpha", [0.5, 0.75, 1.0])
def test_depth_scales_closed_form(alpha):
  scales = mup_flax.depth_scales(params_tree(), depth=12, base_depth=3, alpha=alpha,
                                 in_blocks=r"^blocks_\d+/")
  assert scales.lr_scales == in_block_tree(4.0 ** (alpha - 1), 1.0)
  assert scales.eps_scales == in_block_tree(4.0 ** -alpha, 1.0)
  # CompleteP keeps the blocks' learning rate; depth-μP divides it by sqrt(m_L).
  if alpha == 1.0:
    assert set(jax.tree.leaves(scales.lr_scales)) == {1.0}
  if alpha == 0.5:
    assert scales.lr_scales["blocks_0"]["Dense_0"]["kernel"] == pytest.approx(0.5)


def test_depth_scales_at_base_depth_are_one():
  scales = mup_flax.depth_scales(params_tree(), depth=3, base_depth=3, in_blocks="blocks")
  assert set(jax.tree.leaves(scales)) == {1.0}


def test_depth_scales_accepts_a_function_shapes_and_infshapes():
  shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params_tree())
  by_function = mup_flax.depth_scales(
      shapes, depth=4, base_depth=1, alpha=0.5, in_blocks=lambda path: path.startswith("blocks"))
  by_pattern = mup_flax.depth_scales(params_tree(), depth=4, base_depth=1, alpha=0.5,
                                     in_blocks="^blocks")
  assert by_function == by_pattern
  infshapes = jax.tree.map(lambda p: mup_flax.InfShape([mup_flax.InfDim(None, d) for d in p.shape]),
                           params_tree())
  assert mup_flax.depth_scales(infshapes, depth=4, base_depth=1, alpha=0.5,
                               in_blocks="^blocks") == by_pattern


def test_depth_scales_of_linen_boxes_and_nnx_modules():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x + nn.Dense(3, kernel_init=nn.with_partitioning(nn.initializers.ones, (None, "m")))(x)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = Block(name="blocks_0")(x)
      return nn.Dense(2, name="head")(x)

  boxed = Net().init(jax.random.key(0), jnp.ones((1, 3)))["params"]
  scales = mup_flax.depth_scales(boxed, depth=4, base_depth=2, alpha=1.0, in_blocks="blocks")
  assert scales.eps_scales["blocks_0"]["Dense_0"]["kernel"] == 0.5
  assert scales.eps_scales["head"]["kernel"] == 1.0

  class NnxNet(nnx.Module):
    def __init__(self, rngs):
      self.blocks_0 = nnx.Linear(3, 3, rngs=rngs)
      self.head = nnx.Linear(3, 2, rngs=rngs)

  model = NnxNet(nnx.Rngs(0))
  scales = mup_flax.depth_scales(model, depth=4, base_depth=2, alpha=1.0, in_blocks="blocks")
  pure = nnx.as_pure(nnx.state(model, nnx.Param))
  assert jax.tree.structure(scales.eps_scales) == jax.tree.structure(pure)
  assert scales.eps_scales["blocks_0"]["kernel"] == 0.5


@pytest.mark.parametrize("bad", [dict(depth=0), dict(base_depth=-1), dict(alpha=0.25),
                                 dict(alpha=1.5), dict(depth=True)])
def test_bad_arguments_name_themselves(bad):
  arguments = {**dict(depth=4, base_depth=2, alpha=1.0), **bad}
  name = next(iter(bad))
  with pytest.raises(ValueError, match=name):
    mup_flax.depth_multiplier(**arguments)
  with pytest.raises(ValueError, match=name):
    mup_flax.depth_scales(params_tree(), **arguments, in_blocks="blocks")


def test_a_pattern_matching_nothing_is_an_error():
  with pytest.raises(ValueError, match="no parameter path matches"):
    mup_flax.depth_scales(params_tree(), depth=4, base_depth=2, in_blocks="layers_")


def test_multiply_scales():
  width = {"a": 0.25, "b": {"c": 1.0}}
  depth = {"a": 0.5, "b": {"c": 2.0}}
  assert mup_flax.multiply_scales(width, None, depth) == {"a": 0.125, "b": {"c": 2.0}}
  assert mup_flax.multiply_scales(None) is None
  with pytest.raises(ValueError, match="same params"):
    mup_flax.multiply_scales(width, {"a": 1.0})


# ---------------------------------------------------------------------------
# The optimizer side: closed forms in float64.
# ---------------------------------------------------------------------------


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("alpha", default_tier([0.5, 1.0], {"1.0"}))
def test_first_adam_step_closed_form(alpha):
  """Adam's first step is -lr * g / (|g| + eps): with depth, -lr m^(a-1) g / (|g| + eps m^-a)."""
  lr, eps, m = 0.1, 1e-3, 4.0
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params_tree())
  scales = mup_flax.depth_scales(params, depth=8, base_depth=2, alpha=alpha, in_blocks="^blocks")
  tx = mup_flax.depth_scaled(optax.adam(lr, eps=eps), scales)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 2e-3), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  inside = -lr * m ** (alpha - 1) * 2e-3 / (2e-3 + eps * m**-alpha)
  outside = -lr * 2e-3 / (2e-3 + eps)
  expected = in_block_tree(inside, outside)
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.usefixtures("x64")
@pytest.mark.slow  # the default tier: test_first_adam_step_closed_form
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_depth_scaled_adamw_is_adamw_per_parameter_group(alpha):
  """== optax.adamw with lr m^(a-1), eps m^-a on the blocks (PyTorch param groups), 30 steps."""
  lr, eps, wd, m = 0.05, 1e-4, 0.1, 4.0
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params_tree())
  scales = mup_flax.depth_scales(params, depth=8, base_depth=2, alpha=alpha, in_blocks="^blocks")
  ours = mup_flax.depth_scaled(optax.adamw(lr, eps=eps, weight_decay=wd), scales)
  groups = optax.partition(
      {"blocks": optax.adamw(lr * m ** (alpha - 1), eps=eps * m**-alpha, weight_decay=wd),
       "rest": optax.adamw(lr, eps=eps, weight_decay=wd)},
      in_block_tree("blocks", "rest"))
  loss = lambda p: sum(jnp.sum(jnp.sin(3 * leaf) * leaf) for leaf in jax.tree.leaves(p))
  results = []
  for tx in (ours, groups):
    p, state = params, tx.init(params)
    for _ in range(30):
      updates, state = tx.update(jax.grad(loss)(p), state, p)
      p = optax.apply_updates(p, updates)
    results.append(p)
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("factory", default_tier(
    [sf_optax.schedule_free_adamw, sf_optax.schedule_free_adan], {"schedule_free_adamw"},
    ids=lambda factory: factory.__name__))
def test_schedule_free_with_scaled_eps_and_lr_scales(factory):
  """scale_eps + lr_scales == the same optimizer built with eps * s and the lr scales."""
  lr, eps, s = 0.05, 1e-3, 0.25
  params = {"blocks_0": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float64)}
  loss = lambda p: jnp.sum(jnp.cos(2 * p["blocks_0"]) + 0.1 * p["blocks_0"] ** 2)
  lr_scales = {"blocks_0": 0.5}
  ours = optax.chain(mup_flax.scale_eps({"blocks_0": s}),
                     factory(lr, eps=eps, weight_decay=0.1, lr_scales=lr_scales))
  direct = factory(lr, eps=eps * s, weight_decay=0.1, lr_scales=lr_scales)
  results = []
  for tx in (ours, direct):
    p, state = params, tx.init(params)
    for _ in range(40):
      updates, state = tx.update(jax.grad(loss)(p), state, p)
      p = optax.apply_updates(p, updates)
    results.append((p, sf_optax.eval_params(state, p)))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_depth_scaled_with_mu_adamw_multiplies_width_and_depth():
  """Around mu_adamw: hidden lr = lr / m_N * m_L^(a-1), as in the CompleteP reference code."""
  base = {"blocks_0": {"kernel": jnp.zeros((4, 4))}, "head": {"kernel": jnp.zeros((4, 2))}}
  delta = {"blocks_0": {"kernel": jnp.zeros((8, 8))}, "head": {"kernel": jnp.zeros((8, 2))}}
  params = {"blocks_0": {"kernel": jnp.zeros((16, 16))}, "head": {"kernel": jnp.zeros((16, 2))}}
  infshapes = mup_flax.get_infshapes(params, mup_flax.make_base_shapes(base, delta))
  scales = mup_flax.depth_scales(params, depth=8, base_depth=2, alpha=0.5, in_blocks="blocks")
  tx = mup_flax.depth_scaled(mup_flax.mu_adamw(0.1, infshapes, eps=1e-12, weight_decay=0.0),
                             scales)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["blocks_0"]["kernel"], -0.1 / 4 * 4**-0.5, rtol=1e-5)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.1, rtol=1e-5)


def test_structure_mismatch_is_reported_at_init():
  scales = mup_flax.depth_scales(params_tree(), depth=4, base_depth=2, in_blocks="blocks")
  tx = mup_flax.depth_scaled(optax.adam(0.1), scales)
  with pytest.raises(ValueError, match="eps_scales gives no value for parameter other"):
    tx.init({"other": jnp.zeros(2)})


def test_dtype_is_kept_and_jit_works():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params_tree())
  scales = mup_flax.depth_scales(params, depth=8, base_depth=2, alpha=0.5, in_blocks="blocks")
  tx = mup_flax.depth_scaled(optax.adam(0.1), scales)
  updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
  assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}


# ---------------------------------------------------------------------------
# The forward side: the branch multiplier keeps a deep residual stack O(1).
# ---------------------------------------------------------------------------


def test_branch_multiplier_bounds_the_residual_stream():
  """Linear branches B_l with i.i.d. N(0, 1/n) entries: E|h_L|^2 = (1 + k^2)^L |h_0|^2.

  With k = 1 it explodes like 2^L; with k = (L/L0)^(-1/2) it tends to e^(L0)
  (depth-μP), with k = (L/L0)^(-1) to 1 (CompleteP).
  """
  n, base_depth = 256, 1
  rng = np.random.default_rng(0)
  h0 = rng.normal(size=n)
  for depth in (4, 16, 64):
    expected = {alpha: (1 + mup_flax.depth_multiplier(depth, base_depth, alpha) ** 2) ** depth
                for alpha in (0.5, 1.0)}
    assert expected[0.5] == pytest.approx((1 + 1 / depth) ** depth)
    assert expected[0.5] < np.e and expected[1.0] < 1 + 2 / depth
    ratios = []
    for _ in range(20):
      h = h0.copy()
      for _ in range(depth):
        h = h + mup_flax.depth_multiplier(depth, base_depth, 0.5) * (
            rng.normal(size=(n, n)) / np.sqrt(n)) @ h
      ratios.append(np.sum(h**2) / np.sum(h0**2))
    assert np.mean(ratios) == pytest.approx(expected[0.5], rel=0.15)
