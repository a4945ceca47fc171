"""DACS self-training: quality weight, row masks, EMA, teacher BN modes, and the whole step.

The step tests use the `tiny=1` toy config (64x64 crops, ResNet-18 at width 1/8) and
share one compiled single-device step; the end-to-end run goes through the trainer.
"""

import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from confeti_jax import methods, sharding, train
from confeti_jax import state as state_lib
from confeti_jax.data import pipeline
from confeti_jax.methods import dacs
from tests import trained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import toy  # noqa: E402


def tiny_dacs_config(cache="", **method_overrides):
  config = toy.get_config("method=dacs,tiny=1")
  config.data.toy.cache_dir = cache
  for key, value in method_overrides.items():
    config.method[key] = value
  return config


# -- pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize("height,ref,rows", [
    (512, 512, (15, 120)), (128, 512, (4, 30)), (64, 512, (2, 15)), (640, 512, (19, 150)),
    (640, 0, (15, 120)), (640, 640, (15, 120)),
])
def test_ignored_rows_scale_with_the_crop(height, ref, rows):
  assert (dacs.scaled_rows(15, height, ref), dacs.scaled_rows(120, height, ref)) == rows


def test_quality_weight_is_one_scalar_and_rows_are_zeroed():
  prob = np.full((2, 10, 3), 0.5, np.float32)
  prob[0, :4] = 0.968  # exactly at the threshold counts (>=)
  prob[1, 9, 0] = 0.99
  weight, q = dacs.pseudo_weight_map(jnp.asarray(prob), 0.968, 2, 3)
  expected_q = (4 * 3 + 1) / prob.size
  np.testing.assert_allclose(float(q), expected_q, rtol=1e-6)
  ref = np.full(prob.shape, expected_q, np.float32)
  ref[:, :2] = 0.0
  ref[:, -3:] = 0.0
  np.testing.assert_allclose(np.asarray(weight), ref, rtol=1e-6)
  # bottom = 0 zeroes nothing (the reference guards `[-0:]`, which would be every row).
  weight, _ = dacs.pseudo_weight_map(jnp.asarray(prob), 0.968, 0, 0)
  np.testing.assert_allclose(np.asarray(weight), expected_q, rtol=1e-6)


@pytest.mark.parametrize("step,alpha", [(0, 0.0), (1, 0.5), (9, 0.9), (998, 1 - 1 / 999),
                                        (999, 0.999), (5000, 0.999)])
def test_ema_rate_ramps_then_caps(step, alpha):
  np.testing.assert_allclose(float(state_lib.ema_alpha(step, 0.999)), alpha, rtol=1e-6)


def test_ema_update_formula():
  rng = np.random.default_rng(0)
  teacher = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": np.float32(2.0)}
  student = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": np.float32(-1.0)}
  out = state_lib.ema_update(teacher, student, 0)  # t = 0: an exact copy of the student
  jax.tree.map(np.testing.assert_array_equal, out, student)
  out = state_lib.ema_update(teacher, student, 3)
  np.testing.assert_allclose(out["a"], 0.75 * teacher["a"] + 0.25 * student["a"], rtol=1e-6)
  np.testing.assert_allclose(out["b"], 0.75 * 2.0 + 0.25 * -1.0, rtol=1e-6)
  out = state_lib.ema_update(teacher, student, 100_000, alpha=0.99)
  np.testing.assert_allclose(out["a"], 0.99 * teacher["a"] + 0.01 * student["a"], rtol=1e-5)


def test_teacher_bn_modes_and_validation():
  fake = lambda m: types.SimpleNamespace(
      step=jnp.int32(1), seg=types.SimpleNamespace(params={"w": jnp.ones(2)}),
      batch_stats={"m": jnp.full(2, 4.0)},
      teacher={"params": {"w": jnp.zeros(2)}, "batch_stats": {"m": jnp.zeros(2)}})
  batch_mode = dacs.DACS(tiny_dacs_config())
  out = batch_mode.update_teacher(fake(batch_mode))
  np.testing.assert_allclose(out["params"]["w"], 0.5)
  np.testing.assert_allclose(out["batch_stats"]["m"], 0.0)  # own stats, not EMA'd
  running = dacs.DACS(tiny_dacs_config(teacher_bn="running"))
  out = running.update_teacher(fake(running))
  np.testing.assert_allclose(out["batch_stats"]["m"], 2.0)  # follows the student's by EMA
  with pytest.raises(ValueError, match="teacher_bn"):
    dacs.DACS(tiny_dacs_config(teacher_bn="eval"))


