"""Generates the float64 fixtures of the reference's 2026 additions (its HEAD).

The reference is the PyTorch package ``schedulefree`` at facebookresearch/schedule_free
commit 70785b5 (May 2026), in ``../shared/reference/schedulefree_head/``. PyPI's 1.4.1
(which ``generate_schedule_free.py`` needs, unchanged) lacks what is recorded here:

- ``AdamWScheduleFree(..., inner_momentum=mu)`` and the same in
  ``AdamWScheduleFreeReference``: an EMA of the gradient inside the AdamW z-step;
- ``AdamCScheduleFreePlusPaper``: ScheduleFree+ (a Polyak step size from the loss
  value, AdamC weight decay, ``c_warmup``, annealed Schedule-Free momentum).

The HEAD package is installed into its own directory so that it never replaces
1.4.1 (both are called ``schedulefree``). Run by hand, never by the test suite::

    pip install torch==2.13.0
    pip install --no-deps --target /tmp/sfhead ../shared/reference/schedulefree_head
    PYTHONPATH=/tmp/sfhead python tests/reference/make_schedulefree_head_fixtures.py

It writes ``tests/reference/fixtures/schedule_free_head/<case>.npz`` (one per case)
and ``cases.json``. Each ``.npz`` holds, per parameter leaf ``<leaf>`` (float64):

- ``init.<leaf>``: the initial params y_0;
- ``grad.<leaf>``: the gradient g_k given to step k, taken at y_k
  (shape ``(steps, *leaf shape)``);
- ``y.<leaf>``: y_{k+1}, the params after step k (shape ``(steps, *leaf shape)``);
- ``x.<leaf>``: x after ``eval_steps[i]`` steps, read with the reference's own
  ``optimizer.eval()`` (shape ``(len(eval_steps), *leaf shape)``);

and, per case:

- ``value``: float64 ``(steps,)``, the loss f(y_k) of step k's minibatch: the
  function value ScheduleFree+ is given (``step_func(value)``);
- ``eval_steps``: int64, the number of steps taken when each x was read;
- ``learning_rate``: float64 ``(steps,)``, the base learning rate of step k (the
  case's schedule at count k; for AdamW before its warmup);
- ``scheduled_lr``: float64 ``(steps,)``, the reference's ``group['scheduled_lr']``
  after step k: AdamW's lr times warmup; ScheduleFree+'s effective step size
  ``max(lr, eps) * polyak_lr``;
- ``grad_l1_ema`` (ScheduleFree+ only): ``group['grad_l1_ema']`` after step k,
  the bias-corrected EMA of sqrt(pi/2) * ||g||_1 that the reference stores back.

The loss is a small two-layer regression network (leaves of shapes (3, 4), (4,),
(4, 2) and ()) on a fixed dataset, one minibatch of 8 rows per step: a real
stochastic loss with a positive value, which ScheduleFree+'s Polyak rule needs.
The JAX tests replay the recorded gradients and values.

``cases.json`` maps each case name to:

- ``optimizer``: ``adamw`` (``sf_optax.schedule_free_adamw``) or ``plus``
  (``sf_optax.schedule_free_plus``);
- ``torch_class``: ``AdamWScheduleFree``, ``AdamWScheduleFreeReference`` or
  ``AdamCScheduleFreePlusPaper``;
- ``learning_rate``: a float, or ``{"schedule": "linear", "init_value",
  "end_value", "transition_steps", "transition_begin"}`` (``optax.linear_schedule``
  at the number of steps already taken; the generator sets every group's ``lr``
  to it before each step, the reference's way of warming ScheduleFree+ up);
- ``hyperparameters``: the sf_optax keyword arguments (other than
  ``learning_rate`` and ``mask``);
- ``weight_decay_excluded``: leaves in a torch param group with
  ``weight_decay=0`` (an sf_optax ``mask`` that is False there);
- ``torch``: the exact reference constructor call; ``steps``, ``eval_steps``,
  ``seed``.
"""

