"""Float64 parity of mup_flax with the reference PyTorch package ``mup`` 1.0.0.

The fixtures in ``tests/reference/fixtures/mup/`` were recorded by
``tests/reference/generate_mup.py`` (layout: ``.notes/MUP_FIXTURES.md``) from an
MLP and a small transformer block at three widths each: every parameter's
infinite/finite dims, its Adam and SGD learning-rate and weight-decay
multipliers, the init rescaling of ``set_base_shapes``, MuReadout outputs,
the losses and (float32-rounded) gradients of five MuAdam / MuAdamW / MuSGD
steps with the weights after each, and Schedule-Free (the reference
``schedulefree``) run on mup's parameter groups. The same models are written
here in Linen; arrays are in Flax layout already. No torch is needed.
"""

import functools
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mup_flax
import sf_optax

from _helpers import default_tier
from _helpers import relative_error

FIXTURES = pathlib.Path(__file__).parent / "reference" / "fixtures" / "mup"
DOC = json.loads((FIXTURES / "mup_reference.json").read_text())
with np.load(FIXTURES / "mup_reference.npz") as _data:
  ARRAYS = {key: _data[key] for key in _data.files}
TOLERANCE = 1e-10
F64 = jnp.float64

MLP_DOC = DOC["models"]["mlp"]
TRANSFORMER_DOC = DOC["models"]["transformer"]

# Float64 everywhere (conftest's `x64` fixture restores the setting afterwards).
pytestmark = pytest.mark.usefixtures("x64")


class MLP(nn.Module):
  """tests/reference/generate_mup.py's MLP: tanh(fc_in) -> tanh(fc_hidden) -> readout."""

  w1: int
  w2: int

  def setup(self):
    self.fc_in = nn.Dense(self.w1, param_dtype=F64)
    self.fc_hidden = nn.Dense(self.w2, param_dtype=F64)
    self.readout = mup_flax.MuReadout(
        MLP_DOC["dims"]["out"], output_mult=MLP_DOC["dims"]["output_mult"], param_dtype=F64)

  def __call__(self, x):
    return self.readout(jnp.tanh(self.fc_hidden(jnp.tanh(self.fc_in(x)))))


class Block(nn.Module):
  """generate_mup.py's transformer: embed, one pre-LN block with 1/d attention, MuReadout."""

  d: int

  def setup(self):
    dims = TRANSFORMER_DOC["dims"]
    dense = functools.partial(nn.Dense, param_dtype=F64)
    norm = functools.partial(nn.LayerNorm, epsilon=dims["layer_norm_eps"],
                             use_fast_variance=False, param_dtype=F64)
    self.embed = nn.Embed(dims["vocab"], self.d, param_dtype=F64)
    self.ln1, self.ln2, self.ln_f = norm(), norm(), norm()
    self.q, self.k, self.v, self.o = dense(self.d), dense(self.d), dense(self.d), dense(self.d)
    self.ff1, self.ff2 = dense(2 * self.d), dense(self.d)
    self.readout = mup_flax.MuReadout(dims["vocab"], output_mult=dims["output_mult"],
                                      param_dtype=F64)

  def __call__(self, tokens):
    heads = TRANSFORMER_DOC["dims"]["heads"]
    b, t = tokens.shape
    head_dim = self.d // heads
    h = self.embed(tokens)
    a = self.ln1(h)
    split = lambda z: z.reshape(b, t, heads, head_dim).transpose(0, 2, 1, 3)
    q, k, v = split(self.q(a)), split(self.k(a)), split(self.v(a))
    scores = q @ k.swapaxes(-1, -2) * mup_flax.attention_scale(head_dim)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    attn = jax.nn.softmax(scores, axis=-1) @ v
    h = h + self.o(attn.transpose(0, 2, 1, 3).reshape(b, t, self.d))
    h = h + self.ff2(jax.nn.gelu(self.ff1(self.ln2(h)), approximate=True))
    return self.readout(self.ln_f(h))


def mse(out, targets):
  return jnp.mean((out - targets) ** 2)


