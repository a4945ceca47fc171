"""Random-access readers of the datasets' own folder layouts (datasets.md C.2, C.3).

Each source is a picklable sequence of file pairs that grain workers index:
`source[i] -> {"image": uint8 [H, W, 3] RGB, "label": uint8 [H, W] trainIds}`,
with 255 for ignored pixels. Pairing is checked once at construction with one
directory listing per folder (cheap for GTA5's 25k files); image sizes are only
known when a file is decoded, so a size mismatch is reported then.

Mistakes a user can fix (wrong root, unextracted labels, a corrupt PNG) raise
`DatasetError` naming the path, the layout expected there and what to do.
"""

import os

import numpy as np
from PIL import Image

from confeti_jax.data import labels as labels_lib

KINDS = ("gta5", "cityscapes")

_GTA5_LAYOUT = ("GTA5 layout: <root>/images/NNNNN.png (RGB) and <root>/labels/NNNNN.png "
                "(8-bit palette PNG whose index is the Cityscapes labelId) or "
                "<root>/labels/NNNNN_labelTrainIds.png")
_CITYSCAPES_LAYOUT = ("Cityscapes layout: <root>/leftImg8bit/<split>/<city>/"
                      "<stem>_leftImg8bit.png and <root>/gtFine/<split>/<city>/"
                      "<stem>_gtFine_labelIds.png (or _gtFine_labelTrainIds.png)")


class DatasetError(ValueError):
  """A dataset on disk does not have the expected layout or content."""


def _listdir(path, what, layout, fix):
  if not os.path.isdir(path):
    raise DatasetError(f"{what} {path!r} does not exist or is not a folder. Expected the "
                       f"{layout}. {fix}")
  return sorted(os.listdir(path))


def _describe_missing(missing, total, kind):
  shown = ", ".join(repr(m) for m in missing[:5])
  more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
  return f"{len(missing)} of {total} {kind}: {shown}{more}"


def _open(path, what):
  """Decodes a PNG fully, turning Pillow's many failure types into one DatasetError."""
  try:
    with Image.open(path) as im:
      im.load()  # decode now, so errors surface here and the file can close
      return im
  except FileNotFoundError as e:
    raise DatasetError(f"{what} {path!r} disappeared after the dataset was indexed; "
                       "restore the file or rebuild the dataset folder.") from e
  except (OSError, ValueError, SyntaxError) as e:
    raise DatasetError(f"Cannot decode {what} {path!r} ({e}); the file is corrupt or "
                       "truncated. Re-extract it from the dataset archive.") from e


def read_image(path):
  """uint8 [H, W, 3] RGB; grey or RGBA files are converted, as mmcv's loader does."""
  im = _open(path, "image")
  if im.mode != "RGB":
    im = im.convert("RGB")
  return np.asarray(im, dtype=np.uint8)


def read_label(path, table=None):
  """uint8 [H, W] trainIds from a single-channel PNG, mapped through `table` if given.

  For 'P' images Pillow returns the palette indices, which is how GTA5 stores its
  labelIds; colour-coded (RGB) label files are refused rather than misread.
  """
  im = _open(path, "label")
  if im.mode not in ("P", "L"):
    raise DatasetError(
        f"Label {path!r} has mode {im.mode}; expected a single-channel PNG of ids (mode P or "
        "L). Colour-coded labels (e.g. Cityscapes *_gtFine_color.png) cannot be used; point "
        "the loader at the id files instead.")
  label = np.asarray(im, dtype=np.uint8)
  return labels_lib.map_ids(label, table) if table is not None else label


class PairedFileSource:
  """A sorted list of (image, label) paths; decodes, maps and checks one pair per index."""

  def __init__(self, image_paths, label_paths, tables, name):
    self.image_paths = list(image_paths)
    self.label_paths = list(label_paths)
    self.tables = list(tables)  # per pair: lookup table, or None for trainId files
    self.name = name

  def __len__(self):
    return len(self.image_paths)

  def __getitem__(self, index):
    index = int(index)
    image_path, label_path = self.image_paths[index], self.label_paths[index]
    image = read_image(image_path)
    label = read_label(label_path, self.tables[index])
    if image.shape[:2] != label.shape:
      raise DatasetError(
          f"Image {image_path!r} is {image.shape[1]}x{image.shape[0]} but its label "
          f"{label_path!r} is {label.shape[1]}x{label.shape[0]} (WxH). The pair does not "
          "belong together or one file is damaged; re-extract both from the archives.")
    return {"image": image, "label": label}

  def __repr__(self):
    return f"{type(self).__name__}({self.name!r}, {len(self)} images)"


