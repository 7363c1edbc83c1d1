"""One constructor: a z-step plus the common settings is a Schedule-Free optimizer.

Every public factory (the built-ins, Adan, the wrapper) takes the same common
keywords, documented once here. A factory is written as::

    @_family.member
    def schedule_free_adamw(learning_rate=0.0025, *, b2=0.999, eps=1e-8, **common):
      \"\"\"... Args: its own arguments, then the line COMMON_SETTINGS ...\"\"\"
      _validation.check_decay("b2", b2)
      return _family.optimizer(
          _z_steps.adamw(b2, eps), learning_rate, common, owner="schedule_free_adamw")

``member`` gives it the full signature (``inspect.signature``, ``help`` and
``optax.inject_hyperparams`` see every keyword and its default) and the shared
Args text; ``optimizer`` checks the keywords and builds the engine.
"""

from __future__ import annotations

import inspect
import textwrap
from typing import Any, Callable, Mapping

import optax

from sf_optax import _schedule_free
from sf_optax import _validation
from sf_optax._schedule_free import Settings
from sf_optax._z_steps import ZStep

COMMON_SETTINGS_DOC = """\
b1: interpolation between x and z (Schedule-Free's momentum), in (0, 1].
weight_decay: decoupled weight decay, scaled by the learning rate.
weight_decay_at: where the decay is evaluated: "y" (the reference's default,
  the gradient point) or "z" (the base iterate; the reference's
  AdamWScheduleFreeReference with ``decay_at_z``). See the README.
mask: which params decay: a bool, a tree of bools matching the params (or a
  prefix of it), or a function of params returning one (matched as by
  :func:`per_parameter_values`).
lr_scales: per-parameter multipliers of the learning rate (Python floats, given
  like ``mask``), like torch parameter groups; the averaging weights stay
  global. For μP: ``mup_flax.schedule_free_scales``.
weight_decay_scales: per-parameter multipliers of ``weight_decay`` (given like
  ``mask``).
warmup_steps: linear warmup (k+1)/warmup_steps of the learning rate (k counts
  from 0).
r: polynomial weighting power of the average, in [0, 10].
weight_lr_power: power of the largest learning rate in the averaging weights,
  in [0, 16].
state_dtype: dtype of z, x and the z-step's buffers. None (default): the
  params' dtype but at least float32, so bf16/float16 params get a float32
  state (4 bytes per entry and buffer, twice the params' size); pass
  ``jnp.bfloat16`` to keep a half-precision state knowingly.
store_x: keep x in the state (default: exact and free evaluation, robust to
  low-precision params, one more params-sized buffer) or reconstruct it as
  (y - (1 - b1) z) / b1 (the state then holds z alone, like the reference).
"""

_COMMON = tuple(name for name in Settings._fields if name != "learning_rate")
_MARKER = "COMMON_SETTINGS"


def _common_parameters() -> list[inspect.Parameter]:
  return [
      inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=Settings._field_defaults[name])
      for name in _COMMON
  ]


def _with_common_doc(doc: str) -> str:
  for line in doc.splitlines():
    if line.strip() == _MARKER:
      indent = line[: len(line) - len(line.lstrip())]
      return doc.replace(line, textwrap.indent(COMMON_SETTINGS_DOC, indent).rstrip("\n"))
  raise ValueError(f"the docstring has no line {_MARKER}")


def member(factory: Callable[..., Any]) -> Callable[..., Any]:
  """Gives a factory ``f(..., **common)`` the common keywords' signature and docs."""
  signature = inspect.signature(factory)
  own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
  factory.__signature__ = signature.replace(parameters=own + _common_parameters())
  factory.__doc__ = _with_common_doc(factory.__doc__)
  return factory


def settings(learning_rate: optax.ScalarOrSchedule, common: Mapping[str, Any], owner: str) -> Settings:
  """The validated settings from a factory's common keywords."""
  unknown = sorted(set(common) - set(_COMMON))
  if unknown:
    raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
  result = Settings(learning_rate=learning_rate, **common)
  _validation.check_settings(result)
  return result


def optimizer(
    z_step: ZStep,
    learning_rate: optax.ScalarOrSchedule,
    common: Mapping[str, Any],
    *,
    owner: str,
) -> optax.GradientTransformationExtraArgs:
  """The Schedule-Free optimizer of ``z_step`` with the common settings.

  Args:
    z_step: how z moves (``_z_steps``).
    learning_rate: a number or an Optax schedule.
    common: the common keywords the caller was given (absent ones take their
      defaults).
    owner: the public factory's name, for errors.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a
    :class:`ScheduleFreeState`.
  """
  return _schedule_free.schedule_free_transform(z_step, settings(learning_rate, common, owner))
