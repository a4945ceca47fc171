"""--mode=visualize: what a run does, as pictures (issue "See what a run does").

  python -m confeti_jax.main --config=CFG --workdir=DIR --mode=visualize \
      [--compare=DIR2,DIR3] [--num_images=4]

writes into DIR/visualize/:

* grid.png: target val images as rows; columns image | ground truth, then per run (DIR,
  then each --compare workdir) its prediction and its error map (wrong red, right white,
  ignored grey), a header naming the columns and a palette legend (the papers' Fig. 5).
* cam.png (CONFETI runs with prototypes): per class the CAM and the cosine similarity of
  the projected features to the class prototype (CONFETI Fig. 2), `insight.py`.
* embedding.png: t-SNE of the backbone's last-stage features, source vs target val, per
  class (CFContra Fig. 1), `insight.py`.

Each run is restored with its own saved `config.json` (the newest stage's for a
multi-stage CONFETI run); DIR itself uses --config, as --mode=eval does. Predictions are
the evaluator's (`stylize._predictor`); the images and labels always come from DIR's config,
so every run is shown on the same images.
"""

import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image, ImageDraw, ImageFont

from confeti_jax import evaluate, run_config, sharding, stages, stylize
from confeti_jax.data import labels as labels_lib
from confeti_jax.data import pipeline

FOLDER = "visualize"
MAX_TILE_WIDTH = 512  # tiles of wider images (Cityscapes 2048) are shown downscaled
GAP = 2
FONT_SIZE = 13
TEXT_HEIGHT = FONT_SIZE + 8
WHITE, RED, GREY = (255, 255, 255), (220, 0, 0), (128, 128, 128)
STUDENT_STAGES = ("stage2", "stage1")  # newest first: where a multi-stage run keeps its student


class Run(NamedTuple):
  """A restored run: its display name, (last stage's) config and workdir, student, step."""

  name: str
  config: Any
  workdir: str
  method: Any
  variables: Any
  step: int


# -- runs ------------------------------------------------------------------------------------
def saved_config(folder):
  """The ConfigDict a run saved in `folder` (run_config.CONFIG_FILE), or None."""
  path = os.path.join(folder, run_config.CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def run_config_of(workdir, fallback, use_fallback=False):
  """(config, workdir) of the stage whose student a workdir shows.

  A multi-stage run keeps no config at its top, only in its stage folders; a workdir
  holding none falls back to `fallback` (the --config), with a warning.
  """
  workdir = os.path.abspath(workdir)
  config = fallback if use_fallback else saved_config(workdir)
  if config is not None:
    return stylize._last_stage(config, workdir)
  for stage in STUDENT_STAGES:
    folder = os.path.join(workdir, stage)
    config = saved_config(folder)
    if config is not None and stages.latest_step(folder) is not None:
      return config, folder
  logging.warning("%s holds no %s; restoring it with --config.", workdir,
                  run_config.CONFIG_FILE)
  return stylize._last_stage(fallback, workdir)


def load_run(config, workdir, mesh, use_fallback=False, name=None):
  """Restores the student of `workdir` (see `run_config_of`) as a `Run`."""
  stage_config, stage_workdir = run_config_of(workdir, config, use_fallback)
  if not stylize._has_student(stage_config):
    raise ValueError(f"{workdir} is a CUT-only run (method={stage_config.method.name!r}); "
                     "it has no segmentor to show.")
  method, variables, step = evaluate.restore_inference(stage_config, stage_workdir, mesh)
  name = name or f"{os.path.basename(os.path.abspath(workdir))} ({stage_config.method.name})"
  logging.info("visualize: %s = %s, step %d", name, stage_workdir, step)
  return Run(name, stage_config, stage_workdir, method, variables, int(step))


# -- drawing ---------------------------------------------------------------------------------
def font(size=FONT_SIZE):
  """PIL's default font, scalable where Pillow has FreeType (>= 10.1), else its bitmap."""
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, ImportError):
    return ImageFont.load_default()


def fit_text(draw, text, width, fnt):
  """`text`, shortened with '...' until it fits `width` pixels."""
  if draw.textlength(text, font=fnt) <= width:
    return text
  while text and draw.textlength(text + "...", font=fnt) > width:
    text = text[:-1]
  return text + "..."


def error_map(pred, label, ignore_index=labels_lib.IGNORE_INDEX):
  """RGB uint8: red where `pred` is wrong, white where right, grey where ignored."""
  out = np.where((pred == label)[..., None], np.uint8(WHITE), np.uint8(RED)).astype(np.uint8)
  out[label == ignore_index] = GREY
  return out


def tile_size(height, width, max_width=MAX_TILE_WIDTH):
  """(h, w) a label map of `height` x `width` is shown at: downscaled to `max_width`."""
  if width <= max_width:
    return height, width
  return max(1, round(height * max_width / width)), max_width


def fit(array, size, nearest):
  """`array` (uint8 HxW or HxWx3) resized to `size` = (h, w); nearest for label maps."""
  if array.shape[:2] == tuple(size):
    return np.asarray(array, np.uint8)
  resample = Image.NEAREST if nearest else Image.BILINEAR
  return np.asarray(Image.fromarray(np.asarray(array, np.uint8)).resize(size[::-1], resample))


