"""Shared by scripts/ablations.py and scripts/paper_tables.py: one training run as a
subprocess (reused once finished, resumed when interrupted) and the markdown tables of
finished runs (mean and population standard deviation over seeds)."""

import json
import os
import subprocess
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

RUN_RECORD = "table_run.json"


def launch(config_arg, overrides, seed, workdir, extra_args=()):
  """Trains one run (or reuses its finished record); returns eval/latest.json + wall_s.

  The output goes to `<workdir>/run.log`; a failure raises with the log's tail and path.
  """
  cmd = [sys.executable, "-m", "confeti_jax.main", f"--config={config_arg}",
         f"--workdir={workdir}", f"--config.seed={seed}"]
  cmd += [f"--config.{o}" for o in overrides] + list(extra_args)
  record_path = os.path.join(workdir, RUN_RECORD)
  if os.path.isfile(record_path):
    with open(record_path) as f:
      record = json.load(f)
    if record["cmd"][1:] == cmd[1:]:
      return {**record["result"], "wall_s": record["wall_s"], "reused": True}
    raise RuntimeError(f"{workdir} holds a different finished run ({record_path}); use "
                       "another --root or delete that folder.")
  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, "run.log")
  t0 = time.time()
  with open(log_path, "a") as log:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, cwd=_ROOT, stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode != 0:
    with open(log_path) as f:
      tail = "".join(f.readlines()[-30:])
    raise RuntimeError(f"{tail}\nRun failed (exit {proc.returncode}); its log: {log_path}")
  with open(os.path.join(workdir, "eval", "latest.json")) as f:
    result = json.load(f)
  wall = time.time() - t0
  tmp = record_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"cmd": cmd, "result": result, "wall_s": wall}, f)
  os.replace(tmp, record_path)
  return {**result, "wall_s": wall, "reused": False}


def train_metric(workdir, key, fraction=0.1):
  """Mean of `key` over the last `fraction` of metrics.jsonl rows that log it (or None)."""
  from confeti_jax import writer

  rows = [r[key] for r in writer.read_rows(os.path.join(workdir, writer.METRICS_FILE))
          if r.get(key) is not None]
  if not rows:
    return None
  return float(np.mean(rows[-max(1, int(round(len(rows) * fraction))):]))


def metric_value(result, workdir, key):
  """A table metric: an eval/latest.json key, or 'train:KEY' from metrics.jsonl."""
  if key.startswith("train:"):
    return train_metric(workdir, key.split(":", 1)[1])
  return result.get(key)


def class_columns(results):
  """Class names for per-class columns: SYNTHIA results keep their 16 classes."""
  from confeti_jax import evaluate
  from confeti_jax.data import labels

  if results and "miou16" in results[0] and len(results[0]["per_class_iou"]) == 19:
    return [labels.CLASSES[i] for i in evaluate.SYNTHIA_SUBSETS["miou16"]]
  return list(results[0]["per_class_iou"]) if results else list(labels.CLASSES)


def _mean_std(values):
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  digits = 3 if max(abs(v) for v in values) < 1 else 2
  return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def table(rows, *, metrics=("miou",), per_class=True, paper=None):
  """Markdown: one line per (label, [(result, workdir), ...]); `paper` maps label to the
  paper's figures (one per metric) for a last column."""
  from confeti_jax import evaluate

  titles = {"miou": "mIoU", "miou16": "mIoU16", "miou13": "mIoU13"}
  extra = [m for m in ("miou16", "miou13") if m not in metrics and per_class
           and rows and rows[0][1] and m in rows[0][1][0][0]]
  heads = [titles.get(m, m.split(":")[-1]) + " (mean ± std)" for m in list(metrics) + extra]
  classes = class_columns([r for r, _ in rows[0][1]]) if per_class and rows else []
  short = [evaluate.SHORT_NAMES.get(c, c) for c in classes]
  cols = ["row", "seeds"] + short + heads + (["paper"] if paper else [])
  lines = ["| " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * (len(cols) - 2)]
  for label, runs in rows:
    cells = [label, str(len(runs))]
    for c in classes:
      vals = [r["per_class_iou"].get(c) for r, _ in runs]
      vals = [v for v in vals if v is not None]
      cells.append(f"{np.mean(vals):.1f}" if vals else "-")
    for m in list(metrics) + extra:
      cells.append(_mean_std([metric_value(r, w, m) for r, w in runs]))
    if paper:
      cells.append(" / ".join("-" if v is None else str(v) for v in paper.get(label, ())))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def eta_line(done, total, spent, fresh):
  """'k/N, elapsed, ETA' from the runs trained in this call (reused ones cost nothing)."""
  eta = "?" if not fresh else f"{(total - done) * spent / fresh / 60:.0f} min"
  return f"{done}/{total} runs, {spent / 60:.1f} min trained, ETA {eta}"
