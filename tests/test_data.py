"""Label maps, dataset readers and the grain pipeline, against hand-made files and values."""

import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from confeti_jax.data import labels, pipeline, sources

# docs/datasets.md C.1: trainId k <- labelId CS_IDS[k]; every other id is ignored.
CS_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


def _png(path, array, mode=None, palette=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im = Image.fromarray(np.asarray(array, np.uint8), mode=mode)
  if palette is not None:
    im.putpalette(palette.ravel().tolist())
  im.save(path)


# Raw ids with the trainIds they must give: listed ids, unlisted ones (0, 1, 9, 29, 34, 255).
RAW = np.array([[7, 8, 26, 0], [1, 9, 29, 34], [33, 23, 255, 21]], np.uint8)
EXPECTED = np.array([[0, 1, 13, 255], [255, 255, 255, 255], [18, 10, 255, 8]], np.uint8)


def _rgb(h, w, value=0):
  image = np.zeros((h, w, 3), np.uint8)
  image[..., 0] = value
  return image


@pytest.fixture
def gta_root(tmp_path):
  root = tmp_path / "gta"
  _png(str(root / "images" / "00001.png"), _rgb(3, 4, 1))
  _png(str(root / "labels" / "00001.png"), RAW, "P", labels.LABEL_ID_PALETTE)
  _png(str(root / "images" / "00002.png"), _rgb(3, 4, 2))
  _png(str(root / "labels" / "00002.png"), RAW, "P", labels.LABEL_ID_PALETTE)
  _png(str(root / "labels" / "00002_labelTrainIds.png"), np.full((3, 4), 5), "L")
  return root


@pytest.fixture
def cityscapes_root(tmp_path):
  root = tmp_path / "cs"
  for city, frame, train_ids in (("aachen", 1, False), ("bremen", 2, True)):
    stem = f"{city}_000000_{frame:06d}"
    _png(str(root / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png"),
         _rgb(3, 4, frame))
    _png(str(root / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png"), RAW, "L")
    if train_ids:
      _png(str(root / "gtFine" / "train" / city / f"{stem}_gtFine_labelTrainIds.png"),
           np.full((3, 4), 7), "L")
  return root


def test_cityscapes_table_matches_datasets_md():
  expected = np.full(256, 255)
  expected[CS_IDS] = np.arange(19)
  np.testing.assert_array_equal(labels.CITYSCAPES_ID_TO_TRAIN, expected)
  assert labels.CITYSCAPES_ID_TO_TRAIN.dtype == np.uint8
  assert len(labels.CLASSES) == 19 and labels.CLASSES[6] == "traffic light"
  np.testing.assert_array_equal(labels.PALETTE[[0, 10, 18]],
                                [(128, 64, 128), (70, 130, 180), (119, 11, 32)])


def test_synthia_table_subsets_and_palettes():
  table = labels.SYNTHIA_ID_TO_TRAIN
  assert [table[i] for i in (3, 4, 2, 21, 1, 10, 8, 11)] == [0, 1, 2, 3, 10, 11, 13, 18]
  assert [table[i] for i in (0, 13, 14, 22)] == [255] * 4  # lanemarking is not road
  assert labels.CLASS_SUBSETS["miou16"] == labels.SYNTHIA16 and len(labels.SYNTHIA16) == 16
  assert set(labels.SYNTHIA16) - set(labels.SYNTHIA13) == {3, 4, 5}
  assert labels.FD_THING_CLASSES == (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
  np.testing.assert_array_equal(labels.LABEL_ID_PALETTE[26], labels.PALETTE[13])
  np.testing.assert_array_equal(labels.LABEL_ID_PALETTE[[0, 1, 29]], np.zeros((3, 3)))
  np.testing.assert_array_equal(labels.map_ids(RAW, labels.CITYSCAPES_ID_TO_TRAIN), EXPECTED)
  np.testing.assert_array_equal(labels.colorize(np.array([[0, 255]])),
                                [[(128, 64, 128), (0, 0, 0)]])


def test_gta5_source_maps_palette_ids_and_prefers_train_ids(gta_root):
  src = sources.GTA5Source(gta_root)
  assert len(src) == 2
  first = src[0]
  assert first["image"].shape == (3, 4, 3) and first["image"].dtype == np.uint8
  assert first["image"][0, 0, 0] == 1
  np.testing.assert_array_equal(first["label"], EXPECTED)
  np.testing.assert_array_equal(src[1]["label"], np.full((3, 4), 5))


def test_cityscapes_source_maps_label_ids_and_prefers_train_ids(cityscapes_root):
  src = sources.build_source("cityscapes", cityscapes_root, "train")
  assert len(src) == 2
  assert src.image_paths[0].endswith("aachen_000000_000001_leftImg8bit.png")
  np.testing.assert_array_equal(src[0]["label"], EXPECTED)
  np.testing.assert_array_equal(src[1]["label"], np.full((3, 4), 7))
  assert src[1]["image"][0, 0, 0] == 2


def test_errors_name_the_path(tmp_path, gta_root, cityscapes_root):
  missing = tmp_path / "nowhere"
  with pytest.raises(sources.DatasetError, match="nowhere.*images/"):
    sources.GTA5Source(missing)
  os.remove(gta_root / "labels" / "00001.png")
  with pytest.raises(sources.DatasetError, match=r"labels/00001\.png"):
    sources.GTA5Source(gta_root)
  empty = tmp_path / "empty"
  os.makedirs(empty / "images")
  os.makedirs(empty / "labels")
  with pytest.raises(sources.DatasetError, match="no .png files"):
    sources.GTA5Source(empty)
  with pytest.raises(sources.DatasetError, match=r"leftImg8bit/val"):
    sources.CityscapesSource(cityscapes_root, "val")
  with pytest.raises(sources.DatasetError, match="allowed kinds.*gta5"):
    sources.build_source("kitti", gta_root)


def test_orphan_label_and_read_time_errors(gta_root):
  _png(str(gta_root / "labels" / "00003.png"), RAW, "P", labels.LABEL_ID_PALETTE)
  with pytest.raises(sources.DatasetError, match=r"00003\.png"):
    sources.GTA5Source(gta_root)
  os.remove(gta_root / "labels" / "00003.png")
  _png(str(gta_root / "labels" / "00001.png"), np.zeros((5, 4)), "P", labels.LABEL_ID_PALETTE)
  with pytest.raises(sources.DatasetError, match=r"images/00001\.png.*labels/00001\.png"):
    sources.GTA5Source(gta_root)[0]
  with open(gta_root / "images" / "00002.png", "wb") as f:
    f.write(b"\x89PNG broken")
  with pytest.raises(sources.DatasetError, match=r"00002\.png.*corrupt"):
    sources.GTA5Source(gta_root)[1]


def test_keep_ratio_sizes():
  assert pipeline.keep_ratio_size(1052, 1914, (1280, 720)) == (704, 1280)
  assert pipeline.keep_ratio_size(1024, 2048, (1280, 640)) == (640, 1280)
  assert pipeline.keep_ratio_size(760, 1280, (1280, 720)) == (720, 1213)
  image = np.random.default_rng(0).integers(0, 255, (52, 96, 3), dtype=np.uint8)
  label = np.repeat(np.arange(96, dtype=np.uint8)[None] % 19, 52, 0)
  out_image, out_label = pipeline.resize_keep_ratio(image, label, (64, 36))
  assert out_image.shape == (35, 64, 3) and out_label.shape == (35, 64)
  assert set(np.unique(out_label)) <= set(np.unique(label))  # nearest: no new ids
  same = pipeline.resize_keep_ratio(image, label, (96, 52))
  assert same[0] is image and same[1] is label


def _reference_crop(label, crop, seed, cat_max_ratio):
  """mmseg RandomCrop's choice, written out independently: first balanced of 11 draws."""
  rng = np.random.default_rng(seed)
  h, w = label.shape
  draws = []
  for _ in range(11):
    draws.append((rng.integers(0, h - crop[0] + 1), rng.integers(0, w - crop[1] + 1)))
  for y, x in draws[:10]:
    values, counts = np.unique(label[y:y + crop[0], x:x + crop[1]], return_counts=True)
    counts = counts[values != 255]
    if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
      return y, x
  return draws[10]


def test_random_crop_redraws_crops_dominated_by_one_class():
  label = np.zeros((10, 40), np.uint8)
  label[:, 35:] = 1
  label[0, :3] = 255
  image = np.repeat(np.arange(40, dtype=np.uint8)[None, :, None], 10, 0).repeat(3, 2)
  balanced = {0.75: 0, 1.0: 0}
  for seed in range(60):
    for ratio in balanced:
      out_image, out_label = pipeline.random_crop(image, label, (10, 10),
                                                  np.random.default_rng(seed), ratio)
      balanced[ratio] += int(len(np.unique(out_label)) > 1 and (out_label == 1).mean() > 0.25)
      if ratio < 1:
        _, x = _reference_crop(label, (10, 10), seed, ratio)
        assert out_image[0, 0, 0] == x
  assert balanced[0.75] > 30 and balanced[1.0] < 15


def test_random_crop_pads_small_images_and_flip_moves_label_with_image():
  image = np.full((4, 6, 3), 9, np.uint8)
  label = np.full((4, 6), 3, np.uint8)
  out_image, out_label = pipeline.random_crop(image, label, (8, 8), np.random.default_rng(0))
  assert out_image.shape == (8, 8, 3) and out_label.shape == (8, 8)
  assert out_image[4:].max() == 0 and out_image[:, 6:].max() == 0
  assert (out_label[4:] == 255).all() and (out_label[:, 6:] == 255).all()
  image = np.arange(12, dtype=np.uint8).reshape(2, 6)[..., None].repeat(3, 2)
  label = image[..., 0].copy()
  flipped_image, flipped_label = pipeline.random_flip(image, label, np.random.default_rng(0), 1.0)
  np.testing.assert_array_equal(flipped_image[..., 0], image[:, ::-1, 0])
  np.testing.assert_array_equal(flipped_label, flipped_image[..., 0])
  kept = pipeline.random_flip(image, label, np.random.default_rng(0), 0.0)
  np.testing.assert_array_equal(kept[1], label)


class _IndexSource:
  """n samples of 12x16 whose label is the sample's index, so batches reveal their samples."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    image = np.random.default_rng(i).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    return {"image": image, "label": np.full((12, 16), i, np.uint8)}


def _train(n=12, seed=3, **kw):
  args = dict(scale=None, crop_size=(8, 8), cat_max_ratio=1.0, flip_prob=0.5, batch_size=2,
              seed=seed)
  args.update(kw)
  return pipeline.train_dataset(_IndexSource(n), **args)


def _ids(batch):
  return [int(x) for x in batch["label"][:, 0, 0]]


def test_train_dataset_is_deterministic_and_reshuffles_each_epoch():
  a, b = iter(_train()), iter(_train())
  batches_a = [next(a) for _ in range(12)]
  batches_b = [next(b) for _ in range(12)]
  for x, y in zip(batches_a, batches_b):
    np.testing.assert_array_equal(x["image"], y["image"])
  first = batches_a[0]
  assert first["image"].shape == (2, 8, 8, 3) and first["image"].dtype == np.uint8
  assert first["label"].shape == (2, 8, 8) and first["label"].dtype == np.uint8
  epoch1 = sum((_ids(b) for b in batches_a[:6]), [])
  epoch2 = sum((_ids(b) for b in batches_a[6:]), [])
  assert sorted(epoch1) == sorted(epoch2) == list(range(12)) and epoch1 != epoch2
  other = [next(iter(_train(seed=4)))["image"]]
  assert not np.array_equal(other[0], first["image"])


def test_train_iterator_resumes_through_state_and_orbax(tmp_path):
  it = iter(_train())
  for _ in range(3):
    next(it)
  state = it.get_state()
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  manager.save(3, args=ocp.args.Composite(it=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = [next(it) for _ in range(2)]

  fresh = iter(_train())
  manager.restore(3, args=ocp.args.Composite(it=grain.checkpoint.CheckpointRestore(fresh)))
  again = iter(_train())
  again.set_state(state)
  for resumed in (fresh, again):
    for want in expected:
      got = next(resumed)
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])
  manager.close()


def test_shards_see_disjoint_samples():
  seen = []
  for shard in range(2):
    it = iter(_train(shard_index=shard, shard_count=2))
    seen.append(sum((_ids(next(it)) for _ in range(3)), []))
  assert len(seen[0]) == len(seen[1]) == 6
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(12))


def test_eval_batches_pad_the_last_batch_and_keep_labels_at_full_size():
  src = _IndexSource(5)
  batches = list(pipeline.eval_batches(src, scale_or_none=(8, 6), batch_size=2))
  assert len(batches) == 3
  assert batches[0]["image"].shape == (2, 6, 8, 3) and batches[0]["label"].shape == (2, 12, 16)
  assert [b["valid"].tolist() for b in batches] == [[True, True], [True, True], [True, False]]
  assert (batches[2]["label"][1] == 255).all() and (batches[2]["label"][0] == 4).all()
  assert [_ids(b)[0] for b in batches] == [0, 2, 4]
  shards = [list(pipeline.eval_batches(src, scale_or_none=None, batch_size=2, shard_index=k,
                                       shard_count=2)) for k in range(2)]
  assert len(shards[0]) == len(shards[1]) == pipeline.num_eval_batches(5, 2, 2) == 2
  assert shards[1][1]["valid"].tolist() == [False, False]
  real = [int(b["label"][i, 0, 0]) for s in shards for b in s for i in np.flatnonzero(b["valid"])]
  assert sorted(real) == list(range(5))
  assert shards[0][0]["image"].shape == (2, 12, 16, 3)
