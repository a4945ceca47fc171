"""The embedded benchmark: procedural street scenes, a flat 'game' source and a 'camera' target.

Both domains draw their scenes from one geometric distribution (horizon, a road in
perspective, sidewalks, facades of varied height, trees, poles with signs and lights,
cars, buses, people, riders) and differ only in how pixels are painted: the source
uses flat, saturated per-class colours; the target uses shifted class colours (an
overcast sky, grey sidewalks, pale poles, muted cars), textures, darker tinted
lighting with gamma, a vignette, blur and sensor noise. A source-only model therefore
loses accuracy on the target, while shape and context still identify every class, so
adaptation has something to recover.

The scenes are written once, in the GTA5 and Cityscapes folder layouts with
Cityscapes labelIds (including ignored ids: ego vehicle, static objects), so the demo
runs through exactly the loaders real data uses. Rendering is deterministic in the
seed, idempotent and atomic: a folder is built under a temporary name and renamed
into place, so a crash or a concurrent render never leaves a half-written folder.
"""

import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
from absl import logging
from PIL import Image, ImageFilter

from confeti_jax.data import labels as labels_lib

VERSION = 1
SOURCE_SIZE = (320, 176)  # (W, H): GTA-like aspect
TARGET_SIZE = (320, 160)  # (W, H): Cityscapes 2:1
CITY = "toycity"
_MANIFEST = "manifest.json"

# Cityscapes labelIds drawn by the renderer (docs/datasets.md C.1); EGO and STATIC map to 255.
EGO, STATIC, ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE = 1, 4, 7, 8, 11, 12, 13, 17
LIGHT, SIGN, VEG, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK, BUS, BICYCLE = (
    19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 33)

# Parts of an object painted differently within one class: windows/glass, dark parts
# (wheels, legs, trunks), light parts (lane marks, lamps), skin.
PLAIN, GLASS, DARK, BRIGHT, SKIN = 0, 1, 2, 3, 4

_GAME_COLOURS = {
    ROAD: [(85, 85, 92), (95, 92, 90), (78, 80, 88), (90, 90, 90)],
    SIDEWALK: [(196, 150, 118), (205, 160, 125), (188, 142, 112), (200, 155, 130)],
    BUILDING: [(205, 95, 60), (215, 185, 115), (120, 135, 180), (175, 175, 165)],
    WALL: [(175, 165, 120)], FENCE: [(165, 110, 50)], POLE: [(55, 55, 60)],
    LIGHT: [(28, 28, 28)], SIGN: [(35, 90, 215), (215, 35, 35), (240, 200, 20), (35, 150, 60)],
    VEG: [(45, 175, 45), (60, 160, 35), (35, 150, 70), (70, 185, 50)],
    TERRAIN: [(160, 205, 85), (150, 195, 80), (170, 210, 95), (155, 200, 75)],
    SKY: [(95, 170, 245), (110, 180, 250), (85, 160, 240), (120, 190, 250)],
    PERSON: [(230, 60, 60), (60, 90, 220), (240, 200, 40), (60, 180, 90)],
    RIDER: [(250, 120, 20), (150, 60, 200), (20, 200, 200), (240, 240, 240)],
    CAR: [(220, 35, 35), (35, 70, 220), (240, 205, 25), (235, 235, 235)],
    TRUCK: [(90, 140, 60), (200, 200, 200), (150, 60, 40), (60, 60, 140)],
    BUS: [(245, 165, 0), (30, 150, 200), (200, 40, 40), (240, 240, 240)],
    BICYCLE: [(30, 30, 30)], EGO: [(30, 30, 35)], STATIC: [(110, 85, 60)],
}
_CAMERA_COLOURS = {
    ROAD: [(72, 74, 80), (82, 80, 78), (66, 68, 72), (76, 76, 82)],
    SIDEWALK: [(150, 148, 145), (140, 140, 138), (160, 155, 150), (135, 138, 142)],
    BUILDING: [(120, 105, 95), (150, 140, 120), (95, 100, 115), (135, 130, 128)],
    WALL: [(140, 135, 125)], FENCE: [(120, 126, 126)], POLE: [(135, 135, 130)],
    LIGHT: [(40, 42, 38)], SIGN: [(40, 80, 160), (170, 45, 45), (200, 180, 60), (40, 110, 60)],
    VEG: [(70, 95, 45), (60, 85, 40), (85, 100, 50), (55, 80, 45)],
    TERRAIN: [(125, 120, 80), (115, 115, 75), (135, 125, 85), (120, 118, 82)],
    SKY: [(205, 210, 215), (190, 200, 210), (215, 215, 210), (180, 190, 205)],
    PERSON: [(50, 50, 60), (90, 80, 70), (40, 45, 70), (120, 110, 100)],
    RIDER: [(60, 60, 65), (100, 70, 60), (45, 60, 80), (130, 125, 120)],
    CAR: [(35, 35, 40), (150, 150, 155), (95, 25, 30), (205, 205, 210)],
    TRUCK: [(110, 110, 100), (170, 170, 165), (90, 70, 55), (60, 70, 90)],
    BUS: [(200, 190, 60), (60, 110, 140), (150, 50, 45), (200, 200, 195)],
    BICYCLE: [(25, 25, 25)], EGO: [(25, 25, 28)], STATIC: [(90, 80, 70)],
}
_GAME_PARTS = {PLAIN: 1.0, GLASS: 1.35, DARK: 0.35, BRIGHT: 2.2}
_CAMERA_PARTS = {PLAIN: 1.0, GLASS: 0.45, DARK: 0.3, BRIGHT: 1.8}
_SKIN = {"game": (235, 185, 150), "camera": (165, 130, 110)}
# Texture amplitude (grey levels) of the camera domain per labelId.
_TEXTURE = {ROAD: 14, SIDEWALK: 12, BUILDING: 10, WALL: 12, VEG: 34, TERRAIN: 26, SKY: 5,
            FENCE: 8, CAR: 6, BUS: 6, TRUCK: 8, PERSON: 8}


