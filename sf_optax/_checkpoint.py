"""Checkpoints of training state on Orbax: committed whole, verified before use.

Orbax (``orbax-checkpoint``, an optional dependency: ``pip install
sf_optax[checkpoint]``) saves any pytree of arrays, and every sf_optax optimizer
state is one (NamedTuples of arrays). :class:`CheckpointManager` is Orbax's
``CheckpointManager`` (one directory per step, ``max_to_keep``, asynchronous
saves) with what a long, preemptible run needs on top:

* **Atomic commit, digest included.** A step is written to a temporary
  directory and renamed into place; just before the rename, a manifest with the
  size and SHA-256 of every file of the step is written into it. A save killed
  at any moment leaves either the previous steps alone or the new step complete:
  old steps are removed (``max_to_keep``) only after the new one is committed.
* **Damage is detected.** Orbax's data files are not checksummed (OCDBT and
  zarr checksum their indices, not the array bytes), so every restore first
  checks each file against the manifest. A missing, truncated, zeroed, flipped
  or extra-long file, unreadable metadata or an empty directory raises
  :class:`CheckpointError` naming the file and the cause.
* **Checked against the running state before any array is read**: tree,
  shapes and dtypes, every differing path named.
* **Bitwise resume** in the target's dtypes and shardings; Python ``int`` and
  ``float`` leaves (Flax ``TrainState.step``) come back as such. The target is
  never modified: on any error the running state is as it was.
* μP base shapes (``mup_flax``) can be saved in the same commit.

:func:`save_checkpoint` and :func:`restore_checkpoint` do the same for one
checkpoint in one directory (an export, a manual snapshot).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from typing import Any, Iterable, Optional

import jax
import numpy as np

from sf_optax._per_parameter import parameter_path_name

__all__ = (
    "CheckpointError",
    "CheckpointManager",
    "restore_checkpoint",
    "save_checkpoint",
)

MANIFEST_NAME = "sf_optax_manifest.json"
_MANIFEST_FORMAT = "sf_optax.checkpoint_manifest"
_MANIFEST_VERSION = 1
_STATE_ITEM = "state"
_BASE_SHAPES_ITEM = "base_shapes"
_HASH_BLOCK = 1 << 22


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored: damaged, incomplete, or another model's.

  The first line of the message names the file (or the checkpoint) and the
  cause; for a checkpoint that does not match the target, the following lines
  name every differing path. Nothing was restored and the target is untouched.
  """


def _orbax():
  try:
    import orbax.checkpoint as ocp
  except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sf_optax checkpoints need orbax-checkpoint: pip install orbax-checkpoint"
        " (or sf_optax[checkpoint])."
    ) from None
  return ocp


# ---------------------------------------------------------------------------
# The digest manifest: written at commit, checked at restore.
# ---------------------------------------------------------------------------


def _file_digest(path: str) -> tuple[int, str]:
  digest = hashlib.sha256()
  size = 0
  with open(path, "rb") as f:
    while block := f.read(_HASH_BLOCK):
      digest.update(block)
      size += len(block)
  return size, digest.hexdigest()


def _files_under(directory: str) -> list[str]:
  found = []
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      relative = os.path.relpath(os.path.join(root, name), directory)
      if relative != MANIFEST_NAME:
        found.append(relative.replace(os.sep, "/"))
  return found


def _digests(directory: str, names: Iterable[str]) -> dict[str, tuple[int, str]]:
  names = list(names)
  # hashlib releases the GIL on large blocks: files are hashed in parallel.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:
    results = pool.map(lambda n: _file_digest(os.path.join(directory, n)), names)
    return dict(zip(names, results))


