"""μP's attention logit scale (the 1/d rule), for Linen and NNX alike."""

from __future__ import annotations

import math

__all__ = ["attention_scale"]


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