def _colour_table(colours):
  table = np.full((256, 4, 3), 128, np.float32)
  for label_id, rgbs in colours.items():
    table[label_id] = [rgbs[k % len(rgbs)] for k in range(4)]
  return table


def _per_id(values, default):
  table = np.full((256,), default, np.float32)
  for key, value in values.items():
    table[key] = value
  return table


_TABLES = {"game": (_colour_table(_GAME_COLOURS), _per_id(_GAME_PARTS, 1.0)),
           "camera": (_colour_table(_CAMERA_COLOURS), _per_id(_CAMERA_PARTS, 1.0))}
_TEXTURE_AMP = _per_id(_TEXTURE, 4.0)


class _Canvas:
  """labelId, colour-variant and part maps that primitives are painted into in order."""

  def __init__(self, height, width):
    self.h, self.w = height, width
    self.label = np.full((height, width), SKY, np.uint8)
    self.variant = np.zeros((height, width), np.uint8)
    self.part = np.zeros((height, width), np.uint8)

  def fill(self, mask, cls, variant=0, part=PLAIN):
    self.label[mask], self.variant[mask], self.part[mask] = cls, variant, part

  def rect(self, x0, y0, x1, y1, cls, variant=0, part=PLAIN):
    """Axis-aligned box, at least one pixel wide and tall so thin poles never vanish."""
    x0, y0 = int(round(x0)), int(round(y0))
    x1, y1 = max(int(round(x1)), x0 + 1), max(int(round(y1)), y0 + 1)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, self.w), min(y1, self.h)
    if x1 > x0 and y1 > y0:
      sl = np.s_[y0:y1, x0:x1]
      self.label[sl], self.variant[sl], self.part[sl] = cls, variant, part

  def ellipse(self, cx, cy, rx, ry, cls, variant=0, part=PLAIN):
    rx, ry = max(rx, 0.6), max(ry, 0.6)
    x0, x1 = max(int(cx - rx), 0), min(int(cx + rx) + 1, self.w)
    y0, y1 = max(int(cy - ry), 0), min(int(cy + ry) + 1, self.h)
    if x1 <= x0 or y1 <= y0:
      return
    yy, xx = np.ogrid[y0:y1, x0:x1]
    inside = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0
    sl = np.s_[y0:y1, x0:x1]
    self.label[sl][inside], self.variant[sl][inside], self.part[sl][inside] = cls, variant, part


