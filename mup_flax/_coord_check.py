"""The coordinate check: is a model's parametrization right, width by width?

Train the same model at several widths for a few steps and record, after each
step, the typical size of every submodule's output coordinates. In μP these
sizes stay the same as the width grows (flat curves on a log-log plot of size
against width); in the standard parametrization some of them grow with width
once training starts. A curve that grows (or vanishes) under μP points to a
layer whose init, multiplier or learning rate is wrong.

Outputs are captured with Flax's own mechanisms, without editing the model:
``capture_intermediates`` for Linen and ``nnx.capture(...,
method_outputs=nnx.Intermediate)`` for NNX.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

from mup_flax import _base_shapes
from mup_flax import _metadata
from mup_flax import _optimizers
from mup_flax import _linen

__all__ = ["get_coord_data", "plot_coord_data", "coord_slopes"]

_DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-1, "schedule_free_adamw": 1e-3}


def _xent(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(outputs, targets).mean()


def _mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.mean((outputs - jnp.reshape(targets, outputs.shape)) ** 2)


_LOSSES = {"xent": _xent, "mse": _mse}


def _linen_outputs(tree: Mapping, prefix: tuple = ()) -> dict[str, Any]:
  """{module path: output of its last ``__call__``} from Linen's ``intermediates``."""
  out = {}
  for key, value in tree.items():
    if key == "__call__" and isinstance(value, tuple):
      if value:
        out["/".join(str(p) for p in prefix)] = value[-1]
    elif isinstance(value, Mapping):
      out.update(_linen_outputs(value, prefix + (key,)))
  return out


def _nnx_outputs(state: Any) -> dict[str, Any]:
  """{module path: output of its last ``__call__``} from ``nnx.capture``'s intermediates."""
  out = {}
  for keys, leaf in _metadata.parameters(state)[0]:
    if not keys or keys[-1] != "__call__":
      continue
    value = leaf.get_value() if _metadata.is_variable(leaf) else leaf
    if isinstance(value, tuple):
      if not value:
        continue
      value = value[-1]
    out["/".join(keys[:-1])] = value
  return out


def _stats(outputs: dict[str, Any], include_root: bool) -> dict[str, tuple[float, float]]:
  """{module: (l1, std)} over every array leaf of every output."""
  stats = {}
  for name, output in outputs.items():
    if not include_root and name == "":
      continue
    leaves = jax.tree_util.tree_flatten_with_path(output)[0]
    for path, leaf in leaves:
      if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
        continue
      leaf_name = (name or "<model>") + jax.tree_util.keystr(path)
      leaf = jnp.asarray(leaf, jnp.float32)
      stats[leaf_name] = (float(jnp.mean(jnp.abs(leaf))), float(jnp.std(leaf)))
  return stats


def _annotated_infshapes(params: Any) -> Any | None:
  """The params' InfShape tree, or None for a model without μP annotations (SP)."""
  try:
    return _base_shapes.get_infshapes(params)
  except (ValueError, TypeError):
    return None


def _make_optimizer(optimizer: Any, lr: float | None, infshapes: Any, params: Any):
  """An Optax transformation from a name (μP-aware), a transformation or a factory."""
  if isinstance(optimizer, str):
    if optimizer not in _DEFAULT_LR:
      raise ValueError(
          f"optimizer must be one of {sorted(_DEFAULT_LR)} or an Optax transformation,"
          f" got {optimizer!r}.")
    lr = _DEFAULT_LR[optimizer] if lr is None else lr
    if optimizer == "adam":
      return _optimizers.mu_adam(lr, infshapes) if infshapes is not None else optax.adam(lr)
    if optimizer == "sgd":
      return _optimizers.mu_sgd(lr, infshapes) if infshapes is not None else optax.sgd(lr)
    import sf_optax  # only for this optimizer: the packages ship together

    scales = {} if infshapes is None else _optimizers.schedule_free_scales(infshapes)
    return sf_optax.schedule_free_adamw(lr, **scales)
  if isinstance(optimizer, optax.GradientTransformation):
    return optimizer
  if callable(optimizer):
    return optimizer(infshapes if infshapes is not None else params)
  raise TypeError(f"optimizer must be a name, an Optax transformation or a callable, got {optimizer!r}")


