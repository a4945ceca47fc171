"""SYNTHIA (RAND-CITYSCAPES) -> Cityscapes with the reference data protocol.

As gta2cs.py, with SYNTHIA resized keep-ratio into 1280x760 (its native size) and the
labels' class ids read from the first channel of the 16-bit GT/LABELS PNGs
(docs/datasets.md C.4). Two conventions (docs/reference_code.md §7):

* `classes=19` (default; DAFormer / CONFETI code): a 19-class head trained on
  Cityscapes trainIds; eval/latest.json reports miou (19), miou16 and miou13, the
  means over the 16 / 13 SYNTHIA classes (terrain, truck, train score 0).
* `classes=16` (ProDA / CONFETII): a 16-class head, terrain/truck/train ignored in
  both domains; miou = miou16, and miou13 over its 13-class subset.

  python scripts/prepare_data.py --dataset=synthia --root=/data/synthia/RAND_CITYSCAPES \\
      --write_train_ids          # RCS stats + 8-bit trainId labels, once
  python -m confeti_jax.main --config=configs/synthia2cs.py:classes=16 \\
      --workdir=workdirs/syn2cs --config.data.source.root=/data/synthia/RAND_CITYSCAPES \\
      --config.data.target.root=/data/cityscapes --config.model.pretrained=r101_v1c.npz

Arguments (`:key=value,...`): method (default confeti: the whole pipeline, as gta2cs.py),
model (A-E, as gta2cs.py), stage (all | 0 | 1 | 2), classes (19 | 16), res (low | full, as
gta2cs.py), crop (512 | 640), eval (full | 1280), rcs (1 | 0).
"""

from confeti_jax.data import labels
from configs import common, gta2cs


def get_config(arg=None):
  args = common.parse_arg(arg, method="confeti", model="", stage="all", classes=19, res="low",
                          crop=512, eval="full", rcs=1)
  if args.classes not in (16, 19):
    raise ValueError(f"classes must be 19 (DAFormer/CONFETI) or 16 (ProDA/CONFETII), "
                     f"got {args.classes}.")
  config = common.base_config()
  gta2cs.apply_method(config, args)
  config.num_classes = args.classes
  config.class_set = f"synthia{args.classes}"
  config.data.source.kind = "synthia"
  config.data.source.scale = (1280, 760)
  config.data.target.kind = "cityscapes"
  config.data.target.scale = (1280, 640)
  remap_thing_classes(config)
  return gta2cs.apply_protocol(config, args)


def remap_thing_classes(config):
  """The feature distance's thing classes, given as 19-class trainIds, in the head's ids:
  with 16 classes person is 10, not 11, and truck / train do not exist."""
  if "fd_classes" not in config.method:
    return
  table = labels.class_set(config.class_set)[2]
  config.method.fd_classes = tuple(int(table[c]) for c in config.method.fd_classes
                                   if table[c] != labels.IGNORE_INDEX)
