"""End to end: a tiny toy run trains, evaluates and checkpoints; sharding, resume and NaN.

One module-level toy cache keeps rendering out of the timings; every run uses the
`tiny=1` toy config (64x64 crops, ResNet-18 at width 1/8).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from confeti_jax import methods, run_config, sharding, train, writer
from confeti_jax.methods import source_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import toy  # noqa: E402


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("toy_cache"))


def tiny_config(cache, **overrides):
  config = toy.get_config("tiny=1")
  config.data.toy.cache_dir = cache
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _params(state):
  return jax.device_get(state.seg.params)


def test_end_to_end_train_and_eval(toy_cache, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(toy_cache)
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 3

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3]
  for key in ("loss", "lr_backbone", "lr_head", "steps_per_sec", "data_skipped_total"):
    assert all(key in r for r in rows), key
  assert [r["data_skipped_total"] for r in rows] == [0, 0, 0]
  assert any(name.startswith("events") for name in os.listdir(os.path.join(workdir,
                                                                           "tensorboard")))

  with open(os.path.join(workdir, "eval", "latest.json")) as f:
    result = json.load(f)
  assert set(result) >= {"step", "model", "dataset", "miou", "per_class_iou", "num_images"}
  assert result["step"] == 3 and result["num_images"] == config.data.toy.num_val
  assert len(result["per_class_iou"]) == 19
  assert os.path.exists(os.path.join(workdir, "eval", "step_3.json"))
  assert "mIoU" in open(os.path.join(workdir, "eval", "latest.md")).read()
  # checkpoint_every_steps=2 and the final step; keep_checkpoints=2.
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                if s.isdigit()) == [2, 3]

  # --mode=eval restores only the inference variables and reproduces the final eval.
  from confeti_jax import evaluate
  again = evaluate.run(config, workdir)
  assert again["miou"] == pytest.approx(result["miou"], abs=1e-6)

  # A different model in the same workdir is refused, naming the key.
  other = tiny_config(toy_cache)
  other.model.backbone = "resnet34"
  with pytest.raises(ValueError, match="model"):
    train.train_and_evaluate(other, workdir)


def method_lr(config, step):
  """The backbone learning rate of `config`'s schedule at `step`."""
  return methods.build(config).learning_rates(step)["lr_backbone"]


def _run_steps(config, mesh, batches):
  method = methods.build(config)
  state, _, shardings = train.create_state(method, config, mesh)
  step = train.make_train_step(method, config, mesh, shardings)
  losses = []
  for batch in batches:
    state, metrics = step(state, sharding.to_global(batch, mesh))
    losses.append(float(metrics["loss"]))
  return losses, _params(state), jax.device_get(state.batch_stats)


def test_sharded_step_equals_single_device(toy_cache):
  config = tiny_config(toy_cache)
  rng = np.random.default_rng(0)
  batches = [{d: {"image": rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8),
                  "label": rng.integers(0, 19, (8, 64, 64), dtype=np.uint8)}
              for d in ("source", "target")} for _ in range(2)]
  assert jax.device_count() == 8
  l8, p8, bs8 = _run_steps(config, sharding.make_mesh(), batches)
  l1, p1, bs1 = _run_steps(config, sharding.make_mesh(1), batches)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  # Adam divides each moment by its own root: a weight whose gradients are near zero
  # moves by up to about the learning rate in whichever direction float32 reduction-order
  # noise gives its gradient, so single weights may differ by a good part of lr (measured:
  # at most 0.1 x lr on earlier CI machines, 0.34 x lr for 1 of 4608 weights on an AMD
  # EPYC host). A sharding error (wrong reduction, mixed-up batch) moves most weights by
  # O(lr). So: fewer than 1% of each tensor's weights beyond 0.1 x lr, none beyond 2 x lr.
  lr = float(method_lr(config, step=1))

  def close(a, b):
    diff = np.abs(np.asarray(a) - np.asarray(b))
    assert np.mean(diff > 0.1 * lr + 1e-4 * np.abs(b)) < 0.01, diff.max() / lr
    assert diff.max() < 2 * lr, diff.max() / lr

  jax.tree.map(close, p8, p1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), bs8, bs1)


def test_next_global_batch_keeps_loader_bookkeeping_on_the_host():
  def loader(skips):
    for s in skips:
      yield {"image": np.zeros((8, 4, 4, 3), np.uint8), "label": np.zeros((8, 4, 4), np.uint8),
             "skipped": np.asarray(s, np.int32), "rcs_class": np.arange(8, dtype=np.int32)}

  iterators = {"source": loader([[0] * 7 + [2]]), "target": loader([[1] * 8])}
  batch, skipped = train.next_global_batch(iterators, sharding.make_mesh())
  assert skipped == 10
  assert set(batch) == {"source", "target"}
  assert set(batch["source"]) == set(batch["target"]) == {"image", "label"}
  assert batch["source"]["image"].shape == (8, 4, 4, 3)


def _main(workdir, cache, steps, stop_at=0):
  cmd = [sys.executable, "-m", "confeti_jax.main", "--config=configs/toy.py:tiny=1",
         f"--workdir={workdir}", f"--config.data.toy.cache_dir={cache}",
         f"--config.train.steps={steps}", "--config.eval.every_steps=0",
         f"--config.train.stop_at_step={stop_at}",
         "--config.train.checkpoint_every_steps=100"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]


