"""μP for NNX: annotating a module in place, and the NNX readouts.

The NNX half of mup_flax; ``_linen.py`` is the Linen half, with the same parts:
annotation (:func:`set_base_shapes`: μP metadata on each ``nnx.Param``, init
corrections from ``_init_rules.plan``; it also makes the base shapes from base
and delta constructors, the counterpart of :class:`mup_flax.MuP`) and the
readouts (which read their width multiplier from that metadata).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers

from mup_flax import _base_shapes
from mup_flax import _init_rules
from mup_flax import _metadata

__all__ = ["MuReadout", "MuSharedReadout", "set_base_shapes"]


def set_base_shapes(model: nnx.Module, base_shapes: Any = None, *, base: Any = None,
                    delta: Any = None, rescale_params: bool | None = None) -> nnx.Module:
  """Annotates an ``nnx.Module`` in place: every ``nnx.Param`` gets ``infshape`` metadata.

  The NNX counterpart of :class:`mup_flax.MuP` and :func:`mup_flax.set_base_shapes`,
  with the same init rules. Give the base shapes, or the base and delta
  models as constructors (built under ``nnx.eval_shape``: nothing is
  allocated). Parameters that already carry an ``infshape`` are only
  re-annotated, never rescaled again. For the others, say what they hold:
  ``rescale_params=True`` for a freshly built model (μP's init corrections are
  applied), ``rescale_params=False`` for values that are μP-initialized
  already (restored from a checkpoint, copied with ``nnx.update``): there is
  no default, since guessing wrong rescales twice. An abstract model
  (``nnx.eval_shape``) needs no choice: annotate it, then restore into it,
  which keeps the metadata.

  Args:
    model: the NNX model (its ``nnx.Param`` variables are annotated).
    base_shapes: from :func:`mup_flax.make_base_shapes` or
      :func:`mup_flax.load_base_shapes`, or the path of a saved file.
    base: instead of ``base_shapes``: the base model, a zero-argument callable
      building it (``lambda: MLP(64, rngs=nnx.Rngs(0))``) or the model itself.
    delta: the same model at another width (only decides which dims are
      infinite), given like ``base``.
    rescale_params: ``True``: apply the μP init corrections to the parameters
      not yet annotated; ``False``: only annotate. Required when a parameter
      holding a value carries no ``infshape`` yet.

  Returns:
    ``model`` itself.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import mup_flax
  >>> class Net(nnx.Module):
  ...   def __init__(self, width, rngs):
  ...     self.hidden = nnx.Linear(5, width, rngs=rngs)
  ...     self.out = mup_flax.nnx.MuReadout(width, 3, rngs=rngs)
  ...   def __call__(self, x):
  ...     return self.out(nnx.relu(self.hidden(x)))
  >>> model = mup_flax.nnx.set_base_shapes(
  ...     Net(256, nnx.Rngs(0)), base=lambda: Net(64, nnx.Rngs(0)),
  ...     delta=lambda: Net(128, nnx.Rngs(0)), rescale_params=True)
  >>> model.out.width_mult()
  4.0
  >>> model(jnp.ones((2, 5))).shape
  (2, 3)
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(
        f"mup_flax.nnx.set_base_shapes annotates an nnx.Module in place, got "
        f"{type(model).__name__}; for Linen parameter trees use mup_flax.set_base_shapes.")
  if base_shapes is None:
    if base is None or delta is None:
      raise ValueError(
          "mup_flax.nnx.set_base_shapes needs base_shapes, or base and delta models "
          "(base=lambda: Net(64, rngs=nnx.Rngs(0)), delta=lambda: Net(128, ...)).")
    base_shapes = _base_shapes.make_base_shapes(base, delta)
  elif base is not None or delta is not None:
    raise ValueError("give either base and delta, or base_shapes, not both.")
  elif isinstance(base_shapes, (str, os.PathLike)):
    base_shapes = _base_shapes.load_base_shapes(base_shapes)
  variables, _ = _metadata.parameters(nnx.state(model, nnx.Param))
  facts = {
      path: _init_rules.Facts(
          shape=_metadata.shape_of(v),
          declarations=_metadata.declarations_of(v),
          annotated=_metadata.infshape_of(v) is not None,
          abstract=isinstance(v.get_value(), jax.ShapeDtypeStruct))
      for path, v in variables
  }
  decided = _init_rules.plan(facts, base_shapes, rescale_params, "mup_flax.nnx.set_base_shapes")
  for path, v in variables:
    infshape, mult = decided[path]
    if mult != 1.0:
      v.set_value(_init_rules.scale(v.get_value(), mult))
    v.set_metadata(_metadata.INFSHAPE, infshape)
  return model