def _listing_digest(files: dict) -> str:
  return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: str) -> None:
  """Writes the size and SHA-256 of every file under ``directory`` (the last write of a save)."""
  files = {name: {"size": size, "sha256": sha}
           for name, (size, sha) in _digests(directory, _files_under(directory)).items()}
  document = {"format": _MANIFEST_FORMAT, "version": _MANIFEST_VERSION,
              "files": files, "listing_sha256": _listing_digest(files)}
  path = os.path.join(directory, MANIFEST_NAME)
  with open(path + ".tmp", "w") as f:
    json.dump(document, f, indent=1, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def _load_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST_NAME)
  if not os.path.isfile(path):
    entries = os.listdir(directory) if os.path.isdir(directory) else []
    cause = "the directory is empty" if not entries else "it has no manifest"
    if any(entry.isdigit() for entry in entries):
      cause += "; it holds steps: restore with CheckpointManager(directory).restore(target)"
    raise CheckpointError(
        f"{path}: not a committed sf_optax checkpoint: {cause} (an interrupted save,"
        " a deleted file, or a checkpoint written by another tool).")
  try:
    with open(path, "rb") as f:
      document = json.loads(f.read().decode("utf-8"))
    files = document["files"]
    valid = (document.get("format") == _MANIFEST_FORMAT and isinstance(files, dict)
             and all(isinstance(v, dict) and isinstance(v.get("size"), int)
                     and isinstance(v.get("sha256"), str) for v in files.values()))
  except (ValueError, KeyError, TypeError, UnicodeDecodeError):
    valid = False
  if not valid:
    raise CheckpointError(f"{path}: the manifest is corrupt (not a valid {_MANIFEST_FORMAT}).")
  if document.get("version") != _MANIFEST_VERSION:
    raise CheckpointError(f"{path}: manifest version {document.get('version')!r}; this"
                          f" sf_optax reads version {_MANIFEST_VERSION}.")
  if document.get("listing_sha256") != _listing_digest(files):
    raise CheckpointError(f"{path}: the manifest is corrupt (its own digest does not match).")
  return files


def verify_directory(directory: str, names: Optional[Iterable[str]] = None) -> None:
  """Checks every file of a committed checkpoint (or only ``names``) against its manifest.

  Raises:
    CheckpointError: the first line names the first damaged file and the cause
      (missing, size, contents), the next ones how many others are damaged.
  """
  files = _load_manifest(directory)
  names = sorted(files) if names is None else [n for n in names if n in files]
  problems = []
  present = []
  for name in names:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      problems.append((path, "missing"))
    elif os.path.getsize(path) != files[name]["size"]:
      problems.append((path, f"{os.path.getsize(path)} bytes, {files[name]['size']} when"
                       " committed (truncated or overwritten)"))
    else:
      present.append(name)
  for name, (_, sha) in _digests(directory, present).items():
    if sha != files[name]["sha256"]:
      problems.append((os.path.join(directory, name),
                       "contents differ from the commit (SHA-256 mismatch)"))
  if problems:
    problems.sort()
    path, cause = problems[0]
    more = ""
    if len(problems) > 1:
      more = f"\n{len(problems) - 1} more damaged: " + ", ".join(
          os.path.relpath(p, directory) for p, _ in problems[1:6])
    raise CheckpointError(f"{path}: damaged checkpoint file, {cause}. Nothing was restored.{more}")


def _committing_path_class(ocp, root: str):
  """Orbax's atomic-rename commit with the manifest written just before the rename.

  The manifest must digest every file in its final state, so it is written after
  Orbax's last write into the step directory (the step metadata's commit time and
  ``commit_success.txt``) and before the rename that makes the step visible. Orbax
  calls ``finalize`` on the primary process only, once every process has written
  its part. Items inside a step (``state``, ``base_shapes``) use Orbax's own
  finalize.
  """
  atomicity = ocp.path.atomicity

  class DigestThenRename(atomicity.AtomicRenameTemporaryPath):

    async def finalize(self):
      final = os.path.abspath(os.fspath(self.get_final()))
      if os.path.dirname(final) != root:
        return await super().finalize()
      tmp = os.fspath(self.get())
      store = self._checkpoint_metadata_store
      if store is not None:  # as AtomicRenameTemporaryPath.finalize (orbax-checkpoint 0.12)
        await asyncio.to_thread(store.wait_until_finished)
        await asyncio.to_thread(store.update, file_path=self.get() / "_CHECKPOINT_METADATA",
                                commit_timestamp_nsecs=time.time_ns())
        await asyncio.to_thread(store.wait_until_finished)
      with open(os.path.join(tmp, atomicity.COMMIT_SUCCESS_FILE), "w") as f:
        f.write(f"Checkpoint commit was successful to {final}")
      await asyncio.to_thread(write_manifest, tmp)
      os.rename(tmp, final)

  return DigestThenRename


# ---------------------------------------------------------------------------
# Restoring: verify, compare with the target, read.
# ---------------------------------------------------------------------------


def _is_closed_loop_error(unraisable) -> bool:
  value = getattr(unraisable, "exc_value", None)
  return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