def _layout(rng, height, width):
  """Samples one street scene at (height, width); returns the filled canvas."""
  c = _Canvas(height, width)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
  hor = height * rng.uniform(0.36, 0.48)
  vx = width * rng.uniform(0.4, 0.6)
  depth = np.maximum(yy - hor, 0.0)  # rows below the horizon
  off = xx - vx
  left = off < 0
  ground = yy > hor
  kr = width * rng.uniform(0.3, 0.5) / (height - hor)  # road half-width per row of depth
  ks = kr * rng.uniform(1.15, 1.45, size=2)  # sidewalk outer edge, left / right
  kt = ks * np.where(rng.random(2) < 0.45, rng.uniform(1.2, 1.6, size=2), 1.0)  # terrain
  ks_map, kt_map = np.where(left, ks[0], ks[1]), np.where(left, kt[0], kt[1])
  dist = np.abs(off)
  road = ground & (dist < kr * depth)
  c.fill(road, ROAD, rng.integers(4))
  u = (height - hor) / np.maximum(depth, 1e-3)  # inverse depth: dashes shorten far away
  marks = road & (dist < 0.012 * kr * depth + 0.3) & (np.sin(2 * np.pi * 2.2 * u) > 0.2)
  c.fill(marks, ROAD, 0, BRIGHT)
  c.fill(ground & ~road & (dist < ks_map * depth), SIDEWALK, rng.integers(4))
  c.fill(ground & (dist >= ks_map * depth) & (dist < kt_map * depth), TERRAIN, rng.integers(4))

  # Skyline: blocks whose roof lines converge to the vanishing point, so they read
  # as facades in perspective; below the horizon they fill beyond the kerb line.
  col = np.arange(width) + 0.5
  top, cls, var = np.empty(width, np.float32), np.empty(width, np.uint8), np.empty(width, np.uint8)
  base = height * rng.uniform(0.01, 0.05)
  x = 0.0
  while x < width:
    x_end = x + width * rng.uniform(0.05, 0.2)
    if x < vx < x_end and rng.random() < 0.5:
      x_end = vx
    span = (col >= x) & (col < x_end)
    kind = rng.choice([BUILDING, VEG, WALL], p=[0.72, 0.18, 0.10])
    slope = {BUILDING: rng.uniform(0.25, 1.1), VEG: rng.uniform(0.2, 0.45),
             WALL: rng.uniform(0.04, 0.1)}[kind]
    top[span] = hor - base - slope * np.abs(col[span] - vx)
    if kind == VEG:
      top[span] -= np.abs(np.sin(col[span] * rng.uniform(0.15, 0.4))) * height * 0.04
    cls[span], var[span] = kind, rng.integers(4)
    x = x_end
  beyond = ~ground | (dist >= kt_map * depth)
  facade = beyond & (yy >= top[None, :])
  c.fill(facade, cls[None, :].repeat(height, 0)[facade], var[None, :].repeat(height, 0)[facade])
  px, py = height * rng.uniform(0.04, 0.07), height * rng.uniform(0.05, 0.08)
  windows = (facade & (c.label == BUILDING) & ((xx % px) < 0.5 * px) & ((yy % py) < 0.45 * py)
             & (yy > top[None, :] + 0.5 * py))
  c.part[windows] = GLASS

  # Fences along the outer kerb on some sides.
  for s, side in enumerate((left, ~left)):
    if rng.random() < 0.35:
      kerb = hor + dist / kt[s]  # row where the ground meets the facades, per column
      band = side & (yy <= kerb) & (yy >= kerb - rng.uniform(0.15, 0.3) * (kerb - hor))
      c.fill(band, FENCE)
      c.part[band & ((xx % 4) < 1)] = DARK

  # Objects, far to near so nearer ones cover farther ones.
  objects = []
  for _ in range(rng.integers(1, 6)):
    objects.append(("car", rng.uniform(0.12, 0.85), rng.uniform(-0.8, 0.8)))
  if rng.random() < 0.3:
    objects.append((rng.choice(["bus", "truck"]), rng.uniform(0.15, 0.6), rng.uniform(-0.6, 0.6)))
  for _ in range(rng.integers(0, 6)):
    objects.append(("person", rng.uniform(0.1, 0.9), rng.uniform(1.02, 1.1) * rng.choice([-1, 1])))
  if rng.random() < 0.3:
    objects.append(("rider", rng.uniform(0.15, 0.8), rng.uniform(0.7, 0.9) * rng.choice([-1, 1])))
  for _ in range(rng.integers(1, 5)):
    objects.append(("pole", rng.uniform(0.1, 0.8), rng.choice([-1, 1])))
  for _ in range(rng.integers(0, 4)):
    objects.append(("tree", rng.uniform(0.1, 0.7), rng.choice([-1, 1])))
  if rng.random() < 0.5:
    objects.append(("static", rng.uniform(0.2, 0.9), rng.uniform(1.05, 1.12) * rng.choice([-1, 1])))
  for kind, d, lat in sorted(objects, key=lambda o: o[1]):
    yb = hor + d * (height - hor)
    hw = kr * (yb - hor)  # road half-width at this row: the object's scale
    side = 0 if lat < 0 else 1
    if kind in ("pole", "tree"):
      lat = np.sign(lat) * ks[side] / kr * rng.uniform(0.93, 0.99)
    elif kind in ("person", "static"):
      lat = np.sign(lat) * (1 + (ks[side] / kr - 1) * (abs(lat) - 1) / 0.12)
    _draw(c, rng, kind, vx + lat * hw, yb, hw)

  if rng.random() < 0.4:  # ego-vehicle bonnet: ignored in the labels
    rise = height * rng.uniform(0.04, 0.09)
    c.fill(yy > height - rise * (1 - 0.5 * ((xx - width / 2) / (width / 2)) ** 2), EGO)
  return c


