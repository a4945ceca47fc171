"""Class names, palettes and the id -> trainId maps of Cityscapes, GTA5 and SYNTHIA.

Every dataset is trained and evaluated in the 19-class Cityscapes trainId space
(docs/datasets.md C.1); raw label files store dataset-specific ids, so each reader maps
them through a 256-entry lookup table (one numpy gather, fast enough for grain
workers). Ids not in a table become IGNORE_INDEX, matching the reference converters.
"""

import numpy as np

IGNORE_INDEX = 255
NUM_CLASSES = 19

# Cityscapes trainId order (docs/datasets.md C.1).
CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
    "bus", "train", "motorcycle", "bicycle",
)

# RGB colour of each trainId, the Cityscapes convention every paper's figures use.
PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)

# Cityscapes labelId of each trainId; GTA5 labels use the same ids (docs/datasets.md C.2).
CITYSCAPES_TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
                              31, 32, 33)

# SYNTHIA-RAND-CITYSCAPES class id of each trainId (docs/datasets.md C.4, the DAFormer map;
# lanemarking 22 is NOT road and stays ignored).
SYNTHIA_TRAIN_LABEL_IDS = (3, 4, 2, 21, 5, 7, 15, 9, 6, 16, 1, 10, 17, 8, 18, 19, 20, 12, 11)

# Evaluation subsets for SYNTHIA -> Cityscapes, as trainId indices (docs/datasets.md C.4).
SYNTHIA16 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA13 = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
CLASS_SUBSETS = {"miou16": SYNTHIA16, "miou13": SYNTHIA13}

# The 16-class SYNTHIA convention (ProDA / CONFETII, docs/datasets.md C.4): a 16-class head over
# the 19 Cityscapes classes minus terrain (9), truck (14) and train (16), numbered in
# trainId order; SYNTHIA_16_LABEL_IDS[k] is the SYNTHIA id of class k.
SYNTHIA_16_LABEL_IDS = (3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11)
CLASSES_16 = tuple(CLASSES[i] for i in SYNTHIA16)

# Thing classes of the ImageNet feature distance (DAFormer/CONFETI FD, docs/reference_code.md §2.6).
FD_THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


def _lookup(label_ids):
  """256-entry uint8 table sending label_ids[k] to k and every other id to IGNORE_INDEX."""
  table = np.full((256,), IGNORE_INDEX, dtype=np.uint8)
  for train_id, label_id in enumerate(label_ids):
    table[label_id] = train_id
  table.setflags(write=False)
  return table


CITYSCAPES_ID_TO_TRAIN = _lookup(CITYSCAPES_TRAIN_LABEL_IDS)
GTA5_ID_TO_TRAIN = CITYSCAPES_ID_TO_TRAIN
SYNTHIA_ID_TO_TRAIN = _lookup(SYNTHIA_TRAIN_LABEL_IDS)


def _train19_to(kept):
  """256-entry table: 19-class trainId kept[k] -> k, everything else -> IGNORE_INDEX."""
  return _lookup(kept)


# Identity on 0..18 (255 stays 255): what a 19-class run applies after the id map.
TRAIN19_TO_19 = _train19_to(range(NUM_CLASSES))
TRAIN19_TO_16 = _train19_to(SYNTHIA16)

# class_set (config.class_set) -> (class names, {report key: class indices}, table that
# turns 19-class trainIds into this set's label ids). 'synthia19' is the DAFormer/CONFETI
# convention (19-class head, mIoU16/13 over subsets of it); 'synthia16' the 16-class head.
CLASS_SETS = {
    "cityscapes19": (CLASSES, {}, TRAIN19_TO_19),
    "synthia19": (CLASSES, {"miou16": SYNTHIA16, "miou13": SYNTHIA13}, TRAIN19_TO_19),
    "synthia16": (CLASSES_16, {"miou16": tuple(range(16)),
                               "miou13": tuple(SYNTHIA16.index(c) for c in SYNTHIA13)},
                  TRAIN19_TO_16),
}


def class_set(name):
  """(names, subsets, 19->set table) of a config.class_set, failing with the allowed names."""
  if name not in CLASS_SETS:
    raise ValueError(f"Unknown class_set {name!r}; allowed: {sorted(CLASS_SETS)}.")
  return CLASS_SETS[name]


def compose(table, then):
  """The 256-entry table equal to applying `table` and then `then` (IGNORE stays IGNORE)."""
  out = np.asarray(then, np.uint8)[np.asarray(table, np.uint8)]
  out.setflags(write=False)
  return out


def _label_id_palette():
  """Colour per Cityscapes labelId (black for ignored ids), for GTA-style 'P' PNGs."""
  palette = np.zeros((256, 3), dtype=np.uint8)
  for train_id, label_id in enumerate(CITYSCAPES_TRAIN_LABEL_IDS):
    palette[label_id] = PALETTE[train_id]
  palette.setflags(write=False)
  return palette


LABEL_ID_PALETTE = _label_id_palette()

# PALETTE extended to 256 rows so any uint8 trainId map can be coloured by one gather.
_TRAIN_ID_COLOURS = np.zeros((256, 3), dtype=np.uint8)
_TRAIN_ID_COLOURS[:NUM_CLASSES] = PALETTE
_TRAIN_ID_COLOURS.setflags(write=False)


def map_ids(label, table):
  """Maps raw dataset ids to trainIds with a 256-entry table; returns uint8.

  Labels arrive as uint8 from PNGs; wider integer inputs (e.g. SYNTHIA's 16-bit
  channel) are accepted but must stay below 256, since larger ids would silently wrap.
  """
  label = np.asarray(label)
  table = np.asarray(table, dtype=np.uint8)
  if table.shape != (256,):
    raise ValueError(f"lookup table must have 256 entries, got shape {table.shape}")
  if label.dtype != np.uint8:
    if label.size and (label.min() < 0 or label.max() > 255):
      raise ValueError(f"label ids must lie in [0, 255], got [{label.min()}, {label.max()}]")
    label = label.astype(np.uint8)
  return table[label]


def colour_table(class_names):
  """256 x 3 uint8: class k of a class set (e.g. the 16 SYNTHIA classes) -> its
  Cityscapes colour; every other id (255 = ignored) black."""
  table = np.zeros((256, 3), np.uint8)
  for k, name in enumerate(class_names):
    table[k] = PALETTE[CLASSES.index(name)]
  return table


def colorize(train_ids):
  """RGB uint8 [..., 3] image of a trainId map; ignored pixels are black."""
  return _TRAIN_ID_COLOURS[np.asarray(train_ids, dtype=np.uint8)]


def class_names(indices=None):
  """Names of `indices` (default: all 19), for per-class tables over a subset."""
  if indices is None:
    return CLASSES
  return tuple(CLASSES[i] for i in indices)
