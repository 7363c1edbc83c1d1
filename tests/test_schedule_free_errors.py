"""Bad input: invalid hyperparameters, mismatched trees, a missing params argument.

Concrete hyperparameters are checked when the optimizer is built, with a
ValueError that names the argument; traced ones (``inject_hyperparams`` inside
``jit``) are never inspected in Python.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sf_optax

from test_schedule_free_suite import OPTIMIZERS, make_params

# ScheduleFree+ names its arguments as its reference does (b1 is Adam's, sf_b1
# the interpolation) and needs the loss in every update: its own checks are in
# test_schedule_free_plus.py.
OPTIMIZERS = [optimizer for optimizer in OPTIMIZERS if optimizer.name != "plus"]
every_optimizer = pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=str)


def is_adaptive(optimizer):
  return optimizer.name in ("adamw", "adamw_paper", "radam")


def invalid_hyperparameters(optimizer):
  """(argument, bad value) pairs that apply to ``optimizer``."""
  cases = [
      ("b1", 0.0), ("b1", -0.5), ("b1", 1.5), ("b1", float("nan")), ("b1", jnp.asarray(1.01)),
      ("learning_rate", -1e-3), ("learning_rate", np.float32(-1.0)),
      ("learning_rate", jnp.asarray(-0.1)), ("learning_rate", float("nan")),
      ("weight_decay", -1e-4),
      ("weight_lr_power", -1.0),
  ]
  cases.append(("warmup_steps", -1))
  if is_adaptive(optimizer):
    cases += [("eps", -1e-8), ("eps", 0.0), ("b2", -0.1), ("b2", 1.0), ("b2", 1.5)]
  return cases


INVALID = [
    pytest.param(optimizer, name, value, id=f"{optimizer.name}-{name}={value}")
    for optimizer in OPTIMIZERS
    for name, value in invalid_hyperparameters(optimizer)
]


@pytest.mark.parametrize("optimizer,name,value", INVALID)
def test_invalid_hyperparameter_raises_at_construction(optimizer, name, value):
  with pytest.raises(ValueError, match=rf"\b{name}\b"):
    optimizer.factory(**{name: value})


@every_optimizer
def test_boundary_values_are_valid(optimizer):
  kwargs = dict(learning_rate=0.0, b1=1.0, weight_decay=0.0, weight_lr_power=0.0)
  kwargs["warmup_steps"] = 0
  if is_adaptive(optimizer):
    kwargs.update(b2=0.0, eps=1e-30)  # eps divides: 0 is refused
  optimizer.factory(**kwargs)


def traceable_hyperparameters(optimizer):
  """Every numeric hyperparameter, each set to a value that would be rejected if concrete."""
  values = {
      "learning_rate": -1.0, "b1": -0.5, "weight_decay": -0.1, "weight_lr_power": -1.0,
      "r": -1.0,
  }
  values["warmup_steps"] = -3
  if is_adaptive(optimizer):
    values.update(b2=1.5, eps=-1.0)
  return values


@every_optimizer
def test_traced_hyperparameters_are_not_checked(optimizer):
  params = make_params()
  state = optimizer.factory(0.1).init(params)

  @jax.jit
  def update(hyperparameters):
    tx = optimizer.factory(**hyperparameters)
    return tx.update(params, state, params)

  hyperparameters = {
      name: jnp.asarray(value) for name, value in traceable_hyperparameters(optimizer).items()
  }
  update(hyperparameters)  # Nonsense numbers, but no Python check of a tracer.


@every_optimizer
def test_inject_hyperparams_values_are_not_checked_under_jit(optimizer):
  params = make_params()
  injected = optax.inject_hyperparams(optimizer.factory)(learning_rate=0.1, b1=0.9)
  state = injected.init(params)
  for name, value in traceable_hyperparameters(optimizer).items():
    # inject_hyperparams keeps every numeric argument, defaults included.
    assert name in state.hyperparams, name
    state.hyperparams[name] = jnp.asarray(value, state.hyperparams[name].dtype)
  jax.jit(injected.update)(params, state, params)


@every_optimizer
def test_gradients_with_another_tree_name_the_mismatch(optimizer):
  tx = optimizer.factory(0.1)
  params = make_params()
  state = tx.init(params)
  renamed = {"w": params["w"], "bias": params["b"]}
  with pytest.raises(ValueError, match=r"\bbias\b") as error:
    tx.update(renamed, state, params)
  assert ": b" in str(error.value)
  with pytest.raises(ValueError, match=r": b\b"):
    tx.update({"w": params["w"]}, state, params)
  with pytest.raises(ValueError, match=r"\bextra\b"):
    tx.update({**params, "extra": jnp.zeros(2)}, state, params)


def test_a_nested_mismatch_is_named_by_its_full_path():
  tx = OPTIMIZERS[0].factory(0.1)
  params = {"layer": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  state = tx.init(params)
  grads = {"layer": {"kernel": jnp.ones((2, 2)), "scale": jnp.ones(2)}}
  with pytest.raises(ValueError, match=r"layer/scale"):
    tx.update(grads, state, params)


@every_optimizer
def test_params_with_another_tree_name_the_mismatch(optimizer):
  tx = optimizer.factory(0.1)
  params = make_params()
  state = tx.init(params)
  with pytest.raises(ValueError, match=r": b\b"):
    tx.update(params, state, {"w": params["w"]})


@every_optimizer
def test_update_without_params_raises(optimizer):
  tx = optimizer.factory(0.1)
  params = make_params()
  state = tx.init(params)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, state)
  chained = optax.chain(optax.identity(), tx)
  with pytest.raises(ValueError, match="params"):
    chained.update(params, chained.init(params))


def test_gradient_of_the_wrong_shape_names_the_path():
  # With rank promotion allowed (JAX's default) a (2,) gradient would broadcast
  # against a (3, 2) parameter and corrupt the step silently.
  tx = sf_optax.schedule_free_adamw(1e-2)
  params = {"layer": {"kernel": jnp.ones((3, 2))}}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"grads at layer/kernel has shape \(2,\)"):
    tx.update({"layer": {"kernel": jnp.ones(2)}}, state, params)


def test_the_wrappers_old_decay_keyword_still_works_with_a_warning():
  params = make_params()
  with pytest.warns(DeprecationWarning, match="weight_decay_at_y"):
    old = sf_optax.schedule_free(optax.sgd(0.1), 0.1, weight_decay_at_y=0.5)
  new = sf_optax.schedule_free(optax.sgd(0.1), 0.1, weight_decay=0.5)
  updates_old, _ = old.update(params, old.init(params), params)
  updates_new, _ = new.update(params, new.init(params), params)
  assert jax.tree.all(jax.tree.map(np.array_equal, updates_old, updates_new))
  with pytest.raises(TypeError, match="weight_decay only"):
    sf_optax.schedule_free(optax.sgd(0.1), 0.1, weight_decay_at_y=0.5, weight_decay=0.5)


@every_optimizer
def test_an_unknown_keyword_is_refused(optimizer):
  with pytest.raises(TypeError, match="weight_decay_att"):
    optimizer.factory(0.1, weight_decay_att=0.1)