def _draw(c, rng, kind, cx, yb, hw):
  """Draws one object standing at (cx, yb) whose size scales with hw."""
  v = rng.integers(4)
  if kind == "car":
    w = 0.5 * hw * rng.uniform(0.85, 1.15)
    h = 0.72 * w
    c.rect(cx - w / 2, yb - 0.55 * h, cx + w / 2, yb - 0.08 * h, CAR, v)
    c.rect(cx - 0.36 * w, yb - h, cx + 0.36 * w, yb - 0.5 * h, CAR, v)
    c.rect(cx - 0.3 * w, yb - 0.92 * h, cx + 0.3 * w, yb - 0.58 * h, CAR, v, GLASS)
    for sx in (-0.36, 0.36):
      c.rect(cx + (sx - 0.1) * w, yb - 0.12 * h, cx + (sx + 0.1) * w, yb, CAR, v, DARK)
      c.rect(cx + (sx - 0.06) * w, yb - 0.45 * h, cx + (sx + 0.06) * w, yb - 0.36 * h, CAR, v,
             BRIGHT)
  elif kind in ("bus", "truck"):
    w = 0.65 * hw
    h = w * (1.1 if kind == "bus" else 0.95)
    cls = BUS if kind == "bus" else TRUCK
    c.rect(cx - w / 2, yb - h, cx + w / 2, yb - 0.05 * h, cls, v)
    c.rect(cx - 0.42 * w, yb - 0.9 * h, cx + 0.42 * w, yb - (0.55 if kind == "bus" else 0.7) * h,
           cls, v, GLASS)
    c.rect(cx - 0.45 * w, yb - 0.08 * h, cx + 0.45 * w, yb, cls, v, DARK)
  elif kind in ("person", "rider"):
    h = 0.42 * hw * rng.uniform(0.85, 1.1)
    base = yb
    cls = PERSON if kind == "person" else RIDER
    if kind == "rider":
      bw = 0.5 * h
      for sx in (-0.3, 0.3):
        c.ellipse(cx + sx * bw, yb - 0.16 * h, 0.17 * h, 0.16 * h, BICYCLE, 0, DARK)
      c.rect(cx - 0.3 * bw, yb - 0.3 * h, cx + 0.3 * bw, yb - 0.24 * h, BICYCLE)
      base = yb - 0.25 * h
    c.rect(cx - 0.1 * h, base - 0.45 * h, cx + 0.1 * h, base, cls, v, DARK)
    c.rect(cx - 0.13 * h, base - 0.82 * h, cx + 0.13 * h, base - 0.42 * h, cls, v)
    c.ellipse(cx, base - 0.9 * h, 0.08 * h, 0.1 * h, cls, v, SKIN)
  elif kind == "pole":
    h = 1.3 * hw * rng.uniform(0.9, 1.2)
    pw = max(0.03 * hw, 0.8)
    c.rect(cx - pw / 2, yb - h, cx + pw / 2, yb, POLE)
    roll = rng.random()
    if roll < 0.45:
      s = 0.13 * hw
      if rng.random() < 0.5:
        c.rect(cx - s / 2, yb - 0.92 * h, cx + s / 2, yb - 0.92 * h + s, SIGN, v)
      else:
        c.ellipse(cx, yb - 0.9 * h, s / 2, s / 2, SIGN, v)
    elif roll < 0.8:
      lw, lh = 0.07 * hw, 0.19 * hw
      c.rect(cx - lw / 2, yb - h, cx + lw / 2, yb - h + lh, LIGHT)
      lit = rng.integers(3)
      c.ellipse(cx, yb - h + (lit + 0.5) * lh / 3, 0.3 * lw, 0.3 * lw, LIGHT, 0, BRIGHT)
  elif kind == "tree":
    h = 1.1 * hw * rng.uniform(0.8, 1.2)
    c.rect(cx - 0.025 * hw, yb - 0.6 * h, cx + 0.025 * hw, yb, VEG, v, DARK)
    for dx, dy, r in ((0, 0.72, 0.22), (-0.12, 0.62, 0.16), (0.12, 0.64, 0.17)):
      c.ellipse(cx + dx * h, yb - dy * h, r * h, r * h * 0.9, VEG, v)
  elif kind == "static":
    s = 0.12 * hw
    c.rect(cx - s / 2, yb - 1.3 * s, cx + s / 2, yb, STATIC, v)


