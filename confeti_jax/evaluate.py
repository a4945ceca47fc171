"""Evaluation: whole-image and sliding-window inference, confusion matrix, mIoU, reports.

Everything per pixel runs inside one jitted step that returns a small [K, K]
confusion matrix, so a 2048x1024 Cityscapes image never leaves the device as
logits. The numbers follow mmseg 0.16 (docs/reference_code.md §7): intersection and union
are accumulated over the whole split, a class absent from both prediction and
ground truth has IoU NaN and is left out of the mean, and results are in percent.

The written files (`eval/step_<N>.json`, `eval/latest.json`, `eval/latest.md`) are
an interface other tools read (docs/design.md, "Interfaces other tools rely on").
"""

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from confeti_jax import augment, best_snapshot, checkpoint, methods, sharding
from confeti_jax.data import labels, pipeline
from confeti_jax.models.conv import compiler_options

IGNORE_INDEX = 255
# Pixels an int32 device-side running sum may absorb before it must move to the host.
DEVICE_PIXEL_LIMIT = np.iinfo(np.int32).max

# Column names the papers' result tables use, keyed by the Cityscapes class name.
SHORT_NAMES = {
    "road": "road", "sidewalk": "side.", "building": "build.", "wall": "wall",
    "fence": "fence", "pole": "pole", "traffic light": "light", "traffic sign": "sign",
    "vegetation": "veg.", "terrain": "terr.", "sky": "sky", "person": "person",
    "rider": "rider", "car": "car", "truck": "truck", "bus": "bus", "train": "train",
    "motorcycle": "mbike", "bicycle": "bike",
}