def _call_factory(factory: Callable, seed: int):
  """``factory(seed)`` if it has a required positional parameter, else ``factory()``."""
  try:
    parameters = inspect.signature(factory).parameters.values()
  except (TypeError, ValueError):
    return factory()
  positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  required = [p for p in parameters if p.kind in positional and p.default is p.empty]
  return factory(seed) if required else factory()


def _split_batch(batch: Any) -> tuple[Any, Any]:
  if isinstance(batch, Mapping):
    return batch["inputs"], batch["targets"]
  inputs, targets = batch
  return inputs, targets


class _LinenRunner:
  """Init, capture and train a Linen model (plain or wrapped in :class:`mup_flax.MuP`)."""

  def __init__(self, model, seed, inputs):
    self.model = model
    # One compiled program, rather than one per initializer and shape eagerly.
    variables = jax.jit(model.init)(jax.random.key(seed), inputs)
    params = variables["params"]
    self.infshapes = _annotated_infshapes(params)
    self.params = nn.unbox(params)
    self.rest = {k: nn.unbox(v) for k, v in variables.items() if k != "params"}

  def apply(self, params, inputs, capture=False):
    variables = {"params": params, **self.rest}
    if not capture:
      return self.model.apply(variables, inputs)
    out, state = self.model.apply(
        variables, inputs, capture_intermediates=True, mutable=["intermediates"])
    return out, _linen_outputs(state["intermediates"])


class _NNXRunner:
  """Capture and train an ``nnx.Module`` functionally (split / merge)."""

  def __init__(self, model, seed, inputs):
    del seed, inputs
    self.infshapes = _annotated_infshapes(model)
    self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
    # Plain nested dicts of arrays (and of InfShapes): the trees an optimizer sees.
    self.params = nnx.to_pure_dict(params)
    if self.infshapes is not None:
      self.infshapes = nnx.to_pure_dict(self.infshapes)
    self._param_state = params

  def _merge(self, params):
    state = jax.tree.map(lambda x: x, self._param_state)  # a copy, then filled in
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state, self.rest)

  def apply(self, params, inputs, capture=False):
    model = self._merge(params)
    if not capture:
      return model(inputs)
    if not hasattr(nnx, "capture"):  # pragma: no cover - older Flax
      raise RuntimeError("the NNX coordinate check needs flax.nnx.capture (Flax >= 0.12).")
    out, state = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(inputs)
    return out, _nnx_outputs(state)


