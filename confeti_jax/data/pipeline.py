"""grain input pipelines: per-sample resize / crop / flip, training streams, eval batches.

The per-sample transforms reproduce mmseg's training pipeline (docs/reference_code.md §2.5):
keep-ratio resize, RandomCrop with `cat_max_ratio`, horizontal flip. They run in
grain workers on numpy, so they are module-level and picklable, and draw all their
randomness from the `np.random.Generator` grain derives from (seed, element index):
augmentation is then reproducible and resumes exactly from an iterator checkpoint.
Normalisation and photometric augmentation happen later, on device.
"""

import collections
import concurrent.futures
import os

import grain
import numpy as np
from absl import logging
from PIL import Image

from confeti_jax.data import labels as labels_lib
from confeti_jax.data import rcs, sources, tfds_builders, toy

IGNORE_INDEX = labels_lib.IGNORE_INDEX
DatasetError = sources.DatasetError

_CROP_TRIES = 10  # mmseg RandomCrop re-draws at most this many times


# ----------------------------------------------------------------------------------------
# Per-sample transforms (numpy, deterministic given the generator).


def keep_ratio_size(height, width, scale):
  """(new_h, new_w) of mmcv's keep-ratio rescale into `scale` (order of its two numbers free).

  The factor is the largest one that fits the long side into max(scale) and the
  short side into min(scale); sizes round half up, as mmcv does.
  """
  long_edge, short_edge = max(scale), min(scale)
  factor = min(long_edge / max(height, width), short_edge / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image, size):
  """Bilinear resize of a uint8 [H, W, 3] image to size=(h, w).

  Pillow's bilinear filter widens its support when shrinking (anti-aliasing), where
  mmcv's cv2 INTER_LINEAR samples 4 pixels; the difference is a slight smoothing.
  """
  if image.shape[:2] == tuple(size):
    return image
  out = Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR)
  return np.asarray(out, dtype=np.uint8)


def resize_label(label, size):
  """Nearest-neighbour resize of a uint8 [H, W] label map, so no new ids appear."""
  if label.shape == tuple(size):
    return label
  out = Image.fromarray(label, mode="L").resize((size[1], size[0]), Image.NEAREST)
  return np.asarray(out, dtype=np.uint8)


def resize_keep_ratio(image, label, scale):
  """mmcv keep-ratio resize of an image (bilinear) and its label (nearest)."""
  size = keep_ratio_size(image.shape[0], image.shape[1], scale)
  return resize_image(image, size), resize_label(label, size)


def squash_size(height, width, scale):
  """(new_h, new_w) with the long side max(scale) and the short side min(scale): the
  aspect ratio is not kept (the CFContra / ADVENT code's PIL resize to a fixed size,
  which squashes GTA5's 1914x1052 into 1280x640)."""
  long_edge, short_edge = max(scale), min(scale)
  return (short_edge, long_edge) if width >= height else (long_edge, short_edge)


def resize_train(image, label, scale, keep_ratio=True):
  """A training sample resized into `scale`: keep-ratio (mmcv) or squashed."""
  if keep_ratio:
    return resize_keep_ratio(image, label, scale)
  size = squash_size(image.shape[0], image.shape[1], scale)
  return resize_image(image, size), resize_label(label, size)


def _crop_box(shape, crop_size, rng):
  margin_h = max(shape[0] - crop_size[0], 0)
  margin_w = max(shape[1] - crop_size[1], 0)
  top = int(rng.integers(0, margin_h + 1))
  left = int(rng.integers(0, margin_w + 1))
  return top, left, top + crop_size[0], left + crop_size[1]


def _balanced(label, cat_max_ratio):
  """mmseg's acceptance test: >1 labelled class and none above `cat_max_ratio`."""
  counts = np.bincount(label.ravel(), minlength=256)[:IGNORE_INDEX]
  counts = counts[counts > 0]
  return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop(image, label, crop_size, rng, cat_max_ratio=1.0):
  """mmseg RandomCrop to crop_size=(h, w), then padding (image 0, label 255) if smaller.

  With cat_max_ratio < 1 a crop dominated by one class (or with a single class) is
  re-drawn up to 10 times; the last draw is kept unchecked, as in mmseg.
  """
  y0, x0, y1, x1 = _crop_box(image.shape, crop_size, rng)
  if cat_max_ratio < 1.0:
    for _ in range(_CROP_TRIES):
      if _balanced(label[y0:y1, x0:x1], cat_max_ratio):
        break
      y0, x0, y1, x1 = _crop_box(image.shape, crop_size, rng)
  image, label = image[y0:y1, x0:x1], label[y0:y1, x0:x1]
  pad_h, pad_w = crop_size[0] - image.shape[0], crop_size[1] - image.shape[1]
  if pad_h > 0 or pad_w > 0:
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
    label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
  return image, label


