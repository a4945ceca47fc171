"""Runs made of several training stages in one workdir (CONFETI's CUT -> joint -> second).

A method class that needs more than one stage defines
`stage_plan(config, workdir) -> [(name, stage_config, stage_workdir), ...]`; everything
else trains in one stage. `run` trains the stages in order, each in its own
sub-folder with its own checkpoints, skips a stage whose final checkpoint exists, and
resumes the one that was interrupted, so rerunning the same command always continues
the pipeline. The last stage's evaluation is copied to `workdir/eval/` so a
pipeline reports where a single-stage run does.
"""

import os
import shutil

import jax
import ml_collections
from absl import logging

from confeti_jax import checkpoint, methods, train


def plan_for(config, workdir):
  """The stage plan of `config`'s method, or None for a single-stage method."""
  cls = methods.method_class(config.method.name)
  plan_fn = getattr(cls, "stage_plan", None)
  return plan_fn(config, os.path.abspath(workdir)) if plan_fn else None


def derive(config, **updates):
  """An unlocked copy of `config` with dotted-key `updates` applied (stage configs)."""
  out = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in updates.items():
    node = out
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return out


def latest_step(workdir):
  """The step of the newest finished checkpoint in `workdir`, or None."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  ckpt = checkpoint.Checkpointer(directory)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def finished(stage_config, stage_workdir):
  step = latest_step(stage_workdir)
  return step is not None and step >= int(stage_config.train.steps)


def require_finished(stage_workdir, what):
  """The checkpoint directory of a finished earlier stage, or an error saying what to run."""
  step = latest_step(stage_workdir)
  if step is None:
    raise FileNotFoundError(
        f"{what} needs the checkpoint of an earlier stage in {stage_workdir}, and there is "
        "none. Run the whole pipeline (without :stage=N), or that stage first.")
  return os.path.join(stage_workdir, "checkpoints"), step


def restore_params(stage_workdir, abstract, what):
  """Host copies of `abstract`'s leaves (a dict mirroring TrainState) from a stage's
  latest checkpoint; used at initialisation, where they enter the jitted init as constants."""
  directory, step = require_finished(stage_workdir, what)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  ckpt = checkpoint.Checkpointer(directory)
  try:
    restored = ckpt.restore_subtree(step, abstract)
  finally:
    ckpt.close()
  logging.info("%s: read %s from step %d of %s", what, list(abstract), step, directory)
  return jax.device_get(restored)


def run(config, workdir, plan=None):
  """Trains every stage of the plan in order; returns the last stage's final state."""
  plan = plan if plan is not None else plan_for(config, workdir)
  state = None
  for name, stage_config, stage_workdir in plan:
    if finished(stage_config, stage_workdir):
      logging.info("Stage %s is finished in %s; skipping it.", name, stage_workdir)
      continue
    logging.info("Stage %s: training in %s", name, stage_workdir)
    state = train.train_and_evaluate(stage_config, stage_workdir)
    if int(jax.device_get(state.step)) < int(stage_config.train.steps):
      logging.warning("Stage %s stopped early (preemption or stop_at_step); rerun the same "
                      "command to continue the pipeline.", name)
      return state
  _publish_last_eval(plan, workdir)
  return state


def _publish_last_eval(plan, workdir):
  """Copies the last evaluated stage's eval/ folder to workdir/eval (process 0)."""
  if jax.process_index() != 0:
    return
  for _, _, stage_workdir in reversed(plan):
    source = os.path.join(stage_workdir, "eval")
    if os.path.isfile(os.path.join(source, "latest.json")):
      target = os.path.join(workdir, "eval")
      tmp = target + ".tmp"
      shutil.rmtree(tmp, ignore_errors=True)
      shutil.copytree(source, tmp)
      shutil.rmtree(target, ignore_errors=True)
      os.replace(tmp, target)
      return
