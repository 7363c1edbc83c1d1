"""The scalar bookkeeping of Schedule-Free: the learning rate at step k, lr_max and the averaging weights.

Everything here works on scalars once per step. The weights follow the reference
(Defazio et al., 2024, and the PyTorch ``schedulefree`` package)::

    lr_max = max(lr, lr_max)
    weight = (k + 1)**r * lr_max**weight_lr_power
    weight_sum += weight
    c = weight / weight_sum        (0 while weight_sum is 0)

The reference sums in Python float64. We keep the sum in float32 or wider and
make it compensated (Kahan): a plain float32 sum of a million nearly equal weights
loses about three digits, which turns ``c`` and hence the average x into
something else; the compensated sum keeps ``c`` within a few float32 ulps of the
float64 value over any run length.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sf_optax import _validation


def float32_or_wider(*dtypes: Any) -> jnp.dtype:
  """float32, or float64 when any of ``dtypes`` is float64: never lower than float32.

  The dtype of the scalar bookkeeping and of all arithmetic inside a step: bf16
  rounds b2 = 0.999 to 1 and b1 = 0.9 to 0.898, so low-precision buffers are
  only ever storage.
  """
  result = jnp.dtype(jnp.float32)
  for dtype in dtypes:
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
      result = jnp.promote_types(result, dtype)
  return result


def warmup_factor(count: jax.Array, warmup_steps: Any, dtype: Any) -> jax.Array:
  """Linear warmup (k+1)/warmup_steps for k < warmup_steps, then 1.

  ``count`` is k, the number of steps already taken: the first step uses
  1/warmup_steps, as the reference does (the Optax peer is one step behind here).
  """
  step = (count + 1).astype(dtype)
  steps = jnp.maximum(jnp.asarray(warmup_steps, dtype), 1)
  return jnp.minimum(step / steps, 1).astype(dtype)


def learning_rate_at(
    learning_rate: optax.ScalarOrSchedule,
    count: jax.Array,
    dtype: Any,
    *,
    warmup_steps: Any = 0,
    factor: Optional[Callable[[jax.Array, Any], jax.Array]] = None,
) -> jax.Array:
  """The learning rate of step k: schedule(k) * warmup(k) * factor(k).

  The one place where it is computed: the z-step moves by it, and it feeds
  lr_max, the averaging weights and the weight decay.

  Args:
    learning_rate: a number or an Optax schedule (a function of k).
    count: k, the number of steps already taken (int32 scalar).
    dtype: the dtype of the result (that of the bookkeeping).
    warmup_steps: the length of the linear warmup; 0 for none.
    factor: a z-step's own factor ``(count, dtype) -> scalar``: the paper
      variant's sqrt(1 - b2^k), RAdam's rectification.

  Returns:
    A scalar of ``dtype``.
  """
  value = learning_rate(count) if callable(learning_rate) else learning_rate
  lr = jnp.asarray(value).astype(dtype)
  if not _validation.is_zero(warmup_steps):
    lr = lr * warmup_factor(count, warmup_steps, dtype)
  if factor is not None:
    lr = lr * factor(count, dtype)
  return lr


def bias_correction(decay: Any, count: jax.Array, dtype: Any) -> jax.Array:
  """1 - decay**(k+1), computed without cancellation.

  ``1 - b2**t`` loses all but a few digits in float32 on the first steps
  (b2 = 0.999 gives 1e-3); ``-expm1(t * log(b2))`` is exact to a few ulps, and
  ``log1p(b2 - 1)`` is log(b2) without rounding since b2 - 1 is exact for b2 in
  [0.5, 1].
  """
  decay = jnp.asarray(decay, dtype)
  step = (count + 1).astype(dtype)
  return -jnp.expm1(step * jnp.log1p(decay - 1))


class Averaging(NamedTuple):
  """The outcome of one step of bookkeeping."""

  c: jax.Array  # [] weight of the new z in the average x
  weight_sum: jax.Array  # [] updated sum of weights, in units of 2**weight_exponent(k+1, lr_max)
  weight_sum_compensation: jax.Array  # [] Kahan compensation of weight_sum, same units
  lr_max: jax.Array  # [] updated largest learning rate


def _bits_type(dtype: Any) -> jnp.dtype:
  """The signed integer type of ``dtype``'s width."""
  return jnp.dtype(f"int{jnp.finfo(dtype).bits}")