def tile_box(row, col, size, top=TEXT_HEIGHT, gap=GAP):
  """(left, upper, right, lower) of tile (row, col) in a grid of `size` tiles below `top`."""
  h, w = size
  left, upper = col * (w + gap), top + row * (h + gap)
  return left, upper, left + w, upper + h


def tile_canvas(rows, headers, size, footer=None):
  """White canvas: a header strip, rows of equal tiles, an optional image underneath."""
  h, w = size
  cols = len(headers)
  width = cols * w + (cols - 1) * GAP
  height = TEXT_HEIGHT + len(rows) * h + (len(rows) - 1) * GAP
  extra = 0 if footer is None else footer.height + GAP
  canvas = Image.new("RGB", (width, height + extra), WHITE)
  draw, fnt = ImageDraw.Draw(canvas), font()
  for c, text in enumerate(headers):
    left = c * (w + GAP)
    draw.text((left + 3, 4), fit_text(draw, text, w - 6, fnt), fill=(0, 0, 0), font=fnt)
  for r, row in enumerate(rows):
    for c, tile in enumerate(row):
      canvas.paste(Image.fromarray(tile), tile_box(r, c, size)[:2])
  if footer is not None:
    canvas.paste(footer, (0, height + GAP))
  return canvas


def legend(class_names, width, extra=(("wrong", RED), ("right", WHITE), ("ignored", GREY))):
  """A strip of palette swatches named by class (then `extra` ones), wrapped to `width`."""
  fnt = font()
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  table = labels_lib.colour_table(class_names)
  entries = [(n, tuple(int(v) for v in table[k])) for k, n in enumerate(class_names)]
  entries += list(extra)
  swatch = FONT_SIZE
  entry_w = swatch + 14 + int(max(probe.textlength(n, font=fnt) for n, _ in entries))
  per_line = max(1, width // entry_w)
  lines = -(-len(entries) // per_line)
  strip = Image.new("RGB", (width, lines * TEXT_HEIGHT + 4), WHITE)
  draw = ImageDraw.Draw(strip)
  for i, (name, colour) in enumerate(entries):
    x, y = (i % per_line) * entry_w + 2, (i // per_line) * TEXT_HEIGHT + 4
    draw.rectangle((x, y, x + swatch, y + swatch), fill=colour, outline=(96, 96, 96))
    draw.text((x + swatch + 5, y), name, fill=(0, 0, 0), font=fnt)
  return strip


def save(image, workdir, filename):
  """Writes `image` to workdir/visualize/filename (process 0); returns the path."""
  path = os.path.join(os.path.abspath(workdir), FOLDER, filename)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stylize.save_png(image, path)
  return path


# -- the qualitative grid --------------------------------------------------------------------
def grid_rows(config, runs, num_images):
  """(rows of uint8 tiles, tile size): image, gt, then per run prediction and errors."""
  names = labels_lib.class_set(config.class_set)[0]
  table = labels_lib.colour_table(names)
  predictors = [stylize._predictor(run.method, run.config) for run in runs]
  batches, count = pipeline.make_eval_batches(config, dataset="target", batch_size=1)
  rows, size = [], None
  for _, batch in zip(range(min(int(num_images), count)), batches):
    label = np.asarray(batch["label"][0])
    size = size or tile_size(*label.shape)
    row = [fit(batch["image"][0], size, nearest=False), fit(table[label], size, nearest=True)]
    for run, predict in zip(runs, predictors):
      pred = np.asarray(predict(run.variables, batch["image"], label.shape)[0])
      row += [fit(table[pred], size, nearest=True),
              fit(error_map(pred, label), size, nearest=True)]
    rows.append(row)
  if not rows:
    raise ValueError("The target val split holds no image to show.")
  return rows, size


def write_grid(config, workdir, runs, num_images=4):
  """DIR/visualize/grid.png (layout in the module docstring); returns its path."""
  rows, size = grid_rows(config, runs, num_images)
  headers = ["image", "ground truth"]
  for run in runs:
    headers += [f"{run.name}, step {run.step}", f"{run.name}: errors"]
  width = len(headers) * size[1] + (len(headers) - 1) * GAP
  strip = legend(labels_lib.class_set(config.class_set)[0], width)
  path = save(tile_canvas(rows, headers, size, footer=strip), workdir, "grid.png")
  logging.info("Wrote the qualitative grid (%d images x %d runs) to %s", len(rows), len(runs),
               path)
  return path


def main_mode(config, workdir, compare=(), num_images=4):
  """--mode=visualize: grid.png, cam.png (CONFETI) and embedding.png; returns their paths."""
  from confeti_jax import insight

  mesh = sharding.make_mesh()
  runs = [load_run(config, workdir, mesh, use_fallback=True)]
  runs += [load_run(config, d, mesh) for d in compare if d]
  paths = {"grid": write_grid(config, workdir, runs, num_images)}
  paths["cam"] = insight.write_cam(config, workdir, runs[0])
  paths["embedding"] = insight.write_embedding(config, workdir, runs[0])
  for what, path in paths.items():
    if path:
      print(f"visualize: {what} -> {path}")
  return paths
