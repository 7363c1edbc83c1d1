"""Checkpoints of training state with Orbax, checked before anything is read.

Orbax (``orbax-checkpoint``, an optional dependency: ``pip install
sf_optax[checkpoint]``) saves any pytree of arrays, and every sf_optax optimizer
state is one (NamedTuples of arrays). These two helpers add what a resumed run
needs on top of ``ocp.StandardCheckpointer``:

* :func:`restore_checkpoint` compares the checkpoint's tree, shapes and dtypes
  with the running state *before* reading any array and names every path that
  differs (Orbax would silently cast dtypes, and reports a shape mismatch
  without the parameter's name); a missing, incomplete or corrupt checkpoint is
  reported as such. It returns new arrays and never modifies its ``target``: on
  any error the running state is as it was.
* Arrays come back bitwise, in the target's dtypes and with the target's
  shardings, so a resumed run is bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

import jax

__all__ = ("restore_checkpoint", "save_checkpoint")


def _orbax():
  try:
    import orbax.checkpoint as ocp
  except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sf_optax checkpoints need orbax-checkpoint: pip install orbax-checkpoint"
        " (or sf_optax[checkpoint])."
    ) from None
  return ocp


def save_checkpoint(directory: str | os.PathLike, tree: Any, *, overwrite: bool = False) -> None:
  """Saves a pytree of arrays (params, optimizer state, step, ...) to ``directory``.

  Blocks until the checkpoint is committed: Orbax writes to a temporary
  directory and renames it, so a crash mid-save never leaves a partial
  checkpoint under ``directory``.

  Args:
    directory: where to write; must not exist unless ``overwrite``.
    tree: any pytree of arrays, e.g. ``{"params": params, "opt_state": opt_state}``
      or, with NNX, ``{"model": nnx.state(model), "optimizer": nnx.state(optimizer)}``.
    overwrite: replace an existing checkpoint.
  """
  ocp = _orbax()
  directory = os.path.abspath(os.fspath(directory))
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(directory, tree, force=overwrite)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()


def _flat(ocp, tree) -> dict[str, Any]:
  serialized = ocp.tree.serialize_tree(tree, keep_empty_nodes=True)
  return {
      key: leaf for key, leaf in ocp.tree.to_flat_dict(serialized, sep=".").items()
      if leaf is not None and not (isinstance(leaf, (dict, list, tuple)) and not leaf)
  }


def _is_closed_loop_error(unraisable) -> bool:
  value = getattr(unraisable, "exc_value", None)
  return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


@contextlib.contextmanager
def _quiet_orphaned_reads(drain_s: float = 0.3):
  """Silences the orphaned reads Orbax leaves behind when reading a damaged checkpoint.

  When one of Orbax's concurrent tensorstore reads fails, the others finish
  after Orbax's asyncio loop has closed and each prints an unraisable
  "RuntimeError: Event loop is closed" traceback (orbax-checkpoint 0.12). On
  the error path only, this waits for them and drops exactly those.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_closed_loop_error(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  except BaseException:
    time.sleep(drain_s)
    raise
  finally:
    sys.unraisablehook = previous


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return (text.splitlines()[0] if text else "")[:300]


def _describe(differences: list[str], limit: int = 12) -> str:
  shown = differences[:limit]
  more = len(differences) - len(shown)
  return "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")


def restore_checkpoint(directory: str | os.PathLike, target: Any) -> Any:
  """Restores a checkpoint into the structure, shapes, dtypes and shardings of ``target``.

  Typical use, resuming training::

    target = {"params": params, "opt_state": opt_state}      # the running state
    restored = sf_optax.restore_checkpoint(path, target)
    params, opt_state = restored["params"], restored["opt_state"]

  ``target`` may be the running state itself (its values are not read, only
  their shapes, dtypes and shardings) or an abstract tree of
  ``jax.ShapeDtypeStruct`` (``jax.eval_shape``, with ``sharding=`` for sharded
  restores).

  Args:
    directory: a checkpoint written by :func:`save_checkpoint` (or by Orbax's
      ``StandardCheckpointer``).
    target: the tree to restore into.

  Returns:
    A new tree like ``target`` holding the checkpoint's values.

  Raises:
    FileNotFoundError: no checkpoint at ``directory``.
    ValueError: the checkpoint does not match ``target`` (every differing path
      is named: missing, unexpected, other shape or other dtype), or it is
      incomplete or corrupt. ``target`` is never modified.
  """
  ocp = _orbax()
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoint at {directory}.")
  checkpointer = ocp.StandardCheckpointer()
  try:
    with _quiet_orphaned_reads():
      return _restore(ocp, checkpointer, directory, target)
  finally:
    checkpointer.close()


def _restore(ocp, checkpointer, directory: str, target: Any) -> Any:
  try:
    item = checkpointer.metadata(directory).item_metadata
    metadata = None if item is None else item.tree
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
    raise ValueError(
        f"The checkpoint at {directory} is incomplete or corrupt: its metadata cannot"
        f" be read ({type(error).__name__}: {_first_line(error)}). Nothing was restored."
    ) from error
  if metadata is None:
    raise ValueError(
        f"The checkpoint at {directory} is incomplete or corrupt: Orbax cannot read"
        " its tree metadata. Nothing was restored."
    )

  stored = _flat(ocp, metadata)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  wanted = _flat(ocp, abstract)
  differences = [f"missing from the checkpoint: {k}" for k in sorted(set(wanted) - set(stored))]
  differences += [f"in the checkpoint, not in the target: {k}"
                  for k in sorted(set(stored) - set(wanted))]
  for key in sorted(set(stored) & set(wanted)):
    have, want = stored[key], wanted[key]
    have_shape = tuple(getattr(have, "shape", ()) or ())
    if have_shape != tuple(want.shape):
      differences.append(f"{key}: shape {have_shape} in the checkpoint, {tuple(want.shape)}"
                         " in the target")
    have_dtype = getattr(have, "dtype", None)
    if have_dtype is not None and jax.numpy.dtype(have_dtype) != jax.numpy.dtype(want.dtype):
      differences.append(f"{key}: dtype {jax.numpy.dtype(have_dtype).name} in the checkpoint,"
                         f" {jax.numpy.dtype(want.dtype).name} in the target")
  if differences:
    raise ValueError(
        f"The checkpoint at {directory} does not match the target state"
        f" ({len(differences)} differences; nothing was restored):\n  "
        + _describe(differences)
    )

  try:
    restored = checkpointer.restore(directory, abstract)
  except (OSError, ValueError, KeyError) as error:
    raise ValueError(
        f"The checkpoint at {directory} is incomplete or corrupt; nothing was restored"
        f" ({type(error).__name__}: {_first_line(error)})."
    ) from error
  return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored))