def random_flip(image, label, rng, prob=0.5):
  """Horizontal flip of image and label together with probability `prob`."""
  if rng.random() < prob:
    return image[:, ::-1], label[:, ::-1]
  return image, label


class TrainTransform(grain.transforms.RandomMap):
  """Resize -> crop -> flip of one {"image", "label"} sample (picklable for workers)."""

  def __init__(self, scale, crop_size, cat_max_ratio, flip_prob, keep_ratio=True):
    self.scale = tuple(int(s) for s in scale) if scale else None
    self.keep_ratio = bool(keep_ratio)
    self.crop_size = tuple(int(s) for s in crop_size)
    self.cat_max_ratio = float(cat_max_ratio)
    self.flip_prob = float(flip_prob)

  def random_map(self, element, rng):
    image, label = element["image"], element["label"]
    if self.scale:
      image, label = resize_train(image, label, self.scale, self.keep_ratio)
    image, label = random_crop(image, label, self.crop_size, rng, self.cat_max_ratio)
    image, label = random_flip(image, label, rng, self.flip_prob)
    # Other keys (e.g. SkipCorrupt's "skipped" count) ride along unchanged.
    return {**element, "image": np.ascontiguousarray(image),
            "label": np.ascontiguousarray(label)}


# ----------------------------------------------------------------------------------------
# Training streams.


def train_dataset(source, *, scale, crop_size, cat_max_ratio, flip_prob, batch_size, seed,
                  num_workers=0, shard_index=0, shard_count=1, samples=None, keep_ratio=True):
  """Infinite grain IterDataset of {"image": uint8 [B,h,w,3], "label": uint8 [B,h,w]}.

  Shuffled anew each epoch from `seed`; augmentation keyed by (seed, position), so
  `iter(ds).get_state()` / `set_state()` (or orbax with grain.checkpoint) resumes
  exactly. With shard_count processes, `batch_size` is the per-process batch and shard
  k takes the k-th slice of every global batch: the processes' batches, concatenated
  in process order, are exactly the global batch one process would read, so a run's
  data does not depend on how many hosts it is spread over. `samples`, an infinite
  MapDataset of transformed samples (rare-class sampling), replaces the shuffled epochs.
  `keep_ratio=False` squashes each image into `scale` instead of keeping its aspect.
  """
  if len(source) == 0:
    raise DatasetError(f"{source!r} is empty; nothing to train on.")
  if samples is not None:
    ds = samples
  else:
    ds = grain.MapDataset.source(source).seed(int(seed)).shuffle().repeat(None)
    ds = ds.random_map(TrainTransform(scale, crop_size, cat_max_ratio, flip_prob, keep_ratio))
  # Consecutive local batches of the stream are the slices of one global batch, so
  # process k reads local batches k, k + n, k + 2n, ... (lazily: only those are decoded).
  ds = ds.batch(int(batch_size), drop_remainder=True)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  # A short read-ahead: batches of full-size crops are megabytes each.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_workers)))
  return ds


def resolve_roots(data_cfg, domains=("source", "target")):
  """dict(source, source_val, target) folders: the rendered toy, or the configured roots.

  With the toy enabled, a non-empty data.source.root / data.target.root still wins, so
  one domain can be swapped for real data. Only `domains` must be set (evaluating on
  the target needs no source folder).
  """
  if data_cfg.toy.enabled:
    rendered = toy.ensure_rendered(data_cfg.toy)
    return dict(source=data_cfg.source.root or rendered["source"],
                source_val=rendered["source_val"],
                target=data_cfg.target.root or rendered["target"])
  examples = {"gta5": "/path/to/gta", "cityscapes": "/path/to/cityscapes",
              "synthia": "/path/to/synthia/RAND_CITYSCAPES"}
  roots = {d: None for d in ("source", "target")}
  for domain in domains:
    cfg = data_cfg[domain]
    if cfg.get("format", "folder") == "tfds" and cfg.get("tfds_dir"):
      roots[domain] = os.fspath(cfg.root)  # unused: records come from tfds_dir
      continue
    if not cfg.root:
      raise DatasetError(
          f"data.{domain}.root is empty. Set it to the {cfg.kind} folder, e.g. "
          f"--config.data.{domain}.root={examples.get(cfg.kind, '/path/to/data')}, or use "
          "configs/toy.py for the embedded benchmark (no download).")
    roots[domain] = os.fspath(cfg.root)
  roots["source_val"] = None
  return roots


def _per_process(total, process_count, what):
  if total % process_count:
    raise ValueError(f"{what}={total} is not divisible by the {process_count} processes; "
                     "choose a multiple of the process count.")
  return total // process_count


