"""What a μP layer may know about its own parameters while a model is initialized.

Linen readouts need their kernel's width multiplier in the forward pass. After
annotation it rides on the parameter box; while :class:`mup_flax.MuP` runs
``init`` (before any box exists) it comes from here.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

_SHAPE_ONLY = contextvars.ContextVar("mup_flax_shape_only", default=False)
_INIT_INFSHAPES = contextvars.ContextVar("mup_flax_init_infshapes", default=None)


@contextlib.contextmanager
def shape_only():
  """Inside, layers may run without base shapes: only output shapes matter (eval_shape)."""
  token = _SHAPE_ONLY.set(True)
  try:
    yield
  finally:
    _SHAPE_ONLY.reset(token)


@contextlib.contextmanager
def init_infshapes(flat: dict[tuple[str, ...], Any]):
  """Inside, layers look up their parameters' InfShape by path in ``flat``."""
  token = _INIT_INFSHAPES.set(flat)
  try:
    yield
  finally:
    _INIT_INFSHAPES.reset(token)


def is_shape_only() -> bool:
  return _SHAPE_ONLY.get()


def lookup(path: tuple[str, ...]) -> Any:
  flat = _INIT_INFSHAPES.get()
  return None if flat is None else flat.get(path)
