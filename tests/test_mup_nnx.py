"""NNX: in-place annotation, Variable metadata, the NNX readouts, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mup_flax
from mup_flax import InfDim
from mup_flax import InfShape

from _helpers import NNXMLP
from _helpers import assert_trees_equal

X = jnp.ones((2, 5))


def MLP(width, rngs, **kw):
  """The shared NNX MLP with a μP readout (``output_mult``, ``readout_zero_init`` in ``kw``)."""
  return NNXMLP(width, rngs, readout=mup_flax.nnx.MuReadout, **kw)


def base_shapes(cls=MLP, base=16, delta=32, **kw):
  return mup_flax.make_base_shapes(lambda: cls(base, nnx.Rngs(0), **kw),
                                   lambda: cls(delta, nnx.Rngs(0), **kw))


def annotated(width, seed=0, cls=MLP, base=16, **kw):
  model = cls(width, nnx.Rngs(seed), **kw)
  return mup_flax.nnx.set_base_shapes(model, base_shapes(cls, base=base, delta=2 * base, **kw),
                                      rescale_params=True)


def params_of(model):
  return nnx.as_pure(nnx.state(model, nnx.Param))


def test_annotates_in_place_with_metadata():
  model = MLP(64, nnx.Rngs(0))
  same = mup_flax.nnx.set_base_shapes(model, base_shapes(), rescale_params=True)
  assert same is model
  assert model.hidden.kernel.get_metadata("infshape") == InfShape([InfDim(16, 64)] * 2)
  assert model.out.kernel.get_metadata("infshape") == InfShape([InfDim(16, 64), InfDim(None, 3)])
  assert model.out.width_mult() == 4.0


def test_base_and_delta_constructors_or_a_file(tmp_path):
  mup_flax.save_base_shapes(base_shapes(), tmp_path / "mlp.json")
  expected = annotated(64)
  make = lambda width: (lambda: MLP(width, nnx.Rngs(0)))
  from_models = mup_flax.nnx.set_base_shapes(
      MLP(64, nnx.Rngs(0)), base=make(16), delta=make(32), rescale_params=True)
  from_file = mup_flax.nnx.set_base_shapes(
      MLP(64, nnx.Rngs(0)), str(tmp_path / "mlp.json"), rescale_params=True)
  for model in (from_models, from_file):
    assert_trees_equal(params_of(model), params_of(expected))
    assert mup_flax.get_infshapes(model) == mup_flax.get_infshapes(expected)
  with pytest.raises(ValueError, match="needs base_shapes, or base and delta"):
    mup_flax.nnx.set_base_shapes(MLP(64, nnx.Rngs(0)), base=make(16), rescale_params=True)
  with pytest.raises(ValueError, match="not both"):
    mup_flax.nnx.set_base_shapes(MLP(64, nnx.Rngs(0)), base_shapes(), base=make(16),
                                 delta=make(32), rescale_params=True)


def test_get_infshapes_matches_what_the_optimizer_sees():
  model = annotated(64)
  infshapes = mup_flax.get_infshapes(model)
  assert jax.tree.structure(infshapes) == jax.tree.structure(params_of(model))
  assert mup_flax.get_infshapes(nnx.state(model, nnx.Param)) == infshapes
  assert infshapes["inp"]["kernel"] == InfShape([InfDim(None, 5), InfDim(16, 64)])


def test_base_equals_target_is_standard_parametrization():
  model = annotated(16)
  plain = MLP(16, nnx.Rngs(0))
  assert_trees_equal(params_of(model), params_of(plain))
  out = model(X)
  # At base width the readout is exactly the Linear it subclasses.
  h = nnx.relu(plain.hidden(nnx.relu(plain.inp(X))))
  np.testing.assert_array_equal(out, nnx.Linear.__call__(plain.out, h))


def test_init_rules():
  model = annotated(64)
  plain = MLP(64, nnx.Rngs(0))
  assert_trees_equal(params_of(model)["hidden"], params_of(plain)["hidden"])
  np.testing.assert_allclose(model.out.kernel[...], plain.out.kernel[...] * 2.0, rtol=1e-6)


def test_readout_forward_closed_form():
  model = annotated(64, output_mult=4.0)
  h = nnx.relu(model.hidden(nnx.relu(model.inp(X))))
  expected = (4.0 * h / 4.0) @ model.out.kernel[...] + model.out.bias[...][None]
  np.testing.assert_allclose(model(X), expected, rtol=1e-6, atol=1e-7)


def test_readout_zero_init():
  model = annotated(64, readout_zero_init=True)
  assert not jnp.any(model.out.kernel[...]) and not jnp.any(model.out.bias[...])


def test_never_rescales_twice_and_rescale_false():
  model = annotated(64)
  before = jax.tree.map(jnp.copy, params_of(model))
  mup_flax.nnx.set_base_shapes(model, base_shapes())
  assert_trees_equal(params_of(model), before)
  fresh = MLP(64, nnx.Rngs(0))
  mup_flax.nnx.set_base_shapes(fresh, base_shapes(), rescale_params=False)
  assert_trees_equal(params_of(fresh), params_of(MLP(64, nnx.Rngs(0))))


def test_checkpoint_restore_into_annotated_abstract_model():
  trained = annotated(64, seed=1)
  saved = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(trained, nnx.Param)))
  abstract = nnx.eval_shape(lambda: MLP(64, nnx.Rngs(0)))
  mup_flax.nnx.set_base_shapes(abstract, base_shapes())  # annotates; nothing to rescale
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, saved))  # what a restore does
  restored = nnx.merge(graphdef, state)
  assert_trees_equal(nnx.to_pure_dict(nnx.state(restored, nnx.Param)), saved)
  assert mup_flax.get_infshapes(restored) == mup_flax.get_infshapes(trained)
  np.testing.assert_allclose(restored(X), trained(X), rtol=1e-6)


def test_restore_plain_arrays_then_annotate_without_rescaling():
  trained = annotated(64, seed=1)
  model = MLP(64, nnx.Rngs(0))
  nnx.update(model, jax.tree.map(np.asarray, params_of(trained)))
  mup_flax.nnx.set_base_shapes(model, base_shapes(), rescale_params=False)
  assert_trees_equal(params_of(model), params_of(trained))


def test_metadata_survives_split_merge_and_jit():
  model = annotated(64)
  graphdef, state = nnx.split(model)
  merged = nnx.merge(graphdef, state)
  assert mup_flax.get_infshapes(merged) == mup_flax.get_infshapes(model)

  @nnx.jit
  def forward(m, x):
    assert m.out.width_mult() == 4.0  # static inside jit
    return m(x)

  np.testing.assert_allclose(forward(model, X), model(X), rtol=1e-6)


def test_mureadout_without_base_shapes_is_a_clear_error():
  with pytest.raises(ValueError, match=r"MuReadout has no base shapes.*mup_flax.nnx.set_base_shapes"):
    MLP(64, nnx.Rngs(0))(X)


class NotAReadout(nnx.Module):

  def __init__(self, width, rngs):
    self.inp = nnx.Linear(5, width, rngs=rngs)
    self.out = nnx.Linear(width, 3, rngs=rngs)


def test_linear_as_readout_is_a_clear_error():
  with pytest.raises(ValueError, match=r"out/kernel.*not a readout.*mup_flax.nnx.MuReadout"):
    annotated(64, cls=NotAReadout)


def test_mismatched_model_names_path_and_shapes():
  shapes = base_shapes()
  with pytest.raises(ValueError, match=r"parameter out/\w+ \(shape \(.*\)\) is not in the base"):
    mup_flax.nnx.set_base_shapes(NotAReadout(64, nnx.Rngs(0)), {
        "inp": shapes["inp"]}, rescale_params=True)
  with pytest.raises(TypeError, match="nnx.Module"):
    mup_flax.nnx.set_base_shapes({"w": jnp.zeros(3)}, shapes)


class TiedLM(nnx.Module):

  def __init__(self, width, rngs, vocab=40):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.hidden = nnx.Linear(width, width, rngs=rngs)
    self.readout = mup_flax.nnx.MuSharedReadout(self.embed, output_mult=2.0, rngs=rngs)

  def __call__(self, tokens):
    return self.readout(nnx.relu(self.hidden(self.embed(tokens))))


def test_shared_readout_and_embedding_init():
  model = annotated(64, cls=TiedLM)
  assert model.readout.embed is model.embed  # shared, not copied
  assert model.readout.bias.shape == (40,)
  plain = TiedLM(64, nnx.Rngs(0))
  # Embedding: Flax's std 1/sqrt(features) -> 1/sqrt(base_features); rescaled once.
  np.testing.assert_allclose(model.embed.embedding[...], plain.embed.embedding[...] * 2.0,
                             rtol=1e-6)
  tokens = jnp.array([[1, 2, 3]])
  h = nnx.relu(model.hidden(model.embed(tokens)))
  expected = (2.0 * h / 4.0) @ model.embed.embedding[...].T + model.readout.bias[...][None, None]
  np.testing.assert_allclose(model(tokens), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", [64, 512])
def test_embedding_std_is_width_independent(width):
  class Emb(nnx.Module):
    def __init__(self, width, rngs):
      self.embed = nnx.Embed(2048, width, rngs=rngs)

  model = annotated(width, cls=Emb, base=32)
  np.testing.assert_allclose(jnp.std(model.embed.embedding[...]), 32 ** -0.5, rtol=0.05)


def test_nnx_optimizer_end_to_end():
  model = annotated(128)
  infshapes = mup_flax.get_infshapes(model)
  optimizer = nnx.Optimizer(model, mup_flax.mu_adamw(1e-2, infshapes, weight_decay=0.0),
                            wrt=nnx.Param)
  inputs = jax.random.normal(jax.random.key(1), (2, 5))  # distinct rows: a fittable target
  targets = jnp.arange(6.0).reshape(2, 3) / 6

  @nnx.jit
  def step(model, optimizer):
    loss_fn = lambda m: jnp.mean((m(inputs) - targets) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(30)]
  assert losses[-1] < 0.1 * losses[0]
  assert mup_flax.get_infshapes(model) == infshapes  # metadata kept through updates


def test_init_with_mup_initializers_declares_rules():
  class Net(nnx.Module):
    def __init__(self, width, rngs):
      self.hidden = nnx.Linear(width, width, kernel_init=mup_flax.init.normal(1.0), rngs=rngs)
      self.embed = nnx.Embed(10, width, embedding_init=mup_flax.init.normal(1.0), rngs=rngs)

  model = annotated(256, cls=Net, base=64)
  plain = Net(256, nnx.Rngs(0))
  np.testing.assert_allclose(model.hidden.kernel[...], plain.hidden.kernel[...] * 0.5,
                             rtol=1e-6)
  # A declared initializer replaces the Flax-default embedding rule.
  np.testing.assert_array_equal(model.embed.embedding[...], plain.embed.embedding[...])
