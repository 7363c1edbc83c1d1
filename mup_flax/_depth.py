r"""Depth-μP and CompleteP: hyperparameters that transfer across the number of blocks.

μP makes the optimum learning rate independent of width. Depth needs its own
rules (Yang et al., 2023; Bordelon et al., 2023; Dey et al., 2025). With
:math:`L` residual blocks, a base depth :math:`L_0` (the depth the
hyperparameters were tuned at, declared like the base width) and
:math:`m_L = L / L_0`:

=============================  ===========================  =====================
what                           rule                         with μP (width)
=============================  ===========================  =====================
residual branch                ``x + m_L^-α * block(x)``     unchanged
Adam lr, params in the blocks  ``lr * m_L^(α-1)``           times ``1/m_N`` (hidden)
Adam eps, params in the blocks ``eps * m_L^-α``             times ``1/m_N``
everything else                unchanged                    μP's rules
=============================  ===========================  =====================

with :math:`\alpha = 1/2` (depth-μP, Yang et al.) or :math:`\alpha = 1`
(CompleteP, Dey et al.: the lr of the blocks then does not change with depth,
and every block keeps learning non-linear features). "Params in the blocks"
means every parameter inside the residual branches: weights, biases and norm
gains, as in the CompleteP reference code; the embeddings, the final norm and
the readout are outside. Initialization does not change with depth (no
GPT-2-style ``1/sqrt(2L)`` on the output projections): the branch multiplier
does that job. The decoupled weight decay of the blocks scales with their
learning rate (PyTorch's ``lr * weight_decay``), as in the reference code.

Why eps moves with depth: the branch multiplier shrinks every gradient inside
the blocks by :math:`m_L^{-\alpha}`, so Adam's :math:`\sqrt{v}` shrinks the same
way; an eps that did not shrink with it would take over the denominator in
deep models. Scaling an Adam-like optimizer's eps by ``s`` is the same as
dividing the gradients it sees by ``s`` (its direction is invariant to the
gradients' scale except through eps), which is how :func:`scale_eps` does it,
so it works in front of any such optimizer (``optax.adam*``, ``mup_flax.mu_adamw``,
``sf_optax.schedule_free_adamw``, ``schedule_free_adan``, ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax
from flax import nnx

from mup_flax import _metadata
import sf_optax
from sf_optax import parameter_path_name

__all__ = [
    "DepthScales",
    "depth_multiplier",
    "depth_scaled",
    "depth_scales",
    "multiply_scales",
    "scale_eps",
]


def _check_depths(depth: Any, base_depth: Any, alpha: Any) -> float:
  """Validates the arguments; returns m_L = depth / base_depth."""
  for name, value in (("depth", depth), ("base_depth", base_depth)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
      raise ValueError(f"{name} must be a positive number of residual blocks, got {value!r}.")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.5 <= alpha <= 1:
    raise ValueError(
        f"alpha must lie in [0.5, 1] (0.5: depth-μP, 1: CompleteP), got {alpha!r}.")
  return float(depth) / float(base_depth)


def depth_multiplier(depth: int, base_depth: int, alpha: float = 1.0) -> float:
  r"""The residual-branch multiplier :math:`(L / L_0)^{-\alpha}`.

  Use it on every residual branch: ``x = x + depth_multiplier(L, L0, alpha) *
  block(x)``. It is 1 at the base depth, so the base model is unchanged.

  Args:
    depth: the number of residual blocks :math:`L` of this model (count what
      the CompleteP reference counts: transformer layers, each holding an
      attention and an MLP branch).
    base_depth: :math:`L_0`, the depth the hyperparameters were tuned at.
    alpha: 0.5 (depth-μP) or 1 (CompleteP), or in between.

  Returns:
    A Python float.

  >>> import mup_flax
  >>> mup_flax.depth_multiplier(8, 2, alpha=0.5), mup_flax.depth_multiplier(8, 2, alpha=1.0)
  (0.5, 0.25)

  References:
    Dey et al, `Don't be lazy: CompleteP enables compute-efficient deep
    transformers <https://arxiv.org/abs/2505.01618>`_, 2025; Yang et al,
    `Tensor Programs VI: Feature Learning in Infinite-Depth Neural Networks
    <https://arxiv.org/abs/2310.02244>`_, 2023
  """
  return _check_depths(depth, base_depth, alpha) ** (-float(alpha))


class DepthScales(NamedTuple):
  """Per-parameter multipliers of the depth rules (trees of Python floats like params)."""

  lr_scales: Any  # (L/L0)^(alpha-1) in the residual blocks, 1.0 elsewhere
  eps_scales: Any  # (L/L0)^(-alpha) in the residual blocks, 1.0 elsewhere


def _block_test(in_blocks: str | Callable[[str], bool]) -> Callable[[str], bool]:
  if isinstance(in_blocks, str):
    pattern = re.compile(in_blocks)
    return lambda path: pattern.search(path) is not None
  if callable(in_blocks):
    return lambda path: bool(in_blocks(path))
  raise TypeError(
      "in_blocks must be a regular expression (searched in paths like"
      f" 'blocks_0/attention/kernel') or a function of the path, got {in_blocks!r}.")


def depth_scales(
    params: Any,
    *,
    depth: int,
    base_depth: int,
    alpha: float = 1.0,
    in_blocks: str | Callable[[str], bool],
) -> DepthScales:
  r"""The depth rules' learning-rate and epsilon multipliers of every parameter.

  Parameters inside the residual blocks get ``lr_scales`` :math:`m_L^{\alpha-1}`
  and ``eps_scales`` :math:`m_L^{-\alpha}` (:math:`m_L = L / L_0`); all others 1.
  Both are static trees of Python floats with the structure of the params the
  optimizer sees (Linen boxes are unboxed, an NNX module or state is made pure
  like ``nnx.Optimizer`` does), so they can be given to ``sf_optax``
  optimizers as ``lr_scales`` (multiply them with μP's first:
  :func:`multiply_scales`) or applied by :func:`depth_scaled`.

  Args:
    params: the parameters, a tree of arrays, ``jax.ShapeDtypeStruct``,
      :class:`~mup_flax.InfShape` (e.g. from :func:`mup_flax.get_infshapes`),
      boxed Linen params, or an ``nnx.Module`` / ``nnx.State``.
    depth: the number of residual blocks of this model.
    base_depth: the depth the hyperparameters were tuned at.
    alpha: 0.5 (depth-μP) or 1 (CompleteP).
    in_blocks: which parameters belong to the residual blocks: a regular
      expression searched in each parameter's path (``"blocks_0/mlp/kernel"``
      style, keys joined by ``/``), or a function of that path string.
      Stacked blocks (``nn.scan``) are matched the same way.

  Returns:
    A :class:`DepthScales`.

  Raises:
    ValueError: for a depth or alpha out of range, or when no parameter
      matches ``in_blocks`` (a misspelled pattern would otherwise silently
      scale nothing).

  >>> import jax.numpy as jnp, mup_flax
  >>> params = {"embed": jnp.zeros((5, 4)), "blocks_0": {"kernel": jnp.zeros((4, 4))}}
  >>> scales = mup_flax.depth_scales(params, depth=8, base_depth=2, alpha=0.5, in_blocks="blocks_")
  >>> scales.lr_scales, scales.eps_scales
  ({'blocks_0': {'kernel': 0.5}, 'embed': 1.0}, {'blocks_0': {'kernel': 0.5}, 'embed': 1.0})

  References:
    Dey et al, `Don't be lazy: CompleteP enables compute-efficient deep
    transformers <https://arxiv.org/abs/2505.01618>`_, 2025 (Table 1)
  """
  depth_mult = _check_depths(depth, base_depth, alpha)
  lr_scale = depth_mult ** (float(alpha) - 1.0)
  eps_scale = depth_mult ** (-float(alpha))
  in_block = _block_test(in_blocks)
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  # One value per parameter: a Linen box or nnx.Variable becomes the float
  # itself, the tree an optimizer sees (unboxed, or made pure by nnx.Optimizer).
  flat, treedef = _metadata.parameters(params)
  members = [in_block(parameter_path_name(path)) for path, _ in flat]
  if flat and not any(members):
    examples = ", ".join(parameter_path_name(path) for path, _ in flat[:4])
    raise ValueError(
        f"depth_scales: no parameter path matches in_blocks={in_blocks!r} (paths look"
        f" like: {examples}).")
  return DepthScales(
      lr_scales=treedef.unflatten([lr_scale if m else 1.0 for m in members]),
      eps_scales=treedef.unflatten([eps_scale if m else 1.0 for m in members]),
  )


def multiply_scales(*scale_trees: Any) -> Any:
  """The leafwise product of trees of Python floats (``None`` entries are skipped).

  Combines μP's width multipliers with the depth ones, e.g.
  ``multiply_scales(mup_flax.schedule_free_scales(infshapes)["lr_scales"],
  depth.lr_scales)``. The trees must have the same structure (build both from
  the same params).

  >>> import mup_flax
  >>> mup_flax.multiply_scales({"w": 0.25, "b": 1.0}, None, {"w": 0.5, "b": 0.5})
  {'b': 0.5, 'w': 0.125}
  """
  trees = [tree for tree in scale_trees if tree is not None]
  if not trees:
    return None
  try:
    return jax.tree.map(lambda *values: math.prod(float(v) for v in values), *trees)
  except ValueError as error:
    raise ValueError(
        f"multiply_scales: the scale trees have different structures ({error}); build them"
        " from the same params tree.") from None


def _multiply_leaves(scales: Any, invert: bool, name: str) -> optax.GradientTransformation:
  """Stateless: each leaf times its scale (or divided by it). Scales of 1 are skipped.

  ``scales`` is matched to the leaves by path (``sf_optax.per_parameter_values``):
  a tree like the params, a prefix of it, or one value.
  """

  def factors(tree):
    return sf_optax.per_parameter_values(scales, tree, name=name, convert=float)

  def init_fn(params):
    factors(params)  # errors surface at init, outside jit
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    # Python floats are weakly typed: every leaf keeps its dtype.
    scale = lambda f, u: u if f == 1.0 else (u / f if invert else u * f)
    return jax.tree.map(scale, factors(updates), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_eps(eps_scales: Any) -> optax.GradientTransformation:
  r"""Multiplies the eps of the Adam-like optimizer that follows it, per parameter.

  Divides each gradient by its parameter's ``eps_scale``. Every Adam-like
  direction (Adam, AdamW, RAdam, Adan, their Schedule-Free versions, μP's) is
  then unchanged except that its eps is multiplied by ``eps_scale``:
  :math:`\frac{g/s}{\sqrt{v/s^2} + \epsilon} = \frac{g}{\sqrt{v} + s\epsilon}`
  (also with bias correction; an ``eps_root`` is multiplied by :math:`s^2`).
  Place it first in the chain, after any gradient clipping, in front of an
  optimizer with decoupled weight decay (``optax.adamw``, ``mu_adamw``,
  ``sf_optax``'s): an L2 term added inside the optimizer would not be divided.
  Not for SGD-like optimizers, whose step it would scale.

  Args:
    eps_scales: a tree of Python floats like the params (or a prefix of it,
      matched by path as ``sf_optax.per_parameter_values`` does), e.g.
      :attr:`DepthScales.eps_scales`.

  Returns:
    A stateless ``optax.GradientTransformation``.

  >>> import jax.numpy as jnp, optax, mup_flax
  >>> tx = optax.chain(mup_flax.scale_eps({"w": 0.5}), optax.adam(1.0, eps=0.5))
  >>> updates, _ = tx.update({"w": jnp.ones(1)}, tx.init({"w": jnp.zeros(1)}))
  >>> print(f"{float(updates['w'][0]):.4f}")  # -1 / (1 + 0.5 * 0.5)
  -0.8000
  """
  return _multiply_leaves(eps_scales, invert=True, name="eps_scales")


def depth_scaled(
    optimizer: optax.GradientTransformation, scales: DepthScales
) -> optax.GradientTransformationExtraArgs:
  r"""An Optax Adam-like optimizer with the depth rules' lr and eps per parameter.

  ``optax.chain(scale_eps(scales.eps_scales), optimizer, <updates times
  scales.lr_scales>)``: the eps of the parameters in the blocks is multiplied by
  :math:`m_L^{-\alpha}` and their whole update (Adam step and decoupled weight
  decay, as PyTorch's per-group ``lr`` does) by :math:`m_L^{\alpha-1}`. Works
  around ``optax.adamw``, ``optax.adan``, ``mup_flax.mu_adamw`` (μP's width
  rules and the depth rules multiply) and any optimizer whose update is
  proportional to its learning rate and invariant to the gradients' scale
  except through eps.

  Schedule-Free optimizers are not of that kind (their update also moves the
  average); give them the learning-rate multipliers through ``lr_scales``
  instead::

    optax.chain(mup_flax.scale_eps(scales.eps_scales),
                sf_optax.schedule_free_adamw(lr, lr_scales=scales.lr_scales))

  Args:
    optimizer: the optimizer to wrap.
    scales: from :func:`depth_scales`.

  Returns:
    A ``GradientTransformationExtraArgs``.

  >>> import jax.numpy as jnp, optax, mup_flax
  >>> params = {"blocks_0": jnp.zeros(1), "head": jnp.zeros(1)}
  >>> scales = mup_flax.depth_scales(params, depth=4, base_depth=1, alpha=0.5, in_blocks="blocks")
  >>> tx = mup_flax.depth_scaled(optax.adam(0.1, eps=1e-12), scales)
  >>> updates, _ = tx.update({"blocks_0": jnp.ones(1), "head": jnp.ones(1)}, tx.init(params))
  >>> print(f"{float(updates['blocks_0'][0]):.3f} {float(updates['head'][0]):.3f}")
  -0.050 -0.100
  """
  return optax.chain(
      scale_eps(scales.eps_scales),
      optimizer,
      _multiply_leaves(scales.lr_scales, invert=False, name="lr_scales"),
  )