# SYNTHIA -> Cityscapes reports over Cityscapes trainIds (DAFormer convention,
# docs/reference_code.md §7):
# 16 classes drop terrain, truck and train; 13 classes also drop wall, fence and pole.
SYNTHIA_SUBSETS = {
    "miou16": (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
    "miou13": (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
}

_SUBSET_TITLES = {"miou16": "mIoU16", "miou13": "mIoU13"}


# ----------------------------------------------------------------------------------------
# Inference.


def _grid(size, crop, stride):
  """Window starts/ends along one axis, exactly as mmseg 0.16 `slide_inference`."""
  n = max(size - crop + stride - 1, 0) // stride + 1
  spans = []
  for i in range(n):
    end = min(i * stride + crop, size)
    spans.append((max(end - crop, 0), end))
  return spans


def predict_logits(apply_fn, images, *, out_size, mode="whole", crop_size=(512, 512),
                   stride=(341, 341), num_classes):
  """Float32 logits [B, *out_size, K] for normalised NHWC `images`.

  Matches mmseg 0.16 inference: the network's stride-8 logits are bilinearly
  resized (align_corners=False) to the network input size, then to `out_size`.
  The two resizes are kept separate so results equal the reference when the image
  was rescaled for evaluation and labels are at full resolution.

  In 'slide' mode the windows are laid out by static Python loops (shapes are
  static), but the network runs once under `lax.map` over the stacked windows, so
  XLA compiles it once instead of once per window and peak memory is one window.

  Args:
    apply_fn: x [b, h, w, C] -> logits [b, h', w', K].
    images: [B, H, W, C] float32, already normalised.
    out_size: (height, width) of the returned logits (the label resolution).
    mode: 'whole' or 'slide'.
    crop_size: (height, width) of a sliding window.
    stride: (height, width) step between windows.
    num_classes: K; checked against the network output.
  """
  height, width = images.shape[1:3]

  def logits_at_input_size(x):
    logits = apply_fn(x)
    if logits.shape[-1] != num_classes:
      raise ValueError(f"apply_fn returned {logits.shape[-1]} classes, expected {num_classes}")
    return augment.resize_bilinear(logits.astype(jnp.float32), x.shape[1:3])

  if mode == "whole":
    logits = logits_at_input_size(images)
  elif mode == "slide":
    rows = _grid(height, crop_size[0], stride[0])
    cols = _grid(width, crop_size[1], stride[1])
    windows = [(r, c) for r in rows for c in cols]
    crops = jnp.stack([images[:, y1:y2, x1:x2] for (y1, y2), (x1, x2) in windows])
    crop_logits = jax.lax.map(logits_at_input_size, crops)
    canvas = jnp.zeros((images.shape[0], height, width, num_classes), jnp.float32)
    count = np.zeros((height, width, 1), np.float32)
    for k, ((y1, y2), (x1, x2)) in enumerate(windows):
      canvas = canvas.at[:, y1:y2, x1:x2].add(crop_logits[k])
      count[y1:y2, x1:x2] += 1.0
    logits = canvas / count
  else:
    raise ValueError(f"Unknown eval mode {mode!r}; use 'whole' or 'slide'")
  return augment.resize_bilinear(logits, tuple(out_size))


def confusion_matrix(pred, label, num_classes, *, ignore_index=IGNORE_INDEX, valid=None):
  """int32 [K, K] pixel counts, rows = ground truth, columns = prediction. Jittable.

  Pixels labelled `ignore_index` or outside [0, K), and every pixel of an image with
  `valid[b] == False` (padding added to fill the last global batch), are dropped by
  sending them to an extra bin that is cut off, so the shape stays static.
  """
  k = num_classes
  label = label.astype(jnp.int32)
  pred = pred.astype(jnp.int32)
  keep = (label != ignore_index) & (label >= 0) & (label < k) & (pred >= 0) & (pred < k)
  if valid is not None:
    keep = keep & jnp.reshape(valid.astype(bool), (-1,) + (1,) * (label.ndim - 1))
  index = jnp.where(keep, label * k + pred, k * k)
  counts = jnp.bincount(index.reshape(-1), length=k * k + 1)
  return counts[: k * k].reshape(k, k).astype(jnp.int32)


def make_eval_step(apply_fn, *, num_classes, mode="whole", crop_size=(512, 512),
                   stride=(341, 341)):
  """Builds step(variables, images_uint8, labels, valid) -> int32 [K, K] confusion matrix.

  The returned function is pure and meant to be wrapped in `jax.jit` by the caller
  (which knows the shardings). Logits are predicted at the label resolution, and the
  argmax of the logits equals the reference's argmax of the softmax.

  Args:
    apply_fn: (variables, x) -> logits [B, h, w, K] at the network's output stride.
    num_classes: K.
    mode, crop_size, stride: see `predict_logits`.
  """

  def step(variables, images, labels, valid):
    x = augment.normalize(images)
    logits = predict_logits(
        lambda inputs: apply_fn(variables, inputs), x, out_size=labels.shape[1:3],
        mode=mode, crop_size=crop_size, stride=stride, num_classes=num_classes)
    pred = jnp.argmax(logits, axis=-1)
    return confusion_matrix(pred, labels, num_classes, valid=valid)

  return step


def evaluate_batches(step_fn, variables, batches):
  """Sums the confusion matrices of all batches; returns (int64 numpy [K, K], num_images).

  The running sum stays on device so the host never waits on a batch; it is fetched
  once at the end. int32 cannot overflow in between because it is flushed to an int64
  host total (one sync) before the pixels summed on device could exceed 2**31 - 1.

  Args:
    step_fn: jitted `make_eval_step` result.
    variables: model variables passed through to `step_fn`.
    batches: iterable of dicts with "image" (uint8 NHWC), "label" (int NHW) and
      optionally "valid" ([B] bool; padded images are False and not counted).
  """
  host_total = None
  device_total = None
  device_pixels = 0
  num_images = 0
  for batch in batches:
    labels = batch["label"]
    valid = batch.get("valid")
    if valid is None:
      valid = np.ones((labels.shape[0],), bool)
    pixels = int(np.prod(labels.shape))
    if device_total is not None and device_pixels + pixels > DEVICE_PIXEL_LIMIT:
      host_total = _add(host_total, np.asarray(jax.device_get(device_total), np.int64))
      device_total, device_pixels = None, 0
    cm = step_fn(variables, batch["image"], labels, valid)
    device_total = cm if device_total is None else device_total + cm
    device_pixels += pixels
    num_images = num_images + (np.sum(valid) if isinstance(valid, np.ndarray)
                               else jnp.sum(valid.astype(jnp.int32)))
  if device_total is not None:
    host_total = _add(host_total, np.asarray(jax.device_get(device_total), np.int64))
  if host_total is None:
    raise ValueError("evaluate_batches got no batches; is the evaluation split empty?")
  return host_total, int(jax.device_get(num_images))


def _add(total, cm):
  return cm if total is None else total + cm


# ----------------------------------------------------------------------------------------
# Metrics and reports.


def _nanmean(values):
  """nanmean that returns NaN (not a RuntimeWarning) when every value is NaN."""
  values = np.asarray(values, np.float64)
  finite = ~np.isnan(values)
  return float(values[finite].mean()) if finite.any() else float("nan")


def _none_if_nan(value):
  value = float(value)
  return None if np.isnan(value) else value


def summarize(cm, class_names, *, subsets=None):
  """mmseg 0.16 metrics from a [K, K] confusion matrix (rows gt, cols pred), in percent.

  IoU_c = I_c / U_c is NaN when class c is absent from prediction and ground truth,
  and the mean skips NaN; a class present in ground truth but never predicted has
  IoU 0 and does count. mAcc is the nanmean of per-class recall, aAcc the pixel
  accuracy.

  Args:
    cm: [K, K] counts.
    class_names: K names in trainId order.
    subsets: optional {key: class indices}, e.g. `SYNTHIA_SUBSETS`; each key gets the
      nanmean IoU over its classes.

  Returns:
    {"miou", "aacc", "macc", "per_class_iou": {name: float or None}, "per_class_acc":
    {...}, and one key per subset}; NaN scalars become None (JSON null).
  """
  cm = np.asarray(cm, np.float64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
    raise ValueError(f"confusion matrix {cm.shape} does not match {len(class_names)} classes")
  intersect = np.diag(cm)
  area_label = cm.sum(axis=1)
  area_pred = cm.sum(axis=0)
  union = area_label + area_pred - intersect
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = 100.0 * intersect / union
    acc = 100.0 * intersect / area_label
    aacc = 100.0 * intersect.sum() / area_label.sum()
  result = {
      "miou": _none_if_nan(_nanmean(iou)),
      "aacc": _none_if_nan(aacc),
      "macc": _none_if_nan(_nanmean(acc)),
  }
  for key, indices in (subsets or {}).items():
    result[key] = _none_if_nan(_nanmean(iou[list(indices)]))
  result["per_class_iou"] = {n: _none_if_nan(v) for n, v in zip(class_names, iou)}
  result["per_class_acc"] = {n: _none_if_nan(v) for n, v in zip(class_names, acc)}
  return result


def _short_name(name):
  return SHORT_NAMES.get(name.lower().replace("_", " "), name)


def markdown_table(result, class_names):
  """One-row markdown table: per-class IoU in trainId order, then mIoU (and subsets).

  The columns follow the papers' tables, so rows from several runs can be pasted
  under each other; '-' marks a class with no IoU (absent from prediction and gt).
  """
  headers = [_short_name(n) for n in class_names] + ["mIoU"]
  values = [result["per_class_iou"].get(n) for n in class_names] + [result.get("miou")]
  for key in ("miou16", "miou13"):
    if key in result:
      headers.append(_SUBSET_TITLES[key])
      values.append(result[key])
  cells = ["-" if v is None else f"{v:.1f}" for v in values]
  return "\n".join([
      "| " + " | ".join(headers) + " |",
      "|" + "|".join("---:" for _ in headers) + "|",
      "| " + " | ".join(cells) + " |",
  ]) + "\n"


def _write_atomic(path, text):
  """Writes via a temp file in the same folder and os.replace: readers see old or new."""
  folder = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_results(workdir, result, *, step, model, dataset, num_images, prefix="eval"):
  """Writes <workdir>/<prefix>/step_<N>.json, latest.json and latest.md atomically.

  The JSON is strict (NaN is written as null) so any JSON reader can parse it. Call it
  on process 0 only.

  Returns:
    The dict written to the JSON files.
  """
  folder = os.path.join(workdir, prefix)
  os.makedirs(folder, exist_ok=True)
  record = {"step": int(step), "model": model, "dataset": dataset,
            "miou": result.get("miou"), "per_class_iou": dict(result["per_class_iou"]),
            "num_images": int(num_images)}
  record.update({k: v for k, v in result.items() if k not in record})
  text = json.dumps(record, indent=2, allow_nan=False) + "\n"
  _write_atomic(os.path.join(folder, f"step_{int(step)}.json"), text)
  _write_atomic(os.path.join(folder, "latest.json"), text)
  class_names = list(record["per_class_iou"])
  heading = (f"## {model} on {dataset}, step {int(step)} ({int(num_images)} images): "
             f"mIoU {_fmt(record['miou'])}\n\n")
  _write_atomic(os.path.join(folder, "latest.md"), heading + markdown_table(result, class_names))
  return record


def write_best(workdir, record, snapshot, prefix="eval"):
  """<workdir>/<prefix>/best.json: the report of the best evaluation so far, plus the
  folder of its saved weights (best_snapshot.py). Process 0 only."""
  text = json.dumps(dict(record, snapshot=snapshot), indent=2, allow_nan=False) + "\n"
  _write_atomic(os.path.join(workdir, prefix, "best.json"), text)


def _fmt(value):
  return "-" if value is None else f"{value:.2f}"


# ----------------------------------------------------------------------------------------
# Entry points: evaluation during training and --mode=eval.


class Evaluator:
  """Evaluates inference variables on the configured split and writes the reports.

  The eval step is jitted once with the images sharded over the mesh; padded
  images (valid=False) do not count. `config.eval.dataset` is 'target' (the
  target val split; reports in eval/) or 'source' (the held-out source split of
  the toy benchmark; reports in eval_source/).
  """

  def __init__(self, config, method, mesh, workdir):
    self.config, self.method, self.mesh, self.workdir = config, method, mesh, workdir
    self.dataset = config.eval.dataset
    self.prefix = "eval" if self.dataset == "target" else f"eval_{self.dataset}"
    # class_set: 'cityscapes19', 'synthia19' (mIoU16/13 over 19-class trainIds) or
    # 'synthia16' (16-class head; mIoU16 = mIoU, mIoU13 over its subset),
    # docs/reference_code.md §7.
    self.class_names, self.subsets = labels.class_set(config.class_set)[:2]
    step = make_eval_step(method.apply_eval, num_classes=method.num_classes,
                          mode=config.eval.mode, crop_size=tuple(config.eval.crop_size),
                          stride=tuple(config.eval.stride))
    batch = sharding.batch_sharding(mesh)
    self._step = jax.jit(step, in_shardings=(sharding.replicated(mesh), batch, batch, batch),
                         out_shardings=sharding.replicated(mesh),
                         compiler_options=compiler_options())
    # Built (and its PNG headers checked) now, at start-up, not at the first evaluation.
    self._batches, _ = pipeline.make_eval_batches(
        config, dataset=self.dataset, batch_size=self._batch_size(),
        process_index=jax.process_index(), process_count=jax.process_count())

  def _batch_size(self):
    """Global eval batch: the configured one rounded up to a multiple of the devices."""
    n = self.mesh.devices.size
    return -(-int(self.config.eval.batch_size) // n) * n

  def run(self, variables, step):
    """Evaluates, logs the mIoU, then writes the reports (so a failed write loses no
    number). Images that fail to decode are left out, counted in "skipped" and named
    in "skipped_files" (this process's; all of them on one host)."""
    global_batches = (sharding.to_global(b, self.mesh) for b in self._batches)
    cm, num_images = evaluate_batches(self._step, variables, global_batches)
    result = summarize(cm, self.class_names, subsets=self.subsets)
    name = pipeline.dataset_name(self.config, self.dataset)
    skipped = sharding.process_sum(len(self._batches.skipped))
    result.update(skipped=skipped, skipped_files=list(self._batches.skipped))
    logging.info("eval step %d on %s (%d images%s): mIoU %.2f", step, name, num_images,
                 f", {skipped} skipped as unreadable" if skipped else "",
                 result["miou"] if result["miou"] is not None else float("nan"))
    record = None
    if jax.process_index() == 0:
      record = write_results(self.workdir, result, step=int(step), model=self.method.model_name,
                             dataset=name, num_images=num_images, prefix=self.prefix)
    snapshot = best_snapshot.keep_if_best(self.workdir, self.prefix, step, result, variables)
    if snapshot and record is not None:
      write_best(self.workdir, record, snapshot, prefix=self.prefix)
    return result


def run(config, workdir):
  """--mode=eval: restores only the inference variables of the latest checkpoint."""
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(ckpt_dir) and config.model.get("init_from"):
    # A released model (model.init_from, confeti_jax/weights.py) and no run of our own.
    mesh = sharding.make_mesh()
    method = methods.build(config)
    variables = jax.jit(method.init_segmentor, out_shardings=sharding.replicated(mesh))(
        jax.random.key(0))
    os.makedirs(workdir, exist_ok=True)
    return Evaluator(config, method, mesh, workdir).run(variables, 0)
  mesh = sharding.make_mesh()
  method, variables, step = restore_inference(config, workdir, mesh)
  return Evaluator(config, method, mesh, workdir).run(variables, step)


def restore_inference(config, workdir, mesh):
  """(method, inference variables replicated on `mesh`, step) of `workdir`'s newest
  readable checkpoint: only the student (and BN statistics) is read, not optimiser
  states."""
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(
        f"No checkpoints in {ckpt_dir}. Train first with the same --config and "
        f"--workdir (--mode=train), or point --workdir at a finished run.")
  method = methods.build(config)
  abstract = jax.eval_shape(method.init_state, jax.random.key(0))
  replicated = sharding.replicated(mesh)
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
  ckpt = checkpoint.Checkpointer(ckpt_dir)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"{ckpt_dir} holds no finished checkpoint; train first.")
    step, subtree = ckpt.restore_subtree_first_intact(method.inference_subtree(abstract))
  finally:
    ckpt.close()
  return method, method.variables_from_subtree(subtree), step
