"""Test helper: a run through the trainer that also keeps its initial state on the host."""

import jax
import pytest

from confeti_jax import train


def train_keeping_init(config, workdir):
  """(initial state, final state) of `train.train_and_evaluate(config, workdir)`, on the host.

  The initial state lets a test replay the same steps on another mesh without
  compiling the initialisation again.
  """
  captured = {}
  create_state = train.create_state

  def capturing(method, config, mesh):
    state, abstract, shardings = create_state(method, config, mesh)
    captured["init"] = jax.device_get(state)
    return state, abstract, shardings

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, "create_state", capturing)
    state = train.train_and_evaluate(config, workdir)
  return captured["init"], jax.device_get(state)
