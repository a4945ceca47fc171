"""Writes toy street scenes into the real datasets' own folder layouts.

For miniature runs of the real configs on a CPU, for the data-pipeline throughput
benchmark on full-size PNGs, and for the tests of the readers: GTA5 (`images/`,
`labels/` palette PNGs of Cityscapes labelIds), Cityscapes (`leftImg8bit/`,
`gtFine/*_labelIds.png`) and SYNTHIA RAND-CITYSCAPES (`RGB/`, `GT/LABELS/` 16-bit RGB
PNGs with the class in the first channel and instance ids above 255 in the second, so
a reader that takes the wrong channel or byte fails). The content is the toy
renderer's (confeti_jax/data/toy.py) at any size; nothing here is real data.

  python scripts/write_layouts.py --out=/tmp/mini --size=small   # miniature runs
  python scripts/write_layouts.py --out=/tmp/full --size=full    # 1914x1052, 2048x1024
"""

import os

import numpy as np
import png
from PIL import Image

from confeti_jax.data import labels, toy

# The datasets' own image sizes (W, H), docs/datasets.md C.1-C.4.
FULL_SIZES = {"gta5": (1914, 1052), "cityscapes": (2048, 1024), "synthia": (1280, 760)}
# SYNTHIA's lanemarking id: mapped to ignore by the 19-class table.
SYNTHIA_LANEMARKING = 22

# SYNTHIA id of each Cityscapes labelId the toy renderer draws (through the trainId).
CS_TO_SYNTHIA = np.zeros(256, np.uint16)
for _train_id, _cs_id in enumerate(labels.CITYSCAPES_TRAIN_LABEL_IDS):
  CS_TO_SYNTHIA[_cs_id] = labels.SYNTHIA_TRAIN_LABEL_IDS[_train_id]


def save_png(array, path, palette=None):
  """An 8-bit PNG (palette mode when `palette` is given), creating its folder."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im = Image.fromarray(array, mode="P" if palette is not None else None)
  if palette is not None:
    im.putpalette(palette.ravel().tolist())
  im.save(path)


def write_png16(path, array):
  """A 16-bit RGB PNG (pypng), the SYNTHIA GT/LABELS format; Pillow cannot write it."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  h, w, _ = array.shape
  with open(path, "wb") as f:
    png.Writer(w, h, greyscale=False, bitdepth=16).write(f, array.reshape(h, -1).tolist())


def photo_noise(image, sigma, seed):
  """Adds Gaussian pixel noise: the flat 'game' renders compress ~100x better than
  photographs, which would flatter a decode benchmark; with noise their PNGs are
  photograph-sized (a few MB at 1914x1052)."""
  if not sigma:
    return image
  noise = np.random.default_rng(seed).normal(0.0, sigma, image.shape)
  return np.clip(image + noise, 0, 255).astype(np.uint8)


def write_gta5(root, n, size=(96, 53), seed=0, noise=0.0):
  """images/NNNNN.png + labels/NNNNN.png (palette index = Cityscapes labelId)."""
  for i in range(n):
    image, label = toy.render_sample(seed, 0, i, "game", size)
    image = photo_noise(image, noise, (seed, i))
    save_png(image, os.path.join(root, "images", f"{i:05d}.png"))
    save_png(label, os.path.join(root, "labels", f"{i:05d}.png"), labels.LABEL_ID_PALETTE)
  return str(root)


def write_cityscapes(root, n_train, n_val, size=(96, 48), seed=0, city="aachen"):
  """leftImg8bit/{train,val}/<city>/*_leftImg8bit.png + gtFine/.../*_gtFine_labelIds.png."""
  for split, count, stream in (("train", n_train, 2), ("val", n_val, 3)):
    for i in range(count):
      image, label = toy.render_sample(seed, stream, i, "camera", size)
      stem = f"{city}_{stream:06d}_{i:06d}"
      save_png(image, os.path.join(root, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png"))
      save_png(label, os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png"))
  return str(root)


def synthia_label(cs_label_ids):
  """[H, W, 3] uint16 SYNTHIA GT from Cityscapes labelIds: class in R (plus a lanemarking
  stripe along the bottom), instance ids 300-999 in G."""
  gt = np.zeros((*cs_label_ids.shape, 3), np.uint16)
  gt[..., 0] = CS_TO_SYNTHIA[cs_label_ids]
  gt[-3:, ::4, 0] = SYNTHIA_LANEMARKING
  gt[..., 1] = 300 + np.arange(cs_label_ids.size).reshape(cs_label_ids.shape) % 700
  return gt


def write_synthia(root, n, size=(96, 57), seed=0, noise=0.0):
  """RGB/NNNNNNN.png + GT/LABELS/NNNNNNN.png (16-bit RGB, class id in R)."""
  for i in range(n):
    image, label = toy.render_sample(seed, 5, i, "game", size)
    image = photo_noise(image, noise, (seed, i))
    save_png(image, os.path.join(root, "RGB", f"{i:07d}.png"))
    write_png16(os.path.join(root, "GT", "LABELS", f"{i:07d}.png"), synthia_label(label))
  return str(root)


def write_all(out, *, num_train, num_val, sizes, seed=0, noise=0.0):
  """GTA5, SYNTHIA and Cityscapes folders under `out`; returns their roots by name.
  `noise` (photo_noise's sigma) applies to the synthetic sources."""
  return dict(
      gta5=write_gta5(os.path.join(out, "gta5"), num_train, sizes["gta5"], seed, noise),
      synthia=write_synthia(os.path.join(out, "synthia"), num_train, sizes["synthia"], seed,
                            noise),
      cityscapes=write_cityscapes(os.path.join(out, "cityscapes"), num_train, num_val,
                                  sizes["cityscapes"], seed))
