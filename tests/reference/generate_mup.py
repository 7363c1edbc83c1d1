"""Generate the μP reference fixtures from the PyTorch package ``mup`` 1.0.0.

Not part of the library and not run by the test suite: it needs PyTorch and the
reference packages, which the library never imports::

    pip install torch==2.13.0 pyyaml tqdm
    pip install --no-deps mup==1.0.0 schedulefree==1.4.1
    python tests/reference/generate_mup.py

It writes ``tests/reference/fixtures/mup/mup_reference.json`` (shapes, multipliers,
init rules, hyperparameters: human-readable) and ``mup_reference.npz`` (the
arrays, float64 unless stated). ``.notes/MUP_FIXTURES.md`` describes the layout.

Everything runs in float64 (``.double()``). Arrays are stored in Flax layout:
a torch ``Linear.weight`` of shape ``(out, in)`` is stored transposed as the
Flax ``Dense`` ``kernel`` of shape ``(in, out)``; ``Embedding.weight`` is the
Flax ``Embed`` ``embedding`` ``(vocab, features)`` unchanged; ``LayerNorm``
``weight``/``bias`` are Flax ``LayerNorm`` ``scale``/``bias``.

Gradients fed to the optimizers are rounded to float32-representable values
before each step (``g.float().double()``), so the fixture can store them in
four bytes without changing what the reference optimizer consumed.
"""

from __future__ import annotations

import collections
import importlib.metadata
import json
import math
import pathlib
import re
import sys

import numpy as np

FIXTURE_DIR = pathlib.Path(__file__).resolve().parent / "fixtures" / "mup"

# Width multipliers 2, 4, 6 (MLP) and 1.5, 2, 3 (transformer) against a base of 4
# and a delta of 6: small enough that five steps of each optimizer at three
# widths of two models stay under 1 MB.
MLP_WIDTHS = (8, 16, 24)            # w1; w2 = w1 // 2
MLP_BASE = dict(w1=4, w2=4)
MLP_DELTA = dict(w1=6, w2=6)
MLP_IN, MLP_OUT, MLP_BATCH = 3, 2, 4
MLP_OUTPUT_MULT = 2.0

TRANSFORMER_WIDTHS = (6, 8, 12)    # d_model; 2 heads, d_ff = 2 * d_model
TRANSFORMER_BASE = 4
TRANSFORMER_DELTA = 6
VOCAB, SEQ, TOKENS_BATCH, HEADS = 7, 4, 2, 2
TRANSFORMER_OUTPUT_MULT = 1.0

NUM_STEPS = 5
OPTIMIZERS = {
    # name: (mup constructor, kwargs). MuAdam and MuSGD use torch's coupled L2
    # weight decay (added to the gradient); MuAdamW torch's decoupled decay
    # (p *= 1 - lr_group * weight_decay_group).
    "mu_adam": ("MuAdam", dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)),
    "mu_adamw": ("MuAdamW", dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)),
    "mu_sgd": ("MuSGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    "mu_sgd_nesterov": ("MuSGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
}
TRANSFORMER_OPTIMIZERS = ("mu_adam", "mu_adamw", "mu_sgd")  # nesterov: MLP only (size)

SF_STEPS = 20
SF_MLP_WIDTHS = dict(w1=12, w2=8)  # width multipliers 3 and 2
SCHEDULE_FREE = {
    # name: (mup constructor for the param groups, its kwargs, schedulefree class, its kwargs)
    "adamw": ("MuAdamW", dict(lr=0.01, weight_decay=0.05), "AdamWScheduleFree",
              dict(betas=(0.9, 0.999), eps=1e-8, warmup_steps=5, r=0.5, weight_lr_power=2.0)),
    "sgd": ("MuSGD", dict(lr=0.1, weight_decay=0.01), "SGDScheduleFree",
            dict(momentum=0.9, warmup_steps=5, r=0.5, weight_lr_power=2.0)),
}


