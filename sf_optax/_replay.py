"""A wrapped Optax step, recomputed from the state it returned.

With ``store_x=False`` two kernels per leaf consume the z-step direction u: the
one writing z' and the one writing y'. XLA:CPU gives each output its own loop
and does not duplicate a divide or a square root into two consumers, so u
would be written to a params-sized temporary. The built-in z-steps avoid it by
recomputing u, in the y' kernel, from buffers that kernel reads anyway: the
gradient and the new state (``ZStep.recompute``). For a wrapped Optax base the
same recomputation is read off the base's own program: its update is traced
once to a jaxpr, and the equations that lead from the gradient and the *new*
state to the step are evaluated again on those values.

That works when the step depends on the old state and the params only through
the new state: Adam's u = m' / (sqrt(v') + eps), RMSProp's, AdaBelief's, SGD's
momentum. A base whose step reads a params-sized buffer of the old state
(Lion's sign(b1 m + (1 - b1) g), with m' = b2 m + (1 - b2) g) or the params
(a weight decay inside the base) cannot be replayed from what the y' kernel
reads: reading the old buffer after it was overwritten in place makes XLA copy
it. For those :func:`trace_steps` returns no replay and the engine keeps the
shared step.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import jax

try:  # jax >= 0.4.36
  from jax.extend.core import Literal as _Literal
except ImportError:  # pragma: no cover - older jax
  from jax.core import Literal as _Literal


def _is_params_sized(var: Any) -> bool:
  return len(getattr(var.aval, "shape", ())) > 0


def _evaluate(eqns, env: dict) -> None:
  """Runs ``eqns`` on the values in ``env`` (keyed by jaxpr variable), adding their outputs."""
  for eqn in eqns:
    invals = [v.val if isinstance(v, _Literal) else env[v] for v in eqn.invars]
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(bind_params, tuple):  # jax < 0.7: (sub-functions, params)
      subfuns, bind_params = bind_params
      invals = [*subfuns, *invals]
    with getattr(getattr(eqn, "ctx", None), "manager", contextlib.nullcontext()):
      outs = eqn.primitive.bind(*invals, **bind_params)
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for var, value in zip(eqn.outvars, outs):
      env[var] = value


def trace_steps(
    update: Callable[[Any, Any, Any], tuple[Any, Any]],
    updates: Any,
    state: Any,
    params: Any,
) -> tuple[Any, Any, Optional[Callable[[Any, Any], Any]]]:
  """``update(updates, state, params)``, and how to recompute its steps from its new state.

  Returns ``(steps, new_state, replay)``: the steps and new state exactly as
  ``update`` computes them (the same equations, evaluated once), and
  ``replay(updates, new_state) -> steps``, which evaluates again only the
  equations from the gradient and the new state to the steps. ``replay`` is
  None when the steps read a params-sized buffer of the old state or the
  params other than through the new state.
  """
  closed, shapes = jax.make_jaxpr(update, return_shape=True)(updates, state, params)
  jaxpr = closed.jaxpr
  steps_tree = jax.tree.structure(shapes[0])
  n_updates = len(jax.tree.leaves(updates))
  n_state = len(jax.tree.leaves(state))
  n_steps = steps_tree.num_leaves
  invars_updates = jaxpr.invars[:n_updates]
  invars_old = jaxpr.invars[n_updates:]  # the old state, then the params

  env = dict(zip(jaxpr.constvars, closed.consts))
  env.update(zip(jaxpr.invars, jax.tree.leaves((updates, state, params))))
  _evaluate(jaxpr.eqns, env)

  def read(var):
    return var.val if isinstance(var, _Literal) else env[var]

  outs = [read(v) for v in jaxpr.outvars]
  steps = steps_tree.unflatten(outs[:n_steps])
  new_state_tree = jax.tree.structure(shapes[1])
  new_state = new_state_tree.unflatten(outs[n_steps:])

  # The equations from (gradient, new state) to the steps: walk back from the
  # steps, stopping at the new state's variables.
  step_out = [v for v in jaxpr.outvars[:n_steps] if not isinstance(v, _Literal)]
  new_state_vars = {v: i for i, v in enumerate(jaxpr.outvars[n_steps:])
                    if not isinstance(v, _Literal)}
  producer = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
  needed, stack, leaves_read = set(), list(step_out), set()
  while stack:
    var = stack.pop()
    if var in new_state_vars or var in leaves_read:
      leaves_read.add(var)
      continue
    eqn = producer.get(var)
    if eqn is None:  # an input or a constant
      leaves_read.add(var)
      continue
    if id(eqn) in needed:
      continue
    needed.add(id(eqn))
    stack.extend(v for v in eqn.invars if not isinstance(v, _Literal))
  old_reads = [v for v in leaves_read
               if v in invars_old and v not in new_state_vars and _is_params_sized(v)]
  if old_reads or n_state != new_state_tree.num_leaves:
    return steps, new_state, None
  eqns = [eqn for eqn in jaxpr.eqns if id(eqn) in needed]
  constants = {v: env[v] for v in leaves_read
               if v not in new_state_vars and v not in invars_updates}

  def replay(updates, new_state):
    env2 = dict(constants)
    env2.update(zip(invars_updates, jax.tree.leaves(updates)))
    new_leaves = jax.tree.leaves(new_state)
    env2.update((v, new_leaves[i]) for v, i in new_state_vars.items())
    _evaluate(eqns, env2)
    return steps_tree.unflatten(
        [v.val if isinstance(v, _Literal) else env2[v] for v in jaxpr.outvars[:n_steps]])

  return steps, new_state, replay