def _noise(rng, height, width, cell):
  """Smooth unit-variance noise: a coarse normal grid bilinearly upsampled."""
  grid = rng.standard_normal((height // cell + 2, width // cell + 2)).astype(np.float32)
  up = Image.fromarray(grid, mode="F").resize((width, height), Image.BILINEAR)
  return np.asarray(up, np.float32)


def _paint(c, rng, domain, shift=1.0):
  """RGB uint8 image of a canvas in the 'game' (flat) or 'camera' (photographic) style.

  `shift` in [0, 1] sets how far the camera's class colours, part shading and
  lighting move from the game's: 0 keeps the game palette (texture, blur and
  noise only), 1 is the full camera palette. The toy default (0.5) is a gap a
  source-only model clearly loses on without leaving nothing to adapt from.
  """
  colours, part_shade = _TABLES[domain]
  if domain == "camera":
    game_colours, game_shade = _TABLES["game"]
    colours = game_colours + shift * (colours - game_colours)
    part_shade = game_shade + shift * (part_shade - game_shade)
  img = colours[c.label, c.variant] * part_shade[c.part][..., None]
  skin = np.asarray(_SKIN["game"], np.float32)
  img[c.part == SKIN] = skin + (shift if domain == "camera" else 0.0) * (
      np.asarray(_SKIN[domain], np.float32) - skin)
  rows = (np.arange(c.h, dtype=np.float32)[:, None] + 0.5) / c.h
  sky = (c.label == SKY)[..., None]
  if domain == "game":
    img += rng.normal(0, 6, (256, 3)).astype(np.float32)[c.label]
    img = np.where(sky, img * (0.9 + 0.2 * rows[..., None]), img)
    img *= rng.uniform(0.93, 1.07)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)
  img += rng.normal(0, 10, (256, 3)).astype(np.float32)[c.label]
  amp = _TEXTURE_AMP[c.label][..., None]
  grain_ = 0.6 * _noise(rng, c.h, c.w, 12) + 0.5 * _noise(rng, c.h, c.w, 2)
  img += amp * grain_[..., None]
  img += 0.4 * amp * rng.standard_normal((c.h, c.w, 3)).astype(np.float32)
  img = np.where(sky, img * (1.08 - 0.25 * rows[..., None]), img)
  cast = rng.uniform(0.85, 1.1, 3).astype(np.float32)
  yy, xx = np.mgrid[0:c.h, 0:c.w].astype(np.float32)
  radius2 = ((xx - c.w / 2) / (c.w / 2)) ** 2 + ((yy - c.h / 2) / (c.h / 2)) ** 2
  light = 1.0 - shift * (1.0 - rng.uniform(0.62, 0.92) * cast)
  img *= light * (1 - 0.18 * radius2)[..., None]
  img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** (1.0 + shift * (rng.uniform(1.05, 1.3) - 1.0))
  blurred = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8)).filter(
      ImageFilter.GaussianBlur(rng.uniform(0.6, 1.1)))
  img = np.asarray(blurred, np.float32) + rng.normal(0, 4, (c.h, c.w, 3)).astype(np.float32)
  return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# Where a class is left out (`data.toy.classes`), its pixels become the first of these
