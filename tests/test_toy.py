"""The embedded toy benchmark: deterministic, atomic, readable by the real loaders, a real gap."""

import filecmp
import os
import threading

import ml_collections
import numpy as np
import pytest

from confeti_jax.data import labels, pipeline, sources, toy
from configs import toy as toy_config


def _toy_cfg(cache_dir, seed=0):
  return ml_collections.ConfigDict(dict(enabled=True, cache_dir=str(cache_dir), seed=seed,
                                        num_source=4, num_source_val=2, num_target=4, num_val=2,
                                        shift=1.0))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
  cfg = _toy_cfg(tmp_path_factory.mktemp("toy_cache"))
  return cfg, toy.ensure_rendered(cfg)


def test_layout_is_readable_by_the_real_loaders(rendered):
  _, folders = rendered
  src = sources.GTA5Source(folders["source"])
  src_val = sources.GTA5Source(folders["source_val"])
  tgt = sources.CityscapesSource(folders["target"], "train")
  val = sources.CityscapesSource(folders["target"], "val")
  assert (len(src), len(src_val), len(tgt), len(val)) == (4, 2, 4, 2)
  assert src[0]["image"].shape == (176, 320, 3) and tgt[0]["image"].shape == (160, 320, 3)
  assert os.path.basename(tgt.image_paths[1]) == "toycity_000000_000001_leftImg8bit.png"
  assert os.path.basename(val.label_paths[0]) == "toycity_000001_000000_gtFine_labelIds.png"
  present = set()
  for ds in (src, src_val, tgt, val):
    for i in range(len(ds)):
      present |= set(np.unique(ds[i]["label"]).tolist())
  assert len(present - {255}) >= 12 and 255 in present


def test_labels_are_written_as_cityscapes_label_ids(rendered):
  from PIL import Image

  _, folders = rendered
  gta = Image.open(os.path.join(folders["source"], "labels", "00000.png"))
  assert gta.mode == "P"
  ids = set(np.unique(np.asarray(gta)).tolist())
  assert {7, 11, 23} <= ids and not ids & set(range(19)) - {1, 4, 7, 8, 11, 12, 13, 17}
  palette = np.array(gta.getpalette()[:768]).reshape(256, 3)
  np.testing.assert_array_equal(palette, labels.LABEL_ID_PALETTE)
  cs_path = os.path.join(folders["target"], "gtFine", "train", "toycity",
                         "toycity_000000_000000_gtFine_labelIds.png")
  assert Image.open(cs_path).mode == "L"


def test_render_is_deterministic_and_keyed_by_settings(rendered, tmp_path):
  cfg, folders = rendered
  again = toy.ensure_rendered(_toy_cfg(tmp_path / "other"))
  for rel in ("source/images/00001.png", "source/labels/00003.png",
              "target/leftImg8bit/val/toycity/toycity_000001_000001_leftImg8bit.png"):
    domain, _, rest = rel.partition("/")
    assert filecmp.cmp(os.path.join(folders[domain], rest), os.path.join(again[domain], rest),
                       shallow=False)
  assert toy.ensure_rendered(cfg) == folders  # idempotent: no second render
  other_seed = _toy_cfg(cfg.cache_dir, seed=1)
  assert toy.cache_folder(other_seed) != toy.cache_folder(cfg)
  image_a, _ = toy.render_sample(0, 0, 1, "game", toy.SOURCE_SIZE)
  image_b, _ = toy.render_sample(1, 0, 1, "game", toy.SOURCE_SIZE)
  assert not np.array_equal(image_a, image_b)


def test_cache_dir_defaults_to_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv("CONFETI_CACHE", str(tmp_path / "env_cache"))
  folder = toy.cache_folder(_toy_cfg(""))
  assert folder.startswith(str(tmp_path / "env_cache")) and "toy_v" in folder


def test_failed_render_leaves_no_folder(monkeypatch, tmp_path):
  calls = []
  real_save = toy._save_png

  def failing_save(*args, **kwargs):
    calls.append(1)
    if len(calls) == 5:
      raise OSError("disk full (simulated)")
    real_save(*args, **kwargs)

  monkeypatch.setattr(toy, "_save_png", failing_save)
  cfg = _toy_cfg(tmp_path / "cache")
  with pytest.raises(OSError, match="simulated"):
    toy.ensure_rendered(cfg)
  assert not os.path.exists(toy.cache_folder(cfg))
  assert os.listdir(tmp_path / "cache") == []  # the temporary folder is gone too
  monkeypatch.setattr(toy, "_save_png", real_save)
  assert os.path.isdir(toy.ensure_rendered(cfg)["source"])


