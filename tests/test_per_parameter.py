"""The per-parameter helper (sf_optax/_per_parameter.py): one matching rule, one path spelling."""

import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import FrozenDict

import sf_optax
from sf_optax import parameter_path_name
from sf_optax import per_parameter_values


def params():
  return {
      "embed": jnp.ones((4, 2)),
      "block_0": {"attn": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
      "layers": [jnp.ones(1), jnp.ones(3)],
  }


def test_path_names_of_every_container():
  paths = [parameter_path_name(path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params())[0]]
  assert paths == ["block_0/attn/bias", "block_0/attn/kernel", "embed", "layers/0", "layers/1"]
  frozen = FrozenDict({"a": {"b": 1.0}})
  assert [parameter_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(frozen)[0]] \
      == ["a/b"]
  assert parameter_path_name(()) == "<root>"
  assert parameter_path_name(("a", 0, "c")) == "a/0/c"


def test_path_names_of_attributes_and_nnx_state():
  class Point(typing.NamedTuple):
    x: float
    y: float

  names = [parameter_path_name(p)
           for p, _ in jax.tree_util.tree_flatten_with_path(Point(1.0, 2.0))[0]]
  assert names == ["x", "y"]
  model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 1, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  names = [parameter_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]]
  assert names == ["layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel"]


def test_a_single_value_holds_for_every_parameter():
  values = per_parameter_values(0.5, params(), name="lr_scales")
  assert jax.tree.leaves(values) == [0.5] * 5
  assert jax.tree.structure(values) == jax.tree.structure(params())
  assert per_parameter_values(2.0, jnp.ones(3), name="lr_scales") == 2.0


def test_a_prefix_tree_holds_for_every_parameter_under_it():
  values = per_parameter_values({"embed": 0.0, "block_0": 1.0, "layers": [2.0, 3.0]}, params(),
                                name="mask")
  assert values == {"embed": 0.0, "block_0": {"attn": {"kernel": 1.0, "bias": 1.0}},
                    "layers": [2.0, 3.0]}


def test_a_function_of_params_is_called_with_the_params():
  seen = []

  def by_rank(tree):
    seen.append(tree)
    return jax.tree.map(lambda p: p.ndim >= 2, tree)

  values = per_parameter_values(by_rank, params(), name="mask")
  assert seen[0] is not None
  assert values["embed"] is True and values["block_0"]["attn"]["bias"] is False


def test_a_lookup_by_path_is_a_function_of_params():
  table = {"embed": 1.0, "block_0/attn/kernel": 0.25, "block_0/attn/bias": 1.0,
           "layers/0": 1.0, "layers/1": 1.0}

  def lookup(tree):
    return jax.tree_util.tree_map_with_path(lambda path, _: table[parameter_path_name(path)], tree)

  values = per_parameter_values(lookup, params(), name="lr_scales")
  assert values["block_0"]["attn"]["kernel"] == 0.25


def test_matching_is_by_path_across_containers():
  frozen = FrozenDict(params())
  values = per_parameter_values({"embed": 3.0, "block_0": 1.0, "layers": 2.0}, frozen,
                                name="lr_scales")
  assert isinstance(values, FrozenDict)
  assert values["embed"] == 3.0 and values["layers"] == [2.0, 2.0]


def test_a_parameter_without_a_value_is_named():
  with pytest.raises(ValueError, match=r"lr_scales gives no value for parameter block_0/attn/bias"):
    per_parameter_values({"embed": 1.0, "block_0": {"attn": {"kernel": 1.0}}, "layers": 1.0},
                         params(), name="lr_scales")


def test_entries_for_other_parameters_are_ignored():
  # A tree built for the whole model also serves the subset optax.masked hands on.
  masked = {"embed": optax.MaskedNode(), "block_0": params()["block_0"]}
  values = per_parameter_values({"embed": 5.0, "block_0": 1.0}, masked, name="lr_scales")
  assert jax.tree.leaves(values) == [1.0, 1.0]


def test_conversion_errors_name_the_argument_and_path():
  def convert(value):
    if isinstance(value, str):
      raise TypeError(f"must hold numbers, got {value!r}.")
    return value

  with pytest.raises(TypeError, match=r"weight_decay_scales for parameter embed: .*'x'"):
    per_parameter_values({"embed": "x", "block_0": 1.0, "layers": 1.0}, params(),
                         name="weight_decay_scales", convert=convert)
  assert per_parameter_values(1, params(), name="s", convert=float)["embed"] == 1.0


def test_is_leaf_selects_what_counts_as_one_parameter():
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  values = per_parameter_values({"kernel": 0.5, "bias": 1.0}, state, name="lr_scales",
                                is_leaf=is_variable)
  assert values["kernel"] == 0.5 and values["bias"] == 1.0


def test_works_on_shape_dtype_structs():
  shapes = jax.eval_shape(lambda: params())
  values = per_parameter_values(lambda tree: jax.tree.map(lambda s: float(np.prod(s.shape)), tree),
                                shapes, name="lr_scales")
  assert values["embed"] == 8.0


def test_the_engine_uses_it_and_names_paths():
  tx = sf_optax.schedule_free_sgd(0.1, weight_decay=0.1, mask={"embed": False, "block_0": True})
  state = tx.init(params())
  with pytest.raises(ValueError, match="mask gives no value for parameter layers/0"):
    tx.update(params(), state, params())
  tx = sf_optax.schedule_free_sgd(0.1, lr_scales={"embed": "fast", "block_0": 1.0, "layers": 1.0})
  with pytest.raises(TypeError, match="lr_scales for parameter embed"):
    tx.update(params(), tx.init(params()), params())
