"""Generates the float64 reference trajectories for the Schedule-Free parity test.

The reference is the PyTorch package ``schedulefree`` 1.4.1. This script is run
by hand, never by the test suite (which must not need torch)::

    pip install torch==2.13.0 schedulefree==1.4.1
    python tests/reference/generate_schedule_free.py

It writes ``tests/reference/fixtures/schedule_free/<case>.npz`` (one per case)
and ``cases.json`` describing every case. Each ``.npz`` holds, per parameter
leaf ``<leaf>`` (all float64):

- ``init.<leaf>``: the initial params y_0 (shape = leaf shape);
- ``grad.<leaf>``: the gradient g_k fed to step k, taken at y_k
  (shape ``(steps, *leaf shape)``);
- ``y.<leaf>``: y_{k+1}, the params after step k (shape ``(steps, *leaf shape)``);
- ``x.<leaf>``: x after ``eval_steps[i]`` steps, read with the reference's own
  ``optimizer.eval()`` (shape ``(len(eval_steps), *leaf shape)``);
- ``eval_steps``: int64, the number of steps taken when each x was read;
- ``learning_rate``: float64 ``(steps,)``, the base learning rate given to
  step k (the value of the case's schedule at count k, before warmup).

The JAX test replays the recorded gradients, so it never needs the loss. The
loss only makes the gradients realistic: they depend on y (a convex quadratic
plus a small sine ripple and a cross-term between leaves) and on a fixed
per-step noise, like minibatch noise, so they keep changing along the
trajectory.

``cases.json`` maps each case name to:

- ``optimizer``: ``sgd``, ``adamw``, ``adamw_paper``, ``radam`` or ``wrapper``
  (the sf_optax factories ``schedule_free_sgd``, ``schedule_free_adamw``,
  ``schedule_free_adamw_paper``, ``schedule_free_radam``, ``schedule_free``);
- ``learning_rate``: a float, or ``{"schedule": "linear", "init_value",
  "end_value", "transition_steps", "transition_begin"}`` (the arguments of
  ``optax.linear_schedule``, evaluated at the number of steps already taken);
- ``hyperparameters``: the sf_optax keyword arguments (other than
  ``learning_rate`` and ``mask``);
- ``weight_decay_excluded``: leaves in a torch param group with
  ``weight_decay=0`` (an sf_optax ``mask`` that is False there);
- ``base`` (wrapper only): the torch base optimizer and its Optax equivalent:
  ``{"name": "sgd", "learning_rate", "momentum"}`` is ``torch.optim.SGD`` ==
  ``optax.sgd(lr, momentum or None)``; ``{"name": "adam", "learning_rate",
  "b1", "b2", "eps", "weight_decay"}`` is ``torch.optim.Adam`` (weight decay
  as L2, at z) == ``optax.chain(optax.add_decayed_weights(wd),
  optax.adam(lr, b1, b2, eps))``;
- ``torch``: the exact reference constructor call, for the record;
- ``steps``, ``eval_steps``.
"""

import json
import pathlib

import numpy as np
import schedulefree
import torch

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)

OUT = pathlib.Path(__file__).parent / "fixtures" / "schedule_free"

SHAPES = {"w": (3, 2), "b": (3,), "k": (2, 1, 2)}
LEAVES = sorted(SHAPES)  # the order jax.tree flattens a dict in
STEPS = 120


def eval_steps_for(steps):
  return sorted({1, 7, 50, 100, steps})


def make_problem(seed, steps):
  """Fixed initial params, loss coefficients and per-step noise."""
  rng = np.random.default_rng(seed)
  init = {n: rng.normal(size=s) for n, s in SHAPES.items()}
  curvature = {n: rng.uniform(1.0, 2.0, size=s) for n, s in SHAPES.items()}
  target = {n: rng.normal(scale=0.5, size=s) for n, s in SHAPES.items()}
  noise = {
      n: 0.3 * rng.normal(size=(steps,) + s) for n, s in SHAPES.items()
  }
  return init, curvature, target, noise


