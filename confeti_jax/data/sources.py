"""Random-access readers of the datasets' own folder layouts (docs/datasets.md C.2-C.4).

Each source is a picklable sequence of file pairs that grain workers index:
`source[i] -> {"image": uint8 [H, W, 3] RGB, "label": uint8 [H, W] trainIds}`,
with 255 for ignored pixels. Pairing is checked once at construction with one
directory listing per folder (cheap for GTA5's 25k files); `check_sizes()` reads
every PNG header (no pixel data) so a size mismatch fails at start-up, naming the
first offending pair. `SkipCorrupt` turns a file that breaks mid-run into a logged,
counted substitution instead of a dead training job.

Mistakes a user can fix (wrong root, unextracted labels, a corrupt PNG) raise
`DatasetError` naming the path, the layout expected there and what to do.
"""

import os

import numpy as np
from absl import logging
from PIL import Image

from confeti_jax.data import labels as labels_lib

KINDS = ("gta5", "cityscapes", "synthia")

_GTA5_LAYOUT = ("GTA5 layout: <root>/images/NNNNN.png (RGB) and <root>/labels/NNNNN.png "
                "(8-bit palette PNG whose index is the Cityscapes labelId) or "
                "<root>/labels/NNNNN_labelTrainIds.png")
_CITYSCAPES_LAYOUT = ("Cityscapes layout: <root>/leftImg8bit/<split>/<city>/"
                      "<stem>_leftImg8bit.png and <root>/gtFine/<split>/<city>/"
                      "<stem>_gtFine_labelIds.png (or _gtFine_labelTrainIds.png)")
_SYNTHIA_LAYOUT = ("SYNTHIA RAND-CITYSCAPES layout: <root>/RGB/NNNNNNN.png (RGB) and "
                   "<root>/GT/LABELS/NNNNNNN.png (16-bit RGB PNG, class id in the first "
                   "channel) or <root>/GT/LABELS/NNNNNNN_labelTrainIds.png (written by "
                   "scripts/prepare_data.py --write_train_ids)")


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


def read_label16(path, table):
  """uint8 [H, W] trainIds from a SYNTHIA 16-bit RGB label PNG (class id in channel 0).

  Pillow keeps only the high byte of 16-bit RGB, which turns every class id into 0
  (docs/datasets.md C.4), so these files are decoded with pypng.
  """
  import png  # pure Python; only SYNTHIA's raw labels need it

  try:
    width, height, rows, info = png.Reader(filename=path).read()
    planes = int(info["planes"])
    flat = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows])
  except FileNotFoundError as e:
    raise DatasetError(f"label {path!r} disappeared after the dataset was indexed; "
                       "restore the file or rebuild the dataset folder.") from e
  except (png.Error, OSError, ValueError, EOFError) as e:
    raise DatasetError(f"Cannot decode label {path!r} ({e}); the file is corrupt or "
                       "truncated. Re-extract it from the dataset archive.") from e
  ids = flat.reshape(height, width, planes)[..., 0]
  return labels_lib.map_ids(ids, table)


def png_size(path):
  """(height, width) from a PNG header without decoding pixels."""
  try:
    with Image.open(path) as im:
      return im.size[1], im.size[0]
  except FileNotFoundError as e:
    raise DatasetError(f"{path!r} does not exist any more; rebuild the dataset folder.") from e
  except (OSError, ValueError, SyntaxError) as e:
    raise DatasetError(f"Cannot read the PNG header of {path!r} ({e}); the file is corrupt. "
                       "Re-extract it from the dataset archive.") from e


def sample_key(path):
  """The name RCS statistics use for a sample: its file name without dataset suffixes.

  Matches the reference's stats files (keyed by '00001_labelTrainIds.png') as well as
  ours, whichever label variant was read.
  """
  name = os.path.basename(path)
  for suffix in ("_gtFine_labelTrainIds.png", "_gtFine_labelIds.png", "_leftImg8bit.png",
                 "_labelTrainIds.png", ".png"):
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


class PairedFileSource:
  """A sorted list of (image, label) paths; decodes, maps and checks one pair per index.

  `tables[i]` maps pair i's raw ids to 19-class trainIds (None: the file already holds
  them); `remap` then takes them to the run's class set (docs/datasets.md C.4), so both
  steps are one composed 256-entry gather. `png16[i]` marks SYNTHIA 16-bit labels.
  """

  def __init__(self, image_paths, label_paths, tables, name, remap=None, png16=None):
    self.image_paths = list(image_paths)
    self.label_paths = list(label_paths)
    remap = labels_lib.TRAIN19_TO_19 if remap is None else remap
    self.tables = [labels_lib.compose(t if t is not None else labels_lib.TRAIN19_TO_19, remap)
                   for t in tables]
    self.png16 = list(png16) if png16 is not None else [False] * len(self.image_paths)
    self.name = name

  def __len__(self):
    return len(self.image_paths)

  def keys(self):
    """Per-sample names (image stems) that RCS statistics are matched by."""
    return [sample_key(p) for p in self.image_paths]

  def check_sizes(self, limit=None):
    """Reads every PNG header; a pair of different sizes fails now, not hours into a run."""
    for index in range(len(self) if limit is None else min(limit, len(self))):
      image_path, label_path = self.image_paths[index], self.label_paths[index]
      image_size, label_size = png_size(image_path), png_size(label_path)
      if image_size != label_size:
        raise DatasetError(
            f"{self.name}: image {image_path!r} is {image_size[1]}x{image_size[0]} but its "
            f"label {label_path!r} is {label_size[1]}x{label_size[0]} (WxH); this is the "
            "first mismatched pair. Re-extract both from the archives, or remove the pair.")

  def __getitem__(self, index):
    index = int(index)
    image_path, label_path = self.image_paths[index], self.label_paths[index]
    image = read_image(image_path)
    if self.png16[index]:
      label = read_label16(label_path, self.tables[index])
    else:
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

  def __init__(self, root, remap=None):
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
    super().__init__(image_paths, label_paths, tables, name=root, remap=remap)


