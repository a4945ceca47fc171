"""The best-snapshot protocol: keep the evaluated weights with the best mIoU.

ADVENT and the CFContra code evaluate every saved snapshot and report the best one.
Here every evaluation (during training and --mode=eval) calls `keep_if_best`: when
its mIoU beats the one in <workdir>/<prefix>/best.json, the inference variables it
evaluated (student parameters and BatchNorm statistics) are saved under
<workdir>/best/<step> and best.json is rewritten (the evaluation's report plus
`snapshot`, the folder). The folder has a checkpointer of its own, so the rotation of
the training checkpoints (train.keep_checkpoints) never deletes it, and a later, worse
evaluation leaves it alone; ties keep the earlier step.

The snapshot is saved before best.json (written by evaluate.py beside latest.json)
names it, and the folder keeps the last two snapshots: a run that dies in between
leaves best.json naming the previous one, still on disk. Every process reads
best.json (the workdir is shared, as orbax needs). Reports of another evaluation set
(`eval.dataset='source'`, prefix eval_source) keep theirs in best_eval_source/.

  variables, record = best_snapshot.restore(workdir, abstract_variables)
"""

import json
import os

from confeti_jax import checkpoint

_KEEP = 2  # the best and the one before it (see the docstring)
METRIC = "miou"  # the head's own mean IoU (19 classes, or 16 with class_set synthia16)


def snapshot_dir(workdir, prefix="eval"):
  """Where the best snapshot of the reports in <workdir>/<prefix>/ lives."""
  return os.path.join(os.path.abspath(workdir), "best" if prefix == "eval" else f"best_{prefix}")


def read_record(workdir, prefix="eval"):
  """The dict of <workdir>/<prefix>/best.json, or None before the first evaluation."""
  path = os.path.join(workdir, prefix, "best.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _improves(value, best):
  if value is None:  # no class had ground truth: nothing to rank
    return False
  return best is None or best.get(METRIC) is None or value > best[METRIC]


def keep_if_best(workdir, prefix, step, result, variables):
  """Saves `variables` as the best snapshot if `result`'s mIoU beats best.json's.

  Called on every process with the same `result` (the snapshot save is collective).
  Returns the snapshot's folder when it was replaced (the caller then writes
  best.json: evaluate.write_best), else None.
  """
  if not _improves(result.get(METRIC), read_record(workdir, prefix)):
    return None
  ckpt = checkpoint.Checkpointer(snapshot_dir(workdir, prefix), keep=_KEEP, async_save=False)
  try:
    ckpt.save(int(step), variables)
  finally:
    ckpt.close()
  return os.path.join(snapshot_dir(workdir, prefix), str(int(step)))


def restore(workdir, abstract_variables, prefix="eval"):
  """(inference variables of the best snapshot, its best.json dict).

  `abstract_variables` mirrors what `method.inference_variables` returns (shapes,
  dtypes and shardings), e.g. jax.eval_shape of it.
  """
  record = read_record(workdir, prefix)
  if record is None:
    raise FileNotFoundError(f"No {os.path.join(workdir, prefix, 'best.json')}: nothing was "
                            "evaluated in this workdir yet.")
  ckpt = checkpoint.Checkpointer(snapshot_dir(workdir, prefix), keep=_KEEP, async_save=False)
  try:
    variables = ckpt.restore(int(record["step"]), abstract_variables)
  finally:
    ckpt.close()
  return variables, record
