"""Linen: the InfShapeBox, the MuP wrapper, MuReadout / MuSharedReadout, μP init."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.core import meta
from flax.training import train_state

import mup_flax
from mup_flax import InfDim
from mup_flax import InfShape
from mup_flax import InfShapeBox

from _helpers import MLP
from _helpers import MuMLP
from _helpers import assert_trees_equal

X = jnp.ones((2, 5))


def SPMLP(width):
  """The MLP with a plain Dense readout (named like MuMLP's): the standard parametrization."""
  return MLP(width, readout_name="MuReadout_0")


def mup(width, base=16, delta=32, cls=MuMLP, **kw):
  return mup_flax.MuP(cls(width, **kw), base=cls(base, **kw), delta=cls(delta, **kw))


def add_bias(y, bias):
  return y + bias.reshape((1,) * (y.ndim - 1) + (-1,))


def dense(x, p):
  return add_bias(x @ p["kernel"], p["bias"])


# ---------------------------------------------------------------- the box


def test_init_annotates_every_param():
  variables = mup(64).init(jax.random.key(0), X)
  params = variables["params"]
  leaves = jax.tree.leaves(params, is_leaf=meta.is_axis_metadata)
  assert leaves and all(isinstance(b, InfShapeBox) for b in leaves)
  assert params["Dense_1"]["kernel"].infshape == InfShape([InfDim(16, 64)] * 2)
  assert params["MuReadout_0"]["kernel"].role == "readout"
  assert params["Dense_1"]["kernel"].role is None


def test_box_survives_jit_and_grad():
  model = mup(64)
  params = model.init(jax.random.key(0), X)["params"]
  infshapes = mup_flax.get_infshapes(params)
  jitted = jax.jit(lambda p: p)(params)
  assert mup_flax.get_infshapes(jitted) == infshapes
  grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, X).sum()))(params)
  assert mup_flax.get_infshapes(grads) == infshapes
  assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_infshapes_structure_matches_unboxed_params():
  params = mup(64).init(jax.random.key(0), X)["params"]
  infshapes = mup_flax.get_infshapes(params)
  assert jax.tree.structure(infshapes) == jax.tree.structure(nn.unbox(params))


SEEN = []  # (InfShape, shape) of a scanned kernel, as each layer sees it.


class Block(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x, _):
    dense = nn.Dense(self.width, kernel_init=nn.with_partitioning(
        nn.initializers.lecun_normal(), (None, "model")))
    y = dense(x)
    raw = dense.get_variable("params", "kernel")
    if isinstance(raw, InfShapeBox):
      SEEN.append((raw.infshape, meta.unbox(raw).shape))
    return nn.relu(y), None


class ScanNet(nn.Module):
  width: int
  transform: str = "scan"

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width)(x)
    if self.transform == "scan":
      x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3, metadata_params={nn.PARTITION_NAME: "layers"})(
                         self.width)(x, None)
    else:
      x = jnp.broadcast_to(x, (3,) + x.shape)
      x, _ = nn.vmap(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(0, None), metadata_params={nn.PARTITION_NAME: "layers"})(
                         self.width)(x, None)
      x = x.mean(0)
    return mup_flax.MuReadout(2)(x)


@pytest.mark.parametrize("transform", ["scan", "vmap"])
def test_box_through_scan_and_vmap_nested_with_partitioning(transform):
  model = mup_flax.MuP(ScanNet(64, transform), base=ScanNet(16, transform),
                       delta=ScanNet(32, transform))
  variables = model.init(jax.random.key(0), X)
  kernel = variables["params"][f"{transform.capitalize()}Block_0"]["Dense_0"]["kernel"]
  # Stacked outside: the layer axis is a finite dim; the Partitioned box nests inside.
  assert kernel.infshape == InfShape([InfDim(None, 3), InfDim(16, 64), InfDim(16, 64)])
  assert isinstance(kernel.value, nn.Partitioned)
  assert kernel.value.names == ("layers", None, "model")
  assert nn.get_partition_spec(variables)["params"][f"{transform.capitalize()}Block_0"][
      "Dense_0"]["kernel"] == jax.sharding.PartitionSpec("layers", None, "model")
  # Inside the transform, remove_axis gave each layer its own 2-d InfShape.
  SEEN.clear()
  jax.jit(model.apply)(variables, X)
  assert SEEN and all(s == (InfShape([InfDim(16, 64)] * 2), (64, 64)) for s in SEEN)


