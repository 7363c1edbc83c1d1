"""μP optimizers: per-parameter learning rates and weight decay (Tensor Programs V, Table 8).

μP trains every width with the same hyperparameters by giving each parameter
a learning-rate multiplier that depends on how its dimensions scale with width
(its :class:`~mup_flax.InfShape`):

=============  ===================  ==========================================
parameter      Adam-like (``adam``)  SGD-like (``sgd``)
=============  ===================  ==========================================
matrix-like    ``1 / width_mult``    ``1 / fanin_fanout_mult_ratio``
vector-like    ``1``                 ``width_mult``
scalar-like    ``1``                 ``1``
=============  ===================  ==========================================

Like the reference (``mup.MuAdam``, ``mup.MuAdamW``, ``mup.MuSGD``), the weight
decay of each parameter is divided by the same multiplier unless
``decoupled_wd=True``, so that the decay PyTorch applies (``lr * weight_decay``)
does not change with width. Every other hyperparameter is shared; Adam's
epsilon is shared too unless ``scale_eps=True``.

The multipliers are static Python floats read from the infshape tree when the
optimizer is built: ``nnx.Optimizer`` hands Optax plain arrays with the
metadata stripped, so the optimizer cannot read it from the updates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from mup_flax import _metadata
from mup_flax._base_shapes import get_infshapes
from mup_flax._infshape import InfShape
import sf_optax
from sf_optax import parameter_path_name

__all__ = [
    "mu_adam",
    "mu_adamw",
    "mu_sgd",
    "scale_by_mup",
    "schedule_free_scales",
]

Rule = Literal["adam", "sgd"]
_RULES = ("adam", "sgd")


def _multipliers(infshape: InfShape, rule: str, decoupled_wd: bool) -> tuple[float, float]:
  """``(lr_mult, weight_decay_mult)`` of one parameter under ``rule`` (Table 8)."""
  ninf = infshape.ninf()  # at most 2: InfShape refuses more
  if rule == "adam":
    if ninf == 2:
      width_mult = infshape.width_mult()
      return 1.0 / width_mult, (1.0 if decoupled_wd else width_mult)
    return 1.0, 1.0
  if ninf == 1:
    width_mult = infshape.width_mult()
    return width_mult, (1.0 if decoupled_wd else 1.0 / width_mult)
  if ninf == 2:
    ratio = infshape.fanin_fanout_mult_ratio()
    return 1.0 / ratio, (1.0 if decoupled_wd else ratio)
  return 1.0, 1.0


def _check_rule(rule: str) -> None:
  if rule not in _RULES:
    raise ValueError(f"rule must be one of {_RULES} ('adam' for Adam-like, entrywise-normalized "
                     f"updates; 'sgd' for SGD-like ones), got {rule!r}.")


class _PerParameter:
  """A static value per parameter, computed from its InfShape.

  The InfShapes are matched to the parameters by path with
  ``sf_optax.per_parameter_values``, so ``dict``, ``FrozenDict`` and
  ``nnx.State`` mix. A parameter is an array leaf, a Linen ``AxisMetadata``
  box (``jax.grad`` of boxed params gives boxed gradients) or an
  ``nnx.Variable`` (``nnx.Optimizer`` initializes the optimizer on its state):
  wrappers are kept, their arrays mapped.
  """

  def __init__(self, infshapes: Any, value_of: Callable[[InfShape], float], owner: str):
    self.owner = owner
    self.value_of = value_of
    self.infshapes = get_infshapes(infshapes)  # read once, when the optimizer is built
    self.values = {value_of(s) for s in jax.tree.leaves(self.infshapes)}

  def _checked_value(self, path: Any, infshape: InfShape, node: Any) -> float:
    shape = _metadata.shape_of(node)
    if shape != infshape.shape:
      raise ValueError(
          f"{self.owner}: parameter {parameter_path_name(path)} has shape {shape} but its "
          f"InfShape {infshape} is for shape {infshape.shape}: the infshapes tree belongs to "
          "another model or width.")
    return self.value_of(infshape)

  def tree(self, tree: Any) -> Any:
    """Each parameter's value, as a prefix tree of ``tree`` (static: runs at trace time).

    Raises a ``ValueError`` naming the parameter when one has no InfShape or
    a shape other than its InfShape's.
    """
    matched = sf_optax.per_parameter_values(
        self.infshapes, tree, name=f"{self.owner}'s infshapes", is_leaf=_metadata.is_parameter)
    return jax.tree_util.tree_map_with_path(self._checked_value, matched, tree)

  def map(self, fn: Callable[..., jax.Array], tree: Any, *rest: Any) -> Any:
    """``fn(value, leaf, *rest_leaves)`` for every array leaf of every parameter."""
    return jax.tree.map(
        lambda value, *nodes: jax.tree.map(lambda *leaves: fn(value, *leaves), *nodes),
        self.tree(tree), tree, *rest)


def _lr_and_decay(infshapes, rule, decoupled_wd, owner) -> tuple[_PerParameter, _PerParameter]:
  """The learning-rate and weight-decay multipliers of ``rule``."""
  _check_rule(rule)
  return (_PerParameter(infshapes, lambda s: _multipliers(s, rule, decoupled_wd)[0], owner),
          _PerParameter(infshapes, lambda s: _multipliers(s, rule, decoupled_wd)[1], owner))


def _scale(multiplier: float, leaf: jax.Array) -> jax.Array:
  # A Python float is weakly typed: the leaf keeps its dtype. Multipliers of
  # 1.0 are skipped so that at base width the updates are bitwise the plain ones.
  return leaf if multiplier == 1.0 else leaf * multiplier


def _scale_updates(multipliers: _PerParameter) -> optax.GradientTransformation:
  def init_fn(params):
    multipliers.tree(params)  # errors surface at init, outside jit
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return multipliers.map(_scale, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_mup(infshapes: Any, *, rule: Rule = "adam") -> optax.GradientTransformation:
  r"""Scales each update by its parameter's μP learning-rate multiplier.

  Stateless. Place it after the optimizer's direction and before the learning
  rate, e.g. ``optax.chain(optax.scale_by_adam(), scale_by_mup(infshapes),
  optax.scale_by_learning_rate(lr))``. With ``rule="adam"`` (for any
  optimizer whose update is normalized entrywise: Adam, RMSProp, Adagrad,
  Lion, ...) a matrix-like parameter's update is divided by its width
  multiplier :math:`n / n_{base}` (its fan-in's); with ``rule="sgd"``
  vector-like updates are multiplied by their width multiplier and
  matrix-like ones divided by ``fanin_fanout_mult_ratio``. Parameters at base
  width (multiplier 1) are passed through untouched.

  Args:
    infshapes: the tree of :class:`~mup_flax.InfShape` of the parameters
      (:func:`mup_flax.get_infshapes`), or the annotated parameters
      themselves (boxed Linen params, an annotated ``nnx.Module``/``nnx.State``).
      Paths are matched, so ``dict``, ``FrozenDict`` and ``nnx.State`` mix.
    rule: ``"adam"`` (Adam-like) or ``"sgd"`` (SGD-like), see above.

  Returns:
    An ``optax.GradientTransformation``. Its ``init`` and ``update`` raise a
    ``ValueError`` naming the parameter when one has no InfShape or a shape
    other than its InfShape's.

  >>> import jax.numpy as jnp, optax
  >>> from mup_flax import InfDim, InfShape, scale_by_mup
  >>> infshapes = {"hidden": InfShape([InfDim(64, 256), InfDim(64, 256)]),  # width_mult 4
  ...              "bias": InfShape([InfDim(64, 256)])}
  >>> params = {"hidden": jnp.ones((256, 256)), "bias": jnp.ones(256)}
  >>> tx = scale_by_mup(infshapes, rule="adam")
  >>> updates, _ = tx.update(params, tx.init(params))
  >>> float(updates["hidden"][0, 0]), float(updates["bias"][0])
  (0.25, 1.0)

  References:
    Yang et al, `Tensor Programs V: Tuning Large Neural Networks via Zero-Shot
    Hyperparameter Transfer <https://arxiv.org/abs/2203.03466>`_, 2022 (Table 8)
  """
  return _scale_updates(_lr_and_decay(infshapes, rule, False, "scale_by_mup")[0])


def _add_decayed_weights(
    weight_decay: optax.ScalarOrSchedule,
    multipliers: _PerParameter,
    mask: Any,
) -> optax.GradientTransformation:
  """``g + weight_decay * weight_decay_mult * p`` per leaf (``optax.add_decayed_weights``
  with μP's per-parameter decay multiplier)."""

  def init_fn(params):
    multipliers.tree(params)
    if callable(weight_decay):
      return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)
    if callable(weight_decay):
      rate = weight_decay(state.count)
      state = optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
    else:
      rate = weight_decay
    return multipliers.map(lambda s, u, p: u + _scale(s, rate) * p, updates, params), state

  transform = optax.GradientTransformation(init_fn, update_fn)
  return transform if mask is None else optax.masked(transform, mask)


def _decay(weight_decay: optax.ScalarOrSchedule, multipliers: _PerParameter,
           mask: Any) -> list[optax.GradientTransformation]:
  """The weight-decay step, or none for a concrete zero (``inject_hyperparams``
  passes traced arrays, which always get the step)."""
  if isinstance(weight_decay, (int, float)) and weight_decay == 0.0:
    return []
  return [_add_decayed_weights(weight_decay, multipliers, mask)]


def _scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov, infshapes, scale_eps, owner):
  """``optax.scale_by_adam``; with ``scale_eps``, eps / width_mult on matrix-like params."""
  if not scale_eps:
    return optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)
  # One Adam per distinct epsilon, like the reference's per-width parameter
  # groups; each parameter's group is looked up by its path.
  eps_mults = _PerParameter(
      infshapes, lambda s: 1.0 / s.width_mult() if s.ninf() == 2 else 1.0, owner)

  def labels(tree):
    return jax.tree.map(repr, eps_mults.tree(tree))

  transforms = {
      repr(m): optax.scale_by_adam(b1, b2, eps if m == 1.0 else eps * m, eps_root, mu_dtype,
                                   nesterov=nesterov)
      for m in eps_mults.values
  }
  return optax.partition(transforms, labels)