import importlib.metadata
import json
import pathlib

import numpy as np
import schedulefree
import torch

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)

OUT = pathlib.Path(__file__).parent / "fixtures" / "schedule_free_head"

SHAPES = {"w": (3, 4), "b": (4,), "v": (4, 2), "s": ()}
LEAVES = sorted(SHAPES)  # the order jax.tree flattens a dict in
STEPS = 150
DATA_SIZE = 64
BATCH = 8


def eval_steps_for(steps):
  return sorted({1, 7, 50, 100, 150, steps})


def make_problem(seed, steps):
  """Initial params, a fixed dataset and the minibatch of every step."""
  rng = np.random.default_rng(seed)
  init = {
      "w": rng.normal(scale=0.6, size=SHAPES["w"]),
      "b": rng.normal(scale=0.1, size=SHAPES["b"]),
      "v": rng.normal(scale=0.5, size=SHAPES["v"]),
      "s": np.asarray(rng.normal(scale=0.1)),
  }
  inputs = rng.normal(size=(DATA_SIZE, 3))
  teacher_w = rng.normal(size=(3, 4))
  teacher_v = rng.normal(size=(4, 2))
  targets = (np.tanh(inputs @ teacher_w) @ teacher_v
             + 0.1 * rng.normal(size=(DATA_SIZE, 2)))
  batches = np.stack([rng.choice(DATA_SIZE, size=BATCH, replace=False)
                      for _ in range(steps)])
  return init, inputs, targets, batches


def loss_fn(params, inputs, targets, rows):
  x = torch.as_tensor(inputs[rows])
  t = torch.as_tensor(targets[rows])
  hidden = torch.tanh(x @ params["w"] + params["b"])
  prediction = hidden @ params["v"] + params["s"]
  return 0.5 * ((prediction - t) ** 2).sum(dim=1).mean()


def linear_schedule_value(spec, count):
  """optax.linear_schedule(**spec)(count), in float64."""
  begin = spec["transition_begin"]
  steps = spec["transition_steps"]
  c = min(max(count - begin, 0), steps)
  frac = 1 - c / steps
  return (spec["init_value"] - spec["end_value"]) * frac + spec["end_value"]


def learning_rate_at(case, k):
  lr = case["learning_rate"]
  if isinstance(lr, dict):
    assert lr["schedule"] == "linear"
    return linear_schedule_value(lr, k)
  return lr


def param_groups(params, case):
  """One torch param group, or two when some leaves skip weight decay."""
  excluded = case.get("weight_decay_excluded", [])
  decayed = [params[n] for n in LEAVES if n not in excluded]
  if not excluded:
    return [{"params": decayed}]
  return [
      {"params": decayed},
      {"params": [params[n] for n in LEAVES if n in excluded],
       "weight_decay": 0.0},
  ]


