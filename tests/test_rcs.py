"""Rare-class sampling against its formula, the statistics script, and target-label blindness."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

from confeti_jax.data import labels, pipeline, rcs, sources
from confeti_jax.data.layouts import write_cityscapes, write_gta5, write_synthia

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import prepare_data  # noqa: E402

STATS = [
    {"file": "data/gta/labels/00000_labelTrainIds.png", "0": 9000, "2": 4000, "13": 500},
    {"file": "data/gta/labels/00001_labelTrainIds.png", "0": 7000, "13": 3500, "18": 3001},
    {"file": "data/gta/labels/00002_labelTrainIds.png", "9": 2000, "14": 5000},
]


def test_class_probabilities_follow_the_formula():
  classes, probs = rcs.class_probabilities(STATS, 0.01)
  totals = {0: 16000, 2: 4000, 13: 4000, 18: 3001, 9: 2000, 14: 5000}
  assert classes.tolist() == [9, 18, 2, 13, 14, 0]  # ascending frequency, ties stable
  n = np.array([totals[c] for c in classes], np.float64)
  want = torch.softmax(torch.from_numpy((1 - n / n.sum()) / 0.01), 0).numpy()
  np.testing.assert_allclose(probs, want, rtol=1e-12)
  # By hand for two classes: f = (0.25, 0.75) -> softmax((0.75, 0.25) / T).
  two = [{"file": "a", "1": 1}, {"file": "b", "5": 3}]
  c2, p2 = rcs.class_probabilities(two, 0.5)
  assert c2.tolist() == [1, 5]
  np.testing.assert_allclose(p2, [1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(1.0))])
  # 16-class convention: terrain (9) and truck (14) drop out, ids are renumbered.
  c16, p16 = rcs.class_probabilities(STATS, 0.01, labels.TRAIN19_TO_16)
  assert sorted(c16.tolist()) == [0, 2, 12, 15] and abs(p16.sum() - 1) < 1e-12


def test_files_per_class_threshold_matching_and_errors():
  samples = {c: [] for c in ("0", "2", "13", "18", "9", "14")}
  for s in STATS:
    for c, n in s.items():
      if c != "file":
        samples[c].append([s["file"], n])
  keys = ["00000", "00001", "00002"]  # our keys: image stems
  classes = np.array([0, 2, 13, 14, 18])
  files = rcs.files_per_class(samples, keys, classes, 3000)
  # strictly more than 3000 pixels: 13 -> only 00001 (3500), 18 -> 00001 (3001).
  assert [f.tolist() for f in files] == [[0, 1], [0], [1], [2], [1]]
  with pytest.raises(sources.DatasetError, match=r"class\(es\) \[9\].*min_pixels"):
    rcs.files_per_class(samples, keys, np.array([9]), 3000)
  with pytest.raises(sources.DatasetError, match="not in the source dataset.*00002"):
    rcs.files_per_class(samples, keys[:2], classes, 3000)


def test_missing_statistics_name_the_script(tmp_path):
  with pytest.raises(sources.DatasetError, match="scripts/prepare_data.py --dataset=synthia"):
    rcs.load_stats(str(tmp_path), "synthia")


class _Stripes:
  """Images whose label is class 0 except for a thin band of class 7 at columns 60..63."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def keys(self):
    return [f"{i:05d}" for i in range(self.n)]

  def __getitem__(self, i):
    label = np.zeros((16, 64), np.uint8)
    label[:, 60:] = 7
    label[:, :4] = 3
    image = np.full((16, 64, 3), i, np.uint8)
    return {"image": image, "label": label}


def test_sampler_draws_classes_by_probability_and_recrops_for_the_class():
  src = _Stripes(3)
  classes, probs = np.array([3, 7, 0]), np.array([0.2, 0.5, 0.3])
  files = [np.array([0]), np.array([1, 2]), np.array([0, 1, 2])]
  sampler = rcs.RareClassSample(src, classes, probs, files, scale=None, crop_size=(16, 16),
                                cat_max_ratio=1.0, flip_prob=0.5, min_pixels=32,
                                min_crop_ratio=0.5)
  n = 1500
  drawn, image_ids, hits = [], [], 0
  for i in range(n):
    out = sampler.random_map(i, np.random.default_rng(i))
    c = int(out["rcs_class"])
    drawn.append(c)
    image_ids.append(int(out["image"][0, 0, 0]))
    hits += int(c == 7 and np.count_nonzero(out["label"] == 7) > 16)
    assert out["image"].shape == (16, 16, 3)
  freq = np.array([np.mean(np.array(drawn) == c) for c in classes])
  np.testing.assert_allclose(freq, probs, atol=4 * np.sqrt(0.25 / n))
  assert set(np.array(image_ids)[np.array(drawn) == 3]) == {0}
  assert set(np.array(image_ids)[np.array(drawn) == 7]) == {1, 2}
  # A 16-wide crop of a 64-wide image holds > 16 px of the 4-column band at 3 of its 49
  # offsets (x >= 46): one draw succeeds with p = 3/49, the first + 10 re-draws with
  # 1 - (46/49)^11 = 0.50 (a single crop, without RCS re-draws, would give 0.06).
  share = hits / np.sum(np.array(drawn) == 7)
  assert abs(share - (1 - (46 / 49) ** 11)) < 0.06