def _saved_params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return ocp.PyTreeCheckpointer().restore(path)["seg"]["params"]


def test_resume_in_fresh_process_is_bitwise(toy_cache, tmp_path):
  """k=2 steps, stop, resume in a new process to 4 == 4 uninterrupted steps (CPU)."""
  resumed, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")
  _main(resumed, toy_cache, 4, stop_at=2)
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["2"]
  _main(resumed, toy_cache, 4)
  _main(straight, toy_cache, 4)
  a, b = _saved_params(resumed, 4), _saved_params(straight, 4)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  rows = {}
  for run in (resumed, straight):
    with open(os.path.join(run, "metrics.jsonl")) as f:
      rows[run] = [json.loads(line) for line in f]
  assert [r["step"] for r in rows[resumed]] == [1, 2, 3, 4]
  # Same seed, same metrics: every logged value but the timings, bit for bit.
  timing = ("steps_per_sec", "eta_seconds", "time", "wall_time", "uptime")
  strip = lambda r: {k: v for k, v in r.items() if k not in timing}
  assert [strip(r) for r in rows[resumed]] == [strip(r) for r in rows[straight]]


def test_nan_stops_and_keeps_last_good_checkpoint(toy_cache, tmp_path, monkeypatch):
  original = source_only.SourceOnly.train_step

  def poisoned(self, state, batch, key):
    state, metrics = original(self, state, batch, key)
    metrics["loss"] = jax.numpy.where(state.step >= 3, jax.numpy.nan, metrics["loss"])
    return state, metrics

  monkeypatch.setattr(source_only.SourceOnly, "train_step", poisoned)
  workdir = str(tmp_path / "nan")
  config = tiny_config(toy_cache, **{"train.steps": 4, "eval.every_steps": 0})
  with pytest.raises(writer.NonFiniteLossError, match="loss") as info:
    train.train_and_evaluate(config, workdir)
  assert "First non-finite step: 3 (of 3-3); non-finite first: loss." in str(info.value)
  rows = writer.read_rows(os.path.join(workdir, writer.METRICS_FILE))
  assert (f"Kept checkpoints: step 2 (loss {writer.loss_at(rows, 2):.4g}). If the loss had "
          "already grown at the newest, restart from an earlier one with "
          "--config.train.restore_step=STEP") in str(info.value)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) == [2]
  restored = ocp.PyTreeCheckpointer().restore(os.path.join(ckpt_dir, "2", "state"))
  assert int(restored["step"]) == 2


def test_nan_weights_with_finite_losses_stop_before_their_save(toy_cache, tmp_path,
                                                                monkeypatch):
  """A non-finite gradient: the losses of the step are finite, the updated student is
  not. The guard names the student and fires at that step, before the step-4 save."""
  original = source_only.SourceOnly.train_step

  def poisoned(self, state, batch, key):
    state, metrics = original(self, state, batch, key)
    bad = lambda p: jax.numpy.where(state.step >= 4, jax.numpy.nan, p)
    return state.replace(seg=state.seg.replace(params=jax.tree.map(bad, state.seg.params))), \
        metrics

  monkeypatch.setattr(source_only.SourceOnly, "train_step", poisoned)
  workdir = str(tmp_path / "nan_weights")
  config = tiny_config(toy_cache, **{"train.steps": 6, "eval.every_steps": 0})
  with pytest.raises(writer.NonFiniteLossError) as info:
    train.train_and_evaluate(config, workdir)
  message = str(info.value)
  assert "First non-finite step: 4" in message and "non-finite gradient" in message
  assert "state:student" in message
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) == [2]


def test_sigterm_saves_and_exits_cleanly(toy_cache, tmp_path):
  """SIGTERM mid-run: the step finishes, state and iterators are saved, exit code 0."""
  import signal
  import time

  workdir = str(tmp_path / "term")
  cmd = [sys.executable, "-m", "confeti_jax.main", "--config=configs/toy.py:tiny=1",
         f"--workdir={workdir}", f"--config.data.toy.cache_dir={toy_cache}",
         "--config.train.steps=100000", "--config.eval.every_steps=0",
         "--config.train.checkpoint_every_steps=100000"]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    assert proc.poll() is None and time.time() < deadline, "run died before its first step"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  with open(metrics) as f:
    last_logged = json.loads(f.readlines()[-1])["step"]
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert saved == [last_logged] and 0 < last_logged < 100000
  restored = ocp.PyTreeCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(last_logged), "state"))
  assert int(restored["step"]) == last_logged


def test_resume_refuses_another_method_naming_the_key_but_not_a_moved_workdir(tmp_path):
  """A saved run of another configuration is refused with the differing key; a stage
  whose predecessor's location moved with the workdir (method.cut_from) resumes."""
  config = toy.get_config("method=confeti")
  config.method.cut_from = "/old/place/stage0"
  run_config.record(config, str(tmp_path), run_config.check(config, str(tmp_path)), 0)
  config.method.cut_from = "/new/place/stage0"
  config.model.dtype = "bfloat16"
  run_config.check(config, str(tmp_path))  # compute and location only: accepted
  config.method.proto.dim = 64
  with pytest.raises(ValueError, match=r"method\.proto\.dim: saved 128, now 64") as info:
    run_config.check(config, str(tmp_path))
  assert "cut_from" not in str(info.value) and "top_n" not in str(info.value)