def test_with_partitioning_either_order_and_get_partition_spec():
  class Net(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
      init = nn.with_partitioning(mup_flax.init.lecun_normal(), ("data", "model"))
      x = nn.Dense(self.width, kernel_init=init)(x)
      init = mup_flax.init.lecun_normal()
      x = nn.Dense(self.width, kernel_init=nn.with_partitioning(init, ("model", None)))(x)
      return mup_flax.MuReadout(2, kernel_init=nn.with_partitioning(
          nn.initializers.lecun_normal(), ("model", None)))(x)

  variables = mup(64, cls=Net).init(jax.random.key(0), X)
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["Dense_0"]["kernel"] == jax.sharding.PartitionSpec("data", "model")
  assert specs["MuReadout_0"]["kernel"] == jax.sharding.PartitionSpec("model", None)
  assert variables["params"]["MuReadout_0"]["kernel"].role == "readout"
  assert nn.unbox(variables)["params"]["Dense_1"]["kernel"].shape == (64, 64)


# ---------------------------------------------------------------- MuP wrapper


def test_base_equals_target_is_standard_parametrization():
  """At base width: the same init (bit for bit) and outputs as the SP model."""
  model = mup(16)
  variables = model.init(jax.random.key(3), X)
  sp = SPMLP(16).init(jax.random.key(3), X)
  assert_trees_equal(nn.unbox(variables), sp)
  np.testing.assert_array_equal(model.apply(variables, X), SPMLP(16).apply(sp, X))


def test_readout_is_dense_on_scaled_input():
  model = mup(64, output_mult=2.0)
  variables = model.init(jax.random.key(0), X)
  p = nn.unbox(variables)["params"]
  h = nn.relu(dense(X, p["Dense_0"]))
  h = nn.relu(dense(h, p["Dense_1"]))
  width_mult = 64 / 16
  expected = dense(2.0 * h / width_mult, p["MuReadout_0"])
  np.testing.assert_allclose(model.apply(variables, X), expected, rtol=1e-6, atol=1e-7)


def test_readout_zero_init():
  params = nn.unbox(mup(64, readout_zero_init=True).init(jax.random.key(0), X))["params"]
  assert not jnp.any(params["MuReadout_0"]["kernel"]) and not jnp.any(params["MuReadout_0"]["bias"])


def test_mup_init_scales_only_what_it_should():
  """μP init = SP init of the same model, except the readout kernel * sqrt(width_mult)."""
  width = 64
  variables = nn.unbox(mup(width).init(jax.random.key(1), X))["params"]
  sp = SPMLP(width).init(jax.random.key(1), X)["params"]
  assert_trees_equal(variables["Dense_1"], sp["Dense_1"])
  np.testing.assert_allclose(variables["MuReadout_0"]["kernel"],
                             sp["MuReadout_0"]["kernel"] * 2.0, rtol=1e-6)


@pytest.mark.parametrize("width", [64, 256, 1024])
def test_init_stds_match_the_closed_forms(width):
  class Net(nn.Module):
    width: int

    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(512, self.width)(tokens)
      x = nn.relu(nn.Dense(self.width)(x))
      return mup_flax.MuReadout(256)(x)

  base = 32
  model = mup(width, base=base, delta=2 * base, cls=Net)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))["params"]
  std = lambda a: float(jnp.std(a))
  # nn.Embed's std 1/sqrt(features) shrinks with width; μP keeps 1/sqrt(base).
  np.testing.assert_allclose(std(params["Embed_0"]["embedding"]), base ** -0.5, rtol=0.05)
  # Hidden Dense: lecun_normal 1/sqrt(fan_in), already μP.
  np.testing.assert_allclose(std(params["Dense_0"]["kernel"]), width ** -0.5, rtol=0.05)
  # Readout: 1/sqrt(base fan_in) (then divided by width_mult in the forward pass).
  np.testing.assert_allclose(std(params["MuReadout_0"]["kernel"]), base ** -0.5, rtol=0.05)


def test_reinit_and_reannotate_never_rescale_twice():
  model = mup(64)
  variables = model.init(jax.random.key(0), X)
  again = model.annotate(variables)
  assert_trees_equal(nn.unbox(again), nn.unbox(variables))
  params = mup_flax.set_base_shapes(variables["params"], model.base_shapes())
  assert_trees_equal(nn.unbox(params), nn.unbox(variables["params"]))


def test_checkpoint_restore_restores_annotations_without_rescaling():
  model = mup(64)
  variables = model.init(jax.random.key(0), X)
  # A checkpoint of plain arrays (what a restore without a target gives).
  plain = jax.tree.map(np.asarray, nn.unbox(variables))
  restored = model.annotate(plain)
  assert_trees_equal(nn.unbox(restored), nn.unbox(variables))
  assert mup_flax.get_infshapes(restored["params"]) == mup_flax.get_infshapes(variables["params"])
  # Restoring into the abstract annotated target (as orbax does) keeps the boxes.
  target = jax.eval_shape(model.init, jax.random.key(0), X)
  restored = meta.replace_boxed(target, jax.tree.map(jnp.asarray, plain))
  assert mup_flax.get_infshapes(restored["params"]) == mup_flax.get_infshapes(variables["params"])
  np.testing.assert_array_equal(model.apply(restored, X), model.apply(variables, X))


