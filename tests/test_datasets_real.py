"""Real-dataset readers on tiny folders written in each real layout (confeti_jax/data/
layouts.py: GTA5 palette PNGs, Cityscapes labelIds, SYNTHIA 16-bit RGB labels); TFDS; bad
data; the real configs in miniature.
"""

import logging
import os
import pickle

import numpy as np
import png
import pytest
from cityscapesscripts.helpers import labels as cs_labels
from PIL import Image

from confeti_jax.data import labels, pipeline, sources, tfds_builders
from confeti_jax.data.layouts import save_png as _save
from confeti_jax.data.layouts import write_cityscapes, write_gta5, write_png16, write_synthia


def test_cityscapes_map_matches_cityscapesscripts():
  """Every labelId of the official label table maps to its trainId (-1 and 255: ignore)."""
  checked = 0
  for label in cs_labels.labels:
    if label.id < 0:
      continue
    want = label.trainId if 0 <= label.trainId < 19 else 255
    assert labels.CITYSCAPES_ID_TO_TRAIN[label.id] == want, label
    if want != 255:
      assert labels.CLASSES[want] == label.name
      assert tuple(labels.PALETTE[want]) == label.color
      checked += 1
  assert checked == 19
  assert (labels.CITYSCAPES_ID_TO_TRAIN[34:] == 255).all()


def test_synthia_16bit_labels(tmp_path):
  root = write_synthia(tmp_path / "synthia", 2)
  label_path = os.path.join(root, "GT", "LABELS", "0000000.png")
  assert np.asarray(Image.open(label_path))[..., 0].max() == 0  # the Pillow trap
  raw = png.Reader(filename=label_path).read()
  ids = np.vstack([np.asarray(r, np.uint16) for r in raw[2]]).reshape(raw[1], raw[0], 3)[..., 0]
  src = sources.build_source("synthia", root)
  assert len(src) == 2 and src.png16 == [True, True]
  got = src[0]["label"]
  want = np.full(ids.shape, 255, np.uint8)
  for train_id, synthia_id in enumerate(labels.SYNTHIA_TRAIN_LABEL_IDS):
    want[ids == synthia_id] = train_id
  np.testing.assert_array_equal(got, want)
  assert (got[-3:, ::4] == 255).all()  # lanemarking is ignored, not road
  assert len(np.unique(got)) > 3
  # The 16-class convention: ProDA's direct id list gives the same labels.
  got16 = sources.build_source("synthia", root, class_set="synthia16")[0]["label"]
  want16 = np.full(ids.shape, 255, np.uint8)
  for k, synthia_id in enumerate(labels.SYNTHIA_16_LABEL_IDS):
    want16[ids == synthia_id] = k
  np.testing.assert_array_equal(got16, want16)
  # An 8-bit trainId file beside the raw one is preferred.
  _save(np.full(ids.shape, 4, np.uint8), os.path.join(root, "GT", "LABELS",
                                                       "0000001_labelTrainIds.png"))
  again = sources.build_source("synthia", root)
  assert again.png16 == [True, False] and (again[1]["label"] == 4).all()


def test_cityscapes_16_class_targets_drop_terrain_truck_train(tmp_path):
  root = write_cityscapes(tmp_path / "cs", 1, 1)
  raw = np.asarray(Image.open(sources.build_source("cityscapes", root).label_paths[0]))
  got = sources.build_source("cityscapes", root, "val", "synthia16")
  train19 = labels.CITYSCAPES_ID_TO_TRAIN[np.asarray(Image.open(got.label_paths[0]))]
  want = np.full(train19.shape, 255, np.uint8)
  for k, c in enumerate(labels.SYNTHIA16):
    want[train19 == c] = k
  np.testing.assert_array_equal(got[0]["label"], want)
  assert raw.shape == want.shape


def test_layout_errors_name_path_and_fix(tmp_path):
  with pytest.raises(sources.DatasetError, match=r"nowhere.*RGB/NNNNNNN\.png.*GT/LABELS"):
    sources.build_source("synthia", tmp_path / "nowhere")
  root = write_synthia(tmp_path / "syn", 2)
  os.remove(os.path.join(root, "RGB", "0000001.png"))
  with pytest.raises(sources.DatasetError, match=r"label count.*0000001\.png"):
    sources.build_source("synthia", root)
  with pytest.raises(sources.DatasetError, match="prepare_data.py --dataset=gta5"):
    tfds_builders.TfdsSource("gta5", tmp_path / "no_tfds")


def test_size_mismatch_fails_at_start_up_naming_the_first_pair(tmp_path):
  root = write_gta5(tmp_path / "gta", 4)
  for i in (1, 3):
    _save(np.zeros((10, 10), np.uint8), os.path.join(root, "labels", f"{i:05d}.png"),
          labels.LABEL_ID_PALETTE)
  src = sources.build_source("gta5", root)
  with pytest.raises(sources.DatasetError, match=r"images/00001\.png.*96x53.*labels/00001"):
    src.check_sizes()
  syn = write_synthia(tmp_path / "syn", 2)
  write_png16(os.path.join(syn, "GT", "LABELS", "0000000.png"), np.zeros((5, 6, 3), np.uint16))
  with pytest.raises(sources.DatasetError, match=r"RGB/0000000\.png.*first mismatched"):
    sources.build_source("synthia", syn).check_sizes()