def mu_adam(
    learning_rate: optax.ScalarOrSchedule,
    infshapes: Any,
    *,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    decoupled_wd: bool = False,
    mask: Any = None,
    mu_dtype: Any = None,
    nesterov: bool = False,
    scale_eps: bool = False,
) -> optax.GradientTransformation:
  r"""Adam with μP per-parameter learning rates: ``mup.MuAdam``.

  Matrix-like parameters (two infinite dims) take the learning rate
  :math:`\eta / m` with :math:`m` their fan-in width multiplier; all others
  :math:`\eta`. ``weight_decay`` is PyTorch ``Adam``'s: an L2 term
  :math:`\lambda_p \theta` added to the gradient before Adam, with
  :math:`\lambda_p = \lambda m` on matrix-like parameters (so that
  :math:`\eta_p \lambda_p` stays :math:`\eta \lambda`) unless
  ``decoupled_wd=True`` (then :math:`\lambda_p = \lambda`).

  At base width every multiplier is 1 and this is
  ``optax.chain(optax.add_decayed_weights(weight_decay, mask), optax.adam(...))``.

  Args:
    learning_rate: the base learning rate (a float or an Optax schedule).
    infshapes: the tree of :class:`~mup_flax.InfShape` of the parameters (see
      :func:`scale_by_mup`).
    b1, b2, eps, eps_root, mu_dtype, nesterov: as in ``optax.adam``.
    weight_decay: L2 coefficient added to the gradient (PyTorch ``Adam``'s
      ``weight_decay``), a float or a schedule.
    decoupled_wd: keep the weight decay of every parameter at
      ``weight_decay`` instead of scaling it against the learning rate.
    mask: which parameters decay (a tree of bools or a function of params).
    scale_eps: use ``eps / width_mult`` for matrix-like parameters. Off by
      default (the reference never scales eps); under μP the gradient entries
      of hidden weights shrink like 1/width, so a fixed eps eventually
      dominates the denominator and damps their updates.

  Returns:
    An ``optax.GradientTransformation``.

  >>> import jax.numpy as jnp, optax
  >>> from mup_flax import InfDim, InfShape, mu_adam
  >>> infshapes = {"w": InfShape([InfDim(8, 32), InfDim(8, 32)])}   # width_mult 4
  >>> params = {"w": jnp.zeros((32, 32))}
  >>> tx = mu_adam(1e-2, infshapes)
  >>> updates, _ = tx.update({"w": jnp.ones((32, 32))}, tx.init(params), params)
  >>> print(f"{float(updates['w'][0, 0]):.4f}")   # -lr / width_mult
  -0.0025

  References:
    Yang et al, `Tensor Programs V <https://arxiv.org/abs/2203.03466>`_, 2022
  """
  lr, decay = _lr_and_decay(infshapes, "adam", decoupled_wd, "mu_adam")
  return optax.chain(
      *_decay(weight_decay, decay, mask),  # L2: added to the gradient, before Adam
      _scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov, infshapes, scale_eps, "mu_adam"),
      _scale_updates(lr),
      optax.scale_by_learning_rate(learning_rate),
  )


