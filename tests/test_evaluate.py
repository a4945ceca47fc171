"""Evaluation: confusion matrix, mmseg-style mIoU, result files, whole/slide inference."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from confeti_jax import augment, evaluate

NAMES4 = ["road", "sidewalk", "building", "wall"]
CITYSCAPES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
              "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
              "truck", "bus", "train", "motorcycle", "bicycle"]


def _hand_case():
  # gt:   0 0 0 1 1 2 255 255 | second image (invalid) all class 3
  # pred: 0 0 1 1 0 0  3   3  |                        all class 3
  label = np.array([[0, 0, 0, 1, 1, 2, 255, 255], [3] * 8], np.int32).reshape(2, 2, 4)
  pred = np.array([[0, 0, 1, 1, 0, 0, 3, 3], [3] * 8], np.int32).reshape(2, 2, 4)
  valid = np.array([True, False])
  return pred, label, valid


HAND_CM = np.array([[2, 1, 0, 0],   # gt road: 2 right, 1 as sidewalk
                    [1, 1, 0, 0],   # gt sidewalk: 1 as road, 1 right
                    [1, 0, 0, 0],   # gt building: never predicted -> IoU 0
                    [0, 0, 0, 0]])  # wall: absent from gt and prediction -> NaN


def test_confusion_matrix_hand_case_excludes_ignore_and_invalid_images():
  pred, label, valid = _hand_case()
  cm = jax.jit(lambda p, l, v: evaluate.confusion_matrix(p, l, 4, valid=v))(pred, label, valid)
  assert cm.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(cm), HAND_CM)


def test_confusion_matrix_matches_numpy_bincount():
  rng = np.random.default_rng(0)
  k = 5
  label = rng.integers(0, k + 2, size=(3, 17, 13)).astype(np.int32)  # k, k+1 are out of range
  label[rng.random(label.shape) < 0.2] = 255
  pred = rng.integers(0, k, size=label.shape).astype(np.int32)
  keep = label < k
  expected = np.bincount(label[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
  np.testing.assert_array_equal(np.asarray(evaluate.confusion_matrix(pred, label, k)), expected)


def test_summarize_hand_computed():
  result = evaluate.summarize(HAND_CM, NAMES4, subsets={"first2": [0, 1], "wall": [3]})
  iou = result["per_class_iou"]
  # I = (2, 1, 0, 0); U = (3 + 4 - 2, 2 + 2 - 1, 1 + 0 - 0, 0) = (5, 3, 1, 0).
  assert iou["road"] == pytest.approx(40.0)
  assert iou["sidewalk"] == pytest.approx(100.0 / 3.0)
  assert iou["building"] == 0.0
  assert iou["wall"] is None
  assert result["miou"] == pytest.approx((40.0 + 100.0 / 3.0 + 0.0) / 3.0)
  assert result["aacc"] == pytest.approx(50.0)  # 3 of 6 labelled pixels right
  assert result["macc"] == pytest.approx((200.0 / 3.0 + 50.0 + 0.0) / 3.0)
  assert result["first2"] == pytest.approx((40.0 + 100.0 / 3.0) / 2.0)
  assert result["wall"] is None


def test_summarize_synthia_subsets_follow_daformer_convention():
  rng = np.random.default_rng(1)
  cm = rng.integers(1, 50, size=(19, 19))
  for c in (9, 14, 16):  # terrain, truck, train never predicted
    cm[:, c] = 0
  result = evaluate.summarize(cm, CITYSCAPES, subsets=evaluate.SYNTHIA_SUBSETS)
  # With the three never-predicted classes at IoU 0, mIoU16 = mIoU19 * 19 / 16.
  assert result["miou16"] == pytest.approx(result["miou"] * 19 / 16)
  kept = [CITYSCAPES[i] for i in evaluate.SYNTHIA_SUBSETS["miou13"]]
  assert "wall" not in kept and "pole" not in kept and len(kept) == 13
  assert result["miou13"] == pytest.approx(np.mean([result["per_class_iou"][n] for n in kept]))


def test_markdown_table_columns_and_nulls():
  result = evaluate.summarize(HAND_CM, NAMES4)
  result["miou16"] = 12.345
  lines = evaluate.markdown_table(result, NAMES4).strip().split("\n")
  assert lines[0] == "| road | side. | build. | wall | mIoU | mIoU16 |"
  assert lines[2] == "| 40.0 | 33.3 | 0.0 | - | 24.4 | 12.3 |"
  header = evaluate.markdown_table(evaluate.summarize(np.eye(19), CITYSCAPES), CITYSCAPES)
  assert header.startswith("| road | side. | build. | wall | fence | pole | light | sign | veg. "
                           "| terr. | sky | person | rider | car | truck | bus | train | mbike "
                           "| bike | mIoU |")


def test_write_results_files(tmp_path):
  result = evaluate.summarize(HAND_CM, NAMES4, subsets={"miou13": [0, 1, 2]})
  workdir = str(tmp_path)
  evaluate.write_results(workdir, result, step=120, model="student", dataset="cityscapes_val",
                         num_images=1)
  evaluate.write_results(workdir, result, step=240, model="student", dataset="cityscapes_val",
                         num_images=1)
  folder = tmp_path / "eval"
  assert sorted(os.listdir(folder)) == ["latest.json", "latest.md", "step_120.json",
                                        "step_240.json"]  # no temp files left behind
  latest = json.loads((folder / "latest.json").read_text())
  assert latest == json.loads((folder / "step_240.json").read_text())
  for key in ("step", "model", "dataset", "miou", "per_class_iou", "num_images", "aacc", "macc",
              "miou13"):
    assert key in latest
  assert latest["step"] == 240 and latest["model"] == "student"
  assert latest["dataset"] == "cityscapes_val" and latest["num_images"] == 1
  assert latest["per_class_iou"]["wall"] is None
  assert latest["per_class_iou"]["road"] == pytest.approx(40.0)
  assert latest["miou"] == pytest.approx(result["miou"])
  md = (folder / "latest.md").read_text().split("\n")
  assert md[0].startswith("## ") and "student" in md[0] and "240" in md[0]
  assert "cityscapes_val" in md[0]
  assert md[2] == "| road | side. | build. | wall | mIoU | mIoU13 |"


# ----------------------------------------------------------------------------------------
# Inference.

K = 3


def _toy_net(x):
  """Stride-8 'network': 8x8 average pool, a fixed channel mix and a nonlinearity."""
  b, h, w, c = x.shape
  pooled = x.reshape(b, h // 8, 8, w // 8, 8, c).mean(axis=(2, 4))
  mix = jnp.asarray(np.arange(c * K, dtype=np.float32).reshape(c, K) / 7.0 - 0.5)
  return jnp.tanh(pooled @ mix) * 3.0


def _torch_resize(x, size):
  t = torch.from_numpy(np.array(x, np.float32)).permute(0, 3, 1, 2)
  return F.interpolate(t, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


def _numpy_slide(images, crop, stride, out_size):
  """Direct re-statement of mmseg 0.16 slide_inference (B, H, W, K layout)."""
  b, h, w, _ = images.shape
  (ch, cw), (sh, sw) = crop, stride
  preds = np.zeros((b, h, w, K), np.float32)
  count = np.zeros((b, h, w, 1), np.float32)
  for i in range(max(h - ch + sh - 1, 0) // sh + 1):
    for j in range(max(w - cw + sw - 1, 0) // sw + 1):
      y1, x1 = i * sh, j * sw
      y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
      y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
      crop_img = images[:, y1:y2, x1:x2]
      logits = _torch_resize(np.asarray(_toy_net(jnp.asarray(crop_img))), (y2 - y1, x2 - x1))
      preds[:, y1:y2, x1:x2] += logits.numpy()
      count[:, y1:y2, x1:x2] += 1
  return _torch_resize(preds / count, out_size).numpy()


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(2).normal(size=(2, 40, 72, 3)).astype(np.float32)


def test_slide_matches_numpy_restatement(images):
  # 2 x 3 windows; the last column is clamped to the right edge (x1 = 40, not 48).
  kwargs = dict(out_size=(50, 90), mode="slide", crop_size=(24, 32), stride=(16, 24),
                num_classes=K)
  got = jax.jit(lambda x: evaluate.predict_logits(_toy_net, x, **kwargs))(images)
  expected = _numpy_slide(images, (24, 32), (16, 24), (50, 90))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_whole_matches_torch_and_slide_with_big_crop_equals_whole(images):
  def predict(out_size, **kwargs):
    fn = lambda x: evaluate.predict_logits(_toy_net, x, out_size=out_size, num_classes=K,
                                           **kwargs)
    return np.asarray(jax.jit(fn)(images))

  expected = _torch_resize(np.asarray(_toy_net(jnp.asarray(images))), (40, 72)).numpy()
  np.testing.assert_allclose(predict((40, 72)), expected, rtol=1e-5, atol=1e-5)
  for out_size in [(40, 72), (20, 36)]:
    slide = predict(out_size, mode="slide", crop_size=(64, 128), stride=(48, 96))
    np.testing.assert_allclose(slide, predict(out_size), rtol=1e-6, atol=1e-6)


def test_predict_logits_errors(images):
  with pytest.raises(ValueError, match="Unknown eval mode"):
    evaluate.predict_logits(_toy_net, jnp.asarray(images), out_size=(40, 72), mode="flip",
                            num_classes=K)
  with pytest.raises(ValueError, match="expected 5"):
    evaluate.predict_logits(_toy_net, jnp.asarray(images), out_size=(40, 72), num_classes=5)


def _fixed_logits_case():
  rng = np.random.default_rng(3)
  variables = {"logits": rng.normal(size=(2, 4, 6, K)).astype(np.float32)}
  images = rng.integers(0, 256, size=(2, 32, 48, 3)).astype(np.uint8)
  labels = rng.integers(0, K, size=(2, 32, 48)).astype(np.int32)
  labels[:, :3] = 255
  return variables, images, labels


def _fake_apply(variables, x):
  """Scenic-style fake model: fixed logits whatever the (float32) input."""
  assert x.dtype == jnp.float32
  return jnp.asarray(variables["logits"]) + 0.0 * x[:, ::8, ::8, :1]


def test_make_eval_step_under_jit():
  variables, images, labels = _fixed_logits_case()
  step = jax.jit(evaluate.make_eval_step(_fake_apply, num_classes=K))
  valid = np.array([True, False])
  cm = step(variables, images, labels, valid)
  pred = _torch_resize(variables["logits"], (32, 48)).numpy().argmax(-1)
  keep = labels[0] != 255
  expected = np.bincount(labels[0][keep] * K + pred[0][keep], minlength=K * K).reshape(K, K)
  assert cm.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(cm), expected)
  # The network sees the image normalised with the ImageNet statistics.
  step = jax.jit(evaluate.make_eval_step(lambda v, x: _toy_net(x), num_classes=K))
  normalised = (images - np.float32(augment.IMAGENET_MEAN)) / np.float32(augment.IMAGENET_STD)
  pred = _torch_resize(np.asarray(_toy_net(jnp.asarray(normalised))), (32, 48)).numpy()
  pred = pred.argmax(-1)
  keep = labels != 255
  expected = np.bincount(labels[keep] * K + pred[keep], minlength=K * K).reshape(K, K)
  np.testing.assert_array_equal(np.asarray(step(None, images, labels, np.ones(2, bool))),
                                expected)


def test_evaluate_batches_accumulates_and_flushes(monkeypatch):
  variables, images, labels = _fixed_logits_case()
  step = jax.jit(evaluate.make_eval_step(_fake_apply, num_classes=K))
  batches = [
      {"image": images, "label": labels, "valid": np.array([True, True])},
      {"image": images, "label": labels, "valid": np.array([True, False])},
      {"image": images, "label": labels},
  ]
  expected = sum(np.asarray(step(variables, b["image"], b["label"],
                                 b.get("valid", np.ones(2, bool))), np.int64) for b in batches)
  cm, n = evaluate.evaluate_batches(step, variables, batches)
  assert cm.dtype == np.int64 and n == 5
  np.testing.assert_array_equal(cm, expected)
  # A tiny limit forces a host flush before every batch; the total must not change.
  monkeypatch.setattr(evaluate, "DEVICE_PIXEL_LIMIT", labels.size + 1)
  cm_flushed, n_flushed = evaluate.evaluate_batches(step, variables, iter(batches))
  np.testing.assert_array_equal(cm_flushed, expected)
  assert n_flushed == 5
  with pytest.raises(ValueError, match="no batches"):
    evaluate.evaluate_batches(step, variables, [])
  assert math.isclose(evaluate.summarize(cm, ["a", "b", "c"])["aacc"],
                      100.0 * np.trace(cm) / cm.sum())
