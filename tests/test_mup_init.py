"""mup_flax.init: equal to Flax's initializers at base shape, width-correct elsewhere."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import mup_flax
from mup_flax import InfShape

# (mup_flax initializer, Flax initializer, SP std of a kernel as a function of (fan_in, fan_out)).
INITIALIZERS = {
    "normal": (mup_flax.init.normal(0.3), jax.nn.initializers.normal(0.3),
               lambda i, o: 0.3),
    "truncated_normal": (mup_flax.init.truncated_normal(0.3),
                         jax.nn.initializers.truncated_normal(0.3), None),
    "lecun_normal": (mup_flax.init.lecun_normal(), jax.nn.initializers.lecun_normal(),
                     lambda i, o: math.sqrt(1 / i)),
    "lecun_uniform": (mup_flax.init.lecun_uniform(), jax.nn.initializers.lecun_uniform(),
                      lambda i, o: math.sqrt(1 / i)),
    "kaiming_normal": (mup_flax.init.kaiming_normal(), jax.nn.initializers.kaiming_normal(),
                       lambda i, o: math.sqrt(2 / i)),
    "kaiming_uniform": (mup_flax.init.kaiming_uniform(), jax.nn.initializers.kaiming_uniform(),
                        lambda i, o: math.sqrt(2 / i)),
    "he_normal": (mup_flax.init.he_normal(), jax.nn.initializers.he_normal(),
                  lambda i, o: math.sqrt(2 / i)),
    "xavier_normal": (mup_flax.init.xavier_normal(), jax.nn.initializers.xavier_normal(),
                      lambda i, o: math.sqrt(2 / (i + o))),
    "xavier_uniform": (mup_flax.init.xavier_uniform(), jax.nn.initializers.xavier_uniform(),
                       lambda i, o: math.sqrt(2 / (i + o))),
    "glorot_normal": (mup_flax.init.glorot_normal(), jax.nn.initializers.glorot_normal(),
                      lambda i, o: math.sqrt(2 / (i + o))),
    "fan_out_normal": (mup_flax.init.variance_scaling(1.0, "fan_out", "normal"),
                       jax.nn.initializers.variance_scaling(1.0, "fan_out", "normal"),
                       lambda i, o: math.sqrt(1 / o)),
}

BASE = 64
# layout -> (base shape, delta shape, target shape) of a Dense kernel (in, out).
LAYOUTS = {
    "hidden": ((BASE, BASE), (2 * BASE, 2 * BASE), (4 * BASE, 4 * BASE)),
    "input": ((48, BASE), (48, 2 * BASE), (48, 8 * BASE)),
    "readout": ((BASE, 48), (2 * BASE, 48), (8 * BASE, 48)),
    "finite": ((48, 40), (48, 40), (48, 40)),
}


@pytest.mark.parametrize("name", sorted(INITIALIZERS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_equal_to_flax_at_base_shape(name, layout):
  ours, flax_init, _ = INITIALIZERS[name]
  base, delta, _ = LAYOUTS[layout]
  at_base = InfShape.from_sizes(base, delta)
  key = jax.random.key(7)
  np.testing.assert_array_equal(ours(key, base, jnp.float32, infshape=at_base),
                                flax_init(key, base, jnp.float32))


@pytest.mark.parametrize("name", sorted(k for k, v in INITIALIZERS.items() if v[2]))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_width_scaling_closed_form(name, layout):
  """Vector-like: the base model's std at any width; matrix-like: that / sqrt(width_mult)."""
  ours, _, sp_std = INITIALIZERS[name]
  base, delta, target = LAYOUTS[layout]
  infshape = InfShape.from_sizes(base, delta, target)
  expected = sp_std(*base)
  if infshape.ninf() == 2:
    expected /= math.sqrt(target[0] / base[0])
  sample = ours(jax.random.key(0), target, jnp.float32, infshape=infshape)
  np.testing.assert_allclose(float(jnp.std(sample)), expected, rtol=0.04)


def test_conv_kernel():
  base, delta, target = (3, 3, 16, 16), (3, 3, 32, 32), (3, 3, 64, 64)
  infshape = InfShape.from_sizes(base, delta, target)
  sample = mup_flax.init.he_normal()(jax.random.key(0), target, infshape=infshape)
  # Matrix-like: He's 2 / (9 * fan_in) at target (already μP for fan_in mode).
  np.testing.assert_allclose(float(jnp.std(sample)), math.sqrt(2 / (9 * 64)), rtol=0.04)
  sample = mup_flax.init.xavier_uniform()(jax.random.key(0), target, infshape=infshape)
  expected = math.sqrt(2 / (9 * 16 + 9 * 16)) / math.sqrt(4)
  np.testing.assert_allclose(float(jnp.std(sample)), expected, rtol=0.04)


