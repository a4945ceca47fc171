"""Training image panels: what one step saw and predicted, for TensorBoard.

DAFormer-based code (CONFETI's base) writes such a debug image every 100 iterations.
Here each method's jitted step adds, when `train.image_every_steps > 0`, a dict of
tiles of the batch's first sample under `KEY` in its metrics, built from arrays the
step computed anyway (no second forward pass). The trainer pops it before the metrics
are summed, and fetches it to the host only on the steps that write an image, so
other steps pay for a few small extra outputs and no host sync.

Tiles by kind, told apart by dtype and rank:
  uint8 [H, W, 3]   an image (denormalised);
  int32 [H, W]      a trainId map (prediction, label; 255 = ignored, drawn black);
  float32 [H, W]    a map in [0, 1] (confidence, entropy), drawn with a heat colour map.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from confeti_jax import augment
from confeti_jax.data import labels as labels_lib

KEY = "panel"
TITLE_HEIGHT = 14
MIN_TILE = 128
COLUMNS = 4


# -- tiles, inside the jitted step --------------------------------------------------------
def image(normalized):
  """The first sample of a batch of normalised images, as uint8 RGB."""
  pixels = augment.denormalize(jax.lax.stop_gradient(normalized[0]).astype(jnp.float32))
  return jnp.clip(jnp.round(pixels), 0, 255).astype(jnp.uint8)


def raw(pixels):
  """The first sample of a batch of uint8 pixel images as given by the loader."""
  return jnp.asarray(pixels[0]).astype(jnp.uint8)


def label(label_map):
  """The first sample of a [B, H, W] trainId map."""
  return jnp.asarray(label_map[0]).astype(jnp.int32)


def prediction(logits, size=None):
  """Argmax of the first sample's logits, resized (bilinear) to `size` when given."""
  logits = jax.lax.stop_gradient(logits[:1]).astype(jnp.float32)
  if size is not None and tuple(logits.shape[1:3]) != tuple(size):
    logits = augment.resize_bilinear(logits, tuple(size))
  return jnp.argmax(logits[0], axis=-1).astype(jnp.int32)


def heat(values, scale=1.0):
  """The first sample of a [B, H, W] map divided by `scale`, clipped to [0, 1]."""
  return jnp.clip(jax.lax.stop_gradient(values[0]).astype(jnp.float32) / scale, 0.0, 1.0)


def attach(metrics, enabled, build):
  """`metrics` with the panel `build()` under KEY when `enabled` (a static flag).

  The tile names get their position as a prefix ("03|target"): pytrees sort dict keys,
  and `compose` restores the method's order from it.
  """
  if not enabled:
    return metrics
  return {**metrics, KEY: {f"{i:02d}|{name}": tile for i, (name, tile) in
                           enumerate(build().items())}}


def pop(metrics):
  """(metrics without the panel, the panel or None): called on the step's outputs."""
  metrics = dict(metrics)
  return metrics, metrics.pop(KEY, None)


# -- the picture, on the host ---------------------------------------------------------------
def heat_colours(values):
  """A black-red-yellow-white ramp (like matplotlib's 'hot'), without matplotlib."""
  v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)
  rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)],
                 axis=-1)
  return (255 * rgb + 0.5).astype(np.uint8)


def to_rgb(tile, class_names=labels_lib.CLASSES):
  """uint8 RGB of one tile of any kind (see the module docstring); label maps in the
  colours of `class_names` (the run's class set)."""
  tile = np.asarray(tile)
  if tile.ndim == 3 and tile.dtype == np.uint8:
    return tile
  if tile.ndim == 2 and np.issubdtype(tile.dtype, np.integer):
    return labels_lib.colour_table(class_names)[np.where((tile >= 0) & (tile < 256), tile, 255)]
  if tile.ndim == 2 and np.issubdtype(tile.dtype, np.floating):
    return heat_colours(tile)
  raise ValueError(f"panel tile of shape {tile.shape} and dtype {tile.dtype} is none of "
                   "uint8 HxWx3, integer HxW, float HxW")


def compose(panel, columns=COLUMNS, min_size=MIN_TILE, class_names=labels_lib.CLASSES):
  """One uint8 RGB picture: the tiles in order, `columns` per row, each titled by its key;
  tiles smaller than `min_size` pixels are enlarged (nearest) so titles stay legible."""
  tiles = [(key.split("|", 1)[-1], to_rgb(tile, class_names))
           for key, tile in sorted(panel.items())]
  if not tiles:
    raise ValueError("empty panel")
  factor = max(1, -(-min_size // min(t.shape[0] for _, t in tiles)))
  tiles = [(name, np.repeat(np.repeat(t, factor, 0), factor, 1)) for name, t in tiles]
  height = max(t.shape[0] for _, t in tiles)
  width = max(t.shape[1] for _, t in tiles)
  rows = -(-len(tiles) // columns)
  cols = min(columns, len(tiles))
  cell_h, cell_w = height + TITLE_HEIGHT, width + 2
  canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, (name, tile) in enumerate(tiles):
    x, y = (i % cols) * cell_w, (i // cols) * cell_h
    draw.text((x + 2, y + 1), name, fill=(0, 0, 0))
    canvas.paste(Image.fromarray(tile), (x, y + TITLE_HEIGHT))
  return np.asarray(canvas)


def write(metric_writer, step, panel, workdir=None, class_names=labels_lib.CLASSES):
  """Writes the composed panel to TensorBoard ("train/panel") and, when `workdir` is given,
  to workdir/panels/latest.png (written atomically); returns the picture."""
  picture = compose(jax.device_get(panel), class_names=class_names)
  metric_writer.write_images(step, {"train/panel": picture})
  if workdir is not None and jax.process_index() == 0:
    from confeti_jax import stylize  # imports the trainer's modules; needed only here

    folder = os.path.join(workdir, "panels")
    os.makedirs(folder, exist_ok=True)
    stylize.save_png(picture, os.path.join(folder, "latest.png"))
  return picture
