"""Which term of a training step went non-finite first, from flags computed in the step.

When a run diverges, every logged value is NaN by the time the guard sees it (it looks
only at log steps, to stay free of host syncs). Each step therefore also returns, for
every loss term and every state tree it produced, a 0/1 flag "non-finite". The flags
are summed with the other metrics over the steps between two reports, so at the report
that fails, the term flagged on the most steps is the one that went non-finite first
(a NaN in the weights stays there), and a state tree flagged on more steps than every
loss names a non-finite *gradient* of that group (its losses were still finite).
No extra transfer: the sums travel with the metrics the report fetches anyway.
"""

import jax
import jax.numpy as jnp
import numpy as np

from confeti_jax import writer

PREFIX = "nonfinite/"

# State trees a step writes, by the names the user knows them by (methods that lack
# one leave it None and it is not flagged).
STATE_TREES = (
    ("student", lambda s: None if s.seg is None else s.seg.params),
    ("student BatchNorm statistics", lambda s: s.batch_stats),
    ("teacher", lambda s: s.teacher),
    ("G (CUT generator)", lambda s: None if s.gen is None else s.gen.params),
    ("D (CUT discriminator)", lambda s: None if s.disc is None else s.disc.params),
    ("F (CUT patch MLPs)", lambda s: None if s.patch_mlp is None else s.patch_mlp.params),
    ("prototypes", lambda s: s.protos),
    ("memory banks", lambda s: s.banks),
)


def _nonfinite(tree):
  """float32 0/1: does any inexact leaf of `tree` hold a NaN or an infinity?"""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype,
                                                               jnp.inexact)]
  if not leaves:
    return jnp.zeros((), jnp.float32)
  bad = jnp.stack([jnp.logical_not(jnp.all(jnp.isfinite(x))) for x in leaves])
  return jnp.any(bad).astype(jnp.float32)


def step_flags(new_state, metrics):
  """{PREFIX + name: 0/1} for every metric (loss terms, grad norms) and state tree."""
  flags = {PREFIX + k: _nonfinite(v) for k, v in metrics.items()}
  for name, get in STATE_TREES:
    tree = get(new_state)
    if tree is not None:
      flags[PREFIX + "state:" + name] = _nonfinite(tree)
  return flags


def split(scalars):
  """(scalars without the flags, {name: fraction of the window's steps flagged})."""
  plain = {k: v for k, v in scalars.items() if not k.startswith(PREFIX)}
  flags = {k[len(PREFIX):]: float(v) for k, v in scalars.items() if k.startswith(PREFIX)}
  return plain, flags


def check(flags, step):
  """Raises writer.NonFiniteLossError if any step of the window flagged a term or a state
  tree, also when the averaged scalars look finite: weights that went NaN at a log step
  (their losses come one step later) must never reach a checkpoint."""
  bad = {k: float("nan") for k, v in flags.items() if v > 0}
  writer.check_finite(bad, step)


def describe(flags, step, window):
  """One sentence naming the first non-finite term(s) of the `window` steps up to `step`.

  `flags` are window fractions from `split`. Terms flagged on the most steps went bad
  first; a state tree among them while no loss term is means a non-finite gradient.
  """
  counts = {k: int(round(v * window)) for k, v in flags.items()}
  worst = max(counts.values(), default=0)
  if worst == 0:
    return ("No term of the step was non-finite at any step of this window (only the "
            "averaged value overflowed).")
  first = sorted(k for k, c in counts.items() if c == worst)
  at = step - worst + 1
  states = [k[len("state:"):] for k in first if k.startswith("state:")]
  terms = [k for k in first if not k.startswith("state:")]
  if terms:
    what = "non-finite first: " + ", ".join(terms)
    if states:
      what += " (and after that step's update: " + ", ".join(states) + ")"
  else:
    what = ("the losses were finite but the update made " + ", ".join(states)
            + " non-finite: a non-finite gradient of that group")
  return f"First non-finite step: {at} (of {step - window + 1}-{step}); {what}."


def first_terms(flags):
  """Names flagged on the most steps (for tests and tools): [] when none is flagged."""
  worst = max(flags.values(), default=0.0)
  return [] if worst <= 0 else sorted(k for k, v in flags.items() if np.isclose(v, worst))