def _rcs_cfg(**kw):
  return ml_collections.ConfigDict({**dict(temperature=0.01, min_pixels=3000,
                                           min_crop_ratio=0.5), **kw})


def test_prepare_data_statistics_resume_and_feed_rcs(tmp_path, capsys):
  root = write_gta5(tmp_path / "gta", 5)
  src = sources.build_source("gta5", root)
  partial = os.path.join(root, prepare_data.PARTIAL)
  fake = {"file": src.label_paths[1], "0": 123456}
  with open(partial, "w") as f:  # an interrupted run: one record, then a torn line
    f.write(json.dumps({"index": 1, "stats": fake}) + "\n" + '{"index": 2, "st')
  prepare_data.main(["--dataset=gta5", f"--root={root}", "--nproc=2"])
  assert "ETA" in capsys.readouterr().err and not os.path.exists(partial)
  stats, samples = rcs.load_stats(root)
  assert stats[1] == fake  # resumed, not recomputed
  for i in (0, 2, 3, 4):
    counts = np.bincount(src[i]["label"].ravel(), minlength=256)
    want = {str(c): int(counts[c]) for c in range(19) if counts[c]}
    assert stats[i] == {"file": src.label_paths[i], **want}
    for c, n in want.items():
      assert [src.label_paths[i], n] in samples[c]
  with open(os.path.join(root, "sample_class_stats_dict.json")) as f:
    assert json.load(f)[src.label_paths[0]] == {k: v for k, v in stats[0].items() if k != "file"}
  # The statistics feed the sampler: every RCS crop comes from an image holding its class.
  ds = rcs.rcs_dataset(sources.SkipCorrupt(src), _rcs_cfg(min_pixels=4), kind="gta5",
                       stats_dir=root, remap=None, scale=(64, 36), crop_size=(32, 32),
                       cat_max_ratio=0.75, flip_prob=0.5, seed=0)
  for i in range(6):
    out = ds[i]
    c = str(int(out["rcs_class"]))
    assert any(entry[1] > 4 for entry in samples[c])
    assert out["image"].shape == (32, 32, 3) and int(out["skipped"]) == 0


def test_synthia_train_id_labels_written_once(tmp_path):
  root = write_synthia(tmp_path / "syn", 2)
  before = [sources.build_source("synthia", root)[i]["label"] for i in range(2)]
  prepare_data.main(["--dataset=synthia", f"--root={root}", "--nproc=1",
                     "--write_train_ids"])
  after = sources.build_source("synthia", root)
  assert after.png16 == [False, False]
  for i in range(2):
    np.testing.assert_array_equal(after[i]["label"], before[i])
  stats, _ = rcs.load_stats(root)
  assert stats[0]["file"].endswith("0000000_labelTrainIds.png")


def test_target_labels_never_steer_training(tmp_path):
  """Same target images, very different labels: identical target batches; RCS reads source."""
  gta = write_gta5(tmp_path / "gta", 4)
  prepare_data.main(["--dataset=gta5", f"--root={gta}", "--nproc=1"])
  targets = [write_cityscapes(tmp_path / f"cs{k}", 4, 1) for k in range(2)]
  for path in sources.build_source("cityscapes", targets[1]).label_paths:
    label = np.zeros((48, 96), np.uint8)
    label[:, :80] = 7  # one dominant class: a label-checked crop would be re-drawn
    label[:, 80:] = 26
    Image.fromarray(label, mode="L").save(path)
  batches = []
  for target in targets:
    config = ml_collections.ConfigDict(dict(
        seed=0, class_set="cityscapes19", train=dict(batch_size=2),
        data=dict(source=dict(kind="gta5", root=gta, scale=(64, 36), format="folder"),
                  target=dict(kind="cityscapes", root=target, scale=(64, 32), format="folder"),
                  crop_size=(24, 24), cat_max_ratio=0.75, flip_prob=0.5, num_workers=0,
                  check_sizes=True, toy=dict(enabled=False),
                  rcs=_rcs_cfg(enabled=True, min_pixels=4, stats_dir=""))))
    _, tgt = pipeline.make_train_iterators(config)
    batches.append([next(tgt) for _ in range(4)])
  for a, b in zip(*batches):
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["label"], b["label"])
  # prepare_data is also a command line tool.
  out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"),
                        "--help"], capture_output=True, text=True, check=True)
  assert "--write_train_ids" in out.stdout
