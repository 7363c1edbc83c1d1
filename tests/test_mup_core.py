"""InfDim/InfShape, base shapes (make, save, load) and set_base_shapes on plain trees."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import mup_flax
from mup_flax import InfDim
from mup_flax import InfShape

from _helpers import MuMLP


def fin(d):
  return InfDim(None, d)


# ---------------------------------------------------------------- InfDim / InfShape


def test_infdim():
  assert InfDim(64, 256).width_mult() == 4.0
  assert InfDim(64, 256).is_infinite()
  assert fin(10).width_mult() == 1.0 and not fin(10).is_infinite()
  assert {InfDim(64, 256): 1}[InfDim(64, 256)] == 1  # hashable, equal by value
  with pytest.raises(ValueError):
    InfDim(0, 4)
  with pytest.raises(ValueError):
    InfDim(4, -1)
  with pytest.raises(ValueError):
    InfDim(4, 2.5)


def reference_width_mult(dims_in_torch_layout):
  """The reference's rule: the last infinite dim in PyTorch's (out, in, ...) layout."""
  for d in reversed(dims_in_torch_layout):
    if d.is_infinite():
      return d.width_mult()
  return 1.0


@pytest.mark.parametrize("fan_in", [fin(7), InfDim(16, 64)])
@pytest.mark.parametrize("fan_out", [fin(5), InfDim(32, 64)])
def test_dense_kernel_matches_reference_rule(fan_in, fan_out):
  shape = InfShape([fan_in, fan_out])  # Flax Dense kernel (in, out)
  torch_layout = [fan_out, fan_in]  # torch Linear weight (out, in)
  assert shape.ninf() == fan_in.is_infinite() + fan_out.is_infinite()
  assert shape.width_mult() == reference_width_mult(torch_layout)
  assert shape.fanin_fanout() == (fan_in, fan_out)
  assert shape.fanin_fanout_mult_ratio() == fan_in.width_mult() / fan_out.width_mult()


def test_conv_embed_vector_scalar():
  conv = InfShape([fin(3), fin(3), InfDim(16, 64), InfDim(8, 64)])  # (kh, kw, in, out)
  assert conv.ninf() == 2 and conv.width_mult() == 4.0
  assert conv.fanin_fanout_mult_ratio() == 4.0 / 8.0
  stem = InfShape([fin(3), fin(3), fin(3), InfDim(8, 64)])
  assert stem.ninf() == 1 and stem.width_mult() == 8.0
  embed = InfShape([fin(1000), InfDim(64, 256)])  # (vocab, features)
  assert embed.ninf() == 1 and embed.width_mult() == 4.0
  bias = InfShape([InfDim(64, 128)])
  assert bias.ninf() == 1 and bias.width_mult() == 2.0
  assert bias.fan_in_axes is None
  with pytest.raises(ValueError, match="undefined"):
    bias.fanin_fanout()
  scalar = InfShape([])
  assert scalar.ninf() == 0 and scalar.width_mult() == 1.0
  assert scalar.shape == () and InfShape([fin(3)]).ninf() == 0


def test_shape_and_base_shape():
  s = InfShape([fin(3), InfDim(8, 32)])
  assert s.shape == (3, 32) and s.base_shape == (3, 8) and s.ndim == 2


def test_more_than_two_infinite_dims_is_an_error():
  with pytest.raises(ValueError, match="3 infinite dims"):
    InfShape([InfDim(2, 4), InfDim(2, 4), InfDim(2, 4)], fan_in_axis=0, fan_out_axis=1)
  with pytest.raises(ValueError, match="3 infinite dims"):
    InfShape([InfDim(2, 4), InfDim(2, 4), InfDim(2, 4)])


def test_infinite_axis_outside_fan_axes_is_ambiguous():
  # A DenseGeneral kernel (d_model, heads, head_dim) read with the default axes.
  with pytest.raises(ValueError, match="declare the fan axes"):
    InfShape([InfDim(16, 64), fin(4), InfDim(4, 16)])


def test_fan_groups_count_once():
  # (d_model, heads, head_dim) with heads and head_dim both scaling: torch's
  # Linear(d_model, heads * head_dim) is matrix-like, not "3 infinite dims".
  s = InfShape([InfDim(16, 64), InfDim(2, 4), InfDim(8, 16)], fan_in_axis=0,
               fan_out_axis=(1, 2))
  assert s.ninf() == 2
  fan_in, fan_out = s.fanin_fanout()
  assert fan_in == InfDim(16, 64)
  assert fan_out == InfDim(16, 64)  # 2*8 -> 4*16
  assert s.width_mult() == 4.0
  out_proj = InfShape([fin(4), InfDim(8, 16), InfDim(32, 64)], fan_in_axis=(0, 1),
                      fan_out_axis=2)
  assert out_proj.fanin_fanout()[0] == InfDim(32, 64) and out_proj.width_mult() == 2.0


def test_bad_fan_axes():
  with pytest.raises(ValueError, match="overlap"):
    InfShape([fin(2), fin(3)], fan_in_axis=0, fan_out_axis=0)
  with pytest.raises(ValueError, match="out of range"):
    InfShape([fin(2), fin(3)], fan_in_axis=2)


def test_insert_remove_axis_round_trip():
  for s in [InfShape([InfDim(8, 16), InfDim(8, 32)]), InfShape([InfDim(8, 16)]),
            InfShape([fin(3), fin(3), InfDim(4, 8), fin(2)])]:
    for index in range(s.ndim + 1):
      stacked = s.insert_axis(index, 5)
      assert stacked.ninf() == s.ninf() and stacked.width_mult() == s.width_mult()
      assert stacked.shape[index] == 5
      assert stacked.remove_axis(index) == s
  with pytest.raises(ValueError, match="cannot remove infinite axis"):
    InfShape([InfDim(8, 16)]).remove_axis(0)


def test_from_sizes_and_with_shape():
  base = InfShape.from_sizes((64, 10), (128, 10))
  assert base == InfShape([InfDim(64, 64), fin(10)])
  assert base.with_shape((256, 10)) == InfShape([InfDim(64, 256), fin(10)])
  with pytest.raises(ValueError, match="finite dim of size 10 has size 11"):
    base.with_shape((256, 11))
  with pytest.raises(ValueError, match="rank"):
    base.with_shape((256,))


def test_infshape_is_static_under_jit():
  s = InfShape([InfDim(8, 32), fin(3)])
  f = jax.jit(lambda x, s: x * s.width_mult(), static_argnums=1)
  assert float(f(1.0, s)) == 4.0
  assert hash(s) == hash(InfShape([InfDim(8, 32), fin(3)]))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_file_round_trip_of_every_kind_of_infshape(tmp_path, suffix):
  shapes = {"a": InfShape([InfDim(8, 32), fin(3)]), "b": InfShape([]),
            "c": InfShape([InfDim(16, 64), fin(4), InfDim(4, 16)], fan_in_axis=0,
                          fan_out_axis=(1, 2))}
  at_base = {k: s.with_shape(s.base_shape) for k, s in shapes.items()}
  mup_flax.save_base_shapes(shapes, tmp_path / f"s{suffix}")
  assert mup_flax.load_base_shapes(tmp_path / f"s{suffix}") == at_base


# ---------------------------------------------------------------- make_base_shapes


def MLP(width):
  """The shared Linen μP MLP with 10 outputs."""
  return MuMLP(width, out=10)


class NnxMLP(nnx.Module):

  def __init__(self, width, rngs):
    self.inp = nnx.Linear(3, width, rngs=rngs)
    self.out = mup_flax.nnx.MuReadout(width, 2, rngs=rngs)


def expected_mlp_shapes(base=16):
  return {
      "Dense_0": {"kernel": InfShape([fin(5), InfDim(base, base)]),
                  "bias": InfShape([InfDim(base, base)])},
      "Dense_1": {"kernel": InfShape([InfDim(base, base), InfDim(base, base)]),
                  "bias": InfShape([InfDim(base, base)])},
      "MuReadout_0": {"kernel": InfShape([InfDim(base, base), fin(10)]),
                      "bias": InfShape([fin(10)])},
  }


def test_make_base_shapes_linen():
  shapes = mup_flax.make_base_shapes(MLP(16), MLP(32), jnp.ones((1, 5)))
  assert shapes == expected_mlp_shapes()


def test_make_base_shapes_never_allocates():
  # 2**20 x 2**20 float32 kernels (4 TiB each): only shapes are computed.
  shapes = mup_flax.make_base_shapes(MLP(2**20), MLP(2**21), jnp.ones((1, 5)))
  assert shapes["Dense_1"]["kernel"].base_shape == (2**20, 2**20)
  abstract = lambda w: (lambda: NnxMLP(w, nnx.Rngs(0)))
  shapes = mup_flax.make_base_shapes(abstract(2**20), abstract(2**21))
  assert shapes["out"]["kernel"] == InfShape([InfDim(2**20, 2**20), fin(2)])


def test_make_base_shapes_pytrees_nnx_agree():
  trees = [{"w": jax.ShapeDtypeStruct((8, 3), jnp.float32)},
           {"w": jax.ShapeDtypeStruct((16, 3), jnp.float32)}]
  assert mup_flax.make_base_shapes(*trees) == {"w": InfShape([InfDim(8, 8), fin(3)])}
  from_modules = mup_flax.make_base_shapes(NnxMLP(8, nnx.Rngs(0)), NnxMLP(16, nnx.Rngs(0)))
  from_constructors = mup_flax.make_base_shapes(lambda: NnxMLP(8, nnx.Rngs(0)),
                                                lambda: NnxMLP(16, nnx.Rngs(0)))
  assert from_modules == from_constructors
  assert from_modules["inp"]["kernel"] == InfShape([fin(3), InfDim(8, 8)])


def test_make_base_shapes_linen_needs_inputs():
  with pytest.raises(ValueError, match="example inputs"):
    mup_flax.make_base_shapes(MLP(16), MLP(32))


def test_make_base_shapes_mismatched_trees_name_the_path():
  with pytest.raises(ValueError, match=r"a/w.*\(8, 3\).*not in the delta"):
    mup_flax.make_base_shapes({"a": {"w": jnp.zeros((8, 3))}}, {"a": {"v": jnp.zeros((8, 3))}})
  with pytest.raises(ValueError, match=r"a/v.*\(8, 3\).*not in the base"):
    mup_flax.make_base_shapes({"a": {}}, {"a": {"v": jnp.zeros((8, 3))}})
  with pytest.raises(ValueError, match=r"w: base shape \(8, 3\) and delta shape \(8, 3, 1\)"):
    mup_flax.make_base_shapes({"w": jnp.zeros((8, 3))}, {"w": jnp.zeros((8, 3, 1))})


def test_make_base_shapes_three_infinite_dims_names_the_parameter():
  with pytest.raises(ValueError, match=r"parameter blocks/w .*3 infinite dims"):
    mup_flax.make_base_shapes({"blocks": {"w": jnp.zeros((2, 2, 2))}},
                              {"blocks": {"w": jnp.zeros((4, 4, 4))}},
                              fan_axes={"blocks/w": (0, 1)})


def test_make_base_shapes_fan_axes_argument():
  base = {"attn": {"kernel": jnp.zeros((16, 4, 4))}}
  delta = {"attn": {"kernel": jnp.zeros((32, 4, 8))}}
  with pytest.raises(ValueError, match="declare the fan axes"):
    mup_flax.make_base_shapes(base, delta)
  by_dict = mup_flax.make_base_shapes(base, delta, fan_axes={"attn/kernel": (0, (1, 2))})
  by_fn = mup_flax.make_base_shapes(
      base, delta, fan_axes=lambda path, shape: (0, (1, 2)) if len(shape) == 3 else None)
  assert by_dict == by_fn
  assert by_dict["attn"]["kernel"].fan_out_axes == (1, 2)


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("ext", [".json", ".yaml", ".yml"])
def test_save_load_round_trip(tmp_path, ext):
  shapes = mup_flax.make_base_shapes(MLP(16), MLP(32), jnp.ones((1, 5)))
  shapes["attn"] = {"kernel": InfShape([InfDim(16, 16), fin(4), InfDim(4, 4)],
                                       fan_in_axis=0, fan_out_axis=(1, 2))}
  shapes["layers"] = {"0": {"scale": InfShape([InfDim(16, 16)])}, "1": {"s": InfShape([])}}
  path = tmp_path / f"shapes{ext}"
  mup_flax.save_base_shapes(shapes, path)
  assert mup_flax.load_base_shapes(path) == shapes
  text = path.read_text()
  assert "MuReadout_0" in text and "infinite" in text  # human-readable


def test_saved_json_is_readable(tmp_path):
  shapes = mup_flax.make_base_shapes({"w": jnp.zeros((8, 3))}, {"w": jnp.zeros((16, 3))})
  mup_flax.save_base_shapes(shapes, tmp_path / "s.json")
  document = json.loads((tmp_path / "s.json").read_text())
  assert document["parameters"] == [{"path": ["w"], "shape": [8, 3], "infinite": [True, False]}]


def write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return path


@pytest.mark.parametrize("text, match", [
    ('{"format": "mup_flax.base_shapes", "version": 1, "parameters": [', "corrupt"),
    ('[1, 2]', "not a mup_flax.base_shapes file"),
    ('{"format": "mup.bsh", "version": 1, "parameters": []}', "not a mup_flax.base_shapes"),
    ('{"format": "mup_flax.base_shapes", "version": 7, "parameters": []}', "version 7"),
    ('{"format": "mup_flax.base_shapes", "version": 1, "parameters": {}}', "must be a list"),
    ('{"format": "mup_flax.base_shapes", "version": 1, "parameters": [{"path": ["w"]}]}',
     "entry keys"),
    ('{"format": "mup_flax.base_shapes", "version": 1, "parameters": '
     '[{"path": ["w"], "shape": [8, "3"], "infinite": [true, false]}]}', "positive ints"),
    ('{"format": "mup_flax.base_shapes", "version": 1, "parameters": '
     '[{"path": ["w"], "shape": [8, 3], "infinite": [true]}]}', "same length"),
    ('{"format": "mup_flax.base_shapes", "version": 1, "parameters": '
     '[{"path": ["w"], "shape": [8], "infinite": [true]}, '
     '{"path": ["w"], "shape": [8], "infinite": [true]}]}', "appears twice"),
    ('{"format": "mup_flax.base_shapes", "version": 1, "parameters": '
     '[{"path": ["w"], "shape": [8], "infinite": [true]}, '
     '{"path": ["w", "x"], "shape": [8], "infinite": [true]}]}', "runs through a parameter"),
    ('{"format": "mup_flax.base_shapes", "version": 1, "parameters": '
     '[{"path": ["w"], "shape": [2, 2, 2], "infinite": [true, true, true], '
     '"fan_in_axes": [0], "fan_out_axes": [1]}]}', "3 infinite dims"),
])
def test_corrupt_files_are_errors(tmp_path, text, match):
  with pytest.raises(ValueError, match=match):
    mup_flax.load_base_shapes(write(tmp_path, "s.json", text))


def test_corrupt_yaml_and_bad_extension(tmp_path):
  with pytest.raises(ValueError, match="corrupt"):
    mup_flax.load_base_shapes(write(tmp_path, "s.yaml", "format: [unclosed\n"))
  with pytest.raises(ValueError, match=r"\.json, \.yaml or \.yml"):
    mup_flax.save_base_shapes({}, tmp_path / "s.bsh")


@pytest.mark.slow
def test_file_for_another_model_is_an_error(tmp_path):
  shapes = mup_flax.make_base_shapes(MLP(16), MLP(32), jnp.ones((1, 5)))
  mup_flax.save_base_shapes(shapes, tmp_path / "mlp.json")
  loaded = mup_flax.load_base_shapes(tmp_path / "mlp.json")
  other = {"Dense_0": {"kernel": jnp.zeros((5, 64)), "bias": jnp.zeros((64,))}}
  with pytest.raises(ValueError, match="base shapes have parameters the model lacks"):
    mup_flax.set_base_shapes(other, loaded, rescale_params=True)
  wrong_input = mup_flax.MuP(MLP(64), base=MLP(16), delta=MLP(32)).init(
      jax.random.key(0), jnp.ones((1, 7)))
  with pytest.raises(ValueError, match=r"Dense_0/kernel: base shape \(5, 16\).*\(7, 64\)"):
    mup_flax.MuP(MLP(64), base_shapes=str(tmp_path / "mlp.json")).annotate(wrong_input)


# ---------------------------------------------------------------- set_base_shapes / get_infshapes


def plain_shapes():
  return mup_flax.make_base_shapes(
      {"hidden": {"kernel": jnp.zeros((8, 8)), "bias": jnp.zeros((8,))},
       "embedding": jnp.zeros((5, 8))},
      {"hidden": {"kernel": jnp.zeros((16, 16)), "bias": jnp.zeros((16,))},
       "embedding": jnp.zeros((5, 16))})


def plain_params(width, key=0):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  return {"hidden": {"kernel": jax.random.normal(k1, (width, width)),
                     "bias": jax.random.normal(k2, (width,))},
          "embedding": jax.random.normal(k3, (5, width))}


def test_set_base_shapes_rules_on_plain_params():
  params = plain_params(32)
  out = mup_flax.set_base_shapes(params, plain_shapes(), rescale_params=True)
  unboxed = nn.unbox(out)
  np.testing.assert_array_equal(unboxed["hidden"]["kernel"], params["hidden"]["kernel"])
  np.testing.assert_allclose(unboxed["hidden"]["bias"], params["hidden"]["bias"] * 2.0)
  np.testing.assert_allclose(unboxed["embedding"], params["embedding"] * 2.0)
  assert mup_flax.get_infshapes(out)["hidden"]["kernel"] == InfShape([InfDim(8, 32)] * 2)


def test_base_equals_target_is_the_identity():
  params = plain_params(8)
  out = nn.unbox(mup_flax.set_base_shapes(params, plain_shapes(), rescale_params=True))
  jax.tree.map(np.testing.assert_array_equal, out, params)


def test_reannotation_never_rescales_twice():
  shapes = plain_shapes()
  once = mup_flax.set_base_shapes(plain_params(32), shapes, rescale_params=True)
  twice = mup_flax.set_base_shapes(once, shapes)  # annotated already: no choice needed
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(twice), nn.unbox(once))
  assert mup_flax.get_infshapes(twice) == mup_flax.get_infshapes(once)


def test_rescale_params_false_only_annotates():
  params = plain_params(32)
  out = mup_flax.set_base_shapes(params, plain_shapes(), rescale_params=False)
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(out), params)


def test_set_base_shapes_on_shape_dtype_structs():
  abstract = jax.eval_shape(lambda: plain_params(32))
  out = mup_flax.set_base_shapes(abstract, plain_shapes())
  assert isinstance(out["hidden"]["kernel"].value, jax.ShapeDtypeStruct)
  assert out["hidden"]["kernel"].infshape.width_mult() == 4.0


def test_set_base_shapes_under_jit():
  shapes = plain_shapes()
  out = jax.jit(lambda p: mup_flax.set_base_shapes(p, shapes, rescale_params=True))(
      plain_params(32))
  assert out["embedding"].infshape == InfShape([fin(5), InfDim(8, 32)])


def test_target_mismatch_names_path_and_both_shapes():
  params = plain_params(32)
  params["embedding"] = jnp.zeros((6, 32))
  with pytest.raises(ValueError, match=r"embedding: base shape \(5, 8\).*target shape \(6, 32\)"):
    mup_flax.set_base_shapes(params, plain_shapes(), rescale_params=True)
  params = plain_params(32)
  params["extra"] = jnp.zeros((3,))
  with pytest.raises(ValueError, match=r"parameter extra \(shape \(3,\)\) is not in the base"):
    mup_flax.set_base_shapes(params, plain_shapes(), rescale_params=True)
  params = plain_params(32)
  params["hidden"]["kernel"] = jnp.zeros((32,))
  with pytest.raises(ValueError, match=r"hidden/kernel.*rank"):
    mup_flax.set_base_shapes(params, plain_shapes(), rescale_params=True)


def test_hidden_dense_with_finite_fan_out_is_an_error():
  shapes = mup_flax.make_base_shapes({"head": {"kernel": jnp.zeros((8, 3))}},
                                     {"head": {"kernel": jnp.zeros((16, 3))}})
  with pytest.raises(ValueError, match=r"head/kernel.*not a readout.*mup_flax.MuReadout"):
    mup_flax.set_base_shapes({"head": {"kernel": jnp.zeros((32, 3))}}, shapes,
                             rescale_params=True)


def test_set_base_shapes_rejects_nnx_modules():
  with pytest.raises(TypeError, match="mup_flax.nnx.set_base_shapes"):
    mup_flax.set_base_shapes(NnxMLP(8, nnx.Rngs(0)), {})


def test_get_infshapes_needs_annotations():
  with pytest.raises(ValueError, match=r"parameter embedding carries no InfShape.*set_base_shapes"):
    mup_flax.get_infshapes(plain_params(8))
  infshapes = mup_flax.get_infshapes(plain_params(32), plain_shapes())
  assert infshapes["embedding"].width_mult() == 4.0
  assert jax.tree.structure(infshapes) == jax.tree.structure(plain_params(32))


def test_base_shapes_must_hold_infshapes():
  with pytest.raises(ValueError, match="not an InfShape"):
    mup_flax.set_base_shapes(plain_params(8), {"hidden": {"kernel": (8, 8)}},
                             rescale_params=True)


def test_saved_file_applies_like_the_original(tmp_path):
  shapes = plain_shapes()
  mup_flax.save_base_shapes(shapes, os.path.join(tmp_path, "p.yaml"))
  loaded = mup_flax.load_base_shapes(os.path.join(tmp_path, "p.yaml"))
  a = mup_flax.set_base_shapes(plain_params(32), shapes, rescale_params=True)
  b = mup_flax.set_base_shapes(plain_params(32), loaded, rescale_params=True)
  assert mup_flax.get_infshapes(a) == mup_flax.get_infshapes(b)
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(a), nn.unbox(b))
