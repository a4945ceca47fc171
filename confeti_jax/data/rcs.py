"""Rare-class sampling (RCS) of source crops, as the reference UDA dataset.

docs/reference_code.md §2.4 and §8.3 give the reference's numbers.

Per-image class pixel counts are computed once by `scripts/prepare_data.py` and stored
beside the data in the reference's own format, so DAFormer-written files work too:

  sample_class_stats.json  [{"file": label path, "<trainId>": pixels, ...}, ...]
  samples_with_class.json  {"<trainId>": [[label path, pixels], ...], ...}

A class c is drawn with P(c) = softmax((1 - f_c) / T) over the classes present in the
statistics (f_c its share of all labelled source pixels, T = 0.01), then a source image
uniformly among those with more than `min_pixels` (3000) pixels of c, at the label's
original resolution; the crop is re-drawn up to 10 times until it holds more than
min_pixels * min_crop_ratio (1500) pixels of c, the last draw kept unchecked. The
stream index is ignored, as in the reference. Only source labels are read.
"""

import json
import os

import grain
import numpy as np

from confeti_jax.data import labels as labels_lib
from confeti_jax.data import sources

STATS_FILE = "sample_class_stats.json"
SAMPLES_FILE = "samples_with_class.json"
_CROP_REDRAWS = 10  # the reference re-runs the source pipeline at most 10 times


def stats_paths(stats_dir):
  return os.path.join(stats_dir, STATS_FILE), os.path.join(stats_dir, SAMPLES_FILE)


def load_stats(stats_dir, kind="gta5"):
  """(sample_class_stats, samples_with_class) from `stats_dir`; missing files name the fix."""
  paths = stats_paths(stats_dir)
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise sources.DatasetError(
        f"Rare-class sampling needs {missing[0]!r}, which does not exist. Compute the "
        f"per-image class statistics once with `python scripts/prepare_data.py "
        f"--dataset={kind} --root={stats_dir}` (resumable, parallel), point "
        "--config.data.rcs.stats_dir at the folder holding them, or disable RCS with "
        "--config.data.rcs.enabled=False.")
  loaded = []
  for path in paths:
    try:
      with open(path) as f:
        loaded.append(json.load(f))
    except (OSError, ValueError) as e:
      raise sources.DatasetError(
          f"Cannot parse {path!r} ({e}); delete it and rerun scripts/prepare_data.py.") from e
  return tuple(loaded)


def _remap_class(c, remap):
  c = int(c)
  return c if remap is None else int(remap[c]) if 0 <= c < 256 else labels_lib.IGNORE_INDEX


def class_probabilities(sample_class_stats, temperature, remap=None):
  """(classes, probabilities): softmax((1 - f_c) / T) in ascending-frequency order.

  `remap` (a 256-entry table) moves 19-class trainIds to the run's class set first;
  classes it sends to 255 drop out, as they would with a 16-class label map.
  """
  totals = {}
  for stats in sample_class_stats:
    for key, pixels in stats.items():
      if key == "file":
        continue
      c = _remap_class(key, remap)
      if c != labels_lib.IGNORE_INDEX:
        totals[c] = totals.get(c, 0) + int(pixels)
  if not totals:
    raise sources.DatasetError("The RCS statistics hold no labelled pixel; rerun "
                               "scripts/prepare_data.py on the source dataset.")
  order = sorted(totals.items(), key=lambda kv: kv[1])  # stable: ties keep insertion order
  classes = np.array([c for c, _ in order], np.int64)
  freq = np.array([n for _, n in order], np.float64)
  logits = (1.0 - freq / freq.sum()) / float(temperature)
  probs = np.exp(logits - logits.max())
  return classes, probs / probs.sum()