def _width_mult(variable: nnx.Variable, layer: str) -> float:
  infshape = _metadata.infshape_of(variable)
  if infshape is None:
    raise ValueError(
        f"{layer} has no base shapes, so its width multiplier is unknown: annotate the "
        "model first with mup_flax.nnx.set_base_shapes(model, base_shapes).")
  return infshape.width_mult()


class MuReadout(nnx.Linear):
  """The μP output layer for NNX: ``nnx.Linear`` applied to ``output_mult * x / width_mult``.

  See :class:`mup_flax.MuReadout` (Linen) for the rules. ``width_mult`` is read
  from the kernel's ``infshape`` metadata, set by
  :func:`mup_flax.nnx.set_base_shapes` (calling the layer before that is an
  error).

  Args:
    in_features: width of the input.
    out_features: number of outputs.
    use_bias: whether to add a bias (not divided by ``width_mult``).
    output_mult: width-independent logit multiplier.
    readout_zero_init: initialize kernel and bias to zero.
    rngs: random number generators.
    **kwargs: other ``nnx.Linear`` arguments (``kernel_init``, ``dtype``, ...).

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import mup_flax
  >>> make = lambda width: mup_flax.nnx.MuReadout(width, 10, output_mult=2.0, rngs=nnx.Rngs(0))
  >>> readout = mup_flax.nnx.set_base_shapes(
  ...     make(512), base=lambda: make(64), delta=lambda: make(128), rescale_params=True)
  >>> readout.width_mult(), readout(jnp.ones((3, 512))).shape
  (8.0, (3, 10))
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               output_mult: float = 1.0, readout_zero_init: bool = False,
               rngs: nnx.Rngs, **kwargs: Any):
    if readout_zero_init:
      kwargs["kernel_init"] = initializers.zeros_init()
      kwargs["bias_init"] = initializers.zeros_init()
    readout = {_metadata.ROLE: _metadata.READOUT}
    kwargs["kernel_metadata"] = {**kwargs.get("kernel_metadata", {}), **readout}
    kwargs["bias_metadata"] = {**kwargs.get("bias_metadata", {}), **readout}
    super().__init__(in_features, out_features, use_bias=use_bias, rngs=rngs, **kwargs)
    self.output_mult = output_mult
    self.readout_zero_init = readout_zero_init

  def width_mult(self) -> float:
    """The kernel's fan-in width multiplier."""
    return _width_mult(self.kernel, "MuReadout")

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    return super().__call__(self.output_mult * inputs / self.width_mult(), out_sharding)


class MuSharedReadout(nnx.Module):
  """A readout sharing an ``nnx.Embed`` table (tied embeddings), for NNX.

  ``logits = embed.attend(output_mult * x / width_mult) + bias``, with a bias
  of one entry per vocabulary item, and the shared table never rescaled by
  the readout (see :class:`mup_flax.MuSharedReadout`).

  Args:
    embed: the ``nnx.Embed`` whose table is shared (held by reference).
    use_bias: whether to add a vocabulary-sized bias.
    output_mult: width-independent logit multiplier.
    bias_init: the bias initializer.
    param_dtype: the bias dtype.
    rngs: random number generators.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import mup_flax
  >>> class LM(nnx.Module):
  ...   def __init__(self, width, rngs):
  ...     self.embed = nnx.Embed(100, width, rngs=rngs)
  ...     self.readout = mup_flax.nnx.MuSharedReadout(self.embed, rngs=rngs)
  ...   def __call__(self, tokens):
  ...     return self.readout(self.embed(tokens))
  >>> shapes = mup_flax.make_base_shapes(lambda: LM(32, nnx.Rngs(0)),
  ...                                    lambda: LM(64, nnx.Rngs(0)))
  >>> model = mup_flax.nnx.set_base_shapes(LM(256, nnx.Rngs(0)), shapes, rescale_params=True)
  >>> model(jnp.zeros((2, 7), jnp.int32)).shape, model.readout.bias.shape
  ((2, 7, 100), (100,))
  """

  def __init__(self, embed: nnx.Embed, *, use_bias: bool = True, output_mult: float = 1.0,
               bias_init: Any = initializers.zeros_init(), param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    if not isinstance(embed, nnx.Embed):
      raise TypeError(f"MuSharedReadout shares an nnx.Embed table, got {type(embed).__name__}.")
    self.embed = embed
    self.output_mult = output_mult
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), (embed.num_embeddings,), param_dtype))
    else:
      self.bias = nnx.data(None)

  def width_mult(self) -> float:
    """The shared table's width multiplier (its features')."""
    return _width_mult(self.embed.embedding, "the nnx.Embed shared by MuSharedReadout")

  def __call__(self, x: jax.Array) -> jax.Array:
    logits = self.embed.attend(self.output_mult * x / self.width_mult())
    if self.bias is not None:
      bias = self.bias[...]
      logits = logits + jnp.reshape(bias, (1,) * (logits.ndim - 1) + (-1,))
    return logits