# that is kept: background stuff, so the scene stays a plausible street.
_FALLBACKS = (BUILDING, VEG, ROAD, SKY, SIDEWALK, TERRAIN)


def _keep_only(canvas, classes):
  """Repaints every pixel of a class (trainId) not in `classes` as a kept background class.

  A benchmark where only some classes ever occur (issue: CONFETI diverged on such a
  target); ignored labelIds (ego vehicle, static) stay as they are.
  """
  kept_ids = [labels_lib.CITYSCAPES_TRAIN_LABEL_IDS[c] for c in classes]
  drawn = np.isin(canvas.label, labels_lib.CITYSCAPES_TRAIN_LABEL_IDS)
  dropped = drawn & ~np.isin(canvas.label, kept_ids)
  fallback = next((f for f in _FALLBACKS if f in kept_ids), kept_ids[0])
  canvas.fill(dropped, fallback)


def render_sample(seed, stream, index, domain, size, shift=1.0, classes=()):
  """(RGB uint8 image, uint8 labelId map) of one scene; pure in its arguments.

  `classes`: trainIds the scene may hold (empty: every class the renderer draws).
  """
  rng = np.random.default_rng([int(seed), int(stream), int(index)])
  canvas = _layout(rng, size[1], size[0])
  if classes:
    _keep_only(canvas, classes)
  return _paint(canvas, rng, domain, shift), canvas.label


def _save_png(array, path, palette=None):
  im = Image.fromarray(array, mode="P" if palette is not None else None)
  if palette is not None:
    im.putpalette(palette.ravel().tolist())
  im.save(path)


def _params(toy_cfg):
  return dict(version=VERSION, seed=int(toy_cfg.seed), num_source=int(toy_cfg.num_source),
              num_source_val=int(toy_cfg.num_source_val), num_target=int(toy_cfg.num_target),
              num_val=int(toy_cfg.num_val), source_size=SOURCE_SIZE, target_size=TARGET_SIZE,
              shift=float(toy_cfg.shift), **_class_param(toy_cfg))


def _class_param(toy_cfg):
  """{'classes': sorted trainIds} when a subset is asked for, else {} (so the folders of
  full-class settings keep their names)."""
  classes = tuple(sorted({int(c) for c in (toy_cfg.get("classes") or ())}))
  bad = [c for c in classes if not 0 <= c < labels_lib.NUM_CLASSES]
  if bad:
    raise ValueError(f"data.toy.classes holds {bad}: trainIds are 0..{labels_lib.NUM_CLASSES - 1}"
                     "; fix: pass e.g. --config.data.toy.classes='(0,1,2,8,10,11,13)'.")
  return {"classes": list(classes)} if classes else {}


