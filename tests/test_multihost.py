"""Two processes (jax.distributed over loopback, gloo collectives) train like one.

The toy `tiny=1` run is launched through `confeti_jax.main` as two processes of two
CPU devices each: 2 steps, stop, checkpoint; then both resume, train step 3 and
evaluate. A single process with four devices runs the same 3 steps, and the two must
agree on losses, parameters, the evaluation and the corrupt-file count: one source
PNG is cut short, so every epoch skips it once, and the count is summed over the
processes and restored from the checkpoint. Compilations are shared through a
persistent cache folder, so the resumed pair does not compile again.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from confeti_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import toy  # noqa: E402

STEPS = 3


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A private copy of the rendered tiny toy with one source PNG cut short."""
  config = toy.get_config("tiny=1")
  config.data.toy.cache_dir = str(tmp_path_factory.mktemp("toy_cache"))
  folders = pipeline.resolve_roots(config.data)
  source = str(tmp_path_factory.mktemp("data") / "source")
  shutil.copytree(folders["source"], source)
  images = sorted(os.path.join(d, f) for d, _, files in os.walk(source) for f in files
                  if f.endswith(".png") and os.sep + "images" + os.sep in os.path.join(d, f))
  with open(images[0], "rb") as f:
    png = f.read()
  with open(images[0], "wb") as f:  # headers intact (the size check passes), pixels cut
    f.write(png[:png.index(b"IDAT") + 20])
  return config.data.toy.cache_dir, source


def _command(workdir, data, stop_at=0):
  cache, source = data
  return [sys.executable, "-m", "confeti_jax.main", "--config=configs/toy.py:tiny=1",
          f"--workdir={workdir}", f"--config.data.toy.cache_dir={cache}",
          f"--config.data.source.root={source}", f"--config.train.steps={STEPS}",
          f"--config.train.stop_at_step={stop_at}", f"--config.eval.every_steps={STEPS}",
          "--config.train.checkpoint_every_steps=100"]


def _env(devices, compile_cache):
  # LLVM at -O0 compiles the CPU programs about 4x faster; every run here uses it alike.
  flags = (f"--xla_force_host_platform_device_count={devices} "
           "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
              JAX_COMPILATION_CACHE_DIR=compile_cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _start_pair(workdir, data, compile_cache, stop_at=0):
  address = f"127.0.0.1:{_free_port()}"
  return [subprocess.Popen(
      [*_command(workdir, data, stop_at), f"--coordinator_address={address}",
       "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=_env(2, compile_cache), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs):
  for proc in procs:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _saved_state(workdir, step):
  """The saved state as numpy arrays (it was written from devices this process lacks)."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def test_process_batches_concatenate_to_the_single_process_batch(data):
  cache, source = data
  config = toy.get_config("tiny=1")
  config.data.toy.cache_dir, config.data.source.root = cache, source
  whole = pipeline.make_train_iterators(config)
  parts = [pipeline.make_train_iterators(config, process_index=k, process_count=2)
           for k in range(2)]
  for _ in range(3):  # three global batches: epochs 1-3 of the 8 tiny sources
    for domain in range(2):
      want = next(whole[domain])
      got = [next(p[domain]) for p in parts]
      for key in want:
        np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])


def test_two_processes_train_checkpoint_resume_and_agree_with_one(data, tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  compile_cache = str(tmp_path / "compile_cache")
  pair = _start_pair(multi, data, compile_cache, stop_at=2)
  reference = subprocess.Popen(_command(single, data), cwd=ROOT, env=_env(4, compile_cache),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _finish(pair)
  ckpts = os.path.join(multi, "checkpoints")
  assert sorted(os.listdir(ckpts)) == ["2"]
  for item in ("source_iter", "target_iter"):  # each process saved its own position
    assert sorted(os.listdir(os.path.join(ckpts, "2", item))) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  _finish(_start_pair(multi, data, compile_cache))  # both restore step 2, train step 3
  _finish([reference])

  rows, want = _metrics(multi), _metrics(single)
  assert [r["step"] for r in rows] == [r["step"] for r in want] == [1, 2, 3]  # process 0 only
  np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in want], rtol=1e-5)
  # One truncated file among 8 sources, met once per epoch of 8 samples (= 1 step).
  assert [r["data_skipped_total"] for r in rows] == [r["data_skipped_total"] for r in want]
  assert [r["data_skipped_total"] for r in want] == [1, 2, 3]

  got, ref = _saved_state(multi, STEPS), _saved_state(single, STEPS)
  assert int(got["step"]) == int(ref["step"]) == STEPS
  # The all-reduces run in another order (gloo across processes), and Adam's first steps
  # are +-lr for any nonzero gradient, so a parameter whose gradient is at rounding level
  # may move the other way: measured, 99% of them agree to 1e-5 and the whole to 3e-5.
  flat = lambda tree: np.concatenate([x.ravel() for x in jax.tree.leaves(tree)])
  p_got, p_ref = flat(got["seg"]["params"]), flat(ref["seg"]["params"])
  assert np.linalg.norm(p_got - p_ref) < 1e-3 * np.linalg.norm(p_ref)
  assert np.mean(np.abs(p_got - p_ref) < 1e-5) > 0.95
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
               got["batch_stats"], ref["batch_stats"])

  # The final evaluation: each process scored its shard of the 4 val images, once each.
  results = []
  for workdir in (multi, single):
    with open(os.path.join(workdir, "eval", "latest.json")) as f:
      results.append(json.load(f))
  assert results[0]["num_images"] == results[1]["num_images"] == 4
  assert results[0]["miou"] == pytest.approx(results[1]["miou"], abs=0.5)