@contextlib.contextmanager
def _quiet_orphaned_reads(drain_s: float = 0.3):
  """Silences the orphaned reads Orbax leaves behind when a read fails.

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
  return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _describe(differences: list[str], limit: int = 12) -> str:
  shown = differences[:limit]
  more = len(differences) - len(shown)
  return "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")


def _flat(ocp, tree) -> dict[str, Any]:
  serialized = ocp.tree.serialize_tree(tree, keep_empty_nodes=True)
  return {
      key: leaf for key, leaf in ocp.tree.to_flat_dict(serialized, sep="/").items()
      if leaf is not None and not (isinstance(leaf, (dict, list, tuple)) and not leaf)
  }


def _is_python_scalar(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _abstract(ocp, leaf):
  if _is_python_scalar(leaf):
    return leaf
  if isinstance(leaf, jax.ShapeDtypeStruct):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      # What Orbax makes of a key array (an NNX Rngs stream, say): its key data,
      # uint32, restored as keys. An abstract one (nnx.eval_shape) must match it.
      data = jax.eval_shape(jax.random.key_data, leaf)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=leaf.sharding)
    return leaf
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    raise TypeError(f"target leaf of type {type(leaf).__name__} is not an array,"
                    " jax.ShapeDtypeStruct or Python int/float.")
  return ocp.utils.to_shape_dtype_struct(leaf)


def _kind(dtype) -> str:
  return np.dtype(dtype).name


def _differences(stored: dict, wanted: dict) -> list[str]:
  differences = [f"missing from the checkpoint: {k}" for k in sorted(set(wanted) - set(stored))]
  differences += [f"in the checkpoint, not in the target: {k}"
                  for k in sorted(set(stored) - set(wanted))]
  for key in sorted(set(stored) & set(wanted)):
    have, want = stored[key], wanted[key]
    have_shape = tuple(getattr(have, "shape", None) or ())
    have_dtype = getattr(have, "dtype", None)
    if _is_python_scalar(want):
      scalar = type(have).__name__ == "ScalarMetadata"
      kind = None if have_dtype is None else np.dtype(have_dtype).kind
      if not scalar or kind != ("i" if isinstance(want, int) else "f"):
        what = (f"Python scalar of dtype {_kind(have_dtype)}" if scalar else
                f"array of shape {have_shape} and dtype {_kind(have_dtype)}")
        differences.append(f"{key}: {what} in the checkpoint, Python {type(want).__name__}"
                           " in the target")
      continue
    if type(have).__name__ == "ScalarMetadata":
      differences.append(f"{key}: Python scalar in the checkpoint, array of shape"
                         f" {tuple(want.shape)} and dtype {_kind(want.dtype)} in the target")
      continue
    if have_shape != tuple(want.shape):
      differences.append(f"{key}: shape {have_shape} in the checkpoint, {tuple(want.shape)}"
                         " in the target")
    if have_dtype is not None and np.dtype(have_dtype) != np.dtype(want.dtype):
      differences.append(f"{key}: dtype {_kind(have_dtype)} in the checkpoint,"
                         f" {_kind(want.dtype)} in the target")
  return differences


def _restore_committed(ocp, directory: str, target: Any) -> Any:
  """Verifies, compares and reads the ``state`` item of a committed checkpoint directory."""
  verify_directory(directory)
  item = os.path.join(directory, _STATE_ITEM)
  checkpointer = ocp.StandardCheckpointer()
  try:
    with _quiet_orphaned_reads():
      try:
        metadata = checkpointer.metadata(item).item_metadata
        metadata = None if metadata is None else metadata.tree
      except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{item}: the tree metadata cannot be read"
                              f" ({type(error).__name__}: {_first_line(error)}).") from error
      if metadata is None:
        raise CheckpointError(f"{item}: the tree metadata cannot be read.")
      try:
        abstract = jax.tree.map(lambda leaf: _abstract(ocp, leaf), target)
      except TypeError as error:
        raise TypeError(f"restore target: {error}") from None
      differences = _differences(_flat(ocp, metadata), _flat(ocp, abstract))
      if differences:
        raise CheckpointError(
            f"{directory}: the checkpoint does not match the target state"
            f" ({len(differences)} differences; nothing was restored):\n  "
            + _describe(differences))
      try:
        restored = checkpointer.restore(item, abstract)
      except Exception as error:  # TensorStore raises bare Exceptions with its whole spec
        raise CheckpointError(f"{item}: cannot be read ({type(error).__name__}:"
                              f" {_first_line(error)}). Nothing was restored.") from error
  finally:
    checkpointer.close()
  return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored))


# ---------------------------------------------------------------------------
# μP base shapes, stored as one JSON item of the same commit.
# ---------------------------------------------------------------------------


def _base_shapes_document(base_shapes: Any) -> dict:
  import mup_flax  # only when base shapes are given: mup_flax is then in use

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "base_shapes.json")
    mup_flax.save_base_shapes(base_shapes, path)
    with open(path) as f:
      return json.load(f)


def _read_base_shapes(directory: str) -> Any:
  import mup_flax

  item = os.path.join(directory, _BASE_SHAPES_ITEM)
  if not os.path.isdir(item):
    raise CheckpointError(f"{directory}: saved without base_shapes.")
  names = [n for n in _load_manifest(directory) if n.startswith(_BASE_SHAPES_ITEM + "/")]
  verify_directory(directory, names)
  ocp = _orbax()
  checkpointer = ocp.Checkpointer(ocp.JsonCheckpointHandler())
  try:
    document = checkpointer.restore(item)
  finally:
    checkpointer.close()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "base_shapes.json")
    with open(path, "w") as f:
      json.dump(document, f)
    return mup_flax.load_base_shapes(path)


def _composite_args(ocp, tree: Any, base_shapes: Any):
  items = {_STATE_ITEM: ocp.args.StandardSave(tree)}
  if base_shapes is not None:
    items[_BASE_SHAPES_ITEM] = ocp.args.JsonSave(_base_shapes_document(base_shapes))
  return ocp.args.Composite(**items)



def _check_tree(tree: Any) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not (_is_python_scalar(leaf) or isinstance(leaf, (jax.Array, np.ndarray, np.generic))):
      raise TypeError(f"save: leaf {parameter_path_name(path)} is a {type(leaf).__name__}; a checkpoint"
                      " holds arrays and Python int/float leaves only.")


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------


class CheckpointManager:
  """Keeps the last steps of a run in ``directory/<step>``, each committed whole.

  Built on Orbax's ``CheckpointManager``; see the module docstring for what it
  adds. Typical use::

    manager = sf_optax.CheckpointManager(ckpt_dir, max_to_keep=3)
    state = {"params": params, "opt_state": tx.init(params)}
    if manager.latest_step() is not None:          # resuming after a preemption
      state = manager.restore(state)
    start = 0 if manager.latest_step() is None else manager.latest_step() + 1
    for step in range(start, num_steps):
      state = train_step(state)
      if step % 1000 == 0:
        manager.save(step, state)
    manager.close()

  With several processes (``jax.distributed``) every process calls the same
  methods with its shards of the same global arrays: Orbax writes each process's
  shards, process 0 writes the manifest and commits, every process verifies
  before reading. The directory must be reachable by all processes, on a
  filesystem with atomic directory renames (local disks, NFS, Lustre, GPFS).

  Args:
    directory: the root; created if missing.
    max_to_keep: how many of the newest steps to keep (``None``: all). An older
      step is removed only once a newer one is committed.
    async_save: return from :meth:`save` once the arrays are copied off the
      devices, and write them in a background thread (Orbax's asynchronous
      checkpointing). :meth:`wait_until_finished` (called by :meth:`restore`,
      :meth:`close` and the next :meth:`save`) waits for the commit.

  >>> import tempfile, jax.numpy as jnp, sf_optax
  >>> state = {"w": jnp.arange(3.0), "step": 7}
  >>> with sf_optax.CheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as manager:
  ...   for step in range(3):
  ...     manager.save(step, state)
  ...   print(manager.all_steps(), manager.restore(state)["step"])
  [1, 2] 7
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: Optional[int] = None,
               async_save: bool = False):
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}.")
    ocp = _orbax()
    self._ocp = ocp
    self._directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(self._directory) and not os.path.isdir(self._directory):
      raise ValueError(f"directory {self._directory} exists and is not a directory.")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=bool(async_save),
        create=True,
        cleanup_tmp_directories=True,
        temporary_path_class=_committing_path_class(ocp, self._directory),
    )
    self._manager = ocp.CheckpointManager(self._directory, options=options,
                                          item_names=(_STATE_ITEM, _BASE_SHAPES_ITEM))

  @property
  def directory(self) -> str:
    """The root directory (absolute)."""
    return self._directory

  def step_directory(self, step: int) -> str:
    """The directory of one step's checkpoint."""
    return os.path.join(self._directory, str(int(step)))

  def all_steps(self) -> list[int]:
    """The committed steps, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest committed step, or ``None`` before the first save."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, *, base_shapes: Any = None) -> None:
    """Saves ``state`` (a pytree of arrays and Python scalars) as ``step``.

    Args:
      step: a non-negative int, not saved yet.
      state: e.g. ``{"params": params, "opt_state": opt_state}``, a Flax
        ``TrainState``, or ``{"model": nnx.state(model), "optimizer":
        nnx.state(optimizer)}``.
      base_shapes: μP base shapes (what ``mup_flax.save_base_shapes`` takes),
        stored in the same commit; read back with :meth:`base_shapes`.

    Raises:
      ValueError: ``step`` exists already.
      TypeError: a leaf of ``state`` is not an array or a Python int/float.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"step must be a non-negative int, got {step!r}.")
    step = int(step)
    _check_tree(state)
    self._manager.wait_until_finished()
    if step in self.all_steps():
      raise ValueError(f"step {step} exists already in {self._directory}.")
    self._manager.save(step, args=_composite_args(self._ocp, state, base_shapes))

  def wait_until_finished(self) -> None:
    """Blocks until an asynchronous save is committed (on every process)."""
    self._manager.wait_until_finished()

  def restore(self, target: Any, *, step: Optional[int] = None) -> Any:
    """Restores ``step`` (default: the latest) into the structure, dtypes and shardings of ``target``.

    ``target`` may be the running state itself (only its shapes, dtypes and
    shardings are used; it is never modified) or an abstract tree of
    ``jax.ShapeDtypeStruct`` (with ``sharding=`` to restore onto other devices or
    another number of processes), with Python ``int``/``float`` leaves where the
    state has them.

    Raises:
      FileNotFoundError: no committed step (or not ``step``) in the directory.
      CheckpointError: the step is damaged (first line: the file and the cause)
        or does not match ``target`` (every differing path named).
    """
    self._manager.wait_until_finished()
    step = self._existing_step(step)
    return _restore_committed(self._ocp, self.step_directory(step), target)

  def base_shapes(self, *, step: Optional[int] = None) -> Any:
    """The μP base shapes saved with ``step`` (default: the latest), as ``mup_flax.load_base_shapes``."""
    self._manager.wait_until_finished()
    return _read_base_shapes(self.step_directory(self._existing_step(step)))

  def close(self) -> None:
    """Waits for a pending save and releases Orbax's resources."""
    self._manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _existing_step(self, step: Optional[int]) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"No committed checkpoint in {self._directory}.")
      return steps[-1]
    if int(step) not in steps:
      raise FileNotFoundError(f"No committed step {step} in {self._directory} (steps: {steps}).")
    return int(step)