def get_coord_data(
    models: Mapping[int, Callable[..., Any]],
    batches: Sequence[Any] | Iterable[Any],
    *,
    optimizer: str | optax.GradientTransformation | Callable[[Any], optax.GradientTransformation] = "adam",
    lr: float | None = None,
    nsteps: int = 3,
    nseeds: int = 1,
    loss_fn: str | Callable[[Any, Any], jax.Array] = "xent",
    include_root: bool = False,
    seed: int = 0,
    as_dataframe: bool | None = None,
) -> Any:
  """Records the size of every submodule's output over a few training steps, per width.

  For each width and seed the model is built, then for ``t = 1 .. nsteps``: a
  forward pass on batch ``t`` records, for every submodule output, its mean
  absolute value (``l1``) and standard deviation (``std``); then one optimizer
  step is taken on the same batch. ``t = 1`` is therefore the model at
  initialization. "Submodule output" means what its ``__call__`` returned
  (every floating-point array in it; for a module called several times in
  one forward pass, or calling its parent class's ``__call__``, the last --
  outermost -- call).

  Args:
    models: ``{width: factory}``; a factory takes no required argument, or
      one (the seed, an int), and returns a Linen module, a :class:`mup_flax.MuP`-wrapped Linen
      module, or an ``nnx.Module`` (annotated with
      :func:`mup_flax.nnx.set_base_shapes` for μP, or not). Linen models are
      initialized with ``jax.random.key(seed)``.
    batches: ``(inputs, targets)`` pairs (or ``{"inputs", "targets"}``
      dicts); step ``t`` uses batch ``(t - 1) % len(batches)``.
    optimizer: ``"adam"``, ``"sgd"`` or ``"schedule_free_adamw"`` -- μP's
      version (:func:`mup_flax.mu_adam`, :func:`mup_flax.mu_sgd`, Schedule-Free
      AdamW with :func:`mup_flax.schedule_free_scales`) when the model's
      parameters carry InfShapes, the plain Optax/sf_optax one otherwise
      (SP) -- or an Optax transformation used as given, or a callable
      ``f(infshapes_or_params) -> transformation``.
    lr: the learning rate of a named optimizer (default 1e-3 for Adam and
      Schedule-Free AdamW, 0.1 for SGD).
    nsteps: number of recorded steps.
    nseeds: seeds per width (``seed, seed + 1, ...``).
    loss_fn: ``"xent"`` (softmax cross-entropy with integer targets, mean),
      ``"mse"`` or a callable ``loss(outputs, targets) -> scalar``.
    include_root: also record the whole model's output (as ``"<model>"``).
    seed: the first seed.
    as_dataframe: return a pandas DataFrame (default: when pandas is
      installed).

  Returns:
    Records ``{"width", "module", "t", "l1", "std", "seed"}``: a list of dicts,
    or a pandas DataFrame.

  >>> import jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import mup_flax
  >>> mlp = lambda width: nn.Sequential([nn.Dense(width), nn.relu, mup_flax.MuReadout(3)])
  >>> models = {w: (lambda w=w: mup_flax.MuP(mlp(w), base=mlp(8), delta=mlp(16))) for w in (8, 32)}
  >>> batch = (jnp.ones((4, 5)), jnp.array([0, 1, 2, 0]))
  >>> records = get_coord_data(models, [batch], nsteps=2, as_dataframe=False)
  >>> sorted({(r["module"], r["t"]) for r in records})  # the Dense and the readout
  [('layers_0', 1), ('layers_0', 2), ('layers_2', 1), ('layers_2', 2)]
  """
  if nsteps < 1 or nseeds < 1:
    raise ValueError(f"nsteps and nseeds must be positive, got {nsteps}, {nseeds}.")
  batches = list(batches)
  if not batches:
    raise ValueError("batches is empty.")
  loss = _LOSSES.get(loss_fn) if isinstance(loss_fn, str) else loss_fn
  if loss is None:
    raise ValueError(f"loss_fn must be one of {sorted(_LOSSES)} or a callable, got {loss_fn!r}.")

  records = []
  for width, factory in sorted(models.items()):
    for s in range(seed, seed + nseeds):
      model = _call_factory(factory, s)
      first_inputs, _ = _split_batch(batches[0])
      if isinstance(model, nnx.Module):
        runner = _NNXRunner(model, s, first_inputs)
      elif isinstance(model, (nn.Module, _linen.MuP)):
        runner = _LinenRunner(model, s, first_inputs)
      else:
        raise TypeError(
            f"models[{width}]() returned {type(model).__name__}; expected a Linen module,"
            " a mup_flax.MuP or an nnx.Module.")
      tx = _make_optimizer(optimizer, lr, runner.infshapes, runner.params)
      params = runner.params
      opt_state = tx.init(params)

      def train_step(params, opt_state, inputs, targets, runner=runner, tx=tx):
        grads = jax.grad(lambda p: loss(runner.apply(p, inputs), targets))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

      train_step = jax.jit(train_step)
      capture = jax.jit(lambda p, x, runner=runner: runner.apply(p, x, capture=True)[1])
      for t in range(1, nsteps + 1):
        inputs, targets = _split_batch(batches[(t - 1) % len(batches)])
        outputs = capture(params, inputs)
        for module, (l1, std) in _stats(outputs, include_root).items():
          records.append(dict(width=int(width), module=module, t=t, l1=l1, std=std, seed=s))
        if t < nsteps:
          params, opt_state = train_step(params, opt_state, inputs, targets)

  if as_dataframe is None or as_dataframe:
    try:
      import pandas as pd
    except ImportError:
      if as_dataframe:
        raise
      return records
    return pd.DataFrame.from_records(records)
  return records