def test_fresh_wrapper_annotates_plain_arrays_given_inputs(tmp_path):
  model = mup(64)
  variables = model.init(jax.random.key(0), X)
  mup_flax.save_base_shapes(model.base_shapes(), tmp_path / "mlp.json")
  plain = jax.tree.map(np.asarray, nn.unbox(variables))
  fresh = mup_flax.MuP(MuMLP(64), base_shapes=str(tmp_path / "mlp.json"))
  with pytest.raises(ValueError, match=r"needs the model's example inputs.*annotate\(params, x\)"):
    fresh.annotate(plain)
  restored = fresh.annotate(plain, X)
  assert mup_flax.get_infshapes(restored["params"]) == mup_flax.get_infshapes(variables["params"])
  np.testing.assert_array_equal(fresh.apply(plain, X), model.apply(variables, X))


def test_apply_accepts_unboxed_params():
  model = mup(64)
  variables = model.init(jax.random.key(0), X)
  np.testing.assert_array_equal(model.apply(nn.unbox(variables), X), model.apply(variables, X))


def test_init_and_apply_under_jit():
  model = mup(64)
  variables = jax.jit(model.init)(jax.random.key(0), X)
  eager = model.init(jax.random.key(0), X)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               nn.unbox(variables), nn.unbox(eager))
  np.testing.assert_allclose(jax.jit(model.apply)(variables, X), model.apply(eager, X),
                             rtol=1e-6)


def test_base_shapes_argument_and_file(tmp_path):
  shapes = mup_flax.make_base_shapes(MuMLP(16), MuMLP(32), X)
  mup_flax.save_base_shapes(shapes, tmp_path / "mlp.yaml")
  a = mup(64).init(jax.random.key(0), X)
  b = mup_flax.MuP(MuMLP(64), base_shapes=shapes).init(jax.random.key(0), X)
  c = mup_flax.MuP(MuMLP(64), base_shapes=str(tmp_path / "mlp.yaml")).init(jax.random.key(0), X)
  for other in (b, c):
    assert_trees_equal(nn.unbox(other), nn.unbox(a))
    assert mup_flax.get_infshapes(other["params"]) == mup_flax.get_infshapes(a["params"])


def test_mup_argument_errors():
  with pytest.raises(ValueError, match="base and delta"):
    mup_flax.MuP(MuMLP(64), base=MuMLP(16))
  with pytest.raises(ValueError, match="not both"):
    mup_flax.MuP(MuMLP(64), base=MuMLP(16), delta=MuMLP(32), base_shapes={})
  with pytest.raises(TypeError, match="mup_flax.nnx.set_base_shapes"):
    mup_flax.MuP(object(), base_shapes={})


def test_mureadout_without_base_shapes_is_a_clear_error():
  # A bare init works (no initial value depends on activations); apply needs base shapes.
  variables = MuMLP(64).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match=r"MuReadout 'MuReadout_0/kernel' has no base shapes.*MuP"):
    MuMLP(64).apply(nn.unbox(variables), X)


def test_hidden_dense_as_readout_is_a_clear_error():
  with pytest.raises(ValueError, match=r"MuReadout_0/kernel.*not a readout.*MuReadout"):
    mup(64, cls=SPMLP).init(jax.random.key(0), X)