def build_domain_source(data_cfg, domain, root, split, class_set):
  """The folder or TFDS source of data.<domain> (format 'folder' or 'tfds')."""
  cfg = data_cfg[domain]
  fmt = cfg.get("format", "folder")
  if fmt == "tfds":
    if not cfg.get("tfds_dir"):
      raise DatasetError(f"data.{domain}.format='tfds' needs data.{domain}.tfds_dir, the "
                         "folder (or bucket path) scripts/prepare_data.py --tfds_dir wrote.")
    return tfds_builders.TfdsSource(cfg.kind, cfg.tfds_dir, split, class_set)
  if fmt != "folder":
    raise ValueError(f"data.{domain}.format must be 'folder' or 'tfds', got {fmt!r}.")
  return sources.build_source(cfg.kind, root, split, class_set)


def make_train_iterators(config, *, process_index=0, process_count=1):
  """(source_iter, target_iter): checkpointable grain iterators of this process's share.

  The target crop is never label-checked (cat_max_ratio 1) and rare-class sampling
  reads source statistics only: target labels exist only to log pseudo-label accuracy
  and must not steer training. Every pair's PNG headers are checked first (when
  data.check_sizes), and a file that breaks later is skipped (`sources.SkipCorrupt`);
  each batch then carries "skipped" [B], the number of files passed over.
  """
  data = config.data
  batch = _per_process(int(config.train.batch_size), process_count, "train.batch_size")
  roots = resolve_roots(data)
  class_set = config.get("class_set", "cityscapes19")
  common = dict(crop_size=tuple(data.crop_size), flip_prob=float(data.flip_prob),
                batch_size=batch, num_workers=int(data.num_workers),
                shard_index=process_index, shard_count=process_count)
  src = build_domain_source(data, "source", roots["source"], "train", class_set)
  tgt = build_domain_source(data, "target", roots["target"], "train", class_set)
  if data.get("check_sizes", True):
    src.check_sizes()
    tgt.check_sizes()
  src, tgt = sources.SkipCorrupt(src), sources.SkipCorrupt(tgt)
  logging.info("Training data: source %r, target %r; %d per domain per process", src, tgt,
               batch)
  samples = None
  rcs_cfg = data.get("rcs")
  if rcs_cfg is not None and rcs_cfg.enabled:
    stats_dir = rcs_cfg.stats_dir or roots["source"]
    samples = rcs.rcs_dataset(
        src, rcs_cfg, kind=data.source.kind, stats_dir=stats_dir,
        remap=labels_lib.class_set(class_set)[2], scale=data.source.scale,
        crop_size=tuple(data.crop_size), cat_max_ratio=data.cat_max_ratio,
        flip_prob=float(data.flip_prob), seed=int(config.seed),
        keep_ratio=bool(data.source.get("keep_ratio", True)))
  src_ds = train_dataset(src, scale=data.source.scale, cat_max_ratio=data.cat_max_ratio,
                         seed=int(config.seed), samples=samples,
                         keep_ratio=bool(data.source.get("keep_ratio", True)), **common)
  tgt_ds = train_dataset(tgt, scale=data.target.scale, cat_max_ratio=1.0,
                         seed=int(config.seed) + 1,
                         keep_ratio=bool(data.target.get("keep_ratio", True)), **common)
  return iter(src_ds), iter(tgt_ds)


# ----------------------------------------------------------------------------------------
# Evaluation.


class _ReadAhead:
  """Reads source items in order with a few threads (PNG decoding releases the GIL).

  An item that fails to decode is logged, its file name appended to `skipped`, and
  yielded as None: evaluation goes on without it.
  """

  def __init__(self, source, indices, depth, skipped):
    self._source, self._indices, self._depth = source, list(indices), depth
    self._skipped = skipped

  def _read(self, index):
    try:
      return self._source[index]
    except DatasetError as error:
      paths = getattr(self._source, "image_paths", None)
      name = paths[index] if paths is not None else f"{self._source!r} #{index}"
      logging.warning("Evaluation skips %s: %s", name, error)
      self._skipped.append(name)
      return None

  def __iter__(self):
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
      pending = collections.deque()
      for index in self._indices:
        pending.append(pool.submit(self._read, index))
        if len(pending) > self._depth:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()


