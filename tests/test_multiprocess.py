"""Multi-process training on JAX's multi-controller runtime, for real, on one machine.

Every job runs ``tests/_multiprocess_worker.py`` through
``tests/_multiprocess.launch``: 2 processes x 4 virtual CPU devices connected
over loopback (``jax.distributed`` + Gloo collectives), or 1 process x 8
devices for the references. The 8-device mesh is the same in both, so the
2-process run must give the single-process numbers; what differs is that the
all-reduces and all-gathers cross a process boundary.

The launcher's own tests and a smoke test of the runtime (one tiny collective)
are in the default tier; the training and checkpoint jobs are slow. Run::

  python -m pytest tests/test_multiprocess.py -q -m "slow or not slow" -p no:xdist
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import textwrap
import time

import numpy as np
import pytest

import _multiprocess

WORKER = pathlib.Path(__file__).with_name("_multiprocess_worker.py")
# Schedule-Free AdamW with and without x in the state, ScheduleFree+ under jit
# and inside shard_map (explicit psum/pmean over the axis, across processes).
OPTIMIZERS = ("adamw", "adamw_no_x", "plus", "plus_shard_map")
CHECKPOINTED = ("adamw", "plus")
# The attention key bias has an exactly zero gradient (softmax ignores a shift
# shared by all keys): its value is rounding noise, different for every
# reduction order, so it is compared in absolute terms (both runs ~1e-13).
ZERO_GRADIENT = "['attn']['key']['bias']"
FLOAT64_TOLERANCE = 1e-12


def records_of(results) -> dict:
  """The JSON lines process 0 printed, by case."""
  found = {}
  for line in results[0].stdout.splitlines():
    if line.startswith("{"):
      record = json.loads(line)
      found[record["case"]] = record
  return found


def run(case: str, out: pathlib.Path, *args: str, num_processes: int = 2,
        devices_per_process: int | None = None, **kwargs):
  """Runs one job of the worker (2 x 4 devices, or 1 x 8); process 0's record."""
  out.mkdir(parents=True, exist_ok=True)
  start, cpu = time.monotonic(), _children_cpu_s()
  results = _multiprocess.launch(
      WORKER, case, str(out), *args, num_processes=num_processes,
      devices_per_process=devices_per_process or 8 // num_processes, **kwargs)
  return {**records_of(results)[case], "wall_s": round(time.monotonic() - start, 1),
          "cpu_s": round(_children_cpu_s() - cpu, 1)}


def _children_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def run_once(tmp_path_factory, name: str, make):
  """``make()`` once per session, also under pytest-xdist (its JSON result is shared)."""
  if "PYTEST_XDIST_WORKER" not in os.environ:
    return make()
  try:
    from filelock import FileLock
  except ImportError:  # every xdist worker runs its own copy then
    return make()
  shared = tmp_path_factory.getbasetemp().parent / f"{name}.json"
  with FileLock(str(shared) + ".lock"):
    if shared.is_file():
      return json.loads(shared.read_text())
    result = make()
    shared.write_text(json.dumps(result))
    return result


# ---------------------------------------------------------------------------
# The launcher (no JAX: fast).
# ---------------------------------------------------------------------------


def _script(tmp_path, body: str) -> pathlib.Path:
  path = tmp_path / "worker.py"
  path.write_text(textwrap.dedent(body))
  return path


def _gone(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  # A zombie is gone too (its parent has not reaped it yet).
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] == "Z"
  except FileNotFoundError:
    return True


def test_launcher_reports_every_process_and_leaves_none(tmp_path):
  # Process 1 fails; process 0 would wait forever (as in a collective), and has
  # started a grandchild that would outlive it.
  script = _script(tmp_path, f"""
      import os, subprocess, sys, time
      rank = int(os.environ["SF_TEST_PROCESS_ID"])
      if rank == 1:
        print("process one was here")
        sys.exit("process one fails")
      child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
      with open({str(tmp_path / "pids")!r}, "w") as f:
        f.write(f"{{os.getpid()}} {{child.pid}}")
      print("process zero waits", flush=True)
      time.sleep(600)
  """)
  start = time.monotonic()
  with pytest.raises(_multiprocess.WorkersFailed) as error:
    _multiprocess.launch(script, timeout_s=60, grace_s=1)
  assert time.monotonic() - start < 30
  message = str(error.value)
  assert "process one fails" in message and "process one was here" in message
  assert "process zero waits" in message and "killed by the launcher" in message
  assert [r.returncode for r in error.value.results] == [None, 1]
  pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
  deadline = time.monotonic() + 10
  while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert all(_gone(pid) for pid in pids), pids


def test_launcher_time_limit(tmp_path):
  script = _script(tmp_path, """
      import time
      print("started", flush=True)
      time.sleep(600)
  """)
  with pytest.raises(_multiprocess.WorkersFailed, match="time limit of 2 s") as error:
    _multiprocess.launch(script, timeout_s=2)
  assert all(r.killed for r in error.value.results)
  assert "started" in str(error.value)


def test_launcher_environment(tmp_path):
  script = _script(tmp_path, """
      import os
      print(os.environ["SF_TEST_PROCESS_ID"], os.environ["SF_TEST_NUM_PROCESSES"],
            os.environ["SF_TEST_COORDINATOR"].split(":")[0], os.environ["XLA_FLAGS"].split()[-1])
  """)
  results = _multiprocess.launch(script, num_processes=3, devices_per_process=2, timeout_s=60)
  lines = [r.stdout.split() for r in results]
  assert [line[:3] for line in lines] == [[str(i), "3", "127.0.0.1"] for i in range(3)]
  assert {line[3] for line in lines} == {"--xla_force_host_platform_device_count=2"}


# ---------------------------------------------------------------------------
# The runtime: a tiny collective across 2 processes (default tier, ~10 s).
# ---------------------------------------------------------------------------


def test_two_processes_one_collective(tmp_path):
  record = run("smoke", tmp_path, timeout_s=120)
  assert record["process_count"] == 2
  assert record["device_count"] == 8 and record["local_device_count"] == 4
  assert record["sum"] == 28.0  # 0 + 1 + ... + 7, half of it on each process
  assert record["gathered"] == list(range(8))


# ---------------------------------------------------------------------------
# Training: 2 processes equal 1 process on the same 8-device mesh.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  """Faster compiles for the training jobs, which compile more than they run.

  One persistent compilation cache for the session (the resuming job compiles
  the programs of the run it resumes), and XLA's backend optimizations off
  (the same flags for every job: the comparisons are between equal programs).
  """
  path = tmp_path_factory.mktemp("jax_cache")
  return {"JAX_COMPILATION_CACHE_DIR": str(path),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
          "XLA_FLAGS": "--xla_backend_optimization_level=0"}


@pytest.fixture(scope="session")
def jobs(tmp_path_factory, compile_cache):
  """The 2-process training run (saving a checkpoint after step 2), its 1-process
  reference, the fresh 2-process job resuming from the checkpoint and the
  1-process job restoring it on 2 devices."""
  def make():
    root = tmp_path_factory.mktemp("multiprocess")
    common = ("--init", str(root / "init.npz"))  # written by the first job
    checkpoint = ("--checkpoint", str(root / "checkpoints"))
    return {
        "root": str(root),
        "one": run("train", root / "one", *common, num_processes=1, env=compile_cache),
        "two": run("train", root / "two", *common, *checkpoint, env=compile_cache),
        "resume": run("resume", root / "resume", *common, *checkpoint, env=compile_cache),
        "restore": run("restore", root / "restore", *common, *checkpoint,
                       num_processes=1, devices_per_process=2, env=compile_cache),
    }

  return run_once(tmp_path_factory, "multiprocess_jobs", make)


def arrays(jobs, job: str, name: str) -> dict[str, np.ndarray]:
  return dict(np.load(pathlib.Path(jobs["root"]) / job / name))


@pytest.mark.slow
def test_job_times(jobs):
  """Reports each job's wall time and CPU time (run with -s to see them)."""
  print("\n" + ", ".join(f"{job}: {jobs[job]['wall_s']} s wall, {jobs[job]['cpu_s']} s CPU"
                         for job in ("one", "two", "resume", "restore")))


def assert_same_training(two, one, name, reference):
  """params and eval_params of optimizer ``name`` in ``two`` equal ``reference``'s in ``one``."""
  keys = [k for k in two if k.startswith(f"['{name}']") and "opt_state" not in k]
  assert len(keys) == 2 * 22  # params and eval_params
  for key in keys:
    a, b = two[key], one[key.replace(f"['{name}']", f"['{reference}']", 1)]
    assert a.dtype == b.dtype == np.float64, key
    if ZERO_GRADIENT in key:
      assert max(np.abs(a).max(), np.abs(b).max()) <= 1e-12, key
      continue
    error = np.abs(a - b).max() / np.abs(b).max()
    assert error <= FLOAT64_TOLERANCE, (key, error)


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp_training_two_processes_equals_one(jobs, name):
  """muP + Schedule-Free over 8 devices: params and eval_params, float64."""
  two, one = jobs["two"], jobs["one"]
  assert (two["process_count"], one["process_count"]) == (2, 1)
  assert two["device_count"] == one["device_count"] == 8
  assert two["sharded_params"] == 22  # every tensor of the model is split
  np.testing.assert_allclose(two["losses"][name], one["losses"][name], rtol=FLOAT64_TOLERANCE)
  a, b = arrays(jobs, "two", "train.npz"), arrays(jobs, "one", "train.npz")
  assert sorted(a) == sorted(b)
  assert_same_training(a, b, name, name)


@pytest.mark.slow
def test_schedule_free_plus_sums_cross_the_processes(jobs):
  """ScheduleFree+ inside shard_map, each device with a slice of every parameter and
  the loss of its rows: with ``axis_name`` the L1 norm and the inner product are
  psum'd and the loss pmean'd over the 8 devices of both processes, and the run
  equals the 1-process run under jit (global sums and mean loss by XLA)."""
  np.testing.assert_allclose(jobs["two"]["losses"]["plus_shard_map"],
                             jobs["one"]["losses"]["plus"], rtol=FLOAT64_TOLERANCE)
  assert_same_training(arrays(jobs, "two", "train.npz"), arrays(jobs, "one", "train.npz"),
                       "plus_shard_map", "plus")


@pytest.mark.slow
def test_fresh_two_process_job_resumes_bitwise(jobs):
  """Written by 2 processes after step 2; a new 2-process job restores it and trains
  steps 3-4: params, optimizer state and eval_params bitwise equal the uninterrupted run."""
  assert jobs["resume"]["restored_steps"] == {name: 2 for name in CHECKPOINTED}
  assert jobs["resume"]["losses"] == {
      name: jobs["two"]["losses"][name][2:] for name in CHECKPOINTED}
  uninterrupted, resumed = arrays(jobs, "two", "train.npz"), arrays(jobs, "resume", "resume.npz")
  assert sorted(resumed) == sorted(k for k in uninterrupted if k.split("]")[0][2:-1]
                                   in CHECKPOINTED)
  for key, value in resumed.items():
    assert value.dtype == uninterrupted[key].dtype, key
    assert np.array_equal(value, uninterrupted[key]), key


@pytest.mark.slow
def test_one_process_restores_on_another_mesh_bitwise(jobs):
  """The same checkpoint restored by 1 process on a 2-device mesh: the values of
  step 2 bitwise, every leaf with the new mesh's sharding (checked in the worker)."""
  record = jobs["restore"]
  assert (record["process_count"], record["device_count"]) == (1, 2)
  assert record["restored_steps"] == {name: 2 for name in CHECKPOINTED}
  # params, z, x and the moments (AdamW: the second; ScheduleFree+: both) of the 22 tensors.
  assert record["split_leaves"] == {"adamw": 4 * 22, "plus": 5 * 22}
  saved, restored = arrays(jobs, "two", "saved.npz"), arrays(jobs, "restore", "restored.npz")
  assert sorted(saved) == sorted(restored)
  for key, value in saved.items():
    assert value.dtype == restored[key].dtype and np.array_equal(value, restored[key]), key


# ---------------------------------------------------------------------------
# A process killed during a save.
# ---------------------------------------------------------------------------

# (which process is SIGKILLed, seconds after its job's first save began)
KILLS = (("1", 1.2), ("0", 1.7), ("both", 0.9))


@pytest.mark.slow
def test_process_killed_during_save_never_leaves_a_wrong_checkpoint(tmp_path):
  """2 processes save step after step (max_to_keep=2) until one of them, or both,
  is SIGKILLed; the next job (2 processes, then 1 process on 2 devices) restores.

  Whatever the moment: the latest step is the last one whose save returned, or
  the next one (committed by process 0 before the kill reached it), and it
  restores bitwise; an older step that was being removed when the job died
  raises CheckpointError, never wrong values.
  """
  directory = str(tmp_path / "run")
  committed, records, outcomes = None, [], []
  for who, after in (*KILLS, (None, 0.0)):
    args = (["--kill-process", who, "--kill-after", str(after)] if who
            else ["--verify-only"])
    final = who is None
    results = _multiprocess.launch(
        WORKER, "save_loop", str(tmp_path), "--checkpoint", directory, *args,
        num_processes=1 if final else 2, devices_per_process=2 if final else 4,
        check=final, grace_s=3, timeout_s=180)
    record = records_of(results)["save_loop"]
    records.append(record)
    # What this job found, left by the previous one.
    steps = record["steps"]
    if committed is None:
      assert steps == [], record
    else:
      assert steps and steps[-1] in (committed, committed + 1), (committed, record)
      assert record["checked"][str(steps[-1])] is True, record
    for step, outcome in record["checked"].items():
      assert outcome is True or outcome.startswith("CheckpointError:"), (step, outcome)
      outcomes.append(outcome is True)
    if final:
      break
    # This job: the chosen processes died by SIGKILL, after some saves.
    for r in results:
      if who in (str(r.process_id), "both"):
        assert r.returncode == -9, _multiprocess.report(results)
    saved = [int(line.split()[1]) for line in results[0].stdout.splitlines()
             if line.startswith("committed ")]
    assert saved, _multiprocess.report(results)
    committed = saved[-1]
  print(f"\nsteps found after each kill: {[r['steps'] for r in records]};"
        f" {outcomes.count(False)} half-removed older steps refused")
