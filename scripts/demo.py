"""`make demo`: train and evaluate the toy benchmark, then show the domain gap.

Trains `configs/toy.py` (source-only DeepLabV2 by default) in --workdir, evaluates
on the target val split during training, then on the held-out source split, and
prints both mIoUs with the wall time. Rerunning resumes or, when finished, only
re-evaluates.

  python scripts/demo.py --workdir=workdirs/toy_demo [--config=configs/toy.py:...]

With `--method=confeti` (short for --config=configs/toy.py:method=confeti) it runs
the CONFETI pipeline (stage 0 CUT, stage 1 joint, stage 2 with G frozen) in
--workdir (default workdirs/toy_demo_confeti), a source-only baseline with the same
settings in --baseline_workdir (default <workdir>/source_only), prints both target
mIoUs, and writes <workdir>/eval/grid.png (source | stylised | target | prediction |
ground truth).
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
_METHOD = flags.DEFINE_string(
    "method", None, "Shorthand for --config=configs/toy.py:method=NAME, e.g. confeti.")
_BASELINE = flags.DEFINE_string(
    "baseline_workdir", None, "Source-only run the CONFETI demo compares with "
    "(default <workdir>/source_only; trained there when missing).")


def _read(folder, prefix="eval"):
  with open(os.path.join(folder, prefix, "latest.json")) as f:
    return json.load(f)


def _report(lines, workdir):
  """Prints the result block once (stdout) and keeps a copy in workdir/demo.txt."""
  text = "\n".join(lines)
  print(text, flush=True)
  with open(os.path.join(workdir, "demo.txt"), "w") as f:
    f.write(text.lstrip("\n") + "\n")


def single_stage(config, workdir):
  """The default demo: one run, its target and held-out source mIoU (the domain gap)."""
  from confeti_jax import evaluate, train

  t0 = time.time()
  train.train_and_evaluate(config, workdir)
  train_s = time.time() - t0
  config.eval.dataset = "source"
  evaluate.run(config, workdir)
  total_s = time.time() - t0

  target, source = _read(workdir), _read(workdir, "eval_source")
  grid = comparison_grid(config, workdir, [(config, workdir)])
  _report([
      "",
      f"confeti_jax toy demo ({config.method.name}, {config.model.backbone} "
      f"x{config.model.width}, {config.train.steps} steps)",
      f"  target val mIoU  {target['miou']:6.2f}  ({target['num_images']} images, "
      f"{target['dataset']})",
      f"  source val mIoU  {source['miou']:6.2f}  ({source['num_images']} images, "
      f"{source['dataset']})",
      f"  domain gap       {source['miou'] - target['miou']:6.2f} mIoU points",
      f"  wall time        {train_s:6.1f} s training+eval, {total_s:6.1f} s with source eval",
      f"  predictions      {grid}",
      f"  outputs          {workdir}/eval/latest.md, metrics.jsonl, tensorboard/",
      f"  report           python scripts/report.py --workdir={workdir}",
  ], workdir)


def comparison_grid(config, workdir, runs):
  """visualize/grid.png of `runs` [(config, workdir)] on the target val images: image,
  ground truth, then each run's prediction and error map."""
  from confeti_jax import sharding, visualize

  mesh = sharding.make_mesh()
  restored = [visualize.load_run(c, w, mesh, use_fallback=True) for c, w in runs]
  return visualize.write_grid(config, workdir, restored)


def baseline_config(config):
  """`config` with the source-only method: the same data, model, schedule and seed."""
  import ml_collections

  from configs import common

  baseline = ml_collections.ConfigDict(config.to_dict())
  baseline.method = common.method_config("source_only")
  return baseline


def pipeline(config, workdir, baseline_workdir):
  """CONFETI's stages, a source-only baseline, their target mIoUs and the demo grid."""
  from confeti_jax import stages, stylize, train

  plan = stages.plan_for(config, workdir) or [("single", config, workdir)]
  t0 = time.time()
  stages.run(config, workdir, plan)
  pipeline_s = time.time() - t0
  train.train_and_evaluate(baseline_config(config), baseline_workdir)
  total_s = time.time() - t0
  try:
    grid = stylize.demo_grid(config, workdir)
  except FileNotFoundError as error:  # e.g. method.pixel_alignment=False: no generator
    logging.warning("No demo grid: %s", error)
    grid = "(no grid: the run has no CUT generator)"

  ours, base = _read(workdir), _read(baseline_workdir)
  comparison = comparison_grid(config, workdir, [(config, workdir),
                                                 (baseline_config(config), baseline_workdir)])
  steps = ", ".join(f"{name} {int(c.train.steps)}" for name, c, _ in plan)
  _report([
      "",
      f"confeti_jax toy demo ({config.method.name}: {steps} steps; "
      f"{config.model.backbone} x{config.model.width})",
      f"  target val mIoU  {ours['miou']:6.2f}  {config.method.name} "
      f"({ours['num_images']} images, {ours['dataset']})",
      f"  target val mIoU  {base['miou']:6.2f}  source_only",
      f"  gain             {ours['miou'] - base['miou']:6.2f} mIoU points",
      f"  wall time        {pipeline_s:6.1f} s pipeline, {total_s:6.1f} s with the baseline",
      f"  pictures         {grid} (source | stylised | target | prediction | ground truth)",
      f"                   {comparison} (predictions and errors, both runs)",
      f"  outputs          {workdir}/eval/latest.md, stage*/ (each stage: metrics, tensorboard)",
      f"  report           python scripts/report.py --workdir={workdir} "
      f"--workdir={baseline_workdir}",
  ], workdir)


def main(argv):
  del argv
  from confeti_jax import compile_cache, writer

  writer.quiet_library_logs()
  compile_cache.enable()
  config = _CONFIG.value
  if _METHOD.value and _METHOD.value != config.method.name:
    raise app.UsageError(f"--method={_METHOD.value} but --config selects method "
                         f"{config.method.name!r}; pass one of them.")
  name = config.method.name
  if name == "confeti":  # its own default folder: it cannot share the source-only run's
    workdir = os.path.abspath(_WORKDIR.value if _WORKDIR.present else "workdirs/toy_demo_confeti")
    pipeline(config, workdir, os.path.abspath(
        _BASELINE.value or os.path.join(workdir, "source_only")))
  else:
    single_stage(config, os.path.abspath(_WORKDIR.value))


def _expand_method(argv):
  """--method=NAME without --config stands for --config=configs/toy.py:method=NAME, so
  --config.x=... overrides still apply."""
  if any(a == "--config" or a.startswith("--config=") for a in argv):
    return argv
  for i, arg in enumerate(argv):
    value = arg.split("=", 1)[1] if arg.startswith("--method=") else (
        argv[i + 1] if arg == "--method" and i + 1 < len(argv) else None)
    if value:
      path = os.path.join(_ROOT, "configs", "toy.py")
      return [argv[0], f"--config={path}:method={value}"] + argv[1:]
  return argv


if __name__ == "__main__":
  app.run(main, argv=_expand_method(sys.argv))