def cross_entropy(logits, targets):
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def mlp_setup(width):
  base, delta = MLP_DOC["base"], MLP_DOC["delta"]
  model = mup_flax.MuP(MLP(width, width // 2), base=MLP(**base), delta=MLP(**delta))
  return model, jnp.zeros((MLP_DOC["dims"]["batch"], MLP_DOC["dims"]["in"]), F64), mse


def transformer_setup(width):
  base, delta = TRANSFORMER_DOC["base"]["d_model"], TRANSFORMER_DOC["delta"]["d_model"]
  model = mup_flax.MuP(Block(width), base=Block(base), delta=Block(delta))
  dims = TRANSFORMER_DOC["dims"]
  return model, jnp.zeros((dims["batch"], dims["seq"]), jnp.int32), cross_entropy


SETUPS = {"mlp": mlp_setup, "transformer": transformer_setup}
CASES = [(name, width) for name in ("mlp", "transformer")
         for width in DOC["models"][name]["widths"]]
# The default tier runs the MLP at one width away from the base (and the optimizer
# steps of the Transformer at one width); the slow tier the others.
DEFAULT_TIER = {"mlp-16"}
TIERED_CASES = default_tier(CASES, DEFAULT_TIER, ids=lambda case: f"{case[0]}-{case[1]}",
                            unpack=True)


def param_docs(name, width):
  return DOC["models"][name]["widths"][width]["params"]


def nested(prefix, paths, index=None):
  """The fixture arrays ``prefix/<module>/<leaf>`` as a Flax params tree."""
  tree = {}
  for path in paths:
    array = ARRAYS[f"{prefix}/{path}"]
    if index is not None:
      array = array[index]
    module, leaf = path.split("/")
    tree.setdefault(module, {})[leaf] = jnp.asarray(array, F64)
  return tree


def flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, mup_flax.InfShape))[0]
  return {"/".join(k.key for k in path): leaf for path, leaf in leaves}


def fixture_infshapes(docs):
  """InfShapes straight from the fixture (the optimizer tests do not depend on MuP)."""
  tree = {}
  for path, doc in docs.items():
    module, leaf = path.split("/")
    dims = [mup_flax.InfDim(base, dim) for base, dim in doc["flax_infshape"]]
    tree.setdefault(module, {})[leaf] = mup_flax.InfShape(dims)
  return tree


def assert_trees_close(actual, expected, what, tolerance=TOLERANCE, floor=0.0):
  """Per parameter, max |actual - expected| <= tolerance * max(max |expected|, floor)."""
  actual, expected = flat(actual), flat(expected)
  assert sorted(actual) == sorted(expected), what
  for path in expected:
    err = relative_error(actual[path], expected[path], floor, float64=False)
    assert err <= tolerance, f"{what}: {path} relative error {err:.3g}"


INIT_SAMPLES = 2048


@functools.cache
def annotated_init(name, width):
  """``MuP(...).init`` of the Linen model at this width, with ``INIT_SAMPLES`` keys.

  Returns the wrapped model, the variables of the first key, the stacked
  parameters of all keys (for the init statistics), the example input and the
  loss. One compilation per model and width: compiling is most of the cost here.
  """
  model, example, loss = SETUPS[name](int(width))
  keys = jax.random.split(jax.random.key(0), INIT_SAMPLES)
  samples = jax.jit(jax.vmap(lambda key: model.init(key, example)))(keys)
  variables = jax.tree.map(lambda a: a[0], samples)
  return model, variables, nn.unbox(samples)["params"], example, loss


# -- infinite/finite dims and multipliers --------------------------------------


@pytest.mark.parametrize("name,width", TIERED_CASES)
def test_infshapes_match_reference(name, width):
  _, variables, _, _, _ = annotated_init(name, width)
  infshapes = flat(mup_flax.get_infshapes(variables["params"]))
  docs = param_docs(name, width)
  assert sorted(infshapes) == sorted(docs)
  for path, doc in docs.items():
    shape = infshapes[path]
    assert [[d.base_dim, d.dim] for d in shape.dims] == doc["flax_infshape"], path
    assert shape.ninf() == doc["ninf"], path
    assert shape.width_mult() == doc["width_mult"], path
    if path.endswith("/kernel"):
      # Dense kernels only: the reference takes an Embedding's features as its
      # fan-in, Flax's layout (vocab, features) makes them the fan-out. The
      # ratio only matters for matrix-like parameters, which are kernels.
      assert shape.fanin_fanout_mult_ratio() == doc["fanin_fanout_mult_ratio"], path


@pytest.mark.parametrize("rule", ["adam", "sgd"])
@pytest.mark.parametrize("name,width", TIERED_CASES)
def test_multipliers_match_reference(name, width, rule):
  _, variables, _, _, _ = annotated_init(name, width)
  infshapes = mup_flax.get_infshapes(variables["params"])
  scales = mup_flax.schedule_free_scales(infshapes, rule=rule)
  lr_scales, decay_scales = flat(scales["lr_scales"]), flat(scales["weight_decay_scales"])
  for path, doc in param_docs(name, width).items():
    expected = doc[rule]
    assert lr_scales[path] == pytest.approx(expected["lr_mult"], rel=1e-15), path
    assert decay_scales[path] == pytest.approx(expected["weight_decay_mult"], rel=1e-15), path
  # scale_by_mup applies the same multipliers.
  params = nn.unbox(variables["params"])
  ones = jax.tree.map(jnp.ones_like, params)
  tx = mup_flax.scale_by_mup(infshapes, rule=rule)
  scaled = flat(tx.update(ones, tx.init(params))[0])
  for path, doc in param_docs(name, width).items():
    np.testing.assert_allclose(scaled[path], doc[rule]["lr_mult"], rtol=1e-15, err_msg=path)