def _frexp(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``jnp.frexp`` of x >= 0 read off the bit pattern: m in [0.5, 1), e as a float.

  The same values as ``jnp.frexp`` (0 and non-finite x give (x, 0); subnormals are
  normalized first) in fewer operations: every Schedule-Free step compiles four.
  """
  info = jnp.finfo(x.dtype)
  subnormal = x < info.smallest_normal
  bits = lax.bitcast_convert_type(
      jnp.where(subnormal, x * 2.0**info.nmant, x), _bits_type(x.dtype))
  half = info.maxexp - 2  # the biased exponent of [0.5, 1)
  exponent = (bits >> info.nmant) - jnp.where(subnormal, half + info.nmant, half)
  mantissa = lax.bitcast_convert_type(
      (bits & ((1 << info.nmant) - 1)) | (half << info.nmant), x.dtype)
  special = (x == 0) | ~jnp.isfinite(x)
  return jnp.where(special, x, mantissa), jnp.where(special, 0, exponent).astype(x.dtype)


def _power_of_two(k: jax.Array, dtype: Any) -> jax.Array:
  """2**k, exactly, for integer k in [minexp, maxexp) of ``dtype``."""
  info = jnp.finfo(dtype)
  biased = k.astype(_bits_type(dtype)) + (info.maxexp - 1)
  return lax.bitcast_convert_type(biased << info.nmant, dtype)


def _scale_down(x: jax.Array, shift: jax.Array) -> jax.Array:
  """x * 2**shift in two exact products, for integer shift < maxexp.

  ``jnp.ldexp``'s value in a third of its operations: ``jnp.ldexp`` handles any
  shift, and the shift of the weight sum is never positive (the weights never
  decrease).
  """
  lowest = jnp.finfo(x.dtype).minexp
  first = jnp.maximum(shift, lowest)
  second = jnp.maximum(shift - first, lowest)
  return x * _power_of_two(first, x.dtype) * _power_of_two(second, x.dtype)


def _power_split(base: jax.Array, power: Any) -> tuple[jax.Array, jax.Array]:
  """base**power as (mantissa, exponent): mantissa * 2**exponent, neither over- nor underflowing.

  With base = m * 2**e (exact, m in [0.5, 1)), base**power =
  m**power * 2**(power*e - n) * 2**n with n = floor(power * e): the mantissa
  lies in [2**-power, 2) and n is an exact integer computed from exact inputs,
  so the same (base, power) gives the same n on every step. A whole power
  known in Python (the defaults r = 0, weight_lr_power = 2) needs neither the
  floor nor the exp2: n = power * e.
  """
  m, e = _frexp(base)
  if _validation.is_concrete(power) and float(power).is_integer():
    if float(power) == 0:
      return jnp.ones_like(m), jnp.zeros_like(e)
    return jnp.power(m, jnp.asarray(power, base.dtype)), float(power) * e
  power = jnp.asarray(power, base.dtype)
  scaled = power * e
  n = jnp.floor(scaled)
  return jnp.power(m, power) * jnp.exp2(scaled - n), n


def weight_exponent_and_mantissa(step: jax.Array, lr_max: jax.Array, r: Any, weight_lr_power: Any):
  """(k+1)**r * lr_max**p as (mantissa in [2**-(r+p), 4), integer exponent E)."""
  mantissa_step, exponent_step = _power_split(step, r)
  mantissa_lr, exponent_lr = _power_split(lr_max, weight_lr_power)
  return mantissa_step * mantissa_lr, exponent_step + exponent_lr


def averaging_step(
    count: jax.Array,
    learning_rate: jax.Array,
    lr_max: jax.Array,
    weight_sum: jax.Array,
    weight_sum_compensation: jax.Array,
    *,
    r: Any,
    weight_lr_power: Any,
) -> Averaging:
  """One step of the reference's averaging weights, with a compensated, rescaled sum.

  The weight (k+1)**r * lr_max**p leaves float32's range for long runs or
  large powers ((k+1)**8 overflows after 65k steps; (1e-3)**16 underflows), yet
  only ratios of weights matter (c = weight / sum). So the sum is kept in units
  of 2**E, E the exponent of the latest weight: each step rescales it by an
  exact power of two (the weights never decrease, so E never does) and adds
  the new weight's mantissa. Powers of two scale without rounding, so the
  compensated (Kahan) sum keeps c within a few float32 ulps of the float64
  value, for r <= 10 and p <= 16 over 10**8 steps.

  Args:
    count: k, steps taken before this one (int32 scalar).
    learning_rate: this step's learning rate (after warmup and any rectification).
    lr_max: the largest learning rate of earlier steps.
    weight_sum: the sum of earlier weights, in units of 2**E of the last weight.
    weight_sum_compensation: the Kahan compensation of ``weight_sum``.
    r: the polynomial weighting power.
    weight_lr_power: the power of lr_max in the weights.

  Returns:
    The interpolation coefficient c and the new bookkeeping.
  """
  dtype = weight_sum.dtype
  previous_lr_max = lr_max.astype(dtype)
  lr_max = jnp.maximum(previous_lr_max, learning_rate.astype(dtype))
  _, previous_exponent = weight_exponent_and_mantissa(
      count.astype(dtype), previous_lr_max, r, weight_lr_power
  )
  weight, exponent = weight_exponent_and_mantissa(
      (count + 1).astype(dtype), lr_max, r, weight_lr_power
  )
  # Before the first weight the sum is 0 whatever its units.
  shift = jnp.where(weight_sum == 0, 0, previous_exponent - exponent).astype(jnp.int32)
  weight_sum = _scale_down(weight_sum, shift)
  weight_sum_compensation = _scale_down(weight_sum_compensation, shift)
  # Kahan summation: `compensation` holds the low-order part lost so far.
  corrected = weight - weight_sum_compensation
  total = weight_sum + corrected
  compensation = (total - weight_sum) - corrected
  # c = weight / total, 0 while the total is 0. Selecting before dividing gives the
  # same value, and makes the division the last operation: XLA computes an
  # expensive scalar once, where it copies a cheap one (the select) into every
  # leaf's kernel (thousands of leaves: that much more to compile).
  positive = total > 0
  c = jnp.where(positive, weight, 0) / jnp.where(positive, total, 1)
  return Averaging(
      c=c.astype(dtype),
      weight_sum=total.astype(dtype),
      weight_sum_compensation=compensation.astype(dtype),
      lr_max=lr_max.astype(dtype),
  )
