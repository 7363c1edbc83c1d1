"""Parameter paths: one spelling for every pytree container (dict, FrozenDict, nnx.State)."""

from __future__ import annotations

from typing import Any


Path = tuple[str, ...]


def key_name(key: Any) -> str:
  """The plain name of one pytree key (dict key, attribute, sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def normalize(path: Any) -> Path:
  return tuple(key_name(k) for k in path)


def path_str(path: Path) -> str:
  """``'params/Dense_0/kernel'`` style, the spelling used in errors and files."""
  return "/".join(path) if path else "<root>"
