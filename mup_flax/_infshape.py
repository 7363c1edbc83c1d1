"""Infinite and finite dimensions of a parameter (the μP bookkeeping unit).

A dimension is *infinite* when it grows with the model's width (it differs
between the base model and the delta model) and *finite* otherwise. An
:class:`InfShape` is the tuple of :class:`InfDim` of one parameter, plus which
axes are its fan-in and fan-out, since Flax stores kernels as ``(in, out)``
(Dense), ``(..., in, out)`` (Conv) or ``(vocab, features)`` (Embed), while the
PyTorch reference stores ``(out, in)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

__all__ = ["InfDim", "InfShape"]


@dataclasses.dataclass(frozen=True)
class InfDim:
  """One dimension of a parameter: its size and, if it scales with width, its base size.

  Args:
    base_dim: the size of this dimension in the base model when the dimension
      is infinite (scales with width), or ``None`` when it is finite.
    dim: the size of this dimension in the model at hand.

  >>> InfDim(64, 256).width_mult()
  4.0
  >>> InfDim(None, 10).is_infinite(), InfDim(None, 10).width_mult()
  (False, 1.0)
  """

  base_dim: int | None
  dim: int

  def __post_init__(self):
    for name in ("base_dim", "dim"):
      value = getattr(self, name)
      if value is None and name == "base_dim":
        continue
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"InfDim.{name} must be a non-negative int, got {value!r}.")
      object.__setattr__(self, name, int(value))
    if self.base_dim == 0:
      raise ValueError("InfDim.base_dim must be positive for an infinite dimension.")

  def is_infinite(self) -> bool:
    """Whether this dimension scales with width."""
    return self.base_dim is not None

  def width_mult(self) -> float:
    """``dim / base_dim`` for an infinite dimension, ``1.0`` for a finite one."""
    if self.base_dim is None:
      return 1.0
    return self.dim / self.base_dim

  def __repr__(self) -> str:
    if self.base_dim is None:
      return f"FinDim({self.dim})"
    return f"InfDim({self.base_dim}, {self.dim})"


def _normalize_axes(axes: int | Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
  if isinstance(axes, int):
    axes = (axes,)
  normalized = []
  for axis in axes:
    if isinstance(axis, bool) or not isinstance(axis, int):
      raise ValueError(f"{what} must be ints, got {axes!r}.")
    if not -ndim <= axis < ndim:
      raise ValueError(f"{what} {axis} is out of range for a {ndim}-d parameter.")
    normalized.append(axis % ndim)
  if not normalized:
    raise ValueError(f"{what} must name at least one axis.")
  if len(set(normalized)) != len(normalized):
    raise ValueError(f"{what} {tuple(axes)} repeats an axis.")
  return tuple(sorted(normalized))


def _merge_dims(dims: Sequence[InfDim]) -> InfDim:
  """One logical dimension made of several axes (a DenseGeneral fan group)."""
  if len(dims) == 1:
    return dims[0]
  size = math.prod(d.dim for d in dims)
  if not any(d.is_infinite() for d in dims):
    return InfDim(None, size)
  base = math.prod(d.base_dim if d.is_infinite() else d.dim for d in dims)
  return InfDim(base, size)


@dataclasses.dataclass(frozen=True, init=False)
class InfShape:
  """The :class:`InfDim` of every axis of one parameter, with its fan-in/fan-out axes.

  ``InfShape`` is immutable and hashable, so it can ride in pytree auxiliary
  data (Linen boxes, NNX variable metadata) and be closed over by ``jit``.

  Args:
    dims: one :class:`InfDim` per axis of the parameter.
    fan_in_axis: the axis (or axes, for a ``DenseGeneral``/``einsum`` kernel
      whose inputs span several axes) that the parameter contracts with its
      input. Defaults to ``-2``: a Dense kernel ``(in, out)``, a Conv kernel
      ``(..., in, out)``, an Embed table ``(vocab, features)``. Ignored for
      parameters with fewer than two axes.
    fan_out_axis: the output axis (or axes); defaults to ``-1``.

  The number of infinite dimensions ``ninf()`` decides the μP rule. Axes of a
  fan group count as one logical dimension (``(heads, head_dim)`` as fan-out
  is the torch ``Linear`` with ``heads * head_dim`` outputs):

  - 2: matrix-like (hidden weights); ``width_mult()`` is the fan-in's.
  - 1: vector-like (embeddings, biases, norm scales, readout kernels);
    ``width_mult()`` is that dimension's.
  - 0: scalar-like; ``width_mult()`` is 1.

  More than two infinite dimensions, or an infinite axis that is neither a
  fan-in nor a fan-out axis of a kernel with three or more axes, is a
  ``ValueError`` (declare the fan axes of such kernels).

  >>> shape = InfShape([InfDim(64, 256), InfDim(64, 512)])   # Dense kernel (in, out)
  >>> shape.ninf(), shape.width_mult(), shape.fanin_fanout_mult_ratio()
  (2, 4.0, 0.5)
  >>> InfShape([InfDim(64, 256), InfDim(None, 10)]).width_mult()  # readout kernel
  4.0
  >>> InfShape([InfDim(None, 3), InfDim(None, 3), InfDim(None, 3), InfDim(16, 32)]).ninf()
  1
  """

  dims: tuple[InfDim, ...]
  fan_in_axes: tuple[int, ...] | None
  fan_out_axes: tuple[int, ...] | None

  def __init__(
      self,
      dims: Sequence[InfDim],
      *,
      fan_in_axis: int | Sequence[int] = -2,
      fan_out_axis: int | Sequence[int] = -1,
  ):
    dims = tuple(dims)
    for d in dims:
      if not isinstance(d, InfDim):
        raise ValueError(f"InfShape dims must be InfDim, got {d!r}.")
    if len(dims) >= 2:
      fan_in = _normalize_axes(fan_in_axis, len(dims), "fan_in_axis")
      fan_out = _normalize_axes(fan_out_axis, len(dims), "fan_out_axis")
      if set(fan_in) & set(fan_out):
        raise ValueError(
            f"fan_in_axis {fan_in} and fan_out_axis {fan_out} overlap.")
    else:
      fan_in = fan_out = None
    object.__setattr__(self, "dims", dims)
    object.__setattr__(self, "fan_in_axes", fan_in)
    object.__setattr__(self, "fan_out_axes", fan_out)
    self._validate()

  # -- construction helpers -------------------------------------------------

  @classmethod
  def from_sizes(
      cls,
      base_shape: Sequence[int],
      delta_shape: Sequence[int],
      shape: Sequence[int] | None = None,
      **fan_axes,
  ) -> InfShape:
    """The InfShape of a parameter from its base, delta and (target) shapes.

    A dim is infinite iff it differs between base and delta. ``shape``
    defaults to ``base_shape``.

    >>> InfShape.from_sizes((64, 10), (128, 10), (256, 10))
    InfShape((InfDim(64, 256), FinDim(10)))
    """
    base_shape, delta_shape = tuple(base_shape), tuple(delta_shape)
    shape = base_shape if shape is None else tuple(shape)
    if not len(base_shape) == len(delta_shape) == len(shape):
      raise ValueError(
          f"shapes differ in rank: base {base_shape}, delta {delta_shape}, "
          f"target {shape}.")
    dims = []
    for b, d, t in zip(base_shape, delta_shape, shape):
      if b == d:
        if t != b:
          raise ValueError(
              f"a finite dim (same size {b} in base and delta) has size {t} in "
              f"the target: base {base_shape}, delta {delta_shape}, target {shape}.")
        dims.append(InfDim(None, t))
      else:
        dims.append(InfDim(b, t))
    return cls(dims, **fan_axes)

  def with_shape(self, shape: Sequence[int]) -> InfShape:
    """The same infinite/finite layout and base sizes at another (target) shape.

    Raises ``ValueError`` if the rank differs or a finite dim changes size.

    >>> base = InfShape.from_sizes((64, 10), (128, 10))
    >>> base.with_shape((512, 10)).width_mult()
    8.0
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(self.dims):
      raise ValueError(
          f"rank mismatch: base shape {self.base_shape}, target shape {shape}.")
    dims = []
    for d, t in zip(self.dims, shape):
      if not d.is_infinite() and t != d.dim:
        raise ValueError(
            f"a finite dim of size {d.dim} has size {t}: base shape "
            f"{self.base_shape}, target shape {shape} (finite dims are the ones "
            "that do not differ between base and delta).")
      dims.append(InfDim(d.base_dim, t))
    return self._replace_dims(tuple(dims))

  def _replace_dims(self, dims: tuple[InfDim, ...]) -> InfShape:
    return InfShape._from_fields(dims, self.fan_in_axes, self.fan_out_axes)

  @staticmethod
  def _from_fields(dims, fan_in_axes, fan_out_axes) -> InfShape:
    """An InfShape from already normalized fields."""
    new = object.__new__(InfShape)
    object.__setattr__(new, "dims", dims)
    object.__setattr__(new, "fan_in_axes", fan_in_axes)
    object.__setattr__(new, "fan_out_axes", fan_out_axes)
    new._validate()
    return new

  def insert_axis(self, index: int, size: int) -> InfShape:
    """A finite axis of ``size`` inserted at ``index`` (``nn.scan``/``nn.vmap`` stacking)."""
    ndim = len(self.dims) + 1
    index = index % ndim if index < 0 else index
    dims = self.dims[:index] + (InfDim(None, size),) + self.dims[index:]
    if self.fan_in_axes is None:
      # A stacked vector (layers, features) takes the default fan axes; the
      # stacking axis is finite, so ninf and width_mult are unchanged.
      return InfShape(dims)
    shift = lambda axes: tuple(a + (a >= index) for a in axes)
    return InfShape._from_fields(dims, shift(self.fan_in_axes), shift(self.fan_out_axes))

  def remove_axis(self, index: int) -> InfShape:
    """The inverse of :meth:`insert_axis`: drops the (finite) axis ``index``."""
    ndim = len(self.dims)
    index = index % ndim
    if self.dims[index].is_infinite():
      raise ValueError(f"cannot remove infinite axis {index} of {self}.")
    dims = self.dims[:index] + self.dims[index + 1:]
    if len(dims) < 2 or self.fan_in_axes is None:
      return InfShape(dims)
    if index in self.fan_in_axes + self.fan_out_axes:
      return InfShape(dims)
    unshift = lambda axes: tuple(a - (a > index) for a in axes)
    return InfShape(
        dims, fan_in_axis=unshift(self.fan_in_axes),
        fan_out_axis=unshift(self.fan_out_axes))

  # -- validation -------------------------------------------------------------

  def _other_axes(self) -> tuple[int, ...]:
    if self.fan_in_axes is None:
      return tuple(range(len(self.dims)))
    fan = set(self.fan_in_axes) | set(self.fan_out_axes)
    return tuple(i for i in range(len(self.dims)) if i not in fan)

  def _validate(self):
    raw = sum(d.is_infinite() for d in self.dims)
    if self.ninf() > 2:
      raise ValueError(
          f"{self} has {self.ninf()} infinite dims; μP is defined for at most two "
          "(declare fan_in/fan_out axes to group the axes of a DenseGeneral kernel).")
    if self.fan_in_axes is not None and len(self.dims) > 2 and raw:
      stray = [i for i in self._other_axes() if self.dims[i].is_infinite()]
      if stray:
        raise ValueError(
            f"{self} has infinite axes {stray} that are neither fan-in axes "
            f"{self.fan_in_axes} nor fan-out axes {self.fan_out_axes}: declare the "
            "fan axes of this kernel (see mup_flax.with_fan_axes).")

  # -- μP quantities ------------------------------------------------------------

  @property
  def shape(self) -> tuple[int, ...]:
    """The parameter's shape."""
    return tuple(d.dim for d in self.dims)

  @property
  def base_shape(self) -> tuple[int, ...]:
    """The parameter's shape in the base model (finite dims keep their size)."""
    return tuple(d.dim if d.base_dim is None else d.base_dim for d in self.dims)

  @property
  def ndim(self) -> int:
    return len(self.dims)

  def _logical_dims(self) -> list[InfDim]:
    if self.fan_in_axes is None:
      return list(self.dims)
    return ([self.dims[i] for i in self._other_axes()]
            + list(self.fanin_fanout()))

  def ninf(self) -> int:
    """Number of infinite (logical) dimensions: 2 matrix-like, 1 vector-like, 0 scalar-like."""
    return sum(d.is_infinite() for d in self._logical_dims())

  def main_dim(self) -> InfDim | None:
    """The dimension whose width multiplier is the parameter's, or ``None`` if none is infinite.

    Fan-in if infinite, else fan-out if infinite, else the one infinite axis
    (the reference's "last infinite dim" in PyTorch's ``(out, in)`` layout).
    """
    if self.fan_in_axes is not None:
      fan_in, fan_out = self.fanin_fanout()
      if fan_in.is_infinite():
        return fan_in
      if fan_out.is_infinite():
        return fan_out
    for i in reversed(self._other_axes()):
      if self.dims[i].is_infinite():
        return self.dims[i]
    return None

  def width_mult(self) -> float:
    """The parameter's width multiplier (fan-in's for matrix-like, 1.0 for scalar-like)."""
    main = self.main_dim()
    return 1.0 if main is None else main.width_mult()

  def fanin_fanout(self) -> tuple[InfDim, InfDim]:
    """``(fan_in, fan_out)`` as :class:`InfDim` (fan groups merged into one dim)."""
    if self.fan_in_axes is None:
      raise ValueError(f"fan_in/fan_out are undefined for the {len(self.dims)}-d {self}.")
    return (_merge_dims([self.dims[i] for i in self.fan_in_axes]),
            _merge_dims([self.dims[i] for i in self.fan_out_axes]))

  def fanin_fanout_mult_ratio(self) -> float:
    """``fan_in.width_mult() / fan_out.width_mult()`` (MuSGD's matrix-like rule)."""
    fan_in, fan_out = self.fanin_fanout()
    return fan_in.width_mult() / fan_out.width_mult()

  def __repr__(self) -> str:
    dims = ", ".join(map(repr, self.dims))
    if len(self.dims) == 1:
      dims += ","
    axes = ""
    if self.fan_in_axes is not None and (
        self.fan_in_axes != (len(self.dims) - 2,)
        or self.fan_out_axes != (len(self.dims) - 1,)):
      axes = f", fan_in_axis={self.fan_in_axes}, fan_out_axis={self.fan_out_axes}"
    return f"InfShape(({dims}){axes})"