def build_reference(params, case):
  """The reference optimizer of a case, and its constructor as a string."""
  hp = case["hyperparameters"]
  lr0 = learning_rate_at(case, 0)
  name = case["torch_class"]
  if name in ("AdamWScheduleFree", "AdamWScheduleFreeReference"):
    kwargs = dict(lr=lr0, betas=(hp.get("b1", 0.9), hp.get("b2", 0.999)),
                  eps=hp.get("eps", 1e-8),
                  weight_decay=hp.get("weight_decay", 0.0),
                  warmup_steps=hp.get("warmup_steps", 0), r=hp.get("r", 0.0),
                  weight_lr_power=hp.get("weight_lr_power", 2.0),
                  inner_momentum=hp.get("inner_momentum", 0.0))
    if name == "AdamWScheduleFreeReference":
      kwargs["decay_at_z"] = hp.get("weight_decay_at", "y") == "z"
  elif name == "AdamCScheduleFreePlusPaper":
    kwargs = dict(lr=lr0, betas=(hp.get("b1", 0.9), hp.get("b2", 0.95)),
                  sf_beta1=hp.get("sf_b1", 0.9), eps=hp.get("eps", 1e-8),
                  weight_decay=hp.get("weight_decay", 0.0), r=hp.get("r", 0.0),
                  polyak_beta=hp.get("polyak_b", 0.0),
                  c_warmup=hp.get("c_warmup", 0),
                  sf_beta1_anneal_steps=hp.get("sf_b1_anneal_steps", 0),
                  sf_beta1_max=hp.get("sf_b1_max", 0.965),
                  weight_lr_power=hp.get("weight_lr_power", 2.0))
  else:
    raise ValueError(name)
  cls = getattr(schedulefree, name)
  opt = cls(param_groups(params, case), **kwargs)
  groups = ("params" if not case.get("weight_decay_excluded") else
            f"[decayed, {{'params': {case['weight_decay_excluded']}, "
            f"'weight_decay': 0.0}}]")
  return opt, f"schedulefree.{name}({groups}, **{kwargs!r})"


def run_case(name, case):
  steps = case["steps"]
  eval_steps = case["eval_steps"]
  plus = case["optimizer"] == "plus"
  init, inputs, targets, batches = make_problem(case["seed"], steps)
  params = {n: torch.tensor(init[n], requires_grad=True) for n in LEAVES}
  opt, description = build_reference(params, case)
  opt.train()

  grads = {n: [] for n in LEAVES}
  ys = {n: [] for n in LEAVES}
  xs = {n: [] for n in LEAVES}
  record = {"value": [], "learning_rate": [], "scheduled_lr": [],
            "grad_l1_ema": []}
  for k in range(steps):
    lr = learning_rate_at(case, k)
    record["learning_rate"].append(lr)
    if isinstance(case["learning_rate"], dict):
      for group in opt.param_groups:
        group["lr"] = lr
    for p in params.values():
      p.grad = None
    loss = loss_fn(params, inputs, targets, batches[k])
    loss.backward()
    record["value"].append(loss.item())
    for n in LEAVES:
      grads[n].append(params[n].grad.detach().clone().numpy())
    if plus:
      opt.step_func(loss.item())
      record["grad_l1_ema"].append(opt.param_groups[0]["grad_l1_ema"])
    else:
      opt.step()  # may overwrite .grad in place: it was copied above
    record["scheduled_lr"].append(opt.param_groups[0]["scheduled_lr"])
    for n in LEAVES:
      ys[n].append(params[n].detach().clone().numpy())
    if k + 1 in eval_steps:
      with torch.no_grad():
        saved_y = {n: params[n].detach().clone() for n in LEAVES}
        opt.eval()
        for n in LEAVES:
          xs[n].append(params[n].detach().clone().numpy())
        opt.train()
        # train() may recompute y from (x, z) with a rounding error; restore y
        # exactly so that reading x never changes the recorded trajectory.
        for n in LEAVES:
          params[n].copy_(saved_y[n])

  arrays = {"eval_steps": np.asarray(eval_steps, dtype=np.int64)}
  for key, values in record.items():
    if values:
      arrays[key] = np.asarray(values, dtype=np.float64)
  for n in LEAVES:
    arrays[f"init.{n}"] = np.asarray(init[n], dtype=np.float64)
    arrays[f"grad.{n}"] = np.stack(grads[n]).astype(np.float64)
    arrays[f"y.{n}"] = np.stack(ys[n]).astype(np.float64)
    arrays[f"x.{n}"] = np.stack(xs[n]).astype(np.float64)
  for key, value in arrays.items():
    assert np.all(np.isfinite(value)), (name, key)
  np.savez_compressed(OUT / f"{name}.npz", **arrays)
  first, last = record["value"][0], np.mean(record["value"][-20:])
  print(f"{name}: loss {first:.3f} -> {last:.3f} (mean of the last 20),"
        f" scheduled_lr {min(record['scheduled_lr']):.3g}.."
        f"{max(record['scheduled_lr']):.3g}")
  return description