def mu_adamw(
    learning_rate: optax.ScalarOrSchedule,
    infshapes: Any,
    *,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    decoupled_wd: bool = False,
    mask: Any = None,
    mu_dtype: Any = None,
    nesterov: bool = False,
    scale_eps: bool = False,
) -> optax.GradientTransformation:
  r"""AdamW with μP per-parameter learning rates: ``mup.MuAdamW``.

  Per parameter, with :math:`\eta_p` as in :func:`mu_adam`,

  .. math::

    \theta \leftarrow \theta - \eta_p (\mathrm{adam}(g) + \lambda_p \theta),

  PyTorch ``AdamW``'s decay ``θ *= 1 - η_p λ_p``. Like the reference,
  :math:`\lambda_p = \lambda m` on matrix-like parameters, so the decay
  :math:`\eta_p \lambda_p = \eta \lambda` is the same at every width; with
  ``decoupled_wd=True``, :math:`\lambda_p = \lambda` and the decay of hidden
  weights shrinks like their learning rate.

  At base width this is ``optax.adamw`` with the same arguments.

  Args:
    learning_rate: the base learning rate (a float or an Optax schedule).
    infshapes: the tree of :class:`~mup_flax.InfShape` of the parameters (see
      :func:`scale_by_mup`).
    b1, b2, eps, eps_root, mu_dtype, nesterov: as in ``optax.adamw``.
    weight_decay: decoupled weight decay, scaled by the learning rate.
    decoupled_wd: do not scale ``weight_decay`` against the learning-rate
      multiplier (see above).
    mask: which parameters decay (a tree of bools or a function of params).
    scale_eps: ``eps / width_mult`` for matrix-like parameters (see
      :func:`mu_adam`).

  Returns:
    An ``optax.GradientTransformation``.

  >>> import jax, jax.numpy as jnp, optax, mup_flax
  >>> base = {"w": jnp.zeros((8, 8))}
  >>> delta = {"w": jnp.zeros((16, 16))}
  >>> params = {"w": jnp.ones((64, 64))}
  >>> infshapes = mup_flax.get_infshapes(params, mup_flax.make_base_shapes(base, delta))
  >>> tx = mup_flax.mu_adamw(1e-2, infshapes, weight_decay=0.1)
  >>> updates, _ = tx.update(params, tx.init(params), params)
  >>> print(f"{float(updates['w'][0, 0]):.6f}")   # -(lr / 8) * 1 - lr * 0.1 * 1
  -0.002250

  References:
    Yang et al, `Tensor Programs V <https://arxiv.org/abs/2203.03466>`_, 2022;
    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019
  """
  lr, decay = _lr_and_decay(infshapes, "adam", decoupled_wd, "mu_adamw")
  return optax.chain(
      _scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov, infshapes, scale_eps,
                     "mu_adamw"),
      *_decay(weight_decay, decay, mask),  # decoupled: added to Adam's direction
      _scale_updates(lr),
      optax.scale_by_learning_rate(learning_rate),
  )


