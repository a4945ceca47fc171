"""best_snapshot.py with evaluate.write_best: the best evaluation's weights outlive later,
worse ones, best.json names them, and they restore to what was evaluated.

The sequence below is what `evaluate.Evaluator.run` does after each evaluation; the
wiring itself runs in tests/test_cfcontra.py's end-to-end test.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from confeti_jax import best_snapshot, evaluate


def _variables(value):
  return {"params": {"conv": {"kernel": jnp.full((2, 3), value, jnp.float32)}},
          "batch_stats": {"bn": {"mean": jnp.full((3,), -value, jnp.float32)}}}


def _evaluate(workdir, step, miou):
  """Evaluator.run's reporting with a given mIoU: latest.json, then the best snapshot."""
  result = {"miou": miou, "per_class_iou": {"road": miou}}
  record = evaluate.write_results(workdir, result, step=step, model="m", dataset="d",
                                  num_images=1)
  snapshot = best_snapshot.keep_if_best(workdir, "eval", step, result, _variables(step))
  if snapshot:
    evaluate.write_best(workdir, record, snapshot)
  return snapshot


def _abstract():
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                      _variables(0))


def test_best_snapshot_survives_worse_evaluations_and_restores(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="best.json"):
    best_snapshot.restore(workdir, _abstract())
  history = [(2, 30.0, True), (4, 25.0, False), (6, 41.5, True), (8, 41.5, False),
             (10, None, False), (12, 12.0, False), (14, 20.0, False)]
  for step, miou, improves in history:
    assert bool(_evaluate(workdir, step, miou)) == improves, step
  with open(os.path.join(workdir, "eval", "best.json")) as f:
    best = json.load(f)
  with open(os.path.join(workdir, "eval", "latest.json")) as f:
    latest = json.load(f)
  assert (best["step"], best["miou"], latest["step"]) == (6, 41.5, 14)
  assert best["snapshot"] == os.path.join(workdir, "best", "6")
  assert best["per_class_iou"] == {"road": 41.5}
  # The folder holds the best and the previous best, nothing evaluated later.
  assert sorted(os.listdir(os.path.join(workdir, "best"))) == ["2", "6"]
  variables, record = best_snapshot.restore(workdir, _abstract())
  assert record["step"] == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables),
               jax.device_get(_variables(6)))
  # A better evaluation later (e.g. --mode=eval on a resumed run) replaces it.
  assert _evaluate(workdir, 16, 50.0)
  assert sorted(os.listdir(os.path.join(workdir, "best"))) == ["16", "6"]
  assert best_snapshot.read_record(workdir)["step"] == 16


def test_other_evaluation_sets_keep_their_own_best(tmp_path):
  assert best_snapshot.snapshot_dir(str(tmp_path)) == os.path.join(str(tmp_path), "best")
  assert best_snapshot.snapshot_dir(str(tmp_path), "eval_source") == os.path.join(
      str(tmp_path), "best_eval_source")
  result = {"miou": 10.0}
  assert best_snapshot.keep_if_best(str(tmp_path), "eval_source", 1, result, _variables(1))
  assert best_snapshot.read_record(str(tmp_path)) is None  # eval/ has no report yet