def cache_folder(toy_cfg):
  """Folder of this setting: named by version and a hash, so settings never collide."""
  params = _params(toy_cfg)
  key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
  root = (toy_cfg.cache_dir or os.environ.get("CONFETI_CACHE")
          or os.path.join(os.path.expanduser("~"), ".cache", "confeti_jax"))
  return os.path.join(os.path.abspath(root), f"toy_v{VERSION}_{key}")


def _folders(final):
  return dict(source=os.path.join(final, "source"), source_val=os.path.join(final, "source_val"),
              target=os.path.join(final, "target"))


def _render_into(folder, params):
  seed = params["seed"]
  for name, stream, count in (("source", 0, params["num_source"]),
                              ("source_val", 1, params["num_source_val"])):
    for sub in ("images", "labels"):
      os.makedirs(os.path.join(folder, name, sub))
    for i in range(count):
      image, label = render_sample(seed, stream, i, "game", SOURCE_SIZE,
                                   classes=params.get("classes", ()))
      _save_png(image, os.path.join(folder, name, "images", f"{i:05d}.png"))
      _save_png(label, os.path.join(folder, name, "labels", f"{i:05d}.png"),
                labels_lib.LABEL_ID_PALETTE)
  for split, stream, count in (("train", 2, params["num_target"]), ("val", 3, params["num_val"])):
    image_dir = os.path.join(folder, "target", "leftImg8bit", split, CITY)
    label_dir = os.path.join(folder, "target", "gtFine", split, CITY)
    os.makedirs(image_dir)
    os.makedirs(label_dir)
    for i in range(count):
      image, label = render_sample(seed, stream, i, "camera", TARGET_SIZE, params["shift"],
                                   params.get("classes", ()))
      stem = f"{CITY}_{stream - 2:06d}_{i:06d}"
      _save_png(image, os.path.join(image_dir, f"{stem}_leftImg8bit.png"))
      _save_png(label, os.path.join(label_dir, f"{stem}_gtFine_labelIds.png"))


def ensure_rendered(toy_cfg):
  """Renders the toy benchmark once; returns dict(source, source_val, target) folders."""
  final = cache_folder(toy_cfg)
  if os.path.isfile(os.path.join(final, _MANIFEST)):
    return _folders(final)
  if os.path.exists(final):
    raise OSError(f"Toy folder {final!r} exists but has no {_MANIFEST}; it was not written "
                  "by this renderer. Delete it and rerun.")
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  params = _params(toy_cfg)
  start = time.time()
  logging.info("Rendering the toy benchmark into %s", final)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
  try:
    _render_into(tmp, params)
    with open(os.path.join(tmp, _MANIFEST), "w") as f:
      json.dump(params, f, indent=1)
    try:
      os.replace(tmp, final)
    except OSError:
      if not os.path.isfile(os.path.join(final, _MANIFEST)):
        raise  # not a concurrent render that finished first
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info("Toy benchmark rendered in %.1f s", time.time() - start)
  return _folders(final)


def preview(toy_cfg, path, num=4):
  """Writes a PNG grid: rows of source images, their labels, target images, their labels."""
  from confeti_jax.data import sources  # local: sources does not need the renderer

  folders = ensure_rendered(toy_cfg)
  rows = []
  for source in (sources.GTA5Source(folders["source"]),
                 sources.CityscapesSource(folders["target"], "train")):
    items = [source[i] for i in range(min(num, len(source)))]
    for key in ("image", "label"):
      tiles = [it[key] if key == "image" else labels_lib.colorize(it[key]) for it in items]
      gap = np.full((tiles[0].shape[0], 2, 3), 255, np.uint8)
      rows.append(np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1))
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
  Image.fromarray(np.concatenate(rows, axis=0)).save(path)
  return path