def num_eval_batches(num_images, batch_size, shard_count=1):
  """Batches every process yields: enough for the largest shard."""
  per_shard = -(-num_images // shard_count)
  return -(-per_shard // batch_size)


def eval_batches(source, *, scale_or_none, batch_size, shard_index=0, shard_count=1,
                 skipped=None):
  """Yields the whole split once, in order, as fixed-shape batches of this shard.

  Images that fail to decode are left out and their names appended to `skipped`.

  "image" is resized keep-ratio when a scale is given, "label" stays at the original
  resolution (mmseg evaluates there), and "valid" marks real images: the last batch
  is padded with copies (label all 255, valid False), and every shard yields
  `num_eval_batches` batches so collective steps stay in lockstep across processes.
  """
  indices = list(range(shard_index, len(source), shard_count))
  if len(source) == 0:
    raise DatasetError(f"{source!r} is empty; nothing to evaluate.")
  total_batches = num_eval_batches(len(source), batch_size, shard_count)
  skipped = [] if skipped is None else skipped
  items = (i for i in _ReadAhead(source, indices, 2 * batch_size, skipped) if i is not None)
  filler = None
  for _ in range(total_batches):
    images, label_maps, valid = [], [], []
    for item in items:
      image = item["image"]
      if scale_or_none:
        image = resize_image(image, keep_ratio_size(*image.shape[:2], scale_or_none))
      images.append(image)
      label_maps.append(item["label"])
      valid.append(True)
      if len(images) == batch_size:
        break
    if images:
      filler = (images[-1], np.full_like(label_maps[-1], IGNORE_INDEX))
    elif filler is None:  # this shard holds no image at all: pad from the first one
      first = source[0]
      image = first["image"]
      if scale_or_none:
        image = resize_image(image, keep_ratio_size(*image.shape[:2], scale_or_none))
      filler = (image, np.full_like(first["label"], IGNORE_INDEX))
    while len(images) < batch_size:
      images.append(filler[0])
      label_maps.append(filler[1])
      valid.append(False)
    if len({im.shape for im in images}) > 1 or len({lb.shape for lb in label_maps}) > 1:
      sizes = sorted({lb.shape for lb in label_maps})
      raise DatasetError(
          f"Images of different sizes {sizes} met in one evaluation batch of {source!r}; "
          "set --config.eval.batch_size=1 to evaluate them one by one.")
    yield {"image": np.stack(images), "label": np.stack(label_maps),
           "valid": np.asarray(valid, dtype=bool)}


class EvalBatches:
  """A re-iterable `eval_batches` stream: each `iter()` (or call) reads the split afresh.

  `skipped` lists the images of the latest pass that failed to decode (this process's).
  """

  def __init__(self, source, **kwargs):
    self.source, self._kwargs = source, kwargs
    self.skipped = []

  def __call__(self):
    self.skipped = []
    return eval_batches(self.source, skipped=self.skipped, **self._kwargs)

  def __iter__(self):
    return self()

  def __len__(self):
    return num_eval_batches(len(self.source), self._kwargs["batch_size"],
                            self._kwargs["shard_count"])


def _eval_source(config, dataset):
  data = config.data
  roots = resolve_roots(data, ("target",) if dataset == "target" else ("source", "target"))
  class_set = config.get("class_set", "cityscapes19")
  if dataset == "target":
    source = build_domain_source(data, "target", roots["target"], "val", class_set)
    if data.get("check_sizes", True):
      source.check_sizes()
    return source
  if dataset == "source":
    if not roots.get("source_val"):
      raise DatasetError(
          "eval.dataset='source' needs a held-out source set, which only the toy benchmark "
          "provides (data.toy.enabled=True); evaluate real runs on the target val split.")
    return sources.build_source(data.source.kind, roots["source_val"], "val", class_set)
  raise ValueError(f"Unknown eval dataset {dataset!r}; allowed: 'target', 'source'.")


def make_eval_batches(config, *, dataset="target", batch_size=None, process_index=0,
                      process_count=1):
  """(batches, num_images) for evaluating on `dataset` ('target' val or toy 'source' val).

  `batches` is an `EvalBatches`: iterate it (or call it) for one pass over the split.
  `batch_size` is the global batch (default config.eval.batch_size); each process
  takes its share, at least 1. Images are resized only when config.eval.resize is set.
  """
  source = _eval_source(config, dataset)
  scale = tuple(config.eval.scale) if config.eval.resize else None
  total = int(config.eval.batch_size if batch_size is None else batch_size)
  batches = EvalBatches(source, scale_or_none=scale, batch_size=max(1, total // process_count),
                        shard_index=process_index, shard_count=process_count)
  return batches, len(source)


def dataset_name(config, dataset="target"):
  """Name of an evaluation set for reports, e.g. 'cityscapes val' or 'toy gta5 source val'."""
  data = config.data
  prefix = "toy " if data.toy.enabled else ""
  if dataset == "source":
    return f"{prefix}{data.source.kind} source val"
  return f"{prefix}{data.target.kind} val"
