"""Input-pipeline throughput on full-size images: images/s per worker, workers to feed a step.

  python scripts/write_layouts.py --out=/tmp/full --size=full --num_train=24 --num_val=2
  python scripts/prepare_data.py --dataset=gta5 --root=/tmp/full/gta5       # RCS statistics
  python scripts/data_throughput.py --gta5=/tmp/full/gta5 \
      --cityscapes=/tmp/full/cityscapes --synthia=/tmp/full/synthia --json=data.json

Per domain, with the reference protocol (keep-ratio resize into the dataset's scale,
512 crops, flip; the source with cat_max_ratio 0.75 and, when its statistics exist,
rare-class sampling with its re-crops; the target without either):

- decode_per_s: PNG decode (image + label + id map) alone, one thread;
- per_worker_per_s: decode + resize + crop + flip, one thread, as one grain worker
  runs it (each sample is `dataset[i]` of the same MapDataset training uses);
- workers_needed: ceil(batch / step_s / per_worker_per_s), the `data.num_workers` that
  keeps a `--step_s` training step fed (each domain has its own workers);
- with `--pipeline_workers`, the end-to-end images/s of pipeline.train_dataset batches
  with that many worker processes on this machine.
Timings are medians of `--repeats` passes over `--num` samples after one warm-up sample.
"""

import json
import math
import os
import sys
import time

import grain
import ml_collections
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from confeti_jax.data import labels, pipeline, rcs, sources  # noqa: E402

_ROOTS = {name: flags.DEFINE_string(name, "", f"{name} folder in its own layout")
          for name in ("gta5", "synthia", "cityscapes")}
_NUM = flags.DEFINE_integer("num", 16, "Samples per timed pass.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes; the median is reported.")
_CROP = flags.DEFINE_integer("crop", 512, "Square crop size.")
_BATCH = flags.DEFINE_integer("batch", 2, "Images per domain per training step.")
_STEP_S = flags.DEFINE_float("step_s", 0.3, "Training step time to keep fed (s).")
_PIPELINE_WORKERS = flags.DEFINE_list("pipeline_workers", [], "e.g. 0,1,2: end-to-end runs.")
_RCS_MIN_PIXELS = flags.DEFINE_integer(
    "rcs_min_pixels", 3000, "RCS: an image qualifies for class c with more pixels of c (the "
    "reference's 3000); lower it for folders where a class is rarer, e.g. the toy scenes.")
_JSON = flags.DEFINE_string("json", None, "Where to write the results.")

# (scale, cat_max_ratio, is_source) of the reference protocol (docs/reference_code.md §2.4-2.5).
PROTOCOL = {"gta5": ((1280, 720), 0.75, True), "synthia": ((1280, 760), 0.75, True),
            "cityscapes": ((1280, 640), 1.0, False)}


def sample_dataset(kind, source, scale, cat_max_ratio, seed=0):
  """(MapDataset of transformed samples, 'rcs' | 'uniform') as training builds it."""
  crop = (_CROP.value, _CROP.value)
  if PROTOCOL[kind][2] and os.path.isfile(rcs.stats_paths(source.name)[0]):
    ds = rcs.rcs_dataset(source, ml_collections.ConfigDict(dict(
        temperature=0.01, min_pixels=_RCS_MIN_PIXELS.value, min_crop_ratio=0.5)), kind=kind,
                         stats_dir=source.name, remap=labels.class_set("cityscapes19")[2],
                         scale=scale, crop_size=crop, cat_max_ratio=cat_max_ratio,
                         flip_prob=0.5, seed=seed)
    return ds, "rcs"
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  return ds.random_map(pipeline.TrainTransform(scale, crop, cat_max_ratio, 0.5)), "uniform"


def rate(fn, num, repeats):
  """Median items/s of `repeats` passes of fn(i) for i in [0, num), after one warm-up call."""
  fn(0)
  rates = []
  for r in range(repeats):
    start = time.perf_counter()
    for i in range(num):
      fn(1 + r * num + i)
    rates.append(num / (time.perf_counter() - start))
  return float(np.median(rates))


def pipeline_rate(source, samples, workers, batches=8):
  """End-to-end images/s of train_dataset batches of `samples` with `workers` processes."""
  it = iter(pipeline.train_dataset(
      source, scale=None, crop_size=(_CROP.value, _CROP.value), cat_max_ratio=1.0,
      flip_prob=0.5, batch_size=_BATCH.value, seed=0, num_workers=workers, samples=samples))
  next(it)  # worker start-up and the first batch are not throughput
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * _BATCH.value / (time.perf_counter() - start)


def measure(kind, root):
  scale, cat_max_ratio, _ = PROTOCOL[kind]
  source = sources.build_source(kind, root, "train")
  num = min(_NUM.value, len(source))
  decode = rate(lambda i: source[i % len(source)], num, _REPEATS.value)
  ds, sampling = sample_dataset(kind, source, scale, cat_max_ratio)
  per_worker = rate(lambda i: ds[i], num, _REPEATS.value)
  height, width = sources.png_size(source.image_paths[0])
  out = dict(dataset=kind, image_size=f"{width}x{height}", scale=scale, crop=_CROP.value,
             sampling=sampling, rcs_min_pixels=_RCS_MIN_PIXELS.value,
             cat_max_ratio=cat_max_ratio, decode_per_s=decode,
             per_worker_per_s=per_worker, step_s=_STEP_S.value, batch=_BATCH.value,
             workers_needed=math.ceil(_BATCH.value / _STEP_S.value / per_worker))
  for w in _PIPELINE_WORKERS.value:
    out[f"pipeline_{int(w)}_workers_per_s"] = pipeline_rate(source, ds, int(w))
  return out


def main(argv):
  del argv
  results = [measure(kind, flag.value) for kind, flag in _ROOTS.items() if flag.value]
  if not results:
    raise SystemExit("Give at least one of --gta5, --synthia, --cityscapes (see --help).")
  for r in results:
    extra = " ".join(f"{k}={v:.2f}" for k, v in r.items() if k.startswith("pipeline_"))
    print(f"{r['dataset']:10s} {r['image_size']:>9s} {r['sampling']:7s} decode "
          f"{r['decode_per_s']:.2f}/s, decode+resize+crop {r['per_worker_per_s']:.2f}/s per "
          f"worker -> {r['workers_needed']} worker(s) for {r['batch']} images per "
          f"{r['step_s']} s {extra}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