def mu_sgd(
    learning_rate: optax.ScalarOrSchedule,
    infshapes: Any,
    *,
    momentum: jax.typing.ArrayLike | None = None,
    nesterov: bool = False,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    decoupled_wd: bool = False,
    mask: Any = None,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformation:
  r"""SGD with μP per-parameter learning rates: ``mup.MuSGD``.

  Vector-like parameters (one infinite dim: input and output weights, biases,
  norm scales) take :math:`\eta m`; matrix-like ones
  :math:`\eta / r` with :math:`r` the ratio of their fan-in and fan-out
  width multipliers; scalar-like ones :math:`\eta`. ``weight_decay`` is
  PyTorch ``SGD``'s L2 term added to the gradient before momentum, divided by
  the same multiplier unless ``decoupled_wd=True``.

  At base width this is
  ``optax.chain(optax.add_decayed_weights(weight_decay, mask), optax.sgd(...))``.

  Args:
    learning_rate: the base learning rate (a float or an Optax schedule).
    infshapes: the tree of :class:`~mup_flax.InfShape` of the parameters (see
      :func:`scale_by_mup`).
    momentum, nesterov, accumulator_dtype: as in ``optax.sgd`` (PyTorch's
      momentum without dampening).
    weight_decay: L2 coefficient added to the gradient, a float or a schedule.
    decoupled_wd: do not scale ``weight_decay`` against the learning-rate
      multiplier.
    mask: which parameters decay (a tree of bools or a function of params).

  Returns:
    An ``optax.GradientTransformation``.

  >>> import jax.numpy as jnp
  >>> from mup_flax import InfDim, InfShape, mu_sgd
  >>> infshapes = {"bias": InfShape([InfDim(8, 32)])}   # vector-like, width_mult 4
  >>> params = {"bias": jnp.zeros(32)}
  >>> tx = mu_sgd(0.125, infshapes)
  >>> updates, _ = tx.update({"bias": jnp.ones(32)}, tx.init(params), params)
  >>> float(updates["bias"][0])   # -lr * width_mult
  -0.5

  References:
    Yang et al, `Tensor Programs V <https://arxiv.org/abs/2203.03466>`_, 2022
  """
  lr, decay = _lr_and_decay(infshapes, "sgd", decoupled_wd, "mu_sgd")
  momentum_steps = [] if momentum is None else [
      optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype)]
  return optax.chain(
      *_decay(weight_decay, decay, mask),  # L2: added to the gradient, before momentum
      *momentum_steps,
      _scale_updates(lr),
      optax.scale_by_learning_rate(learning_rate),
  )