class CityscapesSource(PairedFileSource):
  """Cityscapes `split`: leftImg8bit images paired with gtFine labels by stem, sorted.

  Prefers *_gtFine_labelTrainIds.png when the mmseg converter has written it, else
  maps *_gtFine_labelIds.png (pixel-identical result, docs/datasets.md C.3).
  """

  def __init__(self, root, split, remap=None):
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
    super().__init__(image_paths, label_paths, tables, name=f"{root}:{split}", remap=remap)


class SynthiaSource(PairedFileSource):
  """SYNTHIA RAND-CITYSCAPES: RGB/X.png paired with GT/LABELS/X.png by file name.

  As the reference converter, only names ending in a digit + '.png' are samples.
  GT/LABELS/X_labelTrainIds.png (8-bit, from scripts/prepare_data.py or DAFormer's
  converter) is preferred when present: Pillow reads it ~30x faster than pypng reads
  the 16-bit originals. The dataset has no official split.
  """

  def __init__(self, root, remap=None):
    root = os.fspath(root)
    fix = "Pass the folder that contains RGB/ and GT/ (e.g. --config.data.source.root)."
    if not os.path.isdir(root):
      raise DatasetError(f"SYNTHIA root {root!r} does not exist. Expected the "
                         f"{_SYNTHIA_LAYOUT}. {fix}")
    image_dir, label_dir = os.path.join(root, "RGB"), os.path.join(root, "GT", "LABELS")
    images = [f for f in _listdir(image_dir, "SYNTHIA image folder", _SYNTHIA_LAYOUT, fix)
              if f.endswith(".png") and f[:-4][-1:].isdigit()]
    label_files = set(_listdir(label_dir, "SYNTHIA label folder", _SYNTHIA_LAYOUT,
                               "Extract the GT archive next to RGB/."))
    if not images:
      raise DatasetError(f"SYNTHIA image folder {image_dir!r} holds no NNNNNNN.png files. "
                         f"Expected the {_SYNTHIA_LAYOUT}.")
    image_paths, label_paths, tables, png16, missing = [], [], [], [], []
    for name in images:
      stem = name[:-len(".png")]
      if f"{stem}_labelTrainIds.png" in label_files:
        label_paths.append(os.path.join(label_dir, f"{stem}_labelTrainIds.png"))
        tables.append(None)
        png16.append(False)
      elif name in label_files:
        label_paths.append(os.path.join(label_dir, name))
        tables.append(labels_lib.SYNTHIA_ID_TO_TRAIN)
        png16.append(True)
      else:
        missing.append(os.path.join(label_dir, name))
        continue
      image_paths.append(os.path.join(image_dir, name))
    if missing:
      raise DatasetError(
          f"SYNTHIA: images in {image_dir!r} have no label "
          f"({_describe_missing(missing, len(images), 'labels missing')}). Expected the "
          f"{_SYNTHIA_LAYOUT}.")
    orphans = sorted(f for f in label_files if f.endswith(".png") and f[:-4][-1:].isdigit()
                     and f not in set(images))
    if orphans:
      detail = _describe_missing([os.path.join(label_dir, f) for f in orphans],
                                 len(label_files), "label files have no image")
      raise DatasetError(
          f"SYNTHIA: label count does not match the images ({detail}). Expected one "
          f"GT/LABELS/X.png per RGB/X.png in {root!r}.")
    super().__init__(image_paths, label_paths, tables, name=root, remap=remap, png16=png16)


class SkipCorrupt:
  """Wraps a source so that a sample that fails to decode is replaced, not fatal.

  A DatasetError at index i is logged with its path and the next index (i+1, i+2, ...
  modulo the length) is read instead, so the substitution is deterministic and a
  resumed run sees the same data. Each element gains "skipped": how many files were
  passed over to produce it; summed over batches it is the run's corrupt-file count.
  More than `max_skips` consecutive failures mean the dataset itself is broken.
  """

  def __init__(self, source, max_skips=16):
    self.source, self.max_skips = source, int(max_skips)

  def __len__(self):
    return len(self.source)

  def __getattr__(self, name):  # keys(), check_sizes(), image_paths, ... of the source
    if name == "source":
      raise AttributeError(name)
    return getattr(self.source, name)

  def __getitem__(self, index):
    index, n = int(index), len(self.source)
    for skipped in range(self.max_skips + 1):
      try:
        element = self.source[(index + skipped) % n]
      except DatasetError as e:
        logging.warning("Skipping corrupt sample %d of %r: %s", (index + skipped) % n,
                        self.source, e)
        last = e
        continue
      return {**element, "skipped": np.int32(skipped)}
    raise DatasetError(f"{self.max_skips + 1} consecutive samples of {self.source!r} failed "
                       f"to decode; the dataset is damaged. Last error: {last}")

  def __repr__(self):
    return repr(self.source)


def build_source(kind, root, split="train", class_set="cityscapes19"):
  """The source of dataset `kind` at `root` with labels in `class_set`'s ids.

  `split` is ignored for GTA5 and SYNTHIA (no splits).
  """
  remap = labels_lib.class_set(class_set)[2]
  if kind == "gta5":
    return GTA5Source(root, remap)
  if kind == "cityscapes":
    return CityscapesSource(root, split, remap)
  if kind == "synthia":
    return SynthiaSource(root, remap)
  raise DatasetError(f"Unknown dataset kind {kind!r}; allowed kinds: {list(KINDS)}.")
