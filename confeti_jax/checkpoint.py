"""Thin wrapper over orbax's CheckpointManager: the train state plus every data iterator.

Saving the grain iterators beside the state is what makes a resumed run see the
same batches as an uninterrupted one. Saves are asynchronous (the step does not
wait for the disk) and atomic (orbax writes to a temporary folder and renames),
so a failed or interrupted save leaves the previous checkpoint readable.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves and restores `state` and named grain iterators under one directory."""

  def __init__(self, directory, *, keep=2, async_save=True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step, state, iterators=None):
    """Starts an (asynchronous) save of `state` and `iterators` (name -> grain iterator)."""
    items = {"state": ocp.args.StandardSave(state)}
    for name, it in (iterators or {}).items():
      items[name] = grain.checkpoint.CheckpointSave(it)
    saved = self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info("Checkpoint for step %d started in %s", step, self.directory)
    return saved

  def restore(self, step, abstract_state, iterators=None):
    """Restores the full state onto `abstract_state`'s shardings; iterators in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    for name, it in (iterators or {}).items():
      items[name] = grain.checkpoint.CheckpointRestore(it)
    restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_subtree(self, step, abstract_subtree):
    """Restores only the leaves named by `abstract_subtree` (a dict mirroring the state).

    Used by evaluation: the student parameters and BatchNorm statistics, without
    optimiser states, teachers, generators or data iterators.
    """
    args = ocp.args.PyTreeRestore(
        item=abstract_subtree,
        restore_args=jax.tree.map(_restore_args, abstract_subtree),
        partial_restore=True)
    restored = self._manager.restore(int(step), args=ocp.args.Composite(state=args))
    return restored["state"]

  def reached_preemption(self, step):
    return self._manager.reached_preemption(int(step))

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def _restore_args(leaf):
  sharding = getattr(leaf, "sharding", None)
  return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype)
