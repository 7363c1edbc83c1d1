"""μP for Linen: annotating parameter trees, the readouts, and the :class:`MuP` wrapper.

The Linen half of mup_flax; ``_nnx.py`` is the NNX half, with the same parts:
annotation (:func:`set_base_shapes`: μP metadata in an :class:`InfShapeBox`
around each parameter, init corrections from ``_init_rules.plan``), the
readouts (which read their width multiplier from that box), and the entry
point (:class:`MuP`, whose ``init`` traces the model once).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.linen import initializers

from mup_flax import _base_shapes
from mup_flax import _init_rules
from mup_flax import _metadata
from mup_flax._metadata import Path
from sf_optax import parameter_path_name

__all__ = ["MuP", "MuReadout", "MuSharedReadout", "set_base_shapes"]


# ---------------------------------------------------------------- annotation


def _annotate(params: Any, base_shapes: Any, rescale_params: bool | None, caller: str,
              known_declarations: Mapping[Path, dict] | None = None) -> Any:
  """Boxes every parameter with its InfShape, rescaling as ``_init_rules.plan`` says.

  ``known_declarations`` supplies what the layers declared (e.g. readout roles)
  for parameters that lost their boxes (restored as plain arrays).
  """
  leaves, treedef = _metadata.parameters(params)
  facts = {}
  for path, leaf in leaves:
    shape = _metadata.shape_of(leaf)
    if shape is None:
      raise ValueError(f"parameter {parameter_path_name(path)} is not an array.")
    facts[path] = _init_rules.Facts(
        shape=shape,
        declarations={**(known_declarations or {}).get(path, {}),
                      **_metadata.declarations_of(leaf)},
        annotated=_metadata.infshape_of(leaf) is not None,
        abstract=isinstance(_metadata.strip(leaf), jax.ShapeDtypeStruct))
  decided = _init_rules.plan(facts, base_shapes, rescale_params, caller)
  new_leaves = []
  for path, leaf in leaves:
    infshape, mult = decided[path]
    role = facts[path].declarations.get(_metadata.ROLE)
    new_leaves.append(_metadata.rebox(
        leaf, _init_rules.scale(_metadata.strip(leaf), mult), infshape, role))
  return treedef.unflatten(new_leaves)


def set_base_shapes(params: Any, base_shapes: Any, *,
                    rescale_params: bool | None = None) -> Any:
  """Annotates Linen (or plain) parameters with their InfShape and applies μP init.

  The functional core behind :class:`mup_flax.MuP`. Each parameter comes back
  in an :class:`InfShapeBox` (outermost; an ``nn.Partitioned`` box stays
  inside it). Parameters that already carry an InfShape are only
  re-annotated, never rescaled again. For the others, say what they hold:
  ``rescale_params=True`` for freshly initialized values (μP's init
  corrections are applied, see below), ``rescale_params=False`` for values
  that are μP-initialized already (restored from a checkpoint, unboxed with
  ``nn.unbox``): there is no default, since guessing wrong rescales twice.

  Init rules (for parameters whose initializer is not from
  :mod:`mup_flax.init`, which declares its own rule): a ``MuReadout`` kernel
  and bias ``* sqrt(width_mult)``; another ``bias`` beside a ``kernel``
  ``* sqrt(fan_in_mult)``; an ``embedding`` table (Flax's default init, std
  ``1/sqrt(features)``) ``* sqrt(width_mult)``, giving std
  ``1/sqrt(base_features)``; everything else unchanged (Flax's
  ``lecun_normal`` is already μP for hidden kernels). With base shapes equal to
  the parameters' shapes every multiplier is 1: standard parametrization.
  These rules assume Flax's default initializers (as the reference assumes
  PyTorch's): a readout or ``nn.Embed`` given another ``jax.nn.initializers``
  initializer, say ``normal(0.02)``, would be rescaled as if it were the
  default. Give such layers the :mod:`mup_flax.init` version instead
  (``mup_flax.init.normal(0.02)``), which declares its own rule.

  Args:
    params: the ``"params"`` collection of a Linen model (arrays, boxes or
      ``jax.ShapeDtypeStruct``), not an ``nnx.Module`` (use
      :func:`mup_flax.nnx.set_base_shapes`).
    base_shapes: from :func:`make_base_shapes` or :func:`load_base_shapes`.
    rescale_params: ``True``: apply the μP init corrections to the parameters
      not yet annotated; ``False``: only annotate. Required when a parameter
      holding a value (not a ``jax.ShapeDtypeStruct``) carries no InfShape yet.

  Returns:
    The annotated parameters, same tree structure with boxes at the leaves.

  Raises:
    ValueError: ``rescale_params`` missing where it matters; a parameter
      missing from the base shapes (or vice versa), a finite dim that changed
      size, a rank change (naming the path and both shapes); a kernel with
      infinite fan-in and finite fan-out that is not a ``MuReadout``.

  >>> import jax, jax.numpy as jnp
  >>> import mup_flax
  >>> shapes = mup_flax.make_base_shapes(
  ...     {"kernel": jnp.zeros((3, 8))}, {"kernel": jnp.zeros((3, 16))})
  >>> params = set_base_shapes({"kernel": jnp.ones((3, 64))}, shapes, rescale_params=True)
  >>> params["kernel"].infshape
  InfShape((FinDim(3), InfDim(8, 64)))
  """
  if isinstance(params, nnx.Module):
    raise TypeError(
        "set_base_shapes takes Linen/plain parameter trees; annotate an nnx.Module "
        "in place with mup_flax.nnx.set_base_shapes(model, base_shapes).")
  return _annotate(params, base_shapes, rescale_params, "mup_flax.set_base_shapes")


# ---------------------------------------------------------------- readouts

_NO_BASE_SHAPES = (
    "{layer} {where!r} has no base shapes, so its width multiplier is unknown. "
    "Wrap the model in mup_flax.MuP(model, base=..., delta=...) (or base_shapes=...) "
    "and use its init/apply, or annotate the parameters with "
    "mup_flax.set_base_shapes(params, base_shapes, rescale_params=...) before apply.")


def _width_mult(module: nn.Module, name: str, layer: str) -> float:
  """The width multiplier of a bound module's parameter ``name``, from its InfShapeBox."""
  infshape = _metadata.infshape_of(module.get_variable("params", name))
  if infshape is not None:
    return infshape.width_mult()
  if module.is_initializing():
    # Not annotated yet (MuP.init annotates after the model's init, and
    # make_base_shapes only needs shapes): initial values never depend on
    # activations, so the output's scale does not matter here.
    return 1.0
  where = parameter_path_name(tuple(module.scope.path) + (name,))
  raise ValueError(_NO_BASE_SHAPES.format(layer=layer, where=where))


