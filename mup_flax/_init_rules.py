"""μP's init corrections, in one place: the rules, the planner, and the initializers.

:func:`plan` decides, for every parameter of a model being annotated (Linen by
:func:`mup_flax.set_base_shapes` / :class:`mup_flax.MuP`, NNX by
:func:`mup_flax.nnx.set_base_shapes`), its InfShape and the factor its
initial value is multiplied by. A parameter whose initializer comes from
:mod:`mup_flax.init` declares an :class:`InitRule`; the others follow the rules
for Flax's default initializers written in :func:`plan`.

Each initializer here samples exactly what its Flax namesake samples, and
declares how its standard deviation must change with width. When the
parameter is annotated (:class:`mup_flax.MuP`, :func:`mup_flax.set_base_shapes`,
:func:`mup_flax.nnx.set_base_shapes`) the sample is multiplied by
:meth:`InitRule.std_mult` of its :class:`InfShape`, which is 1 at base shape:
the result equals Flax's initializer there and keeps μP's scaling elsewhere.
Called with ``infshape=...`` an initializer returns the width-correct array
directly.

The rules are those of the reference ``mup.init`` (Tensor Programs V):

- ``normal``, ``uniform``, ``truncated_normal`` (a width-independent std):
  matrix-like parameters get ``std / sqrt(width_mult)``; others keep ``std``.
- ``variance_scaling`` with ``mode="fan_in"`` (``lecun_*``, ``he_*``/
  ``kaiming_*``): vector-like parameters get the base fan-in's variance
  (``sqrt(fan_in_mult)``); matrix-like ones keep ``1/fan_in`` (already μP).
- ``mode="fan_out"``: vector-like ``* sqrt(fan_out_mult)``; matrix-like
  ``* sqrt(fan_out_mult / fan_in_mult)``.
- ``mode="fan_avg"`` (``glorot_*``/``xavier_*``): ``* sqrt((fan_in + fan_out) /
  (base_fan_in + base_fan_out))``, and ``/ sqrt(fan_in_mult)`` if matrix-like.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mup_flax import _base_shapes
from mup_flax import _metadata
from mup_flax._infshape import InfShape
from mup_flax._metadata import Path
from sf_optax import parameter_path_name


_MODES = ("fan_in", "fan_out", "fan_avg")


@dataclasses.dataclass(frozen=True)
class InitRule:
  """How an initializer's standard deviation scales with width.

  Attributes:
    kind: ``"constant_std"`` (a std that does not depend on shape), one of
      ``"fan_in"``, ``"fan_out"``, ``"fan_avg"`` (``variance_scaling``), or
      ``"flax_embed"`` (Flax's default ``nn.Embed``/``nnx.Embed`` init, whose
      std ``1/sqrt(features)`` must become ``1/sqrt(base_features)``).
    zero_mean: whether the distribution has mean zero (``uniform(scale)``
      samples ``[0, scale)``: not zero-mean, so undefined for matrix-like
      parameters, as in the reference).
  """

  kind: str
  zero_mean: bool = True

  def std_mult(self, infshape: InfShape, name: str = "parameter") -> float:
    """The factor turning the standard sample into the width-correct one."""
    ninf = infshape.ninf()
    if self.kind == "constant_std":
      if ninf == 2:
        if not self.zero_mean:
          raise ValueError(
              f"{name} is matrix-like (two infinite dims) but its initializer is "
              "not zero-mean (uniform(scale) samples [0, scale)); use a symmetric "
              "initializer for hidden weights.")
        return infshape.width_mult() ** -0.5
      return 1.0
    if self.kind == "flax_embed":
      return infshape.width_mult() ** 0.5 if ninf == 1 else 1.0
    if ninf == 0:
      return 1.0
    fan_in, fan_out = infshape.fanin_fanout()
    if self.kind == "fan_in":
      return 1.0 if ninf == 2 else fan_in.width_mult() ** 0.5
    if self.kind == "fan_out":
      if ninf == 2:
        return (fan_out.width_mult() / fan_in.width_mult()) ** 0.5
      return fan_out.width_mult() ** 0.5
    if self.kind == "fan_avg":
      base = lambda d: d.dim if d.base_dim is None else d.base_dim
      mult = ((fan_in.dim + fan_out.dim) / (base(fan_in) + base(fan_out))) ** 0.5
      if ninf == 2:
        mult /= fan_in.width_mult() ** 0.5
      return mult
    raise ValueError(f"unknown InitRule kind {self.kind!r}.")


FLAX_EMBED = InitRule("flax_embed")


@dataclasses.dataclass(frozen=True)
class Facts:
  """What annotation needs to know about one parameter, whatever carries it."""

  shape: tuple[int, ...]
  declarations: dict
  annotated: bool  # already carries an InfShape: never rescaled again
  abstract: bool  # a jax.ShapeDtypeStruct: there is no value to rescale


_READOUT_ADVICE = (
    "make this layer a mup_flax.MuReadout (Linen) / mup_flax.nnx.MuReadout (NNX), whose "
    "forward pass divides by width_mult, or make its output dimension scale with width "
    "too. (If its fan axes are not (-2, -1), declare them with mup_flax.with_fan_axes. "
    "Parameters restored as plain arrays have lost the MuReadout marker: annotate them "
    "with MuP(...).annotate(params, x) or restore into the annotated abstract tree "
    "jax.eval_shape(MuP(...).init, key, x).)")


def _check_readouts(infshapes: Mapping[Path, InfShape], facts: Mapping[Path, Facts]) -> None:
  """A kernel from width to a fixed size must be a readout (it needs 1/width_mult)."""
  for path, infshape in infshapes.items():
    if (path[-1] != "kernel" or infshape.ndim < 2
        or facts[path].declarations.get(_metadata.ROLE) == _metadata.READOUT):
      continue
    fan_in, fan_out = infshape.fanin_fanout()
    if fan_in.is_infinite() and not fan_out.is_infinite():
      raise ValueError(
          f"parameter {parameter_path_name(path)} {infshape} maps a width-sized input to a "
          f"fixed-size output but is not a readout: {_READOUT_ADVICE}")


def _check_rescale_choice(facts: Mapping[Path, Facts], caller: str) -> None:
  """``rescale_params`` has no default where a value could be rescaled a second time."""
  for path, f in facts.items():
    if not f.annotated and not f.abstract:
      raise ValueError(
          f"{caller}: parameter {parameter_path_name(path)} carries no μP annotation, so it cannot "
          "tell a fresh value from one that is μP-initialized already: pass "
          "rescale_params=True for freshly initialized parameters (applies μP's init "
          "corrections once) or rescale_params=False for values that are μP-initialized "
          "already (restored from a checkpoint, unboxed with nn.unbox, copied from "
          "another model), which would otherwise be rescaled a second time.")


def _std_mult(path: Path, infshape: InfShape, declarations: dict,
              infshapes: Mapping[Path, InfShape]) -> float:
  """The init correction of one parameter (1 when nothing changes)."""
  rule = declarations.get(_metadata.INIT_RULE)
  if rule is not None:
    return rule.std_mult(infshape, parameter_path_name(path))
  readout = declarations.get(_metadata.ROLE) == _metadata.READOUT
  kernel = infshapes.get(path[:-1] + ("kernel",))
  if readout and path[-1] == "bias" and kernel is not None:
    return math.sqrt(kernel.width_mult())
  if readout:
    return math.sqrt(infshape.width_mult())
  if path[-1] == "bias" and kernel is not None and kernel.ndim >= 2:
    return math.sqrt(kernel.fanin_fanout()[0].width_mult())
  if path[-1] == "embedding":
    return FLAX_EMBED.std_mult(infshape, parameter_path_name(path))
  return 1.0


def plan(facts: Mapping[Path, Facts], base_shapes: Any, rescale_params: bool | None,
         caller: str) -> dict[Path, tuple[InfShape, float]]:
  """``{path: (InfShape, init std multiplier)}``: the one place the μP init rules live.

  The target's InfShapes are computed here, once. Rules for parameters that
  do not declare an initializer (``mup_flax.init``), written for Flax's
  defaults:

  - a readout kernel (``MuReadout``) and its bias: ``* sqrt(width_mult)``, which
    with the readout's ``1/width_mult`` forward multiplier keeps the logits'
    scale (the reference's MuReadout rescale);
  - another ``bias`` next to a ``kernel`` (Dense, Conv, DenseGeneral):
    ``* sqrt(fan_in_mult)`` of that kernel (zero for Flax's zero init);
  - an ``embedding`` table (``nn.Embed``/``nnx.Embed``): Flax's default std
    ``1/sqrt(features)`` becomes ``1/sqrt(base_features)``;
  - everything else (hidden kernels: ``lecun_normal`` is already μP; input
    kernels; norm scales): unchanged.

  Parameters that carry an InfShape already are never rescaled. With
  ``rescale_params=None`` (no choice made), a parameter that carries none and
  has a value is an error naming ``caller``.
  """
  infshapes = _base_shapes.target_infshapes(
      {path: f.shape for path, f in facts.items()}, base_shapes)
  _check_readouts(infshapes, facts)
  if rescale_params is None:
    _check_rescale_choice(facts, caller)
  return {
      path: (infshape,
             _std_mult(path, infshape, facts[path].declarations, infshapes)
             if rescale_params and not facts[path].annotated else 1.0)
      for path, infshape in infshapes.items()
  }


def scale(array: Any, mult: float) -> Any:
  """``array * mult`` in ``array``'s dtype; the identity when ``mult == 1``."""
  if mult == 1.0 or isinstance(array, jax.ShapeDtypeStruct):
    return array
  return (array * jnp.asarray(mult, array.dtype)).astype(array.dtype)


def _declared(flax_init, rule: InitRule):
  """Flax's initializer, declaring ``rule``; with ``infshape=`` it applies it at once."""
  tagged = _metadata.declare(flax_init, **{_metadata.INIT_RULE: rule})

  def init(key, shape, dtype=None, *, infshape: InfShape | None = None):
    args = (key, shape) if dtype is None else (key, shape, dtype)
    if infshape is None:
      return tagged(*args)
    if tuple(shape) != infshape.shape:
      raise ValueError(f"shape {tuple(shape)} does not match {infshape}.")
    value = flax_init(*args)
    return value * jnp.asarray(rule.std_mult(infshape), value.dtype)

  init.rule = rule
  init.__doc__ = flax_init.__doc__
  return init


def variance_scaling(scale: float, mode: str, distribution: str, in_axis=-2,
                     out_axis=-1, batch_axis=(), dtype=jnp.float32):
  """Width-correct ``jax.nn.initializers.variance_scaling``.

  ``in_axis``/``out_axis`` describe Flax's fan computation as usual; the μP
  correction uses the parameter's :class:`InfShape` fan axes (the defaults
  agree for Dense and Conv kernels).

  >>> import jax
  >>> from mup_flax import InfShape
  >>> init = variance_scaling(1.0, "fan_in", "normal")
  >>> readout = InfShape.from_sizes((64, 10), (128, 10), (256, 10))
  >>> float(init(jax.random.key(0), (256, 10), infshape=readout).std()) > 0.1
  True
  """
  if mode not in _MODES:
    raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
  flax_init = jax.nn.initializers.variance_scaling(
      scale, mode, distribution, in_axis=in_axis, out_axis=out_axis,
      batch_axis=batch_axis, dtype=dtype)
  return _declared(flax_init, InitRule(mode))


def normal(stddev: float = 1e-2, dtype=jnp.float32):
  """Width-correct ``jax.nn.initializers.normal``: ``stddev / sqrt(width_mult)`` for matrix-like.

  >>> import jax
  >>> from mup_flax import InfShape
  >>> hidden = InfShape.from_sizes((64, 64), (128, 128), (256, 256))
  >>> x = normal(1.0)(jax.random.key(0), (256, 256), infshape=hidden)
  >>> round(float(x.std()), 1)
  0.5
  """
  return _declared(jax.nn.initializers.normal(stddev, dtype), InitRule("constant_std"))


def truncated_normal(stddev: float = 1e-2, dtype=jnp.float32, lower=-2.0, upper=2.0):
  """Width-correct ``jax.nn.initializers.truncated_normal`` (bounds in units of std).

  >>> import jax
  >>> from mup_flax import InfShape
  >>> readout = InfShape.from_sizes((64, 10), (128, 10), (512, 10))  # vector-like: unchanged
  >>> x = truncated_normal(0.02)(jax.random.key(0), (512, 10), infshape=readout)
  >>> bool((x == jax.nn.initializers.truncated_normal(0.02)(jax.random.key(0), (512, 10))).all())
  True
  """
  return _declared(
      jax.nn.initializers.truncated_normal(stddev, dtype, lower, upper),
      InitRule("constant_std"))


def uniform(scale: float = 1e-2, dtype=jnp.float32):
  """Width-correct ``jax.nn.initializers.uniform`` (``[0, scale)``; not for matrix-like).

  >>> import jax
  >>> from mup_flax import InfShape
  >>> gain = InfShape.from_sizes((64,), (128,), (512,))
  >>> uniform(1.0)(jax.random.key(0), (512,), infshape=gain).shape
  (512,)
  """
  return _declared(jax.nn.initializers.uniform(scale, dtype),
                   InitRule("constant_std", zero_mean=False))


_NAMED_DOC = """Width-correct ``jax.nn.initializers.{name}`` ({what}).

  Equal to Flax's at base shape; see :mod:`mup_flax.init` for the rule.

  >>> import jax, jax.numpy as jnp
  >>> from mup_flax import InfShape
  >>> at_base = InfShape.from_sizes((64, 64), (128, 128))
  >>> ours = {name}()(jax.random.key(0), (64, 64), jnp.float32, infshape=at_base)
  >>> flax = jax.nn.initializers.{name}()(jax.random.key(0), (64, 64), jnp.float32)
  >>> bool((ours == flax).all())
  True
  """


def _named(name, scale, mode, distribution, what):
  def factory(in_axis=-2, out_axis=-1, batch_axis=(), dtype=jnp.float32):
    return variance_scaling(scale, mode, distribution, in_axis, out_axis,
                            batch_axis, dtype)
  factory.__name__ = factory.__qualname__ = name
  factory.__doc__ = _NAMED_DOC.format(name=name, what=what)
  return factory


lecun_normal = _named("lecun_normal", 1.0, "fan_in", "truncated_normal",
                      "Flax's Dense default; fan_in mode")
lecun_uniform = _named("lecun_uniform", 1.0, "fan_in", "uniform", "fan_in mode")
he_normal = _named("he_normal", 2.0, "fan_in", "truncated_normal", "fan_in mode")
he_uniform = _named("he_uniform", 2.0, "fan_in", "uniform", "fan_in mode")
glorot_normal = _named("glorot_normal", 1.0, "fan_avg", "truncated_normal", "fan_avg mode")
glorot_uniform = _named("glorot_uniform", 1.0, "fan_avg", "uniform", "fan_avg mode")
# The same functions under their other names, as in jax.nn.initializers.
kaiming_normal = he_normal
kaiming_uniform = he_uniform
xavier_normal = glorot_normal
xavier_uniform = glorot_uniform