def save_checkpoint(directory: str | os.PathLike, tree: Any) -> None:
  """Saves one checkpoint of a pytree (params, optimizer state, step, ...) to a new ``directory``.

  For a run that saves repeatedly, use :class:`CheckpointManager`: it keeps
  the previous step until the next one is committed. This is for one-off
  checkpoints, such as the evaluation params ``eval_params(opt_state, params)``
  exported for inference. It is committed the same way: written to a temporary
  directory with its digest manifest, then renamed to ``directory``.

  Args:
    directory: where to write; must not exist.
    tree: any pytree of arrays and Python int/float leaves.

  Raises:
    ValueError: ``directory`` exists.

  >>> import os, tempfile, jax.numpy as jnp, sf_optax
  >>> path = os.path.join(tempfile.mkdtemp(), "export")
  >>> sf_optax.save_checkpoint(path, {"w": jnp.ones(2)})
  >>> sf_optax.restore_checkpoint(path, {"w": jnp.zeros(2)})
  {'w': Array([1., 1.], dtype=float32)}
  """
  ocp = _orbax()
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory):
    raise ValueError(f"{directory} exists: save_checkpoint writes a new directory (use"
                     " CheckpointManager to keep a rolling latest checkpoint).")
  _check_tree(tree)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(),
                                  temporary_path_class=_committing_path_class(ocp, parent))
  try:
    checkpointer.save(directory, args=_composite_args(ocp, tree, None))
  finally:
    checkpointer.close()


def restore_checkpoint(directory: str | os.PathLike, target: Any) -> Any:
  """Restores a checkpoint written by :func:`save_checkpoint` into the structure of ``target``.

  Also accepts one step directory of a :class:`CheckpointManager`
  (``manager.step_directory(step)``). ``target`` is used as in
  :meth:`CheckpointManager.restore` and never modified.

  Raises:
    FileNotFoundError: ``directory`` does not exist.
    CheckpointError: it is damaged (first line: the file and the cause) or does
      not match ``target`` (every differing path named).
  """
  ocp = _orbax()
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoint at {directory}.")
  return _restore_committed(ocp, directory, target)