def test_dense_general_with_declared_fan_axes():
  class Attn(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
      heads = 4
      qkv_init = mup_flax.with_fan_axes(nn.initializers.lecun_normal(), 0, (1, 2))
      q = nn.DenseGeneral((heads, self.width // heads), kernel_init=qkv_init)(x)
      out_init = mup_flax.with_fan_axes(
          nn.initializers.lecun_normal(batch_axis=()), (0, 1), 2)
      y = nn.DenseGeneral(self.width, axis=(-2, -1), kernel_init=out_init)(q)
      return mup_flax.MuReadout(2)(y)

  variables = mup(64, cls=Attn).init(jax.random.key(0), X)
  params = variables["params"]
  q = params["DenseGeneral_0"]["kernel"].infshape
  assert q.ninf() == 1 and q.fanin_fanout() == (InfDim(None, 5), InfDim(16, 64))
  out = params["DenseGeneral_1"]["kernel"].infshape
  assert out.ninf() == 2 and out.width_mult() == 4.0


def test_dense_general_without_fan_axes_is_an_error():
  class Attn(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
      x = nn.Dense(self.width)(x)
      q = nn.DenseGeneral((4, self.width // 4))(x)
      return mup_flax.MuReadout(2)(q.reshape(q.shape[:-2] + (-1,)))

  with pytest.raises(ValueError, match=r"DenseGeneral_0/kernel.*declare the fan axes"):
    mup(64, cls=Attn).init(jax.random.key(0), X)


CALLS = collections.Counter()  # width -> calls of Counted.__call__ (traces included)


class Counted(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    CALLS[self.width] += 1
    return mup_flax.MuReadout(3)(nn.relu(nn.Dense(self.width)(x)))


@pytest.mark.parametrize("jit", [False, True])
def test_init_traces_the_model_once(jit):
  CALLS.clear()
  model = mup(64, cls=Counted)
  init = jax.jit(model.init) if jit else model.init
  variables = init(jax.random.key(0), X)
  assert CALLS == {16: 1, 32: 1, 64: 1}  # base and delta once each, for the base shapes
  init(jax.random.key(1), X) if not jit else model.init(jax.random.key(1), X)
  assert CALLS == {16: 1, 32: 1, 64: 2}  # base shapes are kept: the target only
  model.apply(variables, X)
  assert CALLS == {16: 1, 32: 1, 64: 3}  # annotated params: the forward pass only
  CALLS.clear()
  mup_flax.MuP(Counted(64), base_shapes=model.base_shapes()).init(jax.random.key(0), X)
  assert CALLS == {64: 1}


# ---------------------------------------------------------------- tied readout


class TiedLM(nn.Module):
  width: int
  vocab: int = 50

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.width)
    x = embed(tokens)
    x = nn.relu(nn.Dense(self.width)(x))
    return mup_flax.MuSharedReadout(output_mult=0.5)(x, embed)


def test_shared_readout():
  tokens = jnp.array([[1, 2, 3]])
  model = mup(64, cls=TiedLM)
  variables = model.init(jax.random.key(0), tokens)
  params = nn.unbox(variables)["params"]
  assert params["MuSharedReadout_0"]["bias"].shape == (50,)  # vocab-sized bias
  # The shared table is rescaled once, by the embedding rule only (not also by
  # the readout, unlike the reference).
  sp = nn.unbox(mup(64, base=64, delta=128, cls=TiedLM).init(jax.random.key(0), tokens))
  np.testing.assert_allclose(params["Embed_0"]["embedding"],
                             sp["params"]["Embed_0"]["embedding"] * 2.0, rtol=1e-6)
  table = params["Embed_0"]["embedding"]
  h = nn.relu(dense(table[tokens], params["Dense_0"]))
  expected = add_bias((0.5 * h / 4.0) @ table.T, params["MuSharedReadout_0"]["bias"])
  np.testing.assert_allclose(model.apply(variables, tokens), expected, rtol=1e-5, atol=1e-6)


def test_shared_readout_at_base_is_attend():
  tokens = jnp.array([[1, 2, 3]])
  variables = mup(16, cls=TiedLM).init(jax.random.key(0), tokens)
  params = nn.unbox(variables)["params"]
  table = params["Embed_0"]["embedding"]
  np.testing.assert_allclose(jnp.std(table), 16 ** -0.5, rtol=0.2)


# ---------------------------------------------------------------- attention scale


def test_attention_scale():
  assert mup_flax.attention_scale(64) == 1 / 8 == 1 / np.sqrt(64)
  for d in [16, 32, 128, 512]:
    assert mup_flax.attention_scale(d) == pytest.approx(8 / d)
    assert mup_flax.attention_scale(d, base_head_dim=d) == pytest.approx(1 / np.sqrt(d))
  assert mup_flax.attention_scale(256, base_head_dim=32) * 256 == pytest.approx(np.sqrt(32))
  with pytest.raises(ValueError):
    mup_flax.attention_scale(0)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_state_end_to_end():
  model = mup(128)
  variables = model.init(jax.random.key(0), X)
  tx = mup_flax.mu_adamw(1e-2, mup_flax.get_infshapes(variables["params"]), weight_decay=0.0)
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=variables["params"], tx=tx)
  inputs = jax.random.normal(jax.random.key(1), (2, 5))  # distinct rows: a fittable target
  targets = jnp.arange(6.0).reshape(2, 3) / 6

  @jax.jit
  def step(state):
    loss_fn = lambda p: jnp.mean((state.apply_fn({"params": p}, inputs) - targets) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(30):
    state, loss = step(state)
    losses.append(float(loss))
  assert losses[-1] < 0.1 * losses[0]
  # Annotations ride along through training.
  assert mup_flax.get_infshapes(state.params) == mup_flax.get_infshapes(variables["params"])
  assert isinstance(state.params["Dense_1"]["kernel"], InfShapeBox)