class GTA5Source(PairedFileSource):
  """GTA5 ("Playing for Data"): images/X.png paired with labels/X.png by file name.

  labels/X_labelTrainIds.png (written by the DAFormer/mmseg converter) is used as is
  when present; otherwise the palette-index labelIds of labels/X.png are mapped.
  GTA5 has no official splits, so the whole folder is one split.
  """

  def __init__(self, root):
    root = os.fspath(root)
    fix = "Pass the folder that contains images/ and labels/ (e.g. --config.data.source.root)."
    if not os.path.isdir(root):
      raise DatasetError(f"GTA5 root {root!r} does not exist. Expected the {_GTA5_LAYOUT}. "
                         f"{fix}")
    image_dir, label_dir = os.path.join(root, "images"), os.path.join(root, "labels")
    images = [f for f in _listdir(image_dir, "GTA5 image folder", _GTA5_LAYOUT, fix)
              if f.endswith(".png")]
    label_files = set(_listdir(label_dir, "GTA5 label folder", _GTA5_LAYOUT,
                               "Extract the labels archive next to images/."))
    if not images:
      raise DatasetError(f"GTA5 image folder {image_dir!r} holds no .png files. Expected the "
                         f"{_GTA5_LAYOUT}. Extract the image archives there.")
    image_paths, label_paths, tables, missing = [], [], [], []
    for name in images:
      stem = name[:-len(".png")]
      if f"{stem}_labelTrainIds.png" in label_files:
        label_paths.append(os.path.join(label_dir, f"{stem}_labelTrainIds.png"))
        tables.append(None)
      elif name in label_files:
        label_paths.append(os.path.join(label_dir, name))
        tables.append(labels_lib.GTA5_ID_TO_TRAIN)
      else:
        missing.append(os.path.join(label_dir, name))
        continue
      image_paths.append(os.path.join(image_dir, name))
    if missing:
      detail = _describe_missing(missing, len(images), "labels missing")
      raise DatasetError(
          f"GTA5: images in {image_dir!r} have no label ({detail}). Expected the "
          f"{_GTA5_LAYOUT}. Extract the matching label archives or remove "
          "the unlabelled images.")
    image_names = set(images)
    orphans = sorted(f for f in label_files if f.endswith(".png")
                     and not f.endswith("_labelTrainIds.png") and f not in image_names)
    if orphans:
      detail = _describe_missing([os.path.join(label_dir, f) for f in orphans],
                                 len(label_files), "label files have no image")
      raise DatasetError(
          f"GTA5: label count does not match the images ({detail}). Expected one "
          f"labels/X.png per images/X.png in {root!r}; an image archive is "
          "probably missing. Extract it, or delete the unmatched labels.")
    super().__init__(image_paths, label_paths, tables, name=root)


class CityscapesSource(PairedFileSource):
  """Cityscapes `split`: leftImg8bit images paired with gtFine labels by stem, sorted.

  Prefers *_gtFine_labelTrainIds.png when the mmseg converter has written it, else
  maps *_gtFine_labelIds.png (pixel-identical result, datasets.md C.3).
  """

  def __init__(self, root, split):
    root = os.fspath(root)
    fix = ("Pass the folder that contains leftImg8bit/ and gtFine/ "
           "(e.g. --config.data.target.root).")
    if not os.path.isdir(root):
      raise DatasetError(f"Cityscapes root {root!r} does not exist. Expected the "
                         f"{_CITYSCAPES_LAYOUT}. {fix}")
    image_root = os.path.join(root, "leftImg8bit", split)
    label_root = os.path.join(root, "gtFine", split)
    cities = [c for c in _listdir(image_root, f"Cityscapes {split!r} image folder",
                                  _CITYSCAPES_LAYOUT,
                                  "Extract leftImg8bit_trainvaltest.zip into the root.")
              if os.path.isdir(os.path.join(image_root, c))]
    _listdir(label_root, f"Cityscapes {split!r} label folder", _CITYSCAPES_LAYOUT,
             "Extract gtFine_trainvaltest.zip into the root.")
    suffix = "_leftImg8bit.png"
    image_paths, label_paths, tables, missing, total = [], [], [], [], 0
    for city in cities:
      city_labels = os.path.join(label_root, city)
      names = set(os.listdir(city_labels)) if os.path.isdir(city_labels) else set()
      for name in sorted(os.listdir(os.path.join(image_root, city))):
        if not name.endswith(suffix):
          continue
        total += 1
        stem = name[:-len(suffix)]
        if f"{stem}_gtFine_labelTrainIds.png" in names:
          label_paths.append(os.path.join(city_labels, f"{stem}_gtFine_labelTrainIds.png"))
          tables.append(None)
        elif f"{stem}_gtFine_labelIds.png" in names:
          label_paths.append(os.path.join(city_labels, f"{stem}_gtFine_labelIds.png"))
          tables.append(labels_lib.CITYSCAPES_ID_TO_TRAIN)
        else:
          missing.append(os.path.join(city_labels, f"{stem}_gtFine_labelIds.png"))
          continue
        image_paths.append(os.path.join(image_root, city, name))
    if not total:
      raise DatasetError(f"Cityscapes {split!r} image folder {image_root!r} holds no "
                         f"*{suffix} files. Expected the {_CITYSCAPES_LAYOUT}.")
    if missing:
      raise DatasetError(
          f"Cityscapes {split!r}: images have no label "
          f"({_describe_missing(missing, total, 'labels missing')}). Expected the "
          f"{_CITYSCAPES_LAYOUT}. Extract gtFine_trainvaltest.zip into {root!r}.")
    super().__init__(image_paths, label_paths, tables, name=f"{root}:{split}")


def build_source(kind, root, split="train"):
  """The source of dataset `kind` at `root`; `split` is ignored for GTA5 (no splits)."""
  if kind == "gta5":
    return GTA5Source(root)
  if kind == "cityscapes":
    return CityscapesSource(root, split)
  raise DatasetError(f"Unknown dataset kind {kind!r}; allowed kinds: {list(KINDS)}.")
