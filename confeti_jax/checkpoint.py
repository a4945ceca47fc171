"""Thin wrapper over orbax's CheckpointManager: the train state plus every data iterator.

Saving the grain iterators beside the state is what makes a resumed run see the
same batches as an uninterrupted one. Saves are asynchronous: `save` returns once
the state is copied to host memory and the files are written by a background thread
while training goes on (the next `save`, `wait` or `close` waits for it). They are
atomic: orbax writes into a temporary folder and renames it when complete, so a save
that fails or is interrupted leaves the previous checkpoint readable; the failure is
raised as `CheckpointError` at the next checkpoint call, naming the step to resume from.

Every process calls every method (orbax synchronises them and each writes what it
owns); the grain iterators are saved per process.
"""

import contextlib
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

STATE, LOOP = "state", "loop"


class CheckpointError(RuntimeError):
  """Writing a checkpoint failed; the previous one on disk is still complete."""


def _state_handler():
  """The PyTree handler for the state, with replica-parallel writes only on TPU.

  Replica-parallel saving (orbax's default off GPU) has every replica write a slice
  of each replicated array; on CPU that costs a jit compile per array shape on the
  first save (8.6 s instead of 0.24 s for the toy state) for no gain. TPU pods keep
  it: there it spreads a replicated state's bytes over the hosts.
  """
  th = ocp.type_handlers
  registry = th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
      (np.ndarray, th.NumpyHandler()),
      (jax.Array, th.ArrayHandler(use_replica_parallel=jax.default_backend() == "tpu")))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpointer:
  """Saves and restores `state` and named grain iterators under one directory."""

  def __init__(self, directory, *, keep=2, async_save=True, cleanup=False):
    """`cleanup` removes what saves that died mid-write left behind; only the trainer
    sets it, as a reader (--mode=eval) would delete the save in flight of a trainer
    running beside it."""
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=cleanup,
        enable_background_delete=True)  # old checkpoints go while training goes on
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    handler = _state_handler()
    registry.add(STATE, ocp.args.PyTreeSave, handler)
    registry.add(STATE, ocp.args.PyTreeRestore, handler)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)
    self._pending = None  # the step whose save may still be running in the background

  def latest_step(self):
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step, state, iterators=None, loop=None):
    """Starts an asynchronous save of `state`, `iterators` (name -> grain iterator) and
    `loop`, a small JSON-able dict of host-side counters (e.g. data_skipped_total)."""
    items = {STATE: ocp.args.PyTreeSave(state)}
    for name, it in (iterators or {}).items():
      items[name] = grain.checkpoint.CheckpointSave(it)
    if loop is not None:
      items[LOOP] = ocp.args.JsonSave(dict(loop))
    self.wait()  # orbax waits for the previous save anyway; this names it if it failed
    with self._raising_checkpoint_error(int(step)):
      saved = self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    if saved:
      self._pending = int(step)
      logging.info("Checkpoint for step %d started in %s", step, self.directory)
    return saved

  def restore(self, step, abstract_state, iterators=None):
    """Restores the full state onto `abstract_state`'s shardings; iterators in place."""
    items = {STATE: _pytree_restore(abstract_state)}
    for name, it in (iterators or {}).items():
      items[name] = grain.checkpoint.CheckpointRestore(it)
    restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
    return restored[STATE]

  def restore_loop(self, step):
    """The `loop` dict saved with `step`; {} for checkpoints written without one."""
    if LOOP not in (self._manager.item_metadata(int(step)) or {}):
      return {}
    restored = self._manager.restore(int(step),
                                     args=ocp.args.Composite(**{LOOP: ocp.args.JsonRestore()}))
    return dict(restored[LOOP] or {})

  def restore_subtree(self, step, abstract_subtree):
    """Restores only the leaves named by `abstract_subtree` (a dict mirroring the state).

    Used by evaluation: the student parameters and BatchNorm statistics, without
    optimiser states, teachers, generators or data iterators.
    """
    args = _pytree_restore(abstract_subtree, partial=True)
    restored = self._manager.restore(int(step), args=ocp.args.Composite(**{STATE: args}))
    return restored[STATE]

  def reached_preemption(self, step):
    """True on every process at the same step once any of them got a preemption notice."""
    return self._manager.reached_preemption(int(step))

  def wait(self):
    """Blocks until the save in flight is on disk; raises CheckpointError if it failed."""
    with self._raising_checkpoint_error(self._pending):
      self._manager.wait_until_finished()
    self._pending = None

  def close(self):
    try:
      self.wait()
    finally:
      self._manager.close()

  @contextlib.contextmanager
  def _raising_checkpoint_error(self, step):
    """Turns an orbax failure (this save's or a background one) into a CheckpointError."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as error:  # noqa: BLE001 - any I/O error of orbax or tensorstore
      self._pending = None
      try:
        previous = [s for s in self.all_steps() if step is None or s < step]
      except Exception:  # noqa: BLE001 - listing a broken disk may fail as well
        previous = []
      keep = (f"the checkpoint of step {max(previous)} is intact and rerunning the same "
              "command resumes from it" if previous else "there is no earlier checkpoint")
      raise CheckpointError(
          f"Writing the checkpoint of step {step} in {self.directory} failed "
          f"({type(error).__name__}: {error}); {keep}. Check the free disk space and "
          "write permissions of the workdir.") from error


def _pytree_restore(abstract, partial=False):
  return ocp.args.PyTreeRestore(item=abstract, restore_args=jax.tree.map(_restore_args, abstract),
                                partial_restore=partial)


def _restore_args(leaf):
  sharding = getattr(leaf, "sharding", None)
  return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype)
