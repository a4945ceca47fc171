"""One-off dataset preparation: rare-class statistics, 8-bit trainId labels, TFDS copies.

Writes beside the data (or into --out_dir), in the reference converters' format
(docs/reference_code.md §8.3), so DAFormer-prepared folders and ours are interchangeable:

  sample_class_stats.json       [{"file": label path, "<trainId>": pixels, ...}, ...]
  sample_class_stats_dict.json  {label path: {"<trainId>": pixels, ...}}
  samples_with_class.json       {"<trainId>": [[label path, pixels], ...]}

Pixel counts are at the label's original resolution, in 19-class trainIds. The work
is parallel (--nproc processes), shows a progress bar with ETA, and is resumable:
finished files are appended to <out>/sample_class_stats.partial.jsonl, so an
interrupted run continues where it stopped.

  python scripts/prepare_data.py --dataset=gta5 --root=/data/gta
  python scripts/prepare_data.py --dataset=synthia --root=/data/synthia/RAND_CITYSCAPES \\
      --write_train_ids   # also GT/LABELS/X_labelTrainIds.png: 8-bit, read fast by Pillow
  python scripts/prepare_data.py --dataset=cityscapes --root=/data/cityscapes \\
      --tfds_dir=/data/tfds   # ArrayRecord copy (train and val) for bucket-backed pods
"""

import argparse
import json
import multiprocessing
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from confeti_jax.data import labels, rcs, sources  # noqa: E402

PARTIAL = "sample_class_stats.partial.jsonl"
_SOURCE = None  # the dataset in each worker process (set by the pool initializer)


class Progress:
  """A one-line text progress bar with rate and ETA (stderr; no extra dependency)."""

  def __init__(self, total, done=0, stream=None, width=30):
    self.total, self.done, self.width = total, done, width
    self.stream = stream or sys.stderr
    self.start_done, self.start = done, time.monotonic()
    self._last = 0.0

  def update(self, n=1, force=False):
    self.done += n
    now = time.monotonic()
    if not force and now - self._last < 0.5 and self.done < self.total:
      return
    self._last = now
    rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    filled = int(self.width * self.done / max(self.total, 1))
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "--:--:--"
    self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] "
                      f"{self.done}/{self.total} {rate:6.1f} files/s ETA {eta_text}")
    if self.done >= self.total:
      self.stream.write("\n")
    self.stream.flush()


def train_id_path(label_path):
  """Where the 8-bit trainId copy of a raw label goes (the mmseg/DAFormer naming)."""
  stem = label_path[:-len(".png")]
  if stem.endswith("_gtFine_labelIds"):
    return stem[:-len("labelIds")] + "labelTrainIds.png"
  return stem + "_labelTrainIds.png"


def _init_worker(source):
  global _SOURCE
  _SOURCE = source


def class_stats(index, write_train_ids=False):
  """{"file": path, "<trainId>": pixels, ...} of one label (classes with > 0 pixels)."""
  source = _SOURCE
  path = source.label_paths[index]
  if source.png16[index]:
    label = sources.read_label16(path, source.tables[index])
  else:
    label = sources.read_label(path, source.tables[index])
  if write_train_ids and not path.endswith("labelTrainIds.png"):
    path = train_id_path(path)
    tmp = path + ".tmp.png"
    Image.fromarray(label, mode="L").save(tmp)
    os.replace(tmp, path)
  counts = np.bincount(label.ravel(), minlength=256)[:labels.IGNORE_INDEX]
  stats = {str(c): int(n) for c, n in enumerate(counts) if n > 0}
  return {"file": path, **stats}


def _work(args):
  index, write = args
  try:
    return index, class_stats(index, write), None
  except sources.DatasetError as e:
    return index, None, str(e)


def write_outputs(out_dir, stats_list):
  """The three reference JSON files, written atomically."""
  samples = {}
  for stats in stats_list:
    for c, n in stats.items():
      if c != "file":
        samples.setdefault(c, []).append([stats["file"], n])
  samples = {c: samples[c] for c in sorted(samples, key=int)}
  stats_dict = {s["file"]: {c: n for c, n in s.items() if c != "file"} for s in stats_list}
  paths = dict(zip(("stats", "samples"), rcs.stats_paths(out_dir)))
  for path, obj in ((paths["stats"], stats_list), (paths["samples"], samples),
                    (os.path.join(out_dir, "sample_class_stats_dict.json"), stats_dict)):
    with open(path + ".tmp", "w") as f:
      json.dump(obj, f)
    os.replace(path + ".tmp", path)


def compute_stats(source, out_dir, nproc=1, write_train_ids=False, progress=True):
  """Per-label class statistics of `source` (a sources.PairedFileSource), resumably."""
  os.makedirs(out_dir, exist_ok=True)
  partial = os.path.join(out_dir, PARTIAL)
  done = {}
  if os.path.exists(partial):
    with open(partial) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:  # a line cut short by the interruption
          continue
        done[record["index"]] = record["stats"]
  todo = [i for i in range(len(source)) if i not in done]
  bar = Progress(len(source), len(done)) if progress else None
  errors = []
  with open(partial, "a") as log:
    if nproc > 1 and todo:
      ctx = multiprocessing.get_context("spawn")
      with ctx.Pool(nproc, initializer=_init_worker, initargs=(source,)) as pool:
        results = pool.imap_unordered(_work, [(i, write_train_ids) for i in todo],
                                      chunksize=8)
        for index, stats, error in results:
          _record(log, done, errors, index, stats, error, bar)
    else:
      _init_worker(source)
      for i in todo:
        _record(log, done, errors, *_work((i, write_train_ids)), bar)
  if errors:
    raise SystemExit(f"{len(errors)} labels could not be read (fix them and rerun; finished "
                     f"files are kept): {errors[:3]}")
  write_outputs(out_dir, [done[i] for i in range(len(source))])
  os.remove(partial)
  return [done[i] for i in range(len(source))]


def _record(log, done, errors, index, stats, error, bar):
  if error is not None:
    errors.append(error)
  else:
    done[index] = stats
    log.write(json.dumps({"index": index, "stats": stats}) + "\n")
    log.flush()
  if bar is not None:
    bar.update()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", required=True, choices=sources.KINDS)
  parser.add_argument("--root", required=True, help="dataset folder in its own layout")
  parser.add_argument("--split", default="train", help="Cityscapes split for the statistics")
  parser.add_argument("--out_dir", default="", help="where the JSON files go (default: root)")
  parser.add_argument("--nproc", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--write_train_ids", action="store_true",
                      help="also write 8-bit *_labelTrainIds.png beside raw labels")
  parser.add_argument("--tfds_dir", default="", help="also write an ArrayRecord copy here")
  parser.add_argument("--skip_stats", action="store_true", help="only --tfds_dir")
  args = parser.parse_args(argv)

  source = sources.build_source(args.dataset, args.root, args.split)
  print(f"{source!r}: checking image/label sizes ...", file=sys.stderr)
  source.check_sizes()
  if not args.skip_stats:
    out_dir = args.out_dir or args.root
    compute_stats(source, out_dir, args.nproc, args.write_train_ids)
    print(f"Wrote {', '.join(rcs.stats_paths(out_dir))}", file=sys.stderr)
  if args.tfds_dir:
    from confeti_jax.data import tfds_builders

    print(f"Prepared {tfds_builders.build(args.dataset, args.root, args.tfds_dir)}",
          file=sys.stderr)


if __name__ == "__main__":
  main()
