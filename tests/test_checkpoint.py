"""Checkpointer: round trip, asynchronous writes, and a failed save that loses nothing.

Small hand-made states (no model) keep this module to a few seconds.
"""

import asyncio
import os
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.path import atomicity

from confeti_jax import checkpoint, sharding
from confeti_jax import state as state_lib

_TX = optax.adam(1e-3)  # one instance: the optimiser is static metadata of the pytree


def _state(seed=0):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  return state_lib.TrainState(
      step=jnp.asarray(seed, jnp.int32),
      seg=state_lib.OptGroup.create(params, _TX),
      batch_stats={"mean": jnp.zeros((4,), jnp.float32)})


def _abstract(state, shard=None):
  mesh = sharding.make_mesh()
  def leaf(x):
    spec = shard if (shard is not None and x.ndim == 2) else sharding.replicated(mesh)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec)
  return jax.tree.map(leaf, state)


def _iterator():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def _assert_states_equal(a, b):
  assert type(a) is type(b)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_round_trip_of_state_iterators_and_loop_counters(tmp_path):
  state, it = _state(3), _iterator()
  [next(it) for _ in range(5)]
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  assert ckpt.save(3, state, {"source_iter": it}, loop={"data_skipped_total": 7})
  assert ckpt.save(4, _state(4), {"source_iter": it})  # written without loop counters
  ckpt.close()

  again = checkpoint.Checkpointer(tmp_path / "ckpt")
  assert again.all_steps() == [3, 4] and again.latest_step() == 4
  fresh = _iterator()
  # Onto another sharding: the 2-D leaves split over the 8 devices' 'data' axis.
  mesh = sharding.make_mesh()
  target = _abstract(state, shard=sharding.batch_sharding(mesh))
  restored = again.restore(3, target, {"source_iter": fresh})
  _assert_states_equal(restored, state)
  assert restored.seg.params["w"].sharding == sharding.batch_sharding(mesh)
  assert next(fresh) == 5
  assert again.restore_loop(3) == {"data_skipped_total": 7}
  assert again.restore_loop(4) == {}
  subtree = again.restore_subtree(4, {"seg": {"params": _abstract(state).seg.params}})
  np.testing.assert_array_equal(subtree["seg"]["params"]["w"], _state(4).seg.params["w"])
  again.close()


def _hold_finalize(monkeypatch, gate=None, error=None):
  """Makes orbax's background commit (rename of the temporary folder) wait or fail."""
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if gate is not None:
      await asyncio.to_thread(gate.wait, 60)
    if error is not None:
      raise error
    return await original(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)


def _finished_steps(directory):
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def test_save_returns_while_the_write_goes_on_in_the_background(tmp_path, monkeypatch):
  gate = threading.Event()
  _hold_finalize(monkeypatch, gate=gate)
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  ckpt.save(1, _state(1), {"source_iter": _iterator()})
  # save() has returned although the checkpoint cannot be committed yet.
  assert _finished_steps(tmp_path / "ckpt") == []
  gate.set()
  ckpt.wait()
  assert _finished_steps(tmp_path / "ckpt") == [1]
  ckpt.close()


def test_failed_save_leaves_the_previous_checkpoint_readable(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  ckpt.save(1, _state(1), {"source_iter": _iterator()})
  ckpt.wait()
  _hold_finalize(monkeypatch, error=OSError(28, "No space left on device"))
  ckpt.save(2, _state(2), {"source_iter": _iterator()})  # fails in the background
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"step 2 .* failed .*No space left.* step 1 is intact"):
    ckpt.close()
  monkeypatch.undo()

  again = checkpoint.Checkpointer(tmp_path / "ckpt", cleanup=True)  # + the half-written one
  assert again.latest_step() == 1
  _assert_states_equal(again.restore(1, _abstract(_state(1)), {"source_iter": _iterator()}),
                       _state(1))
  again.close()
  assert [n for n in os.listdir(tmp_path / "ckpt") if "tmp" in n] == []


def _two_steps(directory):
  ckpt = checkpoint.Checkpointer(directory, keep=3)
  it = _iterator()
  for step in (2, 4):
    next(it)
    ckpt.save(step, _state(step), {"source_iter": it}, loop={"at": step})
  ckpt.close()
  return os.path.join(directory, "4")


def _truncate_data(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      if os.path.basename(root) == "d":
        path = os.path.join(root, name)
        os.truncate(path, os.path.getsize(path) // 2)


def _flip_bits(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      if os.path.basename(root) == "d":
        path = os.path.join(root, name)
        data = bytearray(open(path, "rb").read())
        data[len(data) // 3::7] = bytes(b ^ 0xFF for b in data[len(data) // 3::7])
        open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage, at_fault", [
    (_truncate_data, "state/d/"),
    (lambda d: os.remove(os.path.join(d, "state", "_METADATA")), "state/_METADATA"),
    (_flip_bits, "state/d/"),
    (lambda d: os.remove(os.path.join(d, "source_iter", "process_0-of-1.json")),
     "source_iter/process_0-of-1.json"),
])
def test_unreadable_newest_step_is_reported_moved_aside_and_the_older_one_used(
    tmp_path, damage, at_fault, caplog):
  directory = str(tmp_path / "checkpoints")
  damage(_two_steps(directory))
  ckpt = checkpoint.Checkpointer(directory, keep=3)
  fresh = _iterator()
  with caplog.at_level("ERROR"):
    step, restored, loop = ckpt.restore_first_intact(_abstract(_state(4)),
                                                     {"source_iter": fresh})
  ckpt.close()
  assert (step, loop) == (2, {"at": 2})
  _assert_states_equal(restored, _state(2))
  assert next(fresh) == 1
  line = next(r.getMessage() for r in caplog.records
              if "cannot be read" in r.getMessage())
  assert line.startswith("The checkpoint of step 4 cannot be read: ")
  assert os.path.join(directory, "4", at_fault) in line
  assert sorted(os.listdir(tmp_path / checkpoint.UNREADABLE_DIR)) == ["4"]
  assert checkpoint.Checkpointer(directory).all_steps() == [2]


def test_no_readable_step_moves_nothing_and_lists_every_try(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _truncate_data(_two_steps(directory))
  _truncate_data(os.path.join(directory, "2"))
  ckpt = checkpoint.Checkpointer(directory, keep=3)
  with pytest.raises(checkpoint.NoIntactCheckpointError) as info:
    ckpt.restore_first_intact(_abstract(_state(4)), {"source_iter": _iterator()})
  ckpt.close()
  assert "step 4: " in str(info.value) and "step 2: " in str(info.value)
  assert "Nothing was moved or deleted" in str(info.value)
  assert sorted(os.listdir(directory)) == ["2", "4"]
