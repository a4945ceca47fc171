"""--mode=stylize: a run's trained CUT generator applied offline to the source set, and the
demo grid (source | stylised | target | prediction | ground truth).

`run` writes `workdir/stylized/` in the GTA5 layout (images/ + labels/), so the
stylised set trains a model offline with `--config.data.source.root=WORKDIR/stylized`
(and `data.source.kind=gta5`). Images are stylised as the online pipeline sees them:
keep-ratio resized to `data.source.scale`, rounded down to a multiple of 4 (G halves
the size twice and doubles it twice), then G. A label whose image kept its size is
linked (or copied); otherwise its resized 19-class trainIds are written as
`labels/X_labelTrainIds.png`, which the GTA5 reader prefers. Existing outputs are
skipped and every file is written atomically, so an interrupted run resumes;
`stylize.json` records the generator, and a rerun with another one refuses to mix.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from confeti_jax import stages, style
from confeti_jax.data import labels as labels_lib
from confeti_jax.data import pipeline, sources
from confeti_jax.models.conv import compiler_options

GENERATOR_STAGES = ("stage2", "stage1", "stage0")  # newest first; then the workdir itself
SIZE_MULTIPLE = 4
MANIFEST = "stylize.json"
_LOG_EVERY_S = 30.0
_READ_AHEAD = 4


# -- files (shared with scripts/stylize_adain.py) ------------------------------------------
def to_uint8(image):
  """[0, 1] floats -> uint8 with torchvision save_image's rounding: floor(clamp * 255 + 0.5)."""
  return np.floor(np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def link_or_copy(src, dst):
  """Symlinks src (absolute) at dst, or copies it where links are not allowed."""
  if os.path.lexists(dst):
    return
  try:
    os.symlink(os.path.abspath(src), dst)
  except OSError:
    tmp = f"{dst}.{os.getpid()}.part"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_png(image, path):
  """Writes a PNG via a temporary name: a killed run never leaves a half-written file."""
  image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
  tmp = f"{path}.{os.getpid()}.part"  # not *.png: dataset readers never list it
  try:
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# -- the generator -------------------------------------------------------------------------
class Generator(NamedTuple):
  """A CUT generator ready to run: its model, host parameters and where they came from."""

  model: Any
  params: Any
  source: str
  step: int


def _stage_info(folder):
  """(holds a G, train.steps or None) from a stage's config.json; (True, None) without one."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    return True, None
  with open(path) as f:
    saved = json.load(f)
  m = saved.get("method", {})
  if m.get("name") == "cut":
    has_gen = True
  elif m.get("name") == "confeti":
    has_gen = int(m.get("stage", 1)) == 0 or (bool(m.get("pixel_alignment", True))
                                               and m.get("style", "cut") == "cut")
  else:
    has_gen = False
  return has_gen, saved.get("train", {}).get("steps")


def find_generator(workdir):
  """(folder, step) of the newest stage holding a G (finished stages first), or None."""
  workdir = os.path.abspath(workdir)
  found = []
  for folder in [os.path.join(workdir, s) for s in GENERATOR_STAGES] + [workdir]:
    step = stages.latest_step(folder)
    if step is None:
      continue
    has_gen, steps = _stage_info(folder)
    if has_gen:
      found.append((steps is not None and step < int(steps), folder, step))
  if not found:
    return None
  unfinished, folder, step = min(found, key=lambda f: f[0])  # stable: keeps the order
  if unfinished:
    logging.warning("No finished stage holds a generator; using the unfinished run in %s "
                    "(step %d).", folder, step)
  return folder, step


def load_generator(config, workdir):
  """The trained G of a run: stage2, stage1, stage0 or the workdir itself (method=cut).

  Falls back to `method.cut.gen_weights` (a converted latest_net_G.pth) when the
  workdir holds none; fails naming the folders looked in and the command to train.
  """
  cut_cfg = config.method.get("cut")
  if cut_cfg is None:
    raise ValueError(f"method={config.method.name!r} has no CUT generator; stylising needs "
                     "a method=confeti or method=cut config.")
  model = style.build_cut(cut_cfg, dtype=str(config.model.dtype))
  found = find_generator(workdir)
  if found is None and model.gen_weights:
    params = style.init_cut(jax.random.key(0), model)[0].params
    return Generator(model, jax.device_get(params), model.gen_weights, 0)
  if found is None:
    workdir = os.path.abspath(workdir)
    looked = ", ".join([os.path.join(workdir, s) for s in GENERATOR_STAGES] + [workdir])
    raise FileNotFoundError(
        f"No trained CUT generator found (looked for checkpoints in {looked}). Train one "
        f"first: python -m confeti_jax.main --config=<the same config> --workdir={workdir} "
        "(method=confeti trains stage0 and stage1, method=cut the generator alone), or set "
        "--config.method.cut.gen_weights to a converted latest_net_G.pth.")
  folder, step = found
  bare = dataclasses.replace(model, gen_weights="", disc_weights="", mlp_weights="")
  abstract = jax.eval_shape(lambda k: style.init_cut(k, bare), jax.random.key(0))[0]
  restored = stages.restore_params(folder, {"gen": {"params": abstract.params}},
                                   "stylize (the CUT generator)")
  return Generator(model, restored["gen"]["params"], folder, int(step))


def generator_size(height, width, scale):
  """(h, w) G runs at: keep-ratio into `scale` (None: as is), rounded down to a multiple of 4."""
  if scale:
    height, width = pipeline.keep_ratio_size(height, width, tuple(scale))
  h, w = height // SIZE_MULTIPLE * SIZE_MULTIPLE, width // SIZE_MULTIPLE * SIZE_MULTIPLE
  if min(h, w) < SIZE_MULTIPLE:
    raise ValueError(f"data.source.scale={scale} leaves a {height}x{width} image, too small "
                     "for the generator.")
  return h, w


@functools.partial(jax.jit, static_argnums=0)
def _translate(module, params, pixels):
  out = module.apply({"params": params}, style.pixels_to_cut(pixels))[0]
  unit = jnp.clip(out.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)
  return jnp.floor(unit * 255.0 + 0.5).astype(jnp.uint8)  # rounded on device: 4x less to fetch


def translate(generator, pixels):
  """G's uint8 [B, H, W, 3] output for uint8 `pixels` (save_image's rounding)."""
  return np.asarray(_translate(generator.model.generator, generator.params, pixels))


# -- stylising the source set --------------------------------------------------------------
def source_set(config):
  """data.source as a folder source with 19-class trainIds (the layout the output copies)."""
  data = config.data
  if data.source.get("format", "folder") != "folder":
    raise ValueError("Stylising reads the source images from their folder; set "
                     "data.source.format='folder' and data.source.root.")
  root = pipeline.resolve_roots(data, ("source",))["source"]
  return sources.build_source(data.source.kind, root, "train", "cityscapes19")


def _check_manifest(out_root, record):
  path = os.path.join(out_root, MANIFEST)
  if os.path.isfile(path):
    with open(path) as f:
      previous = json.load(f)
    if previous != record:
      raise ValueError(
          f"{out_root} was stylised with {previous}, not {record}; its images would mix two "
          "generators or sizes. Delete the folder (or pick another) to stylise afresh.")
    return
  tmp = f"{path}.{os.getpid()}.part"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, path)


def _read_ahead(pool, fn, items, depth=_READ_AHEAD):
  """Yields fn(item) in order, `depth` items decoded ahead on `pool`."""
  pending = collections.deque()
  for item in items:
    pending.append(pool.submit(fn, item))
    if len(pending) > depth:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()


def _eta(seconds):
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run(config, workdir, num_images=0, out_root=None, generator=None):
  """Stylises the source training images (the first `num_images`; 0 = all) into
  `out_root` (default workdir/stylized); returns {"root", "written", "skipped"}.

  `generator` (a `Generator`) skips `load_generator`. Each process takes every
  process_count-th image, so hosts share the work.
  """
  workdir = os.path.abspath(workdir)
  out_root = os.path.abspath(out_root or os.path.join(workdir, "stylized"))
  generator = generator or load_generator(config, workdir)
  source = source_set(config)
  scale = tuple(int(s) for s in config.data.source.scale) if config.data.source.scale else None
  count = len(source) if num_images <= 0 else min(int(num_images), len(source))
  for sub in ("images", "labels"):
    os.makedirs(os.path.join(out_root, sub), exist_ok=True)
  record = {"generator": generator.source, "step": generator.step,
            "scale": list(scale) if scale else None,
            "source": source.name}
  if jax.process_index() == 0:
    _check_manifest(out_root, record)

  def targets(index):
    image_path, label_path = source.image_paths[index], source.label_paths[index]
    stem = os.path.splitext(os.path.basename(image_path))[0]
    out_image = os.path.join(out_root, "images", f"{stem}.png")
    linked = os.path.join(out_root, "labels", os.path.basename(label_path))
    written = os.path.join(out_root, "labels", f"{stem}_labelTrainIds.png")
    return out_image, linked, written

  def done(index):
    out_image, linked, written = targets(index)
    return os.path.exists(out_image) and (os.path.lexists(linked) or os.path.exists(written))

  indices = range(jax.process_index(), count, jax.process_count())
  todo = [i for i in indices if not done(i)]
  skipped = len(indices) - len(todo)
  logging.info("Stylising %d source images into %s with G from %s (step %d); %d already "
               "there.", len(todo), out_root, generator.source, generator.step, skipped)
  def read(index):
    image = sources.read_image(source.image_paths[index])
    return index, image, pipeline.resize_image(image, generator_size(*image.shape[:2], scale))

  def write(index, original, resized, stylised):
    out_image, linked, written = targets(index)
    if resized.shape == original.shape and isinstance(source, sources.GTA5Source):
      link_or_copy(source.label_paths[index], linked)  # the same file: nothing to convert
    elif not os.path.exists(written):
      label = pipeline.resize_label(source[index]["label"], resized.shape[:2])
      save_png(label, written)
    save_png(stylised, out_image)  # last: an existing image marks a finished pair

  start, last_log = time.time(), time.time()
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    saves = collections.deque()
    for n, (index, original, resized) in enumerate(_read_ahead(pool, read, todo), 1):
      stylised = translate(generator, resized[None])[0]
      saves.append(pool.submit(write, index, original, resized, stylised))
      while len(saves) > _READ_AHEAD or (saves and saves[0].done()):
        saves.popleft().result()
      if time.time() - last_log > _LOG_EVERY_S or n == len(todo):
        elapsed = max(time.time() - start, 1e-6)
        logging.info("stylised %d/%d (%.2f images/s, ETA %s)", n, len(todo), n / elapsed,
                     _eta(elapsed / n * (len(todo) - n)))
        last_log = time.time()
    for future in saves:
      future.result()
  return {"root": out_root, "written": len(todo), "skipped": skipped}


# -- the demo grid -------------------------------------------------------------------------
def _last_stage(config, workdir):
  plan = stages.plan_for(config, workdir)
  if plan:
    return plan[-1][1], plan[-1][2]
  return config, os.path.abspath(workdir)


def _has_student(config):
  """False for CUT alone (method=cut, or a CONFETI plan that ends with stage 0)."""
  return not (config.method.name == "cut"
              or (config.method.name == "confeti" and int(config.method.stage) == 0))


def _tile_row(tiles, height, width, gap=2):
  padded = [np.pad(t, ((0, height - t.shape[0]), (0, width - t.shape[1]), (0, 0)),
                   constant_values=255) for t in tiles]
  spacer = np.full((height, gap, 3), 255, np.uint8)
  return np.concatenate([p for tile in padded for p in (tile, spacer)][:-1], axis=1)


def _predictor(method, config):
  """Jitted (variables, uint8 images, out_size) -> trainId map, as the evaluator predicts."""
  from confeti_jax import augment, evaluate

  def predict(variables, images, out_size):
    logits = evaluate.predict_logits(
        lambda x: method.apply_eval(variables, x), augment.normalize(images), out_size=out_size,
        mode=config.eval.mode, crop_size=tuple(config.eval.crop_size),
        stride=tuple(config.eval.stride), num_classes=method.num_classes)
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

  return jax.jit(predict, static_argnums=2, compiler_options=compiler_options())


def demo_grid(config, workdir, method_variables=None, num=4, path=None):
  """Writes rows of (source | stylised | target | prediction | ground truth) to
  workdir/eval/grid.png (or `path`); returns the path.

  Predictions come from the last stage's student, restored from its checkpoint unless
  `method_variables` = (method, inference variables) is given. Labels use the
  Cityscapes palette (ignored pixels black); a run without a student (method=cut) gets
  grey prediction tiles.
  """
  from confeti_jax import evaluate, sharding

  workdir = os.path.abspath(workdir)
  generator = load_generator(config, workdir)
  stage_config, stage_workdir = _last_stage(config, workdir)
  if method_variables is None and not _has_student(stage_config):
    method_variables = (None, None)
  if method_variables is None:
    method, variables, _ = evaluate.restore_inference(stage_config, stage_workdir,
                                                      sharding.make_mesh())
  else:
    method, variables = method_variables
  source = source_set(config)
  scale = tuple(config.data.source.scale) if config.data.source.scale else None
  batches, _ = pipeline.make_eval_batches(stage_config, dataset="target", batch_size=1)
  predict = _predictor(method, stage_config) if method is not None else None
  rows = []
  for i, batch in zip(range(num), batches):
    image = sources.read_image(source.image_paths[i % len(source)])
    resized = pipeline.resize_image(image, generator_size(*image.shape[:2], scale))
    stylised = translate(generator, resized[None])[0]
    gt = batch["label"][0]
    if predict is not None:
      pred = labels_lib.colorize(np.asarray(predict(variables, batch["image"], gt.shape)[0]))
    else:
      pred = np.full(gt.shape + (3,), 128, np.uint8)
    rows.append([resized, stylised, batch["image"][0], pred, labels_lib.colorize(gt)])
  height = max(t.shape[0] for r in rows for t in r)
  width = max(t.shape[1] for r in rows for t in r)
  lines = [_tile_row(r, height, width) for r in rows]
  gap = np.full((2, lines[0].shape[1], 3), 255, np.uint8)
  grid = np.concatenate([x for line in lines for x in (line, gap)][:-1], axis=0)
  path = path or os.path.join(workdir, "eval", "grid.png")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_png(grid, path)
    logging.info("Wrote the demo grid (%d rows: source | stylised | target | prediction | "
                 "ground truth) to %s", len(rows), path)
  return path


def main_mode(config, workdir, num_images=0):
  """--mode=stylize: the stylised source set, then (toy benchmark) the demo grid."""
  result = run(config, workdir, num_images=num_images)
  if config.data.toy.enabled:
    demo_grid(config, workdir)
  return result