def loss_fn(params, curvature, target, noise, k):
  loss = 0.0
  for n in LEAVES:
    p = params[n]
    a = torch.as_tensor(curvature[n])
    t = torch.as_tensor(target[n])
    loss = loss + (0.5 * a * (p - t) ** 2).sum()
    loss = loss + 0.1 * torch.sin(3.0 * p).sum()
    loss = loss + (torch.as_tensor(noise[n][k]) * p).sum()
  loss = loss + 0.2 * torch.tanh(params["w"].sum()) * params["b"].mean()
  loss = loss + 0.1 * params["k"].mean() * params["b"].sum() ** 2
  return loss


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
  """The reference optimizer for a case, and its constructor as a string."""
  hp = case["hyperparameters"]
  lr0 = learning_rate_at(case, 0)
  name = case["optimizer"]
  if name == "sgd":
    kwargs = dict(lr=lr0, momentum=hp.get("b1", 0.9),
                  weight_decay=hp.get("weight_decay", 0.0),
                  warmup_steps=hp.get("warmup_steps", 0), r=hp.get("r", 0.0),
                  weight_lr_power=hp.get("weight_lr_power", 2.0))
    cls = schedulefree.SGDScheduleFree
  elif name in ("adamw", "adamw_paper"):
    kwargs = dict(lr=lr0, betas=(hp.get("b1", 0.9), hp.get("b2", 0.999)),
                  eps=hp.get("eps", 1e-8),
                  weight_decay=hp.get("weight_decay", 0.0),
                  warmup_steps=hp.get("warmup_steps", 0), r=hp.get("r", 0.0),
                  weight_lr_power=hp.get("weight_lr_power", 2.0))
    cls = (schedulefree.AdamWScheduleFree if name == "adamw"
           else schedulefree.AdamWScheduleFreePaper)
  elif name == "radam":
    kwargs = dict(lr=lr0, betas=(hp.get("b1", 0.9), hp.get("b2", 0.999)),
                  eps=hp.get("eps", 1e-8),
                  weight_decay=hp.get("weight_decay", 0.0),
                  r=hp.get("r", 0.0),
                  weight_lr_power=hp.get("weight_lr_power", 2.0),
                  silent_sgd_phase=hp.get("silent_sgd_phase", True))
    cls = schedulefree.RAdamScheduleFree
  elif name == "wrapper":
    base = case["base"]
    groups = [{"params": [params[n] for n in LEAVES]}]
    if base["name"] == "sgd":
      base_kwargs = dict(lr=base["learning_rate"], momentum=base["momentum"])
      base_opt = torch.optim.SGD(groups, **base_kwargs)
    elif base["name"] == "adam":
      base_kwargs = dict(lr=base["learning_rate"],
                         betas=(base["b1"], base["b2"]), eps=base["eps"],
                         weight_decay=base["weight_decay"], foreach=False)
      base_opt = torch.optim.Adam(groups, **base_kwargs)
      # The wrapper keeps z in the base's state dict, so torch Adam's lazy
      # init (`if len(state) == 0`) never runs and its step raises KeyError
      # 'exp_avg'. Create Adam's state up front exactly as that init would.
      for n in LEAVES:
        base_opt.state[params[n]].update(
            step=torch.tensor(0.0, dtype=torch.get_default_dtype()),
            exp_avg=torch.zeros_like(params[n]),
            exp_avg_sq=torch.zeros_like(params[n]))
    else:
      raise ValueError(base["name"])
    kwargs = dict(momentum=hp.get("b1", 0.9),
                  weight_decay_at_y=hp.get("weight_decay_at_y", 0.0),
                  r=hp.get("r", 0.0),
                  weight_lr_power=hp.get("weight_lr_power", 2.0))
    opt = schedulefree.ScheduleFreeWrapper(base_opt, **kwargs)
    base_name = "SGD" if base["name"] == "sgd" else "Adam"
    description = (f"schedulefree.ScheduleFreeWrapper(torch.optim.{base_name}"
                   f"(params, **{base_kwargs!r}), **{kwargs!r})")
    return opt, description
  else:
    raise ValueError(name)
  opt = cls(param_groups(params, case), **kwargs)
  groups = ("params" if not case.get("weight_decay_excluded") else
            f"[decayed, {{'params': {case['weight_decay_excluded']}, "
            f"'weight_decay': 0.0}}]")
  return opt, f"schedulefree.{cls.__name__}({groups}, **{kwargs!r})"


def run_case(name, case, seed):
  steps = case["steps"]
  eval_steps = case["eval_steps"]
  init, curvature, target, noise = make_problem(seed, steps)
  params = {n: torch.tensor(init[n], requires_grad=True) for n in LEAVES}
  opt, description = build_reference(params, case)
  opt.train()

  grads = {n: [] for n in LEAVES}
  ys = {n: [] for n in LEAVES}
  xs = {n: [] for n in LEAVES}
  lrs = []
  for k in range(steps):
    lr = learning_rate_at(case, k)
    lrs.append(lr)
    if isinstance(case["learning_rate"], dict):
      for group in opt.param_groups:
        group["lr"] = lr
    for p in params.values():
      p.grad = None
    loss = loss_fn(params, curvature, target, noise, k)
    loss.backward()
    for n in LEAVES:
      grads[n].append(params[n].grad.detach().clone().numpy())
    opt.step()  # may overwrite .grad in place: it was copied above
    for n in LEAVES:
      ys[n].append(params[n].detach().clone().numpy())
    if k + 1 in eval_steps:
      with torch.no_grad():
        saved_y = {n: params[n].detach().clone() for n in LEAVES}
        opt.eval()
        for n in LEAVES:
          xs[n].append(params[n].detach().clone().numpy())
        opt.train()
        # train() recomputes y from (x, z) with a rounding error; restore y
        # exactly so that reading x never changes the recorded trajectory.
        for n in LEAVES:
          params[n].copy_(saved_y[n])

  arrays = {"eval_steps": np.asarray(eval_steps, dtype=np.int64),
            "learning_rate": np.asarray(lrs, dtype=np.float64)}
  for n in LEAVES:
    arrays[f"init.{n}"] = init[n].astype(np.float64)
    arrays[f"grad.{n}"] = np.stack(grads[n]).astype(np.float64)
    arrays[f"y.{n}"] = np.stack(ys[n]).astype(np.float64)
    arrays[f"x.{n}"] = np.stack(xs[n]).astype(np.float64)
  for key, value in arrays.items():
    assert np.all(np.isfinite(value)), (name, key)
  np.savez_compressed(OUT / f"{name}.npz", **arrays)
  return description


