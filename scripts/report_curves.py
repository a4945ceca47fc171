"""The curves of scripts/report.py: which logged keys a stage has, drawn as one PNG.

Panels: losses, CUT losses, learning rates, mIoU of the evaluations, pseudo-label
accuracy and q, gradient norm, steps/s. Reads rows with scripts/plot_metrics.py's
`series`, so a curve that turns non-finite ends in a cross there too. Needs matplotlib.
"""

import io
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plot_metrics  # noqa: E402

from confeti_jax import evaluate  # noqa: E402

# Evaluation folders: the target val split, and the source val split (eval.dataset=source).
EVAL_FOLDERS = {"eval": "target val", "eval_source": "source val"}
SUBSET_KEYS = ("miou16", "miou13")
PSEUDO_KEYS = ("pseudo_acc", "pseudo_weight")
LEGEND_INSIDE_MAX = 5  # lines in a panel whose legend still fits inside it



def _eval_rows(stage, prefix, key):
  return [r for r in stage.evals.get(prefix, []) if key in r]


def keys_of(rows, accept):
  """Logged keys that `accept`s, 'loss' first then alphabetical (the legend's order)."""
  keys = {k for row in rows for k in row if k != "step" and accept(k)}
  return sorted(keys, key=lambda k: (k != "loss", k))


def panels_of(stage):
  """[(title, [(label, rows, key)], log_y, markers)] of the curves a stage has logged;
  markers for the evaluations, which are few points."""
  rows = stage.rows
  panels = []
  losses = keys_of(rows, lambda k: k == "loss" or k.startswith("loss_"))
  if losses:
    panels.append(("losses", [(k, rows, k) for k in losses], False, False))
  cut_losses = keys_of(rows, lambda k: k.startswith("cut_loss"))  # CONFETI's joint stage
  if cut_losses:
    panels.append(("CUT losses", [(k, rows, k) for k in cut_losses], False, False))
  rates = keys_of(rows, lambda k: k == "lr" or k.startswith("lr_"))
  if rates:
    panels.append(("learning rates", [(k, rows, k) for k in rates], True, False))
  lines = []
  for prefix, split in EVAL_FOLDERS.items():
    for key, title in [("miou", "mIoU")] + [(k, evaluate._SUBSET_TITLES[k]) for k in SUBSET_KEYS]:
      records = _eval_rows(stage, prefix, key)
      if records:
        lines.append((f"{title} ({split})", records, key))
  if lines:
    panels.append(("mIoU of the evaluations (%)", lines, False, True))
  pseudo = [k for k in PSEUDO_KEYS if any(k in r for r in rows)]
  if pseudo:
    names = {"pseudo_acc": "pseudo-label accuracy", "pseudo_weight": "pseudo_weight (q)"}
    panels.append(("pseudo-labels", [(names[k], rows, k) for k in pseudo], False, False))
  for key, title in (("grad_norm", "gradient norm"), ("steps_per_sec", "steps / s")):
    if any(key in r for r in rows):
      panels.append((title, [(key, rows, key)], False, False))
  return panels


def plotted_keys(panels):
  return {key for _, lines, *_ in panels for _, _, key in lines}


def _pyplot():
  try:
    import matplotlib
  except ImportError:
    raise SystemExit("report: needs matplotlib for the curves; `pip install matplotlib`.")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def figure_png(panels, title=""):
  """PNG bytes of `panels` two per row; a line that turns non-finite ends in a cross, as
  in plot_metrics, labelled with the first non-finite step."""
  plt = _pyplot()
  columns = 2 if len(panels) > 1 else 1
  grid_rows = math.ceil(len(panels) / columns)
  from matplotlib.ticker import MaxNLocator
  fig, axes = plt.subplots(grid_rows, columns, figsize=(6.2 * columns, 3.1 * grid_rows),
                           squeeze=False, layout="constrained")
  for ax in axes.flat[len(panels):]:
    ax.set_visible(False)
  for ax, (panel_title, lines, log_y, markers) in zip(axes.flat, panels):
    all_values = []
    for index, (label, rows, key) in enumerate(lines):
      steps, values, bad = plot_metrics.series(rows, key)
      colour = f"C{index}" if len(lines) <= 10 else plt.cm.tab20(index % 20)
      text = label if bad is None else f"{label} (non-finite from step {bad})"
      ax.plot(steps, values, color=colour, lw=1.2, marker="o" if markers else None, ms=4,
              label=text)
      if bad is not None and steps:
        ax.plot(steps[-1], values[-1], "x", color=colour, ms=10, mew=2)
      all_values += values
    if log_y and all_values and min(all_values) > 0 and max(all_values) > 10 * min(all_values):
      ax.set_yscale("log")
    ax.set_title(panel_title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    eval_steps = sorted({int(r["step"]) for _, rows, _ in lines for r in rows})
    if markers and len(eval_steps) <= 12:  # the evaluated steps themselves, not 20.5
      ax.set_xticks(eval_steps)
    ax.grid(alpha=0.3)
    if len(lines) > LEGEND_INSIDE_MAX:  # below the axes, where it hides no curve
      ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    else:
      ax.legend(fontsize=7, loc="best")
  if title:
    fig.suptitle(title)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=90)
  plt.close(fig)
  return buffer.getvalue()