def test_concurrent_renders_agree(tmp_path):
  cfg = _toy_cfg(tmp_path / "cache")
  cfg.num_source = cfg.num_target = 2
  barrier, results, errors = threading.Barrier(2), [], []

  def render():
    barrier.wait()
    try:
      results.append(toy.ensure_rendered(cfg))
    except Exception as e:  # reported by the assertion below
      errors.append(e)

  threads = [threading.Thread(target=render) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and results[0] == results[1]
  assert os.listdir(tmp_path / "cache") == [os.path.basename(toy.cache_folder(cfg))]
  assert len(sources.GTA5Source(results[0]["source"])) == 2


def _class_means(source):
  sums, counts = np.zeros((19, 3)), np.zeros(19)
  for i in range(len(source)):
    item = source[i]
    for c in np.unique(item["label"]):
      if c < 19:
        mask = item["label"] == c
        sums[c] += item["image"][mask].sum(0)
        counts[c] += mask.sum()
  return sums / np.maximum(counts, 1)[:, None], counts > 0


def test_domain_gap_in_class_colours(rendered):
  _, folders = rendered
  src_mean, src_has = _class_means(sources.GTA5Source(folders["source"]))
  tgt_mean, tgt_has = _class_means(sources.CityscapesSource(folders["target"], "train"))
  both = src_has & tgt_has
  dist = np.linalg.norm(src_mean - tgt_mean, axis=1)
  assert dist[10] > 60  # sky: saturated blue -> overcast grey
  assert np.mean(dist[both]) > 40
  for c in (0, 2, 8, 10):  # road, building, vegetation, sky
    assert both[c]


def test_toy_config_runs_through_the_pipeline(rendered):
  cfg, folders = rendered
  config = toy_config.get_config("tiny=1")
  config.data.toy.update(dict(cfg))
  assert pipeline.resolve_roots(config.data) == dict(folders)
  src_iter, tgt_iter = pipeline.make_train_iterators(config, process_index=1, process_count=2)
  src_batch, tgt_batch = next(src_iter), next(tgt_iter)
  assert src_batch["image"].shape == (4, 64, 64, 3) and tgt_batch["label"].shape == (4, 64, 64)
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.make_train_iterators(config, process_count=3)
  stream, num_images = pipeline.make_eval_batches(config)
  batches = list(stream)
  assert num_images == 2 and len(stream) == len(batches) == 1
  assert batches[0]["label"].shape == (8, 160, 320) and batches[0]["valid"].sum() == 2
  assert len(list(stream())) == 1  # re-iterable: every pass reads the split again
  stream, num_images = pipeline.make_eval_batches(config, dataset="source", batch_size=4,
                                                  process_index=1, process_count=2)
  batch = next(iter(stream))
  assert num_images == 2 and batch["image"].shape == (2, 176, 320, 3)
  assert batch["valid"].tolist() == [True, False]
  assert pipeline.dataset_name(config, "source") == "toy gta5 source val"
  assert pipeline.dataset_name(config) == "toy cityscapes val"


def test_real_configs_need_roots(rendered):
  config = toy_config.get_config()
  config.data.toy.enabled = False
  with pytest.raises(sources.DatasetError, match=r"--config\.data\.source\.root=/path/to/gta"):
    pipeline.resolve_roots(config.data)
  config.data.source.root = rendered[1]["source"]
  config.data.target.root = rendered[1]["target"]
  with pytest.raises(sources.DatasetError, match="only the toy"):
    pipeline.make_eval_batches(config, dataset="source")


def test_preview_writes_a_grid(rendered, tmp_path):
  from PIL import Image

  cfg, _ = rendered
  path = toy.preview(cfg, str(tmp_path / "preview.png"), num=2)
  with Image.open(path) as im:
    assert im.size == (642, 2 * 178 + 2 * 162)


def test_class_subset_renders_only_those_classes():
  """data.toy.classes: a benchmark where only some classes ever occur (others are
  repainted as kept background), with the ignored ids (ego, static) untouched."""
  from confeti_jax.data import labels as labels_lib
  kept = (0, 2, 8, 10, 13)
  seen = set()
  for index in range(6):
    _, label = toy.render_sample(0, 2, index, "camera", toy.TARGET_SIZE, 0.5, kept)
    train_ids = labels_lib.map_ids(label, labels_lib.CITYSCAPES_ID_TO_TRAIN)
    seen |= set(np.unique(train_ids).tolist())
    _, full = toy.render_sample(0, 2, index, "camera", toy.TARGET_SIZE, 0.5)
    moved = labels_lib.map_ids(full, labels_lib.CITYSCAPES_ID_TO_TRAIN) != train_ids
    assert not np.isin(train_ids[moved], [255]).any()
  assert seen - {255} <= set(kept) and len(seen - {255}) >= 4


def test_class_subset_is_part_of_the_cache_name_and_checked():
  import ml_collections
  base = dict(seed=0, num_source=1, num_source_val=1, num_target=1, num_val=1, shift=0.5,
              cache_dir="/tmp/x")
  full = toy.cache_folder(ml_collections.ConfigDict(dict(base, classes=())))
  part = toy.cache_folder(ml_collections.ConfigDict(dict(base, classes=(0, 2))))
  assert full != part
  with pytest.raises(ValueError, match="data.toy.classes"):
    toy.cache_folder(ml_collections.ConfigDict(dict(base, classes=(0, 19))))
