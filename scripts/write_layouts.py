"""Writes toy scenes into the GTA5, SYNTHIA and Cityscapes folder layouts.

  python scripts/write_layouts.py --out=/tmp/layouts --size=small   # miniature runs
  python scripts/write_layouts.py --out=/tmp/full --size=full --num_train=24 --num_val=4

`small` renders 160x88 (GTA5), 160x95 (SYNTHIA) and 160x80 (Cityscapes); `full` the
datasets' own sizes (1914x1052, 1280x760, 2048x1024), for the data-pipeline benchmark
(scripts/data_throughput.py), with pixel noise (--noise, default 6 there) on the flat
synthetic sources so that their PNGs decode as slowly as photographs do. The folders
are written under a temporary name and renamed into place, so an interrupted run
leaves nothing half-written. Then run
scripts/prepare_data.py on the source folders (rare-class statistics) and point
data.source.root / data.target.root at them (README, "Real datasets").
"""

import os
import shutil
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from confeti_jax.data import layouts  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "Folder to create (must not exist).")
_SIZE = flags.DEFINE_enum("size", "small", ["small", "full"], "Image sizes (see above).")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 48, "Training images per dataset.")
_NUM_VAL = flags.DEFINE_integer("num_val", 12, "Cityscapes val images.")
_NOISE = flags.DEFINE_float("noise", None, "Pixel noise sigma on GTA5/SYNTHIA images "
                            "(default: 0 for small, 6 for full).")
_SEED = flags.DEFINE_integer("seed", 0, "Scene seed.")
flags.mark_flags_as_required(["out"])

SMALL_SIZES = {"gta5": (160, 88), "cityscapes": (160, 80), "synthia": (160, 95)}


def main(argv):
  del argv
  out = os.path.abspath(_OUT.value)
  if os.path.exists(out):
    raise SystemExit(f"{out!r} exists; give a new folder (or delete it) and rerun.")
  sizes = SMALL_SIZES if _SIZE.value == "small" else layouts.FULL_SIZES
  noise = _NOISE.value if _NOISE.value is not None else (0.0 if _SIZE.value == "small" else 6.0)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
  start = time.time()
  try:
    roots = layouts.write_all(tmp, num_train=_NUM_TRAIN.value, num_val=_NUM_VAL.value,
                              sizes=sizes, seed=_SEED.value, noise=noise)
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  for name, root in roots.items():
    print(f"{name}: {root.replace(tmp, out)} {sizes[name][0]}x{sizes[name][1]}")
  print(f"written in {time.time() - start:.1f} s")


if __name__ == "__main__":
  app.run(main)