def test_pseudo_label_accuracy_skips_ignored_pixels():
  pseudo = jnp.asarray([[0, 1, 2, 3]])
  labels = jnp.asarray([[0, 2, 2, 255]], jnp.uint8)
  np.testing.assert_allclose(float(dacs.pseudo_label_accuracy(pseudo, labels)), 2 / 3)
  assert float(dacs.pseudo_label_accuracy(pseudo, jnp.full((1, 4), 255, jnp.uint8))) == 0.0


# -- the step ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
  """One 3-step run of configs/toy.py:method=dacs,tiny=1 through the trainer (8 devices).

  The initial state is captured on the host so the single-device replay starts from the
  same numbers without compiling the initialisation again.
  """
  cache = str(tmp_path_factory.mktemp("toy_cache"))
  workdir = str(tmp_path_factory.mktemp("dacs_run"))
  config = tiny_dacs_config(cache)
  init, state = trained.train_keeping_init(config, workdir)
  return config, workdir, init, state


def test_end_to_end_three_steps(e2e):
  config, workdir, init, state = e2e
  assert int(state.step) == 3
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3]
  for key in ("loss", "loss_src_seg", "loss_mix_seg", "loss_fd", "pseudo_weight", "pseudo_acc",
              "lr_backbone", "lr_head"):
    assert all(np.isfinite(r[key]) for r in rows), key
  for r in rows:
    np.testing.assert_allclose(r["loss"], r["loss_src_seg"] + r["loss_mix_seg"] + r["loss_fd"],
                               rtol=1e-5)
    assert 0.0 <= r["pseudo_weight"] <= 1.0 and 0.0 <= r["pseudo_acc"] <= 1.0
  assert all(r["loss_fd"] > 0 for r in rows)  # the toy crops have thing-class cells
  with open(os.path.join(workdir, "eval", "latest.json")) as f:
    assert json.load(f)["model"].startswith("dacs/")
  # The ImageNet copy stays the initial backbone; the teacher is an average that has moved.
  jax.tree.map(np.testing.assert_array_equal, state.imnet, {
      "params": init.seg.params["backbone"], "batch_stats": init.batch_stats["backbone"]})
  jax.tree.map(np.testing.assert_array_equal, init.teacher["params"], init.seg.params)
  t, s = jax.tree.leaves(state.teacher["params"]), jax.tree.leaves(state.seg.params)
  assert any(not np.allclose(a, b) for a, b in zip(t, s))


def test_single_device_replay_equals_sharded_run_and_ignores_target_labels(e2e):
  """The trainer's 8-device run == the same batches on 1 device; target labels never train."""
  config, _, init, sharded = e2e
  src_iter, tgt_iter = pipeline.make_train_iterators(config)
  batches = [{"source": next(src_iter), "target": next(tgt_iter)} for _ in range(3)]
  mesh = sharding.make_mesh(1)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), init)
  step = train.make_train_step(methods.build(config), config, mesh, shardings)

  def run(batches):
    state = jax.device_put(init, shardings)
    accs = []
    for batch in batches:
      state, metrics = step(state, sharding.to_global(batch, mesh))
      accs.append(float(metrics["pseudo_acc"]))
    return jax.device_get(state), accs

  single, accs = run(batches)
  # Adam divides by sqrt(v): parameters whose gradients are ~0 move by up to lr for any
  # reduction-order noise (8 devices vs 1; the LLVM -O0 the suite compiles with
  # reorders more of it), hence an absolute tolerance of a fraction of the lr (1e-3)
  # for weights; the statistics are not Adam-moved.
  weights = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-4)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  for pick in (lambda s: s.seg.params, lambda s: s.teacher):
    jax.tree.map(weights, pick(single), pick(sharded))
  for pick in (lambda s: s.batch_stats, lambda s: s.imnet):
    jax.tree.map(close, pick(single), pick(sharded))
  relabelled = [{"source": b["source"], "target": {
      "image": b["target"]["image"], "label": np.zeros_like(b["target"]["label"])}}
      for b in batches]
  other, other_accs = run(relabelled)
  jax.tree.map(np.testing.assert_array_equal, other.seg.params, single.seg.params)
  jax.tree.map(np.testing.assert_array_equal, other.teacher, single.teacher)
  assert other_accs != accs