class MuReadout(nn.Module):
  """The μP output layer: ``Dense`` applied to ``output_mult * x / width_mult``.

  Use it for every layer that maps a width-sized input to a fixed-size output
  (logits). ``width_mult`` is the kernel's fan-in width multiplier, read from
  its :class:`InfShape` (so the model must be initialized through
  :class:`mup_flax.MuP` or annotated with :func:`mup_flax.set_base_shapes`
  before ``apply``). During ``init``, before the parameters are annotated, the
  forward pass uses ``width_mult = 1``: no parameter's initial value depends
  on activations, and ``MuP.init`` discards the output.
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
    readout = {_metadata.ROLE: _metadata.READOUT}
    kernel = self.param("kernel", _metadata.declare(kernel_init, **readout),
                        (jnp.shape(x)[-1], self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", _metadata.declare(bias_init, **readout),
                        (self.features,), self.param_dtype)
    width_mult = _width_mult(self, "kernel", "MuReadout")
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
    width_mult = _width_mult(embed, "embedding", "the nn.Embed shared by MuSharedReadout")
    logits = embed.attend(self.output_mult * x / width_mult)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (embed.num_embeddings,), self.param_dtype)
      logits = logits + jnp.reshape(bias, (1,) * (logits.ndim - 1) + (-1,))
    return logits


# ---------------------------------------------------------------- the wrapper


class MuP:
  """Wraps a Linen model so that ``init`` returns μP-annotated, μP-initialized parameters.

  Give either the base and delta models (the same architecture at two widths;
  base shapes are computed with ``jax.eval_shape`` at the first ``init`` or
  ``apply``, from its inputs) or ready ``base_shapes`` (a tree from
  :func:`mup_flax.make_base_shapes` or a path for
  :func:`mup_flax.load_base_shapes`).

  - ``init(rngs, *args, **kwargs)``: the model's variables, with every
    parameter in an :class:`InfShapeBox` and μP's init corrections applied
    (:func:`mup_flax.set_base_shapes`). The model is traced once per call;
    the first call also traces ``base`` and ``delta`` once each.
  - ``apply(variables, *args, **kwargs)``: the model's ``apply``; plain-array
    parameters (e.g. after ``nn.unbox`` or from a checkpoint) are annotated
    first, without rescaling.
  - ``annotate(params)``: annotation without rescaling, for parameters
    restored from a checkpoint.

  Args:
    module: the target Linen model.
    base: the base model (same class, base width).
    delta: the delta model (same class, another width; only decides which
      dims are infinite).
    base_shapes: instead of ``base``/``delta``: a base-shapes tree or file path.
    fan_axes: passed to :func:`mup_flax.make_base_shapes`.
    collection: the variable collection holding the parameters.

  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import mup_flax
  >>> class MLP(nn.Module):
  ...   width: int
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     x = nn.relu(nn.Dense(self.width)(x))
  ...     x = nn.relu(nn.Dense(self.width)(x))
  ...     return mup_flax.MuReadout(10)(x)
  >>> model = mup_flax.MuP(MLP(1024), base=MLP(64), delta=MLP(128))
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 784)))
  >>> variables["params"]["Dense_1"]["kernel"].infshape.ninf()
  2
  >>> model.apply(variables, jnp.ones((1, 784))).shape
  (1, 10)
  """

  def __init__(
      self,
      module: nn.Module,
      *,
      base: nn.Module | None = None,
      delta: nn.Module | None = None,
      base_shapes: Any = None,
      fan_axes: Any = None,
      collection: str = "params",
  ):
    if not isinstance(module, nn.Module):
      raise TypeError(
          f"MuP wraps a Linen module, got {type(module).__name__}; for NNX use "
          "mup_flax.nnx.set_base_shapes(model, base_shapes).")
    if base_shapes is not None:
      if base is not None or delta is not None:
        raise ValueError("give either base and delta, or base_shapes, not both.")
      if isinstance(base_shapes, (str, os.PathLike)):
        base_shapes = _base_shapes.load_base_shapes(base_shapes)
    elif base is None or delta is None:
      raise ValueError(
          "MuP needs base and delta models (MuP(model, base=..., delta=...)) or "
          "base_shapes=...")
    self.module = module
    self.base = base
    self.delta = delta
    self.fan_axes = fan_axes
    self.collection = collection
    self._base_shapes = base_shapes
    self._declarations = None

  def base_shapes(self, *example_args: Any, **example_kwargs: Any) -> Any:
    """The base shapes (computed once from base and delta with these example inputs)."""
    if self._base_shapes is None:
      self._base_shapes = _base_shapes.make_base_shapes(
          self.base, self.delta, *example_args, fan_axes=self.fan_axes,
          collection=self.collection, **example_kwargs)
    return self._base_shapes

  def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any:
    """The model's ``init``, with annotated, μP-initialized parameters.

    Traces the model's ``init`` once (the real one; annotation and the init
    corrections follow on its output). The first call of a wrapper given
    ``base``/``delta`` also traces each of them once under ``jax.eval_shape``
    to make the base shapes, which are kept for later calls.
    """
    base_shapes = self.base_shapes(*args, **kwargs)
    variables = self.module.init(rngs, *args, **kwargs)
    if self.collection not in variables:
      raise ValueError(f"{type(self.module).__name__} has no {self.collection!r} collection.")
    params = variables[self.collection]
    self._declarations = _declarations(params)
    params = _annotate(params, base_shapes, True, "MuP.init")
    return _replace_collection(variables, self.collection, params)

  def annotate(self, variables: Any, *example_args: Any, **example_kwargs: Any) -> Any:
    """Annotates without rescaling (e.g. after restoring plain arrays from a checkpoint).

    Accepts the variables dict or the parameters alone. Example inputs are
    needed before this wrapper's first ``init`` when base shapes must be
    computed from ``base``/``delta``, or when ``variables`` holds plain
    arrays (their boxes lost, so the layers' declarations, such as which
    kernel is a readout, are read from the model with ``jax.eval_shape``).
    """
    base_shapes = self.base_shapes(*example_args, **example_kwargs)
    is_variables = isinstance(variables, Mapping) and self.collection in variables
    params = variables[self.collection] if is_variables else variables
    declarations = None
    if not _is_annotated(params):
      # Plain arrays lost what the layers declared (e.g. which kernel is a readout).
      declarations = self._declared(*example_args, **example_kwargs)
    params = _annotate(params, base_shapes, False, "MuP.annotate", declarations)
    return _replace_collection(variables, self.collection, params) if is_variables else params

  def _declared(self, *example_args: Any, **example_kwargs: Any) -> dict:
    """What the model's layers declare about their parameters (readout roles, fan axes)."""
    if self._declarations is None:
      if not example_args and not example_kwargs:
        raise ValueError(
            "annotating plain arrays before MuP.init needs the model's example inputs, "
            "to learn what its layers declare (which kernels are readouts): "
            "model.annotate(params, x).")
      self._declarations = _declarations(_base_shapes.parameter_tree(
          self.module, example_args, example_kwargs, self.collection))
    return self._declarations

  def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
    """The model's ``apply``; plain-array parameters are annotated first (never rescaled)."""
    params = variables.get(self.collection) if isinstance(variables, Mapping) else None
    if params is None or not _is_annotated(params):
      variables = self.annotate(variables, *args, **_call_kwargs(kwargs))
    return self.module.apply(variables, *args, **kwargs)

  def __repr__(self) -> str:
    return f"MuP({self.module!r})"


_APPLY_KWARGS = ("rngs", "method", "mutable", "capture_intermediates")


def _call_kwargs(kwargs: dict) -> dict:
  """The keyword arguments of ``apply`` that are the model's own inputs."""
  return {k: v for k, v in kwargs.items() if k not in _APPLY_KWARGS}


def _declarations(params: Any) -> dict[Path, dict]:
  """``{path: μP declarations}`` of a (boxed, possibly abstract) Linen parameter tree."""
  return {path: _metadata.declarations_of(leaf)
          for path, leaf in _metadata.parameters(params)[0]}


def _is_annotated(params: Any) -> bool:
  return all(_metadata.infshape_of(leaf) is not None
             for _, leaf in _metadata.parameters(params)[0])


def _replace_collection(variables: Any, collection: str, params: Any) -> Any:
  new = dict(variables)
  new[collection] = params
  return type(variables)(new) if not isinstance(variables, dict) else new
