"""μP reliability: values that are μP-initialized already are never rescaled by accident."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import mup_flax

TOKENS = jnp.zeros((2, 3), jnp.int32)


class Embedder(nn.Module):
  width: int

  @nn.compact
  def __call__(self, tokens):
    return nn.Dense(self.width)(nn.Embed(4096, self.width)(tokens))


class NnxEmbedder(nnx.Module):

  def __init__(self, width, rngs):
    self.embed = nnx.Embed(4096, width, rngs=rngs)
    self.dense = nnx.Linear(width, width, rngs=rngs)


def test_linen_unboxed_values_need_an_explicit_rescale_choice():
  model = mup_flax.MuP(Embedder(256), base=Embedder(16), delta=Embedder(32))
  plain = nn.unbox(model.init(jax.random.key(0), TOKENS))["params"]  # μP-initialized, boxes lost
  assert float(jnp.std(plain["Embed_0"]["embedding"])) == pytest.approx(16 ** -0.5, rel=0.05)
  with pytest.raises(ValueError, match=(
      r"mup_flax.set_base_shapes: parameter \w+/\w+ carries no μP annotation.*"
      r"rescale_params=True for freshly initialized.*rescale_params=False.*nn.unbox")):
    mup_flax.set_base_shapes(plain, model.base_shapes())
  restored = nn.unbox(mup_flax.set_base_shapes(plain, model.base_shapes(), rescale_params=False))
  jax.tree.map(np.testing.assert_array_equal, restored, plain)


def test_nnx_copied_values_need_an_explicit_rescale_choice():
  make = lambda width: (lambda: NnxEmbedder(width, nnx.Rngs(0)))
  trained = mup_flax.nnx.set_base_shapes(
      NnxEmbedder(256, nnx.Rngs(0)), base=make(16), delta=make(32), rescale_params=True)
  fresh = NnxEmbedder(256, nnx.Rngs(1))
  nnx.update(fresh, nnx.as_pure(nnx.state(trained, nnx.Param)))  # μP-initialized values
  with pytest.raises(ValueError, match=(
      r"mup_flax.nnx.set_base_shapes: parameter \w+/\w+ carries no μP annotation")):
    mup_flax.nnx.set_base_shapes(fresh, base=make(16), delta=make(32))
  mup_flax.nnx.set_base_shapes(fresh, base=make(16), delta=make(32), rescale_params=False)
  np.testing.assert_array_equal(fresh.embed.embedding[...], trained.embed.embedding[...])


def test_annotated_or_abstract_parameters_need_no_choice():
  model = mup_flax.MuP(Embedder(256), base=Embedder(16), delta=Embedder(32))
  variables = model.init(jax.random.key(0), TOKENS)
  again = mup_flax.set_base_shapes(variables["params"], model.base_shapes())
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(again), nn.unbox(variables["params"]))
  abstract = jax.eval_shape(lambda: nn.unbox(variables["params"]))
  assert mup_flax.get_infshapes(mup_flax.set_base_shapes(abstract, model.base_shapes())) == (
      mup_flax.get_infshapes(variables["params"]))