def main() -> None:
  import mup
  import schedulefree
  import torch
  from torch import nn

  torch.set_default_dtype(torch.float64)

  class MLP(nn.Module):
    """x -> tanh(fc_in) -> tanh(fc_hidden) -> readout. Two width dims, w1 and w2."""

    def __init__(self, w1, w2):
      super().__init__()
      self.fc_in = nn.Linear(MLP_IN, w1)
      self.fc_hidden = nn.Linear(w1, w2)
      self.readout = mup.MuReadout(w2, MLP_OUT, output_mult=MLP_OUTPUT_MULT)

    def forward(self, x):
      return self.readout(torch.tanh(self.fc_hidden(torch.tanh(self.fc_in(x)))))

  class Block(nn.Module):
    """Embedding, one pre-LN transformer block with 8/d_head attention, MuReadout."""

    def __init__(self, d):
      super().__init__()
      self.d = d
      self.embed = nn.Embedding(VOCAB, d)
      self.ln1 = nn.LayerNorm(d)
      self.q = nn.Linear(d, d)
      self.k = nn.Linear(d, d)
      self.v = nn.Linear(d, d)
      self.o = nn.Linear(d, d)
      self.ln2 = nn.LayerNorm(d)
      self.ff1 = nn.Linear(d, 2 * d)
      self.ff2 = nn.Linear(2 * d, d)
      self.ln_f = nn.LayerNorm(d)
      self.readout = mup.MuReadout(d, VOCAB, output_mult=TRANSFORMER_OUTPUT_MULT)

    def forward(self, tokens):
      b, t = tokens.shape
      head_dim = self.d // HEADS
      h = self.embed(tokens)
      a = self.ln1(h)
      split = lambda z: z.view(b, t, HEADS, head_dim).transpose(1, 2)
      q, k, v = split(self.q(a)), split(self.k(a)), split(self.v(a))
      # μP attention: 1/d_head scaling, written 8/d_head as in the mup README.
      scores = q @ k.transpose(-1, -2) * (8.0 / head_dim)
      causal = torch.ones(t, t, dtype=torch.bool).tril()
      scores = scores.masked_fill(~causal, float("-inf"))
      attn = torch.softmax(scores, dim=-1) @ v
      h = h + self.o(attn.transpose(1, 2).reshape(b, t, self.d))
      h = h + self.ff2(torch.nn.functional.gelu(self.ff1(self.ln2(h)), approximate="tanh"))
      return self.readout(self.ln_f(h))

  def flax_name(torch_name, module):
    """torch parameter name -> (Flax path, whether the array is transposed)."""
    mod_name, leaf = torch_name.rsplit(".", 1)
    if isinstance(module, nn.Linear):
      return f"{mod_name}/{'kernel' if leaf == 'weight' else 'bias'}", leaf == "weight"
    if isinstance(module, nn.Embedding):
      return f"{mod_name}/embedding", False
    if isinstance(module, nn.LayerNorm):
      return f"{mod_name}/{'scale' if leaf == 'weight' else 'bias'}", False
    raise TypeError(type(module))

  def param_table(model):
    modules = dict(model.named_modules())
    table = []
    for name, p in model.named_parameters():
      module = modules[name.rsplit(".", 1)[0]]
      path, transposed = flax_name(name, module)
      table.append((name, path, transposed, module, p))
    return table

  def to_flax(t, transposed):
    a = t.detach().numpy().astype(np.float64)
    return np.ascontiguousarray(a.T) if transposed else a

  arrays: dict[str, np.ndarray] = {}
  # Per-step arrays are stacked along a leading step axis (index k-1 = step k).
  series: dict[str, list[np.ndarray]] = collections.defaultdict(list)
  doc: dict = {
      "generator": "tests/reference/generate_mup.py",
      "versions": {name: importlib.metadata.version(name) for name in ("torch", "mup", "schedulefree")},
      "layout": ("arrays in mup_reference.npz are float64 in Flax layout: Linear.weight (out, in) "
                 "is stored transposed as kernel (in, out); Embedding.weight as embedding "
                 "(vocab, features); LayerNorm weight/bias as scale/bias. Keys are "
                 "'<model>/<width>/<what>/<flax path>'."),
      "models": {},
      "optimizers": {},
      "schedule_free": {},
  }
  for name, (ctor, kwargs) in OPTIMIZERS.items():
    doc["optimizers"][name] = {"reference": f"mup.{ctor}", **{k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in kwargs.items()}}

  def infshape_entry(p, transposed):
    dims = [[d.base_dim, d.dim] for d in p.infshape]
    flax_dims = dims[::-1] if transposed else dims
    entry = {
        "torch_infshape": dims,
        "flax_infshape": flax_dims,
        "ninf": p.infshape.ninf(),
        "width_mult": float(p.infshape.width_mult()),
    }
    if p.dim() >= 2:
      entry["fanin_fanout_mult_ratio"] = float(p.infshape.fanin_fanout_mult_ratio())
    return entry

  def multipliers(model, ctor, lr, weight_decay):
    opt = getattr(mup, ctor)(model.parameters(), lr=lr, weight_decay=weight_decay)
    out = {}
    for group in opt.param_groups:
      for p in group["params"]:
        out[id(p)] = {"lr_mult": group["lr"] / lr, "weight_decay_mult": group["weight_decay"] / weight_decay}
    return out

  # key: (torch default init, what set_base_shapes(rescale_params=True) does, closed-form μP std)
  init_rules = {
      "linear_weight": ("kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))",
                        "unchanged: torch's 1/fan_in variance is already μP", "1 / sqrt(3 fan_in)"),
      "linear_bias": ("U(-1/sqrt(fan_in), 1/sqrt(fan_in))",
                      "*= sqrt(fanin_mult), fanin_mult = width_mult of the weight's fan_in dim",
                      "sqrt(fanin_mult) / sqrt(3 fan_in)"),
      "readout_weight": ("kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))",
                         "MuReadout: *= sqrt(width_mult), width_mult = fan_in / base_fan_in",
                         "sqrt(width_mult) / sqrt(3 fan_in) = 1 / sqrt(3 base_fan_in)"),
      "readout_bias": ("U(-1/sqrt(fan_in), 1/sqrt(fan_in))",
                       "MuReadout: *= sqrt(width_mult), width_mult = fan_in / base_fan_in",
                       "sqrt(width_mult) / sqrt(3 fan_in) = 1 / sqrt(3 base_fan_in)"),
      "embedding": ("normal(0, 1)", "unchanged: constant variance is μP", "1"),
      "layer_norm_scale": ("ones", "unchanged", "0 (constant 1)"),
      "layer_norm_bias": ("zeros", "unchanged", "0 (constant 0)"),
  }
  doc["init_rules"] = {k: dict(zip(("torch_init", "mup_rescale", "mup_std"), v)) for k, v in init_rules.items()}

  def init_entry(name, module, rescale):
    """The closed-form std of torch's default init and the μP rescale of set_base_shapes."""
    leaf = name.rsplit(".", 1)[1]
    entry = {}
    if isinstance(module, nn.Linear):
      fan_in = module.weight.shape[1]
      sp_std = 1.0 / math.sqrt(3.0 * fan_in)
      if isinstance(module, mup.MuReadout):
        rule, expected = f"readout_{leaf}", math.sqrt(module.weight.infshape.width_mult())
      elif leaf == "bias":
        rule, expected = "linear_bias", math.sqrt(module.weight.infshape[1].width_mult())
      else:
        rule, expected = "linear_weight", 1.0
      entry["fan_in"] = fan_in
    elif isinstance(module, nn.Embedding):
      rule, sp_std, expected = "embedding", 1.0, 1.0
    else:
      rule, sp_std, expected = f"layer_norm_{'scale' if leaf == 'weight' else 'bias'}", 0.0, 1.0
    # The closed form must be what the reference did to the arrays.
    assert abs(rescale - expected) <= 1e-12 * expected, (name, rescale, expected)
    entry.update({"rule": rule, "sp_std": sp_std, "rescale": expected, "mup_std": sp_std * expected})
    return entry

  def describe(model_name, make, base, delta, widths, batch_fn, loss_fn, optimizers):
    model_doc = {"widths": {}}
    for width in widths:
      torch.manual_seed(1000 + width)
      model = make(width).double()
      before = {n: p.detach().clone() for n, p in model.named_parameters()}
      mup.set_base_shapes(model, base, delta=delta)
      table = param_table(model)
      adam = multipliers(model, "MuAdam", 1.0, 1.0)
      sgd = multipliers(model, "MuSGD", 1.0, 1.0)
      params_doc = {}
      prefix = f"{model_name}/{width}"
      for name, path, transposed, module, p in table:
        b = before[name]
        nonzero = b.abs() > 0
        rescale = float((p.detach()[nonzero] / b[nonzero]).mean()) if nonzero.any() else 1.0
        params_doc[path] = {
            "torch_name": name,
            "transposed": transposed,
            "flax_shape": list(to_flax(p, transposed).shape),
            **infshape_entry(p, transposed),
            "adam": adam[id(p)],
            "sgd": sgd[id(p)],
            "init": init_entry(name, module, rescale),
        }
        arrays[f"{prefix}/init/{path}"] = to_flax(p, transposed)
      state0 = {n: p.detach().clone() for n, p in model.named_parameters()}

      # MuReadout on the init weights and a given input.
      gen = torch.Generator().manual_seed(7 + width)
      x = torch.randn(5, model.readout.in_features, generator=gen)
      with torch.no_grad():
        arrays[f"{prefix}/readout/x"] = x.numpy()
        arrays[f"{prefix}/readout/out"] = model.readout(x).numpy()

      # Batches, shared by all optimizers.
      gen = torch.Generator().manual_seed(11 + width)
      batches = [batch_fn(gen) for _ in range(NUM_STEPS)]
      arrays[f"{prefix}/batches/inputs"] = np.stack([xb.numpy() for xb, _ in batches])
      arrays[f"{prefix}/batches/targets"] = np.stack([yb.numpy() for _, yb in batches])

      for opt_name in optimizers:
        ctor, kwargs = OPTIMIZERS[opt_name]
        with torch.no_grad():
          for n, p in model.named_parameters():
            p.copy_(state0[n])
        opt = getattr(mup, ctor)(model.parameters(), **kwargs)
        losses = []
        for k, (xb, yb) in enumerate(batches, start=1):
          opt.zero_grad()
          loss = loss_fn(model(xb), yb)
          loss.backward()
          losses.append(float(loss.detach()))
          for name, path, transposed, module, p in table:
            p.grad.copy_(p.grad.float().double())
            series[f"{prefix}/{opt_name}/grad/{path}"].append(to_flax(p.grad, transposed).astype(np.float32))
          opt.step()
          for name, path, transposed, module, p in table:
            series[f"{prefix}/{opt_name}/params/{path}"].append(to_flax(p, transposed))
        model_doc.setdefault("losses", {}).setdefault(str(width), {})[opt_name] = losses
      model_doc["widths"][str(width)] = {"params": params_doc}
    return model_doc

  mse = lambda out, y: ((out - y) ** 2).mean()
  xent = lambda logits, y: torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))

  mlp_doc = describe(
      "mlp", lambda w: MLP(w, w // 2), MLP(**MLP_BASE), MLP(**MLP_DELTA), MLP_WIDTHS,
      lambda g: (torch.randn(MLP_BATCH, MLP_IN, generator=g), torch.randn(MLP_BATCH, MLP_OUT, generator=g)),
      mse, tuple(OPTIMIZERS))
  mlp_doc.update({
      "description": ("x -> tanh(fc_in x) -> tanh(fc_hidden .) -> readout, readout = MuReadout(w2, "
                      f"{MLP_OUT}, output_mult={MLP_OUTPUT_MULT}); width w means (w1, w2) = (w, w // 2); "
                      "loss = mean squared error to the batch targets"),
      "dims": {"in": MLP_IN, "out": MLP_OUT, "batch": MLP_BATCH, "output_mult": MLP_OUTPUT_MULT},
      "base": MLP_BASE, "delta": MLP_DELTA,
  })
  doc["models"]["mlp"] = mlp_doc

  tr_doc = describe(
      "transformer", Block, Block(TRANSFORMER_BASE), Block(TRANSFORMER_DELTA), TRANSFORMER_WIDTHS,
      lambda g: (torch.randint(VOCAB, (TOKENS_BATCH, SEQ), generator=g),
                 torch.randint(VOCAB, (TOKENS_BATCH, SEQ), generator=g)),
      xent, TRANSFORMER_OPTIMIZERS)
  tr_doc.update({
      "description": ("tokens -> embed -> h + o(causal attention(ln1 h)) with scores q.k * 8/d_head -> "
                      "h + ff2(gelu_tanh(ff1(ln2 h))) -> ln_f -> MuReadout(d, vocab); "
                      f"{HEADS} heads, d_ff = 2 d, LayerNorm eps 1e-5, no positional embedding; "
                      "loss = mean cross-entropy of the logits against the batch targets"),
      "dims": {"vocab": VOCAB, "seq": SEQ, "batch": TOKENS_BATCH, "heads": HEADS,
               "output_mult": TRANSFORMER_OUTPUT_MULT, "layer_norm_eps": 1e-5},
      "base": {"d_model": TRANSFORMER_BASE}, "delta": {"d_model": TRANSFORMER_DELTA},
  })
  doc["models"]["transformer"] = tr_doc

  # Schedule-Free (the reference) on mup's μP parameter groups.
  for sf_name, (ctor, mu_kwargs, sf_cls, sf_kwargs) in SCHEDULE_FREE.items():
    torch.manual_seed(2000)
    model = MLP(**SF_MLP_WIDTHS).double()
    mup.set_base_shapes(model, MLP(**MLP_BASE), delta=MLP(**MLP_DELTA))
    table = param_table(model)
    mu_opt = getattr(mup, ctor)(model.parameters(), **mu_kwargs)
    groups = [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}
              for g in mu_opt.param_groups]
    opt = getattr(schedulefree, sf_cls)(groups, lr=mu_kwargs["lr"], weight_decay=mu_kwargs["weight_decay"],
                                        **sf_kwargs)
    b1 = sf_kwargs["betas"][0] if "betas" in sf_kwargs else sf_kwargs["momentum"]
    prefix = f"schedule_free/{sf_name}"
    for name, path, transposed, module, p in table:
      arrays[f"{prefix}/init/{path}"] = to_flax(p, transposed)
    opt.train()
    gen = torch.Generator().manual_seed(3000)
    losses = []
    for k in range(1, SF_STEPS + 1):
      xb = torch.randn(MLP_BATCH, MLP_IN, generator=gen)
      yb = torch.randn(MLP_BATCH, MLP_OUT, generator=gen)
      opt.zero_grad()
      loss = mse(model(xb), yb)
      loss.backward()
      losses.append(float(loss.detach()))
      for name, path, transposed, module, p in table:
        p.grad.copy_(p.grad.float().double())
        series[f"{prefix}/grad/{path}"].append(to_flax(p.grad, transposed).astype(np.float32))
      opt.step()
      for name, path, transposed, module, p in table:
        series[f"{prefix}/y/{path}"].append(to_flax(p, transposed))
    for name, path, transposed, module, p in table:
      arrays[f"{prefix}/z_final/{path}"] = to_flax(opt.state[p]["z"], transposed)
    group_of = {}
    for g in groups:
      for p in g["params"]:
        group_of[id(p)] = (g["lr"], g["weight_decay"])
    doc["schedule_free"][sf_name] = {
        "reference": f"schedulefree.{sf_cls} on the param groups of mup.{ctor}",
        "model": "mlp", "widths": SF_MLP_WIDTHS, "steps": SF_STEPS,
        "lr": mu_kwargs["lr"], "weight_decay": mu_kwargs["weight_decay"],
        **{k: list(v) if isinstance(v, tuple) else v for k, v in sf_kwargs.items()},
        "group_lr_and_weight_decay": {path: list(group_of[id(p)]) for _, path, _, _, p in table},
        "losses": losses,
        "b1": b1,
        "note": ("grads are taken at y (the params); y is stored after every step, z after the last; "
                 "the average is x = (y - (1 - b1) z) / b1"),
    }

  arrays.update({key: np.stack(values) for key, values in series.items()})
  FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
  with open(FIXTURE_DIR / "mup_reference.json", "w") as f:
    # One line per list of numbers keeps the file short and readable.
    text = json.dumps(doc, indent=1)
    text = re.sub(r"\[[^\[\]{}\"]*\]", lambda m: " ".join(m.group(0).split()), text)
    text = re.sub(r"\[(\s*\[[^\[\]{}\"]*\],?)+\s*\]", lambda m: " ".join(m.group(0).split()), text)
    text = re.sub(r"\{[^\[\]{}]*\}", lambda m: " ".join(m.group(0).split()), text)
    f.write(text + "\n")
  np.savez_compressed(FIXTURE_DIR / "mup_reference.npz", **arrays)
  total = sum(p.stat().st_size for p in FIXTURE_DIR.iterdir())
  print(f"wrote {len(arrays)} arrays to {FIXTURE_DIR} ({total / 1e6:.3f} MB)", file=sys.stderr)


if __name__ == "__main__":
  main()
