"""Runs a worker script as several JAX processes on this machine (multi-controller).

JAX's multi-controller runtime is what multi-host training runs on: one Python
process per host, ``jax.distributed.initialize`` connecting them, the mesh
spanning every process's devices. On one machine the same runtime runs over
loopback: each process gets ``--xla_force_host_platform_device_count`` virtual
CPU devices and the CPU collectives go through Gloo, so the cross-process
all-reduces and all-gathers are real ones.

Two halves, one module:

* :func:`launch` (the test side) starts ``num_processes`` copies of a worker
  script on a free loopback port, each in its own process group, with a time
  limit; when one process fails the others are stopped after a short grace
  period (a process left waiting in a collective would otherwise wait for
  minutes). Every process is killed and reaped before it returns or raises,
  whatever happens. On failure the error shows every process's exit code,
  stdout and stderr.
* :func:`initialize` (the worker side, called before any other JAX call) reads
  what :func:`launch` put in the environment and connects the process.

A worker is a plain script (never collected by pytest: ``collect_ignore`` in
``tests/conftest.py``); it finds this module next to it on ``sys.path``.
With ``num_processes=1`` the worker runs alone, without ``jax.distributed``,
on ``devices_per_process`` devices: the single-process reference runs.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Environment variables from launch() to initialize().
_COORDINATOR = "SF_TEST_COORDINATOR"
_NUM_PROCESSES = "SF_TEST_NUM_PROCESSES"
_PROCESS_ID = "SF_TEST_PROCESS_ID"

# Virtual CPU devices share one thread pool per process: multi-threaded Eigen
# kernels can starve a device that a collective waits for, so single-threaded
# (as in tests/_sharding_worker.py); collectives may wait long on a busy machine.
_XLA_FLAGS = (
    "--xla_cpu_multi_thread_eigen=false"
    " --xla_cpu_collective_call_terminate_timeout_seconds=300"
)


@dataclasses.dataclass(frozen=True)
class ProcessResult:
  """How one worker process ended."""

  process_id: int
  returncode: int | None  # None: killed by the launcher (time limit or another process failed)
  stdout: str
  stderr: str
  killed: bool = False


class WorkersFailed(AssertionError):
  """A worker process failed, or the workers ran past their time limit."""

  def __init__(self, message: str, results: list[ProcessResult]):
    super().__init__(message)
    self.results = results


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def report(results: list[ProcessResult], tail: int = 6000) -> str:
  """Every process's exit and the ends of its stdout and stderr."""
  parts = []
  for r in results:
    how = "killed by the launcher" if r.killed else f"exit code {r.returncode}"
    parts.append(
        f"--- process {r.process_id} ({how}) stdout:\n{r.stdout[-tail:]}"
        f"\n--- process {r.process_id} stderr:\n{r.stderr[-tail:]}"
    )
  return "\n".join(parts)


def _kill_group(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def launch(
    script: str | os.PathLike,
    *args: str,
    num_processes: int = 2,
    devices_per_process: int = 4,
    timeout_s: float = 240.0,
    grace_s: float = 10.0,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> list[ProcessResult]:
  """Runs ``python script *args`` as ``num_processes`` connected JAX processes.

  Args:
    script: the worker script; it calls :func:`initialize` before any other JAX call.
    *args: its command-line arguments (the same for every process).
    num_processes: 1 runs the worker alone (no ``jax.distributed``).
    devices_per_process: virtual CPU devices of each process.
    timeout_s: every process is killed after this long (then this raises).
    grace_s: once a process has failed, how long the others may still run.
    check: raise :class:`WorkersFailed` unless every process exits with 0.
    env: extra environment variables.

  Returns:
    One :class:`ProcessResult` per process, in process order.
  """
  port = free_port()
  base = dict(os.environ)
  base.update(env or {})
  base["XLA_FLAGS"] = (
      f"{base.get('XLA_FLAGS', '')} {_XLA_FLAGS}"
      f" --xla_force_host_platform_device_count={devices_per_process}"
  ).strip()
  base["JAX_PLATFORMS"] = "cpu"
  base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
  base[_COORDINATOR] = f"127.0.0.1:{port}"
  base[_NUM_PROCESSES] = str(num_processes)

  procs: list[subprocess.Popen] = []
  killed: set[int] = set()
  with tempfile.TemporaryDirectory(prefix="sf_multiprocess_") as logs:
    files = []
    try:
      for i in range(num_processes):
        out = open(os.path.join(logs, f"{i}.out"), "w+")  # noqa: SIM115 -- closed below
        err = open(os.path.join(logs, f"{i}.err"), "w+")  # noqa: SIM115
        files.append((out, err))
        procs.append(subprocess.Popen(
            [sys.executable, str(script), *map(str, args)],
            cwd=ROOT, env={**base, _PROCESS_ID: str(i)}, stdout=out, stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: killed with everything it started
        ))
      deadline = time.monotonic() + timeout_s
      failed_at = None
      while [p.poll() for p in procs].count(None):  # poll every one (no short circuit)
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
          failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + grace_s):
          for i, p in enumerate(procs):
            if p.poll() is None:
              killed.add(i)
              _kill_group(p)
          break
        time.sleep(0.05)
    finally:
      # Whatever happened (a time limit, KeyboardInterrupt, an error above): no
      # process of ours outlives this call, nor anything it started.
      for i, p in enumerate(procs):
        if p.poll() is None:
          killed.add(i)
        _kill_group(p)
        p.wait()
    results = []
    for i, (p, (out, err)) in enumerate(zip(procs, files)):
      out.seek(0)
      err.seek(0)
      results.append(ProcessResult(i, None if i in killed else p.returncode, out.read(),
                                   err.read(), killed=i in killed))
      out.close()
      err.close()
  if check:
    if killed and all(r.returncode in (None, 0) for r in results):
      raise WorkersFailed(
          f"{script} ran past its time limit of {timeout_s:.0f} s"
          f" ({num_processes} processes):\n{report(results)}", results)
    if any(r.returncode != 0 for r in results):
      raise WorkersFailed(f"{script} failed ({num_processes} processes):\n{report(results)}",
                          results)
  return results


def initialize():
  """Connects this worker to the others; call it before any other JAX call.

  Returns ``jax``, configured: Gloo CPU collectives, ``jax.distributed``
  initialized when the launcher started more than one process.
  """
  if _NUM_PROCESSES not in os.environ:
    raise RuntimeError(
        "initialize() reads what tests/_multiprocess.launch() puts in the environment;"
        " start this worker through launch()."
    )
  import jax

  num_processes = int(os.environ[_NUM_PROCESSES])
  if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ[_COORDINATOR],
        num_processes=num_processes,
        process_id=int(os.environ[_PROCESS_ID]),
        initialization_timeout=120,
    )
  return jax