def schedule_free_scales(
    infshapes: Any, *, rule: Rule = "adam", decoupled_wd: bool = False
) -> dict[str, Any]:
  """μP's per-parameter learning rates for the z-step of a Schedule-Free optimizer.

  Returns the keyword arguments ``lr_scales`` and ``weight_decay_scales`` of
  every ``sf_optax`` optimizer: trees of Python floats with the structure of
  ``infshapes``. The z-step of each parameter then moves with the learning
  rate of its μP parameter group, exactly like the reference
  ``schedulefree.AdamWScheduleFree`` (or ``SGDScheduleFree``) run on the
  parameter groups of ``mup.MuAdamW`` (or ``mup.MuSGD``); the averaging
  weights stay global. Use ``rule="adam"`` for the AdamW, RAdam and paper
  variants and ``rule="sgd"`` for SGD.

  Args:
    infshapes: the tree of :class:`~mup_flax.InfShape` of the parameters (see
      :func:`scale_by_mup`).
    rule: ``"adam"`` or ``"sgd"`` (see :func:`scale_by_mup`).
    decoupled_wd: keep every parameter's weight decay at ``weight_decay``
      (see :func:`mu_adamw`).

  Returns:
    ``{"lr_scales": tree, "weight_decay_scales": tree}``.

  >>> import jax.numpy as jnp, sf_optax
  >>> from mup_flax import InfDim, InfShape, schedule_free_scales
  >>> infshapes = {"w": InfShape([InfDim(8, 32), InfDim(8, 32)]), "b": InfShape([InfDim(8, 32)])}
  >>> scales = schedule_free_scales(infshapes)
  >>> scales
  {'lr_scales': {'b': 1.0, 'w': 0.25}, 'weight_decay_scales': {'b': 1.0, 'w': 4.0}}
  >>> tx = sf_optax.schedule_free_adamw(1e-2, weight_decay=0.1, **scales)
  """
  _check_rule(rule)
  tree = get_infshapes(infshapes)
  return {
      name: jax.tree.map(lambda s: _multipliers(s, rule, decoupled_wd)[index], tree)
      for index, name in enumerate(("lr_scales", "weight_decay_scales"))
  }