def test_uniform_is_not_for_matrix_like():
  hidden = InfShape.from_sizes((8, 8), (16, 16), (32, 32))
  with pytest.raises(ValueError, match="not zero-mean"):
    mup_flax.init.uniform(1.0)(jax.random.key(0), (32, 32), infshape=hidden)
  vector = InfShape.from_sizes((8,), (16,), (32,))
  x = mup_flax.init.uniform(1.0)(jax.random.key(0), (32,), infshape=vector)
  np.testing.assert_array_equal(x, jax.nn.initializers.uniform(1.0)(jax.random.key(0), (32,)))


def test_shape_must_match_infshape():
  with pytest.raises(ValueError, match="does not match"):
    mup_flax.init.normal()(jax.random.key(0), (3, 3), infshape=InfShape.from_sizes((3, 4), (3, 8)))


def test_bad_mode():
  with pytest.raises(ValueError, match="mode"):
    mup_flax.init.variance_scaling(1.0, "fan_sum", "normal")


class Net(nn.Module):
  width: int
  init_name: str = "normal"

  @nn.compact
  def __call__(self, tokens):
    ours = INITIALIZERS[self.init_name][0]
    x = nn.Embed(30, self.width, embedding_init=mup_flax.init.normal(1.0))(tokens)
    x = nn.Dense(self.width, kernel_init=ours)(x)
    return mup_flax.MuReadout(7, kernel_init=ours)(x)


class FlaxNet(nn.Module):
  width: int
  init_name: str = "normal"

  @nn.compact
  def __call__(self, tokens):
    flax_init = INITIALIZERS[self.init_name][1]
    x = nn.Embed(30, self.width, embedding_init=jax.nn.initializers.normal(1.0))(tokens)
    x = nn.Dense(self.width, kernel_init=flax_init)(x)
    return nn.Dense(7, kernel_init=flax_init, name="MuReadout_0")(x)


TOKENS = jnp.zeros((1, 2), jnp.int32)


@pytest.mark.parametrize("init_name", ["normal", "xavier_uniform", "kaiming_normal"])
def test_in_model_equal_to_flax_at_base(init_name):
  model = mup_flax.MuP(Net(32, init_name), base=Net(32, init_name), delta=Net(64, init_name))
  ours = nn.unbox(model.init(jax.random.key(0), TOKENS))
  flax_params = FlaxNet(32, init_name).init(jax.random.key(0), TOKENS)
  jax.tree.map(np.testing.assert_array_equal, ours, flax_params)


def test_in_model_declared_rule_replaces_default_rules():
  width, base = 256, 32
  model = mup_flax.MuP(Net(width), base=Net(base), delta=Net(2 * base))
  ours = nn.unbox(model.init(jax.random.key(0), TOKENS))["params"]
  flax_params = FlaxNet(width).init(jax.random.key(0), TOKENS)["params"]
  mult = width / base
  # Embedding declared normal(1.0): vector-like, unchanged (not the nn.Embed default rule).
  np.testing.assert_array_equal(ours["Embed_0"]["embedding"], flax_params["Embed_0"]["embedding"])
  # Hidden normal(0.3): / sqrt(width_mult). Readout normal(0.3): vector-like, unchanged.
  np.testing.assert_allclose(ours["Dense_0"]["kernel"],
                             flax_params["Dense_0"]["kernel"] / math.sqrt(mult), rtol=1e-6)
  np.testing.assert_array_equal(ours["MuReadout_0"]["kernel"], flax_params["MuReadout_0"]["kernel"])


def test_nnx_metadata_and_declarations_combine():
  init = mup_flax.with_fan_axes(nnx.with_metadata(mup_flax.init.normal(1.0), note="inner"), 0, 1)

  class M(nnx.Module):
    def __init__(self, width, rngs):
      self.hidden = nnx.Linear(width, width, kernel_init=init, rngs=rngs)
      self.other = nnx.Linear(width, width, kernel_init=mup_flax.init.normal(1.0),
                              kernel_metadata={"note": "layer"}, rngs=rngs)

  shapes = mup_flax.make_base_shapes(lambda: M(16, nnx.Rngs(0)), lambda: M(32, nnx.Rngs(0)))
  model = mup_flax.nnx.set_base_shapes(M(64, nnx.Rngs(0)), shapes, rescale_params=True)
  assert model.hidden.kernel.get_metadata("note") == "inner"
  assert model.other.kernel.get_metadata("note") == "layer"
  plain = M(64, nnx.Rngs(0))
  np.testing.assert_allclose(model.hidden.kernel[...], plain.hidden.kernel[...] / 2, rtol=1e-6)
  np.testing.assert_allclose(model.other.kernel[...], plain.other.kernel[...] / 2, rtol=1e-6)
