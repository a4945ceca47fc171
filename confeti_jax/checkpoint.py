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
import re
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

STATE, LOOP = "state", "loop"
# Beside `checkpoints/`: steps that could not be read, and newer steps set aside by a
# restart from an earlier one (train.restore_step). Moved, never deleted.
UNREADABLE_DIR, SET_ASIDE_DIR = "checkpoints_unreadable", "checkpoints_set_aside"


class CheckpointError(RuntimeError):
  """Writing a checkpoint failed; the previous one on disk is still complete."""


class NoIntactCheckpointError(RuntimeError):
  """No kept checkpoint can be read (or the step asked for is not kept)."""


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
    # Registered so that reading the state alone (or the metadata) knows the item and
    # orbax does not warn "Item 'loop' ... could not be restored" on every resume.
    loop_handler = ocp.handlers.JsonCheckpointHandler()
    registry.add(LOOP, ocp.args.JsonSave, loop_handler)
    registry.add(LOOP, ocp.args.JsonRestore, loop_handler)
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

  def restore_first_intact(self, abstract_state, iterators=None, *, steps=None,
                           move_unreadable=True):
    """(step, state, loop) of the newest readable step among `steps` (default: all kept).

    A step that fails to restore (a truncated or bit-flipped data file, a missing
    metadata or iterator file) is reported in one line and the next older one is
    tried. Only once an older step restored are the unreadable newer ones moved to
    `checkpoints_unreadable/` beside this folder: when none restores, the fault is more
    likely the code or config than the disk, so nothing is moved and the error lists
    every step tried with its reason.
    """
    def read(step):
      return self.restore(step, abstract_state, iterators), self.restore_loop(step)

    step, (state, loop), failures = self._newest_readable(read, steps)
    if failures and move_unreadable:
      self._move_aside([s for s, _ in failures], UNREADABLE_DIR)
    return step, state, loop

  def restore_subtree_first_intact(self, abstract_subtree):
    """(step, subtree) of the newest step whose `abstract_subtree` leaves can be read.

    For readers (--mode=eval): an unreadable step is reported and skipped, never
    moved, as a trainer may own the folder.
    """
    step, subtree, _ = self._newest_readable(
        lambda step: self.restore_subtree(step, abstract_subtree))
    return step, subtree

  def _newest_readable(self, read, steps=None):
    """(step, read(step), [(unreadable newer step, its description)]) for the newest of
    `steps` (default: all kept) that `read` restores; each failure is logged in one line.
    Raises NoIntactCheckpointError, listing every try, when none can be read."""
    failures = []
    for step in sorted(self.all_steps() if steps is None else steps, reverse=True):
      try:
        return step, read(step), failures
      except Exception as error:  # noqa: BLE001 - orbax/tensorstore raise many types
        path, reason = describe_unreadable(os.path.join(self.directory, str(step)), error)
        logging.error("The checkpoint of step %d cannot be read: %s (%s); trying an older "
                      "one.", step, path, reason)
        failures.append((step, f"{path} ({reason})"))
    tried = "; ".join(f"step {s}: {d}" for s, d in failures) or "none is kept"
    raise NoIntactCheckpointError(
        f"No checkpoint in {self.directory} can be read ({tried}). Nothing was moved or "
        "deleted. If the files are damaged, move that folder aside to start afresh; if the "
        "code or config changed since they were written, rerun with the version that wrote "
        "them.")

  def set_aside_after(self, step):
    """Moves every kept step newer than `step` to `checkpoints_set_aside/` (a restart
    from an earlier step must not resume the newer ones later)."""
    newer = [s for s in self.all_steps() if s > step]
    if newer:
      self.wait()
      self._move_aside(newer, SET_ASIDE_DIR)
    return newer

  def _move_aside(self, steps, folder_name):
    """Process 0 renames the step folders into `folder_name`; every process reloads."""
    target = os.path.join(os.path.dirname(self.directory), folder_name)
    if jax.process_index() == 0:
      os.makedirs(target, exist_ok=True)
      for step in steps:
        destination = os.path.join(target, str(step))
        if os.path.exists(destination):  # set aside before: keep both
          destination += time.strftime("_%Y%m%d-%H%M%S")
        os.replace(os.path.join(self.directory, str(step)), destination)
        logging.warning("Moved the checkpoint of step %d to %s", step, destination)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("confeti_jax.checkpoint.move_aside")
    self._manager.reload()

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


def describe_unreadable(step_dir, error):
  """(the file at fault, a one-line reason) for a step that failed to restore.

  A missing file is looked for first, as orbax then reports something unrelated (a
  deleted state/_METADATA reads as a "pytree structure error"); otherwise the last
  local path in the error message is the file tensorstore could not read.
  """
  for needed in ("_CHECKPOINT_METADATA", os.path.join(STATE, "_METADATA"),
                 os.path.join(STATE, "manifest.ocdbt")):
    if not os.path.exists(os.path.join(step_dir, needed)):
      return os.path.join(step_dir, needed), "the file is missing"
  message = str(error)
  paths = re.findall(r'local file "([^"]+)"', message) or re.findall(
      r"File (.+?) does not exist", message)
  path = next((p for p in reversed(paths) if os.path.isfile(p)), paths[-1] if paths else step_dir)
  reason = message.split(" [tensorstore_spec")[0]
  if paths and f'"{paths[-1]}": ' in reason:  # what tensorstore says about that file
    reason = reason.rsplit(f'"{paths[-1]}": ', 1)[1]
  reason = reason.strip().splitlines()[0] if reason.strip() else "no message"
  if len(reason) > 240:
    reason = reason[:237] + "..."
  return path, f"{type(error).__name__}: {reason}"


def _pytree_restore(abstract, partial=False):
  return ocp.args.PyTreeRestore(item=abstract, restore_args=jax.tree.map(_restore_args, abstract),
                                partial_restore=partial)


def _restore_args(leaf):
  sharding = getattr(leaf, "sharding", None)
  return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype)