# -- initialization --------------------------------------------------------------


@pytest.mark.parametrize("name,width", TIERED_CASES)
def test_init_std_follows_reference_rescaling(name, width):
  """Sampled stds of MuP's init against Flax's default std times the reference's factor.

  The reference starts from torch's defaults and multiplies MuReadout's weight
  (and every bias) by a per-parameter factor; Flax's defaults differ from
  torch's (lecun_normal kernels, zero biases), so the test applies the
  fixture's factor to Flax's own closed-form std: a Dense kernel has
  ``1/sqrt(fan_in)``, times ``sqrt(width_mult)`` for the readout (the base
  model's std). Biases and LayerNorm stay constant. Embeddings: the reference
  keeps torch's N(0, 1) (constant in width); Flax's default ``1/sqrt(features)``
  is replaced by its base-width value ``1/sqrt(base_features)``.
  """
  _, variables, samples, _, _ = annotated_init(name, width)
  docs = param_docs(name, width)
  samples = flat(samples)
  infshapes = flat(mup_flax.get_infshapes(variables["params"]))
  for path, doc in docs.items():
    x = np.asarray(samples[path])
    init = doc["init"]
    rule = init["rule"]
    if rule in ("linear_weight", "readout_weight"):
      expected = init["rescale"] / np.sqrt(init["fan_in"])
    elif rule == "embedding":
      (base_features, _), = [d for d in doc["flax_infshape"] if d[0] is not None]
      assert init["rescale"] == 1.0
      expected = 1.0 / np.sqrt(base_features)
      assert infshapes[path].width_mult() > 1.0
    elif rule in ("linear_bias", "readout_bias", "layer_norm_bias"):
      np.testing.assert_array_equal(x, 0.0, err_msg=path)
      continue
    elif rule == "layer_norm_scale":
      np.testing.assert_array_equal(x, 1.0, err_msg=path)
      continue
    else:
      raise AssertionError(f"unknown init rule {rule!r}")
    # The mean is zero; the std estimate from n samples has relative sd <= 1/sqrt(2n).
    std = float(np.sqrt(np.mean(x ** 2)))
    bound = 6.0 / np.sqrt(2 * x.size)
    assert abs(std / expected - 1) < bound, f"{path}: std {std:.5g}, expected {expected:.5g}"


# -- forward: MuReadout and the whole model ------------------------------------------


@pytest.mark.parametrize("name,width", TIERED_CASES)
def test_mureadout_outputs_match_reference(name, width):
  model, _, _, example, _ = annotated_init(name, width)
  prefix = f"{name}/{width}"
  # Plain arrays (as from a checkpoint): MuP.apply annotates them, never rescales.
  params = nested(f"{prefix}/init", param_docs(name, width))
  x = jnp.asarray(ARRAYS[f"{prefix}/readout/x"])
  out = model.apply({"params": params}, example, method=lambda m, _: m.readout(x))
  err = relative_error(out, ARRAYS[f"{prefix}/readout/out"], float64=False)
  assert err <= TOLERANCE, err


@pytest.mark.parametrize("name,width", TIERED_CASES)
def test_losses_and_gradients_match_reference(name, width):
  """The Linen model equals the reference model: losses to 1e-10, gradients to
  float32 rounding (the fixture stores the gradients it fed rounded to float32)."""
  model, _, _, _, loss_fn = annotated_init(name, width)
  prefix = f"{name}/{width}"
  docs = param_docs(name, width)
  inputs = ARRAYS[f"{prefix}/batches/inputs"]
  targets = ARRAYS[f"{prefix}/batches/targets"]

  @jax.jit
  def loss_and_grad(params, x, y):
    return jax.value_and_grad(lambda p: loss_fn(model.apply({"params": p}, x), y))(params)

  for optimizer, losses in DOC["models"][name]["losses"][width].items():
    for step, expected in enumerate(losses):
      params = (nested(f"{prefix}/init", docs) if step == 0
                else nested(f"{prefix}/{optimizer}/params", docs, step - 1))
      loss, grads = loss_and_grad(params, jnp.asarray(inputs[step]), jnp.asarray(targets[step]))
      assert abs(float(loss) - expected) <= TOLERANCE * abs(expected), (optimizer, step)
      reference = nested(f"{prefix}/{optimizer}/grad", docs, step)
      # The attention key bias has a zero gradient (softmax ignores a shift
      # shared by all keys): both sides hold rounding noise there.
      assert_trees_close(grads, reference, f"{optimizer} step {step + 1} grads", 1e-6,
                         floor=1e-6)