def _as_records(records: Any) -> list[dict]:
  if hasattr(records, "to_dict"):
    return records.to_dict("records")
  return list(records)


def _mean_by(records: list[dict], key: str) -> dict[tuple[str, int], dict[int, float]]:
  """{(module, t): {width: mean of key over seeds}}."""
  sums: dict[tuple[str, int], dict[int, list[float]]] = {}
  for r in records:
    sums.setdefault((r["module"], int(r["t"])), {}).setdefault(int(r["width"]), []).append(float(r[key]))
  return {k: {w: float(np.mean(v)) for w, v in sorted(d.items())} for k, d in sums.items()}


def coord_slopes(records: Any, *, key: str = "l1") -> dict[tuple[str, int], float]:
  """The least-squares slope of ``log(key)`` against ``log(width)`` per (module, t).

  Averages over seeds first. Flat curves (μP) have slopes near 0; a coordinate
  that grows like ``width ** a`` has slope ``a``.

  >>> recs = [dict(width=w, module="m", t=1, l1=w ** 0.5, std=0.0, seed=0) for w in (64, 256)]
  >>> coord_slopes(recs)[("m", 1)]
  0.5
  """
  slopes = {}
  for (module, t), by_width in _mean_by(_as_records(records), key).items():
    widths = np.array(list(by_width), float)
    values = np.array(list(by_width.values()), float)
    if len(widths) < 2 or np.any(values <= 0):
      slopes[(module, t)] = float("nan")
      continue
    slope = np.polyfit(np.log(widths), np.log(values), 1)[0]
    slopes[(module, t)] = round(float(slope), 12)
  return slopes


def plot_coord_data(
    records: Any,
    path: str | None = None,
    *,
    key: str = "l1",
    title: str | None = None,
    modules: Sequence[str] | None = None,
    axes: Any = None,
    legend: bool = True,
) -> Any:
  """Plots ``key`` (default l1) against width, log-log: one panel per step, a line per module.

  Needs matplotlib. Values are averaged over seeds.

  Args:
    records: what :func:`get_coord_data` returned.
    path: where to save the figure (PNG, PDF, ...); ``None`` only returns it.
    key: ``"l1"`` or ``"std"``.
    title: a title above the panels.
    modules: the modules to draw (default: all, in first-recorded order).
    axes: a sequence of matplotlib axes, one per step, to draw into
      (e.g. a row of a larger figure); a new figure otherwise.
    legend: draw a legend in the last panel.

  Returns:
    The matplotlib figure.
  """
  import matplotlib.pyplot as plt

  recs = _as_records(records)
  means = _mean_by(recs, key)
  steps = sorted({t for _, t in means})
  names = list(dict.fromkeys(r["module"] for r in recs)) if modules is None else list(modules)
  if axes is None:
    fig, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps) + 0.8, 3.2), squeeze=False)
    axes = axes[0]
  else:
    axes = list(axes)
    fig = axes[0].figure
  colors = plt.cm.tab10(np.arange(len(names)) % 10) if len(names) <= 10 else plt.cm.viridis(
      np.linspace(0, 1, len(names)))
  for ax, t in zip(axes, steps):
    for name, color in zip(names, colors):
      # Log axes: zeros (e.g. a zero-initialized layer at t = 1) are left out.
      points = [(w, v) for w, v in (means.get((name, t)) or {}).items() if v > 0]
      if not points:
        continue
      ax.plot(*zip(*points), "o-", ms=3, color=color, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(f"t = {t}", fontsize=9)
    ax.set_xlabel("width")
    ax.grid(alpha=0.3, which="both")
  axes[0].set_ylabel(f"{key} of the module's output")
  if legend:
    axes[len(steps) - 1].legend(fontsize=7, loc="best")
  if title:
    fig.suptitle(title, fontsize=10)
  if path is not None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
  return fig