def files_per_class(samples_with_class, keys, classes, min_pixels, remap=None):
  """For each class, the indices into the source of samples with > min_pixels of it.

  Files are matched by `sources.sample_key` of their path, so the stats may name the
  trainId files the reference wrote or the raw label files read here.
  """
  index_of = {k: i for i, k in enumerate(keys)}
  found = {int(c): [] for c in classes}
  unknown = []
  for key, entries in samples_with_class.items():
    c = _remap_class(key, remap)
    if c not in found:
      continue
    for path, pixels in entries:
      if int(pixels) <= min_pixels:
        continue
      name = sources.sample_key(path)
      if name in index_of:
        found[c].append(index_of[name])
      else:
        unknown.append(path)
  if unknown:
    raise sources.DatasetError(
        f"The RCS statistics name {len(unknown)} files that are not in the source dataset, "
        f"e.g. {unknown[0]!r}. They were computed for another folder; rerun "
        "scripts/prepare_data.py on this dataset.")
  empty = [int(c) for c in classes if not found[int(c)]]
  if empty:
    raise sources.DatasetError(
        f"RCS: no source image has more than {min_pixels} pixels of class(es) {empty}, so "
        "they cannot be sampled (the reference asserts the same). Lower "
        "--config.data.rcs.min_pixels (e.g. for miniature images) or disable RCS.")
  return [np.array(sorted(set(found[int(c)])), np.int64) for c in classes]


class RareClassSample(grain.transforms.RandomMap):
  """Ignores its input index: draws a class, an image holding it, and a crop showing it."""

  def __init__(self, source, classes, probs, files, *, scale, crop_size, cat_max_ratio,
               flip_prob, min_pixels, min_crop_ratio, keep_ratio=True):
    from confeti_jax.data import pipeline  # the shared per-sample transforms

    self.source = source
    self.classes = np.asarray(classes, np.int64)
    self.probs = np.asarray(probs, np.float64)
    self.files = [np.asarray(f, np.int64) for f in files]
    self.transform = pipeline.TrainTransform(None, crop_size, cat_max_ratio, flip_prob)
    self.scale = tuple(int(s) for s in scale) if scale else None
    self.keep_ratio = bool(keep_ratio)
    self.min_crop_pixels = float(min_pixels) * float(min_crop_ratio)

  def random_map(self, element, rng):
    from confeti_jax.data import pipeline

    del element  # the reference ignores the dataset index under RCS
    k = int(rng.choice(len(self.classes), p=self.probs))
    c = int(self.classes[k])
    index = int(self.files[k][rng.integers(len(self.files[k]))])
    sample = self.source[index]
    image, label = sample["image"], sample["label"]
    if self.scale:
      image, label = pipeline.resize_train(image, label, self.scale, self.keep_ratio)
    resized = dict(sample, image=image, label=label)
    out = self.transform.random_map(resized, rng)
    if self.min_crop_pixels > 0:
      for _ in range(_CROP_REDRAWS):
        if np.count_nonzero(out["label"] == c) > self.min_crop_pixels:
          break
        out = self.transform.random_map(resized, rng)
    out["rcs_class"] = np.int32(c)
    return out


def rcs_dataset(source, rcs_cfg, *, kind, stats_dir, remap, scale, crop_size, cat_max_ratio,
                flip_prob, seed, keep_ratio=True):
  """Infinite grain MapDataset of rare-class-sampled source crops (before batching)."""
  stats, samples = load_stats(stats_dir, kind)
  classes, probs = class_probabilities(stats, rcs_cfg.temperature, remap)
  files = files_per_class(samples, source.keys(), classes, int(rcs_cfg.min_pixels), remap)
  sampler = RareClassSample(
      source, classes, probs, files, scale=scale, crop_size=crop_size,
      cat_max_ratio=cat_max_ratio, flip_prob=flip_prob, min_pixels=int(rcs_cfg.min_pixels),
      min_crop_ratio=float(rcs_cfg.min_crop_ratio), keep_ratio=keep_ratio)
  return grain.MapDataset.range(len(source)).repeat(None).seed(int(seed)).random_map(sampler)
