"""Plot logged scalars of one or more runs from their `metrics.jsonl` into one PNG.

    python scripts/plot_metrics.py --out curves.png --keys=loss,loss_src_reg \
        before=workdirs/a/stage1 after=workdirs/b/stage1

Each positional argument is `label=PATH`, PATH a workdir (or stage folder) holding
`metrics.jsonl`, or the file itself. One panel per key, one line per run. A run whose
value stops being finite is cut there and marked with a cross at its last finite point,
labelled with the first non-finite step, so a divergence is seen at a glance.
Needs matplotlib (`pip install matplotlib`); training does not.
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from confeti_jax import writer  # noqa: E402


def read_rows(path):
  """The JSON rows of a run's metrics.jsonl (a later row for the same step replaces an
  earlier one, as after a resume that replayed logged steps)."""
  if os.path.isdir(path):
    path = os.path.join(path, writer.METRICS_FILE)
  if not os.path.isfile(path):
    raise SystemExit(f"plot_metrics: no metrics file at {path}; pass a workdir that has "
                     "trained (or its stageN folder) or the metrics.jsonl itself.")
  by_step = {int(row["step"]): row for row in writer.read_rows(path)}
  return [by_step[s] for s in sorted(by_step)]


def series(rows, key):
  """(steps, values, first non-finite step or None) of `key`, values up to that step."""
  steps, values = [], []
  for row in rows:
    if key not in row:
      continue
    value = row[key]
    if value is None or not math.isfinite(value):
      return steps, values, int(row["step"])
    steps.append(int(row["step"]))
    values.append(float(value))
  return steps, values, None


def plot(runs, keys, out, title=""):
  """Write the panel figure of `keys` for `runs` ([(label, rows)]) to `out`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.6 * len(keys)), sharex=True,
                           squeeze=False)
  for ax, key in zip(axes[:, 0], keys):
    for index, (label, rows) in enumerate(runs):
      steps, values, bad = series(rows, key)
      colour = f"C{index}"
      text = label if bad is None else f"{label} (non-finite from step {bad})"
      ax.plot(steps, values, color=colour, lw=1.2, label=text)
      if bad is not None and steps:
        ax.plot(steps[-1], values[-1], "x", color=colour, ms=10, mew=2)
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
  axes[-1, 0].set_xlabel("step")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out + ".tmp.png", dpi=110)
  os.replace(out + ".tmp.png", out)  # never a half-written PNG at `out`
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("runs", nargs="+", help="label=PATH (workdir or metrics.jsonl)")
  parser.add_argument("--keys", default="loss", help="comma-separated scalar names")
  parser.add_argument("--out", required=True, help="PNG to write")
  parser.add_argument("--title", default="")
  args = parser.parse_args(argv)
  runs = []
  for spec in args.runs:
    label, sep, path = spec.partition("=")
    if not sep:
      raise SystemExit(f"plot_metrics: {spec!r} is not label=PATH, e.g. before=workdirs/a")
    runs.append((label, read_rows(path)))
  keys = [k for k in args.keys.split(",") if k]
  missing = [k for k in keys if not any(k in r for _, rows in runs for r in rows)]
  if missing:
    raise SystemExit(f"plot_metrics: no run logged {missing}; the first run's keys are "
                     f"{sorted(runs[0][1][0]) if runs[0][1] else []}")
  plot(runs, keys, args.out, args.title)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  sys.exit(main())