# -- optimizers ------------------------------------------------------------------------


def reference_optimizer(optimizer, infshapes):
  """The mup_flax equivalent of the fixture's torch optimizer."""
  spec = DOC["optimizers"][optimizer]
  if spec["reference"] in ("mup.MuAdam", "mup.MuAdamW"):
    factory = mup_flax.mu_adam if spec["reference"] == "mup.MuAdam" else mup_flax.mu_adamw
    b1, b2 = spec["betas"]
    return factory(spec["lr"], infshapes, b1=b1, b2=b2, eps=spec["eps"],
                   weight_decay=spec["weight_decay"])
  assert spec["reference"] == "mup.MuSGD", spec
  return mup_flax.mu_sgd(spec["lr"], infshapes, momentum=spec["momentum"],
                         nesterov=spec.get("nesterov", False), weight_decay=spec["weight_decay"])


OPTIMIZER_CASES = [(name, width, optimizer) for name, width in CASES
                   for optimizer in DOC["models"][name]["losses"][width]]


@pytest.mark.parametrize("name,width,optimizer", default_tier(
    OPTIMIZER_CASES, {f"{n}-{w}-{o}" for n, w, o in OPTIMIZER_CASES if f"{n}-{w}" in DEFAULT_TIER | {"transformer-8"}},
    ids=lambda case: "-".join(case), unpack=True))
def test_optimizer_steps_match_reference(name, width, optimizer):
  """Five steps of mu_adam / mu_adamw / mu_sgd from the reference's weights and gradients."""
  prefix = f"{name}/{width}"
  docs = param_docs(name, width)
  tx = reference_optimizer(optimizer, fixture_infshapes(docs))
  params = nested(f"{prefix}/init", docs)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(len(DOC["models"][name]["losses"][width][optimizer])):
    grads = nested(f"{prefix}/{optimizer}/grad", docs, step)
    updates, state = update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    expected = nested(f"{prefix}/{optimizer}/params", docs, step)
    assert_trees_close(params, expected, f"{optimizer} after step {step + 1}")


@pytest.mark.parametrize("sf_name", default_tier(sorted(DOC["schedule_free"]), {"sgd"}))
def test_schedule_free_on_mup_groups_matches_reference(sf_name):
  """sf_optax + schedule_free_scales == schedulefree on mup's parameter groups."""
  spec = DOC["schedule_free"][sf_name]
  prefix = f"schedule_free/{sf_name}"
  base, delta = MLP_DOC["base"], MLP_DOC["delta"]
  model = mup_flax.MuP(MLP(**spec["widths"]), base=MLP(**base), delta=MLP(**delta))
  example = jnp.zeros((MLP_DOC["dims"]["batch"], MLP_DOC["dims"]["in"]), F64)
  infshapes = mup_flax.get_infshapes(jax.eval_shape(model.init, jax.random.key(0), example)["params"])
  rule = "adam" if sf_name == "adamw" else "sgd"
  scales = mup_flax.schedule_free_scales(infshapes, rule=rule)

  # The scales reproduce the reference's parameter groups.
  lr_scales, decay_scales = flat(scales["lr_scales"]), flat(scales["weight_decay_scales"])
  for path, (group_lr, group_decay) in spec["group_lr_and_weight_decay"].items():
    assert spec["lr"] * lr_scales[path] == pytest.approx(group_lr, rel=1e-15), path
    assert spec["weight_decay"] * decay_scales[path] == pytest.approx(group_decay, rel=1e-15), path

  common = dict(weight_decay=spec["weight_decay"], warmup_steps=spec["warmup_steps"],
                r=spec["r"], weight_lr_power=spec["weight_lr_power"], **scales)
  if sf_name == "adamw":
    b1, b2 = spec["betas"]
    tx = sf_optax.schedule_free_adamw(spec["lr"], b1=b1, b2=b2, eps=spec["eps"], **common)
  else:
    tx = sf_optax.schedule_free_sgd(spec["lr"], b1=spec["momentum"], **common)

  paths = spec["group_lr_and_weight_decay"]
  params = nested(f"{prefix}/init", paths)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(spec["steps"]):
    grads = nested(f"{prefix}/grad", paths, step)
    updates, state = update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    assert_trees_close(params, nested(f"{prefix}/y", paths, step), f"y after step {step + 1}")
  y, z = nested(f"{prefix}/y", paths, spec["steps"] - 1), nested(f"{prefix}/z_final", paths)
  x = jax.tree.map(lambda y, z: (y - (1 - spec["b1"]) * z) / spec["b1"], y, z)
  assert_trees_close(sf_optax.eval_params(state, params), x, "x after the last step")
  assert_trees_close(state.z, z, "z after the last step")