def test_corrupt_file_mid_run_is_logged_counted_and_skipped(tmp_path, caplog):
  root = write_gta5(tmp_path / "gta", 6)
  src = sources.build_source("gta5", root)
  src.check_sizes()  # fine at start-up; the file breaks afterwards
  with open(src.image_paths[2], "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n truncated")
  wrapped = sources.SkipCorrupt(src)
  np.testing.assert_array_equal(wrapped[2]["image"], src[3]["image"])
  assert int(wrapped[2]["skipped"]) == 1 and int(wrapped[3]["skipped"]) == 0
  ds = pipeline.train_dataset(wrapped, scale=None, crop_size=(32, 32), cat_max_ratio=0.75,
                              flip_prob=0.5, batch_size=2, seed=0)
  with caplog.at_level(logging.WARNING):
    batches = [b for _, b in zip(range(6), iter(ds))]  # two epochs: the file is met twice
  assert sum(int(b["skipped"].sum()) for b in batches) == 2
  assert all(b["image"].shape == (2, 32, 32, 3) for b in batches)
  assert "00002.png" in caplog.text and "corrupt" in caplog.text
  for i in range(6):
    with open(src.image_paths[i], "wb") as f:
      f.write(b"broken")
  with pytest.raises(sources.DatasetError, match="consecutive samples"):
    sources.SkipCorrupt(src, max_skips=3)[0]


def test_tfds_array_record_equals_folders(tmp_path):
  gta = write_gta5(tmp_path / "gta", 5)
  cs = write_cityscapes(tmp_path / "cs", 3, 2)
  out = tmp_path / "tfds"
  for kind, root in (("gta5", gta), ("cityscapes", cs)):
    directory = tfds_builders.build(kind, root, out)
    assert directory == tfds_builders.dataset_dir(kind, out)
  for kind, root, split in (("gta5", gta, "train"), ("cityscapes", cs, "train"),
                            ("cityscapes", cs, "val")):
    folder = sources.build_source(kind, root, split)
    records = pickle.loads(pickle.dumps(tfds_builders.TfdsSource(kind, out, split)))
    assert len(records) == len(folder) and records.keys() == folder.keys()
    for i in range(len(folder)):
      a, b = folder[i], records[i]
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])
  args = dict(scale=(64, 36), crop_size=(24, 24), cat_max_ratio=0.75, flip_prob=0.5,
              batch_size=2, seed=5)
  streams = [iter(pipeline.train_dataset(s, **args)) for s in (
      sources.SkipCorrupt(sources.build_source("gta5", gta)),
      sources.SkipCorrupt(tfds_builders.TfdsSource("gta5", out)))]
  for _ in range(4):
    a, b = next(streams[0]), next(streams[1])
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  sixteen = tfds_builders.TfdsSource("cityscapes", out, "val", "synthia16")
  np.testing.assert_array_equal(
      sixteen[1]["label"], sources.build_source("cityscapes", cs, "val", "synthia16")[1]["label"])


# ----------------------------------------------------------------------------------------
# The real configs in miniature, end to end.


def _miniature(spec, **roots):
  import sys

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import gta2cs, synthia2cs

  module = {"gta2cs": gta2cs, "synthia2cs": synthia2cs}[spec.partition(":")[0]]
  config = module.get_config(spec.partition(":")[2] or None)
  config.model.backbone, config.model.width = "resnet18", 0.125
  config.data.source.root, config.data.target.root = roots["source"], roots["target"]
  config.data.source.scale, config.data.target.scale = (96, 57), (96, 48)
  config.data.crop_size = (32, 32)
  config.data.rcs.min_pixels = 4
  config.data.num_workers = 0
  config.train.steps, config.train.batch_size = 2, 8
  config.train.log_every_steps = config.train.checkpoint_every_steps = 2
  config.optim.warmup_steps = 1
  config.eval.every_steps, config.eval.batch_size = 2, 8
  config.eval.resize, config.eval.scale = True, (96, 48)
  return config


@pytest.mark.parametrize("spec,classes", [("gta2cs:eval=1280", 19), ("synthia2cs", 19),
                                           ("synthia2cs:classes=16", 16)])
def test_real_configs_evaluate_a_released_checkpoint(tmp_path, spec, classes):
  """--mode=eval with model.init_from and no checkpoints scores the converted student;
  SYNTHIA runs also report mIoU16 / mIoU13 in either class convention."""
  import json

  from confeti_jax import evaluate
  from tests.test_weights import TorchSegmentor, _numpy_sd, _randomize

  cs = write_cityscapes(tmp_path / "cs", 1, 3)
  released = _numpy_sd(_randomize(TorchSegmentor(18, 0.125, classes), seed=0), "model.")
  np.savez(tmp_path / "released.npz", **released)
  config = _miniature(spec, source="", target=cs)  # evaluation needs no source folder
  config.model.init_from = str(tmp_path / "released.npz")
  result = evaluate.run(config, str(tmp_path / "eval_run"))
  with open(tmp_path / "eval_run" / "eval" / "latest.json") as f:
    written = json.load(f)
  assert written["step"] == 0 and written["num_images"] == 3
  assert written["miou"] == pytest.approx(result["miou"])
  assert len(written["per_class_iou"]) == classes
  if spec.startswith("gta2cs"):
    assert "miou16" not in written
    return
  subsets = labels.class_set(config.class_set)[1]
  iou = list(written["per_class_iou"].values())
  for key in ("miou16", "miou13"):
    kept = [iou[c] for c in subsets[key] if iou[c] is not None]
    assert written[key] == pytest.approx(np.mean(kept) if kept else None)
