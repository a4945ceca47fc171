"""Runs variants x seeds of a config and writes a markdown table of target mIoU.

  python scripts/ablations.py --config=configs/toy.py --variants=source_only,dacs \
      --seeds=0,1,2 --root=workdirs/ablations

A variant is a method name, or `label=method[;key=value;...]` with config
overrides, e.g. `dacs_nofd=dacs;method.fd_lambda=0`. Each run is
`python -m confeti_jax.main` in `<root>/<label>/seed_<s>` (an existing finished run
is reused, an interrupted one resumes), and the table gives mean and standard
deviation (population, over seeds) of the final target mIoU with per-class means,
in the papers' column order. Also written: `<root>/results.md` and `results.json`.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

_CONFIG = flags.DEFINE_string("config", "configs/toy.py", "Config file (without :arg).")
_VARIANTS = flags.DEFINE_list("variants", ["source_only"], "Variants (see module doc).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_OUT = flags.DEFINE_string("root", "workdirs/ablations", "Folder of the runs and the table.")
_EXTRA = flags.DEFINE_multi_string("override", [], "Overrides for every run: key=value.")


def parse_variant(spec):
  label, _, rest = spec.partition("=")
  if not rest:
    return label, label, []
  method, *overrides = rest.split(";")
  return label, method, overrides


def run_one(method, overrides, seed, workdir):
  result = os.path.join(workdir, "eval", "latest.json")
  cmd = [sys.executable, "-m", "confeti_jax.main", f"--config={_CONFIG.value}:method={method}",
         f"--workdir={workdir}", f"--config.seed={seed}"]
  cmd += [f"--config.{o}" for o in list(_EXTRA.value) + overrides]
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"Run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
  with open(result) as f:
    out = json.load(f)
  out["wall_s"] = time.time() - t0
  return out


def table(rows, class_names):
  from confeti_jax import evaluate

  short = [evaluate.SHORT_NAMES.get(c, c) for c in class_names]
  lines = ["| variant | seeds | " + " | ".join(short) + " | mIoU (mean ± std) |",
           "|---|---:|" + "---:|" * len(short) + "---:|"]
  for label, results in rows:
    per_class = []
    for c in class_names:
      vals = [r["per_class_iou"][c] for r in results if r["per_class_iou"].get(c) is not None]
      per_class.append(f"{np.mean(vals):.1f}" if vals else "-")
    mious = np.array([r["miou"] for r in results])
    lines.append(f"| {label} | {len(results)} | " + " | ".join(per_class)
                 + f" | {mious.mean():.2f} ± {mious.std():.2f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  from confeti_jax.data import labels

  rows, raw = [], {}
  for spec in _VARIANTS.value:
    label, method, overrides = parse_variant(spec)
    results = []
    for seed in _SEEDS.value:
      workdir = os.path.abspath(os.path.join(_OUT.value, label, f"seed_{seed}"))
      print(f"[{label} seed {seed}] {workdir}", flush=True)
      results.append(run_one(method, overrides, seed, workdir))
      print(f"  mIoU {results[-1]['miou']:.2f} ({results[-1]['wall_s']:.0f} s)", flush=True)
    rows.append((label, results))
    raw[label] = [{"seed": s, "miou": r["miou"], "step": r["step"], "wall_s": r["wall_s"]}
                  for s, r in zip(_SEEDS.value, results)]
  text = table(rows, labels.CLASSES)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "results.md"), "w") as f:
    f.write(f"Target val mIoU, {_CONFIG.value}, seeds {','.join(_SEEDS.value)}\n\n{text}\n")
  with open(os.path.join(_OUT.value, "results.json"), "w") as f:
    json.dump(raw, f, indent=2)
  print(text)


if __name__ == "__main__":
  app.run(main)
