"""The coordinate check catches a wrong μP: flat under μP, growing under SP or a broken μP."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mup_flax
from mup_flax import coord_check

WIDTHS = (64, 256, 1024)
BASE = 64
LR = 0.02
NSTEPS = 3


class MLP(nn.Module):
  width: int
  mup: bool = True
  readout_mult_removed: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.width, name="input")(x))
    x = nn.relu(nn.Dense(self.width, name="hidden")(x))
    if not self.mup:
      return nn.Dense(10, name="readout")(x)
    # output_mult = width / base cancels MuReadout's 1 / width_mult.
    mult = self.width / BASE if self.readout_mult_removed else 1.0
    return mup_flax.MuReadout(10, output_mult=mult, readout_zero_init=True, name="readout")(x)


def _batches():
  """A learnable task (a random linear teacher): gradients are coherent across coordinates."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 64)).astype(np.float32)
  teacher = rng.standard_normal((64, 10)).astype(np.float32)
  return [(jnp.asarray(x), jnp.asarray(np.argmax(x @ teacher, axis=-1)))]


def _mup_models(widths=WIDTHS, **kwargs):
  make = lambda w: MLP(w, **kwargs)  # noqa: E731
  return {w: (lambda w=w: mup_flax.MuP(make(w), base=make(BASE), delta=make(2 * BASE)))
          for w in widths}


def _slopes(models, **kwargs):
  records = coord_check.get_coord_data(
      models, _batches(), lr=LR, nsteps=NSTEPS, as_dataframe=False, **kwargs)
  return coord_check.coord_slopes(records)


def _is_flat(slopes):
  return all(abs(s) < 0.1 for (_, t), s in slopes.items() if t >= 2)


@pytest.mark.slow
def test_records_have_every_module_and_step_and_plot(tmp_path):
  # The layout of the records, not flatness: two widths suffice.
  widths = WIDTHS[:2]
  records = coord_check.get_coord_data(
      _mup_models(widths), _batches(), lr=LR, nsteps=2, nseeds=2, as_dataframe=False)
  assert {r["module"] for r in records} == {"input", "hidden", "readout"}
  assert {(r["width"], r["t"], r["seed"]) for r in records} == {
      (w, t, s) for w in widths for t in (1, 2) for s in (0, 1)}
  assert all(set(r) == {"width", "module", "t", "l1", "std", "seed"} for r in records)
  readout_at_init = [r for r in records if r["module"] == "readout" and r["t"] == 1]
  assert all(r["l1"] == 0.0 for r in readout_at_init)  # zero-initialized readout

  pytest.importorskip("matplotlib")
  import matplotlib

  matplotlib.use("Agg")
  fig = coord_check.plot_coord_data(records, tmp_path / "coord.png", title="MLP")
  assert (tmp_path / "coord.png").stat().st_size > 0
  assert len(fig.axes) == 2


def test_mup_is_flat():
  mup = _slopes(_mup_models())
  assert _is_flat(mup), mup


# The controls (SP and broken μPs grow) and the NNX models are in the slow tier.
@pytest.mark.slow
def test_sp_grows():
  sp = _slopes({w: (lambda w=w: MLP(w, mup=False)) for w in WIDTHS})
  assert not _is_flat(sp), sp
  assert max(s for (_, t), s in sp.items() if t >= 2) > 0.3, sp


@pytest.mark.slow
def test_removing_the_readout_multiplier_breaks_flatness():
  slopes = _slopes(_mup_models(readout_mult_removed=True))
  assert not _is_flat(slopes), slopes
  assert slopes[("readout", 2)] > 0.3


@pytest.mark.slow
def test_removing_the_learning_rate_scaling_breaks_flatness():
  # μP init and readout, but plain Adam: hidden weights move lr per entry at every width.
  # (The zero readout passes them no gradient at the first step: they move at the second.)
  slopes = _slopes(_mup_models(), optimizer=optax.adam(LR))
  assert not _is_flat(slopes), slopes
  assert slopes[("hidden", 3)] > 0.3


@pytest.mark.slow
def test_schedule_free_adamw_with_mup_scales_is_flat():
  slopes = _slopes(_mup_models(), optimizer="schedule_free_adamw")
  assert _is_flat(slopes), slopes


class NNXMLP(nnx.Module):

  def __init__(self, width, rngs, mup=True):
    self.input = nnx.Linear(64, width, rngs=rngs)
    self.hidden = nnx.Linear(width, width, rngs=rngs)
    if mup:
      self.readout = mup_flax.nnx.MuReadout(width, 10, readout_zero_init=True, rngs=rngs)
    else:
      self.readout = nnx.Linear(width, 10, rngs=rngs)

  def __call__(self, x):
    return self.readout(nnx.relu(self.hidden(nnx.relu(self.input(x)))))


@pytest.mark.slow
def test_nnx_models():
  shapes = mup_flax.make_base_shapes(lambda: NNXMLP(BASE, nnx.Rngs(0)),
                                     lambda: NNXMLP(2 * BASE, nnx.Rngs(0)))
  mup = {w: (lambda seed, w=w: mup_flax.nnx.set_base_shapes(NNXMLP(w, nnx.Rngs(seed)), shapes,
                                                                 rescale_params=True))
         for w in WIDTHS}
  slopes = _slopes(mup)
  assert {m for m, _ in slopes} == {"input", "hidden", "readout"}
  assert _is_flat(slopes), slopes
  # The named optimizers see NNX params and infshapes as matching trees.
  assert _is_flat(_slopes(mup, optimizer="schedule_free_adamw"))
  sp = _slopes({w: (lambda seed, w=w: NNXMLP(w, nnx.Rngs(seed), mup=False)) for w in WIDTHS})
  assert max(s for (_, t), s in sp.items() if t >= 2) > 0.3, sp


def test_bad_arguments():
  with pytest.raises(ValueError, match="optimizer"):
    coord_check.get_coord_data(_mup_models(), _batches(), optimizer="lion")
  with pytest.raises(ValueError, match="loss_fn"):
    coord_check.get_coord_data(_mup_models(), _batches(), loss_fn="hinge")
  with pytest.raises(TypeError, match="expected a Linen module"):
    coord_check.get_coord_data({64: lambda: object()}, _batches())
