"""`make demo`: train and evaluate the toy benchmark, then show the domain gap.

Trains `configs/toy.py` (source-only DeepLabV2 by default) in --workdir, evaluates
on the target val split during training, then on the held-out source split, and
prints both mIoUs with the wall time. Rerunning resumes or, when finished, only
re-evaluates.

  python scripts/demo.py --workdir=workdirs/toy_demo [--config=configs/toy.py:...]
"""

import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_ROOT, "configs", "toy.py"), "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/toy_demo", "Run directory.")


def main(argv):
  del argv
  from confeti_jax import evaluate, train, writer

  writer.quiet_library_logs()
  config = _CONFIG.value
  workdir = os.path.abspath(_WORKDIR.value)
  t0 = time.time()
  train.train_and_evaluate(config, workdir)
  train_s = time.time() - t0
  config.eval.dataset = "source"
  evaluate.run(config, workdir)
  total_s = time.time() - t0

  with open(os.path.join(workdir, "eval", "latest.json")) as f:
    target = json.load(f)
  with open(os.path.join(workdir, "eval_source", "latest.json")) as f:
    source = json.load(f)
  lines = [
      "",
      f"confeti_jax toy demo ({config.method.name}, {config.model.backbone} "
      f"x{config.model.width}, {config.train.steps} steps)",
      f"  target val mIoU  {target['miou']:6.2f}  ({target['num_images']} images, "
      f"{target['dataset']})",
      f"  source val mIoU  {source['miou']:6.2f}  ({source['num_images']} images, "
      f"{source['dataset']})",
      f"  domain gap       {source['miou'] - target['miou']:6.2f} mIoU points",
      f"  wall time        {train_s:6.1f} s training+eval, {total_s:6.1f} s with source eval",
      f"  outputs          {workdir}/eval/latest.md, metrics.jsonl, tensorboard/",
  ]
  logging.info("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