def cases():
  """Every case: sf_optax arguments, plus what the reference needs."""
  c = {}

  def add(name, optimizer, torch_class, learning_rate, steps=STEPS,
          excluded=(), **hyperparameters):
    c[name] = {
        "optimizer": optimizer,
        "torch_class": torch_class,
        "learning_rate": learning_rate,
        "hyperparameters": hyperparameters,
        "weight_decay_excluded": list(excluded),
        "steps": steps,
        "eval_steps": eval_steps_for(steps),
    }

  # Inner momentum inside the AdamW z-step.
  add("adamw_inner_05_warmup_wd", "adamw", "AdamWScheduleFree", 0.02,
      inner_momentum=0.5, warmup_steps=10, weight_decay=0.05)
  add("adamw_inner_09_warmup_wd_r_mask", "adamw", "AdamWScheduleFree", 0.01,
      inner_momentum=0.9, warmup_steps=20, weight_decay=0.1, r=0.5, b1=0.95,
      excluded=["b", "s"])
  add("adamw_reference_inner_09_warmup_wd", "adamw",
      "AdamWScheduleFreeReference", 0.02, inner_momentum=0.9,
      warmup_steps=15, weight_decay=0.05, b2=0.99)
  add("adamw_reference_inner_05_decay_at_z", "adamw",
      "AdamWScheduleFreeReference", 0.02, inner_momentum=0.5,
      warmup_steps=10, weight_decay=0.1, weight_decay_at="z",
      weight_lr_power=1.0)
  # ScheduleFree+ (AdamCScheduleFreePlusPaper).
  add("plus_defaults", "plus", "AdamCScheduleFreePlusPaper", 1.0)
  add("plus_polyak_09_cwarmup_anneal_wd_r", "plus",
      "AdamCScheduleFreePlusPaper", 0.3, polyak_b=0.9, c_warmup=10,
      sf_b1_anneal_steps=100, sf_b1_max=0.965, weight_decay=2.0, r=0.5)
  add("plus_polyak_0_cwarmup_anneal_wd_r_power0", "plus",
      "AdamCScheduleFreePlusPaper", 0.5, polyak_b=0.0, c_warmup=5,
      sf_b1_anneal_steps=60, sf_b1_max=0.98, weight_decay=1.0, r=1.0,
      weight_lr_power=0.0, b1=0.8, b2=0.99, sf_b1=0.85)
  add("plus_schedule_polyak_09_mask", "plus", "AdamCScheduleFreePlusPaper",
      {"schedule": "linear", "init_value": 0.0, "end_value": 0.3,
       "transition_steps": 20, "transition_begin": 0},
      polyak_b=0.9, c_warmup=20, sf_b1_anneal_steps=80, weight_decay=5.0,
      r=0.5, excluded=["b", "s"])
  return c


def main():
  OUT.mkdir(parents=True, exist_ok=True)
  all_cases = cases()
  for seed, (name, case) in enumerate(all_cases.items()):
    case["seed"] = seed
    case["torch"] = run_case(name, case)
  meta = {
      "generator": "tests/reference/make_schedulefree_head_fixtures.py",
      "reference": (f"schedulefree {importlib.metadata.version('schedulefree')},"
                    f" torch {torch.__version__}, float64"),
      "leaves": {n: list(SHAPES[n]) for n in LEAVES},
      "cases": all_cases,
  }
  with open(OUT / "cases.json", "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True)
    f.write("\n")
  total = sum(p.stat().st_size for p in OUT.iterdir())
  print(f"wrote {len(all_cases)} cases to {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
  assert hasattr(schedulefree, "AdamCScheduleFreePlusPaper"), (
      "this is schedulefree 1.4.1: put the HEAD package first on PYTHONPATH")
  main()