def cases():
  """Every case: sf_optax arguments, plus what the reference needs."""
  c = {}

  def add(name, optimizer, learning_rate, steps=STEPS, excluded=(), base=None,
          **hyperparameters):
    c[name] = {
        "optimizer": optimizer,
        "learning_rate": learning_rate,
        "hyperparameters": hyperparameters,
        "weight_decay_excluded": list(excluded),
        "steps": steps,
        "eval_steps": eval_steps_for(steps),
    }
    if base is not None:
      c[name]["base"] = base

  add("sgd_plain", "sgd", 0.05)
  add("sgd_warmup_wd_mask", "sgd", 0.05, warmup_steps=10, weight_decay=0.1,
      excluded=["b"])
  # With a constant lr, lr_max**weight_lr_power cancels out of c: the warmup
  # is what makes weight_lr_power matter.
  add("sgd_b1_095_r05_power1_warmup", "sgd", 0.05, b1=0.95, r=0.5,
      weight_lr_power=1.0, warmup_steps=5)
  add("adamw_plain", "adamw", 0.02)
  add("adamw_warmup_wd", "adamw", 0.02, warmup_steps=10, weight_decay=0.05)
  add("adamw_wd_mask_r1_b1_095", "adamw", 0.02, b1=0.95, r=1.0,
      weight_decay=0.05, excluded=["b"])
  add("adamw_schedule_warmup", "adamw",
      {"schedule": "linear", "init_value": 0.03, "end_value": 0.003,
       "transition_steps": 80, "transition_begin": 20},
      warmup_steps=10, weight_decay=0.02)
  add("adamw_long_warmup", "adamw", 0.02, steps=150, warmup_steps=30,
      b2=0.99, eps=1e-6, r=0.5, weight_decay=0.01)
  add("adamw_paper_plain", "adamw_paper", 0.02)
  add("adamw_paper_warmup_wd", "adamw_paper", 0.02, warmup_steps=10,
      weight_decay=0.05)
  add("radam_silent", "radam", 0.02, silent_sgd_phase=True)
  add("radam_not_silent", "radam", 0.02, silent_sgd_phase=False)
  add("radam_wd_mask", "radam", 0.02, b2=0.99, weight_decay=0.05, r=0.5,
      silent_sgd_phase=True, excluded=["k"])
  add("wrapper_sgd", "wrapper", 0.05,
      base={"name": "sgd", "learning_rate": 0.05, "momentum": 0.0})
  add("wrapper_sgd_momentum_wd_at_y", "wrapper", 0.02, b1=0.95,
      weight_decay_at_y=0.1,
      base={"name": "sgd", "learning_rate": 0.02, "momentum": 0.9})
  add("wrapper_adam", "wrapper", 0.02,
      base={"name": "adam", "learning_rate": 0.02, "b1": 0.9, "b2": 0.999,
            "eps": 1e-8, "weight_decay": 0.0})
  add("wrapper_adam_l2_wd_at_y_r", "wrapper", 0.02, r=1.0,
      weight_decay_at_y=0.05, weight_lr_power=1.0,
      base={"name": "adam", "learning_rate": 0.02, "b1": 0.8, "b2": 0.99,
            "eps": 1e-8, "weight_decay": 0.1})
  return c


def main():
  OUT.mkdir(parents=True, exist_ok=True)
  all_cases = cases()
  for seed, (name, case) in enumerate(all_cases.items()):
    case["seed"] = seed
    case["torch"] = run_case(name, case, seed)
  meta = {
      "generator": "tests/reference/generate_schedule_free.py",
      "reference": f"schedulefree 1.4.1, torch {torch.__version__}, float64",
      "leaves": {n: list(SHAPES[n]) for n in LEAVES},
      "cases": all_cases,
  }
  with open(OUT / "cases.json", "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True)
    f.write("\n")
  total = sum(p.stat().st_size for p in OUT.iterdir())
  print(f"wrote {len(all_cases)} cases to {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
