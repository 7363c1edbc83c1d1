"""μP layers for Linen: the readout, the tied readout, and the attention scale."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers

from mup_flax import _box
from mup_flax import _context
from mup_flax import _paths

__all__ = ["MuReadout", "MuSharedReadout", "attention_scale"]

_NO_BASE_SHAPES = (
    "{layer} {where!r} has no base shapes, so its width multiplier is unknown. "
    "Wrap the model in mup_flax.MuP(model, base=..., delta=...) (or base_shapes=...) "
    "and use its init/apply, or annotate the parameters with "
    "mup_flax.set_base_shapes(params, base_shapes) before apply.")


def linen_width_mult(module: nn.Module, name: str, layer: str) -> float:
  """The width multiplier of ``module``'s parameter ``name`` (bound Linen module)."""
  raw = module.get_variable("params", name)
  box = _box.find_box(raw)
  if box is not None:
    return box.infshape.width_mult()
  path = tuple(module.scope.path) + (name,)
  infshape = _context.lookup(path)
  if infshape is not None:
    return infshape.width_mult()
  if _context.is_shape_only():
    return 1.0  # Only output shapes are being computed (jax.eval_shape).
  raise ValueError(_NO_BASE_SHAPES.format(layer=layer, where=_paths.path_str(path)))


class MuReadout(nn.Module):
  """The μP output layer: ``Dense`` applied to ``output_mult * x / width_mult``.

  Use it for every layer that maps a width-sized input to a fixed-size output
  (logits). ``width_mult`` is the kernel's fan-in width multiplier, read from
  its :class:`InfShape` (so the model must be initialized through
  :class:`mup_flax.MuP` or annotated with :func:`mup_flax.set_base_shapes`).
  The bias is added after the division. At init, the kernel and bias are
  multiplied by ``sqrt(width_mult)`` (Flax's ``lecun_normal`` then has the
  base model's variance); with ``readout_zero_init=True`` both start at zero.

  Attributes:
    features: number of outputs.
    use_bias: whether to add a bias.
    output_mult: a width-independent multiplier of the logits, tuned like a
      learning rate (over powers of two).
    readout_zero_init: initialize kernel and bias to zero.
    kernel_init, bias_init: initializers (Flax's Dense defaults).
    dtype, param_dtype, precision: as for ``nn.Dense``.

  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import mup_flax
  >>> class Net(nn.Module):
  ...   width: int
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     return mup_flax.MuReadout(3)(nn.relu(nn.Dense(self.width)(x)))
  >>> x = jnp.ones((2, 5))
  >>> model = mup_flax.MuP(Net(256), base=Net(64), delta=Net(128))
  >>> variables = model.init(jax.random.key(0), x)
  >>> variables["params"]["MuReadout_0"]["kernel"].infshape.width_mult()
  4.0
  >>> model.apply(variables, x).shape
  (2, 3)
  """

  features: int
  use_bias: bool = True
  output_mult: float = 1.0
  readout_zero_init: bool = False
  kernel_init: Any = nn.linear.default_kernel_init
  bias_init: Any = initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_init = initializers.zeros_init() if self.readout_zero_init else self.kernel_init
    bias_init = initializers.zeros_init() if self.readout_zero_init else self.bias_init
    readout = {_box.ROLE: _box.READOUT}
    kernel = self.param("kernel", _box.declare(kernel_init, **readout),
                        (jnp.shape(x)[-1], self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", _box.declare(bias_init, **readout),
                        (self.features,), self.param_dtype)
    width_mult = linen_width_mult(self, "kernel", "MuReadout")
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    x = self.output_mult * x / width_mult
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                            precision=self.precision)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


class MuSharedReadout(nn.Module):
  """A :class:`MuReadout` whose kernel is an ``nn.Embed`` table (tied embeddings).

  ``logits = embed.attend(output_mult * x / width_mult) + bias`` with
  ``width_mult`` the table's (its features' width multiplier). Unlike the
  reference ``MuSharedReadout``, the bias has one entry per vocabulary item
  (``num_embeddings``) and the shared table is never rescaled by the
  readout: it keeps the embedding's own (width-independent) initialization.

  Attributes:
    use_bias: whether to add a vocabulary-sized bias.
    output_mult: width-independent logit multiplier.
    bias_init: the bias initializer.
    param_dtype: the bias dtype.

  Call it as ``MuSharedReadout()(x, embed)`` with the (bound) ``nn.Embed``
  module whose table it shares.

  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import mup_flax
  >>> class LM(nn.Module):
  ...   width: int
  ...   @nn.compact
  ...   def __call__(self, tokens):
  ...     embed = nn.Embed(100, self.width)
  ...     x = nn.relu(nn.Dense(self.width)(embed(tokens)))
  ...     return mup_flax.MuSharedReadout()(x, embed)
  >>> tokens = jnp.zeros((2, 7), jnp.int32)
  >>> model = mup_flax.MuP(LM(256), base=LM(32), delta=LM(64))
  >>> variables = model.init(jax.random.key(0), tokens)
  >>> variables["params"]["MuSharedReadout_0"]["bias"].value.shape
  (100,)
  >>> model.apply(variables, tokens).shape
  (2, 7, 100)
  """

  use_bias: bool = True
  output_mult: float = 1.0
  bias_init: Any = initializers.zeros_init()
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, embed: nn.Embed) -> jax.Array:
    if not isinstance(embed, nn.Embed):
      raise TypeError(f"MuSharedReadout shares an nn.Embed table, got {type(embed).__name__}.")
    _ = embed.embedding  # Runs the Embed's setup so its table exists.
    width_mult = linen_width_mult(embed, "embedding", "the nn.Embed shared by MuSharedReadout")
    logits = embed.attend(self.output_mult * x / width_mult)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (embed.num_embeddings,), self.param_dtype)
      logits = logits + jnp.reshape(bias, (1,) * (logits.ndim - 1) + (-1,))
    return logits


def attention_scale(head_dim: int, *, base_head_dim: int = 64) -> float:
  """μP's attention logit scale ``sqrt(base_head_dim) / head_dim``: the 1/d rule.

  Standard attention multiplies ``q @ k.T`` by ``1/sqrt(d)``; μP uses ``1/d``
  so that logits stay of order one as ``d = head_dim`` grows (queries and keys
  become correlated during training). The constant is chosen so that the two
  agree at ``d = base_head_dim``: with the default 64 this is the reference's
  ``8 / d`` convention, and with ``base_head_dim`` set to the base model's
  head dimension the base model is exactly the standard parametrization.

  >>> attention_scale(64) == 1 / 8
  True
  >>> attention_scale(256), attention_scale(16, base_head_dim=16)
  (0.03125, 0.25)
  """
  if head_dim <= 0 or base_head_dim <= 0:
    raise ValueError(f"head_dim and base_head_dim must be positive, got {head_dim}, {base_head_dim}.")
  return math.sqrt(base_head_dim) / head_dim
