"""scripts/plot_metrics.py: divergence cut at the first non-finite step, replayed steps once."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import plot_metrics  # noqa: E402

pytest.importorskip("matplotlib")


def _write(path, rows):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")  # json writes NaN as NaN, as the trainer's writer


def test_series_stops_at_the_first_non_finite_value_and_replays_replace(tmp_path):
  rows = [{"step": s, "loss": 1.0 / s} for s in (10, 20, 30)]
  rows += [{"step": 20, "loss": 7.0}, {"step": 40, "loss": float("nan")},
           {"step": 50, "loss": 0.1}]
  _write(str(tmp_path / "a"), rows)
  read = plot_metrics.read_rows(str(tmp_path / "a"))
  assert [r["step"] for r in read] == [10, 20, 30, 40, 50]
  steps, values, bad = plot_metrics.series(read, "loss")
  assert steps == [10, 20, 30] and values[1] == 7.0 and bad == 40


def test_the_figure_is_written_and_names_bad_input(tmp_path, capsys):
  _write(str(tmp_path / "ok"), [{"step": s, "loss": np.sin(s / 5.0)} for s in range(1, 60)])
  _write(str(tmp_path / "nan"), [{"step": s, "loss": s if s < 30 else float("inf")}
                                 for s in range(1, 60)])
  out = str(tmp_path / "fig" / "curves.png")
  plot_metrics.main([f"ok={tmp_path / 'ok'}", f"nan={tmp_path / 'nan' / 'metrics.jsonl'}",
                     "--keys=loss", f"--out={out}"])
  image = np.asarray(Image.open(out).convert("L"))
  assert image.shape[0] > 200 and image.std() > 5 and not os.path.exists(out + ".tmp.png")
  with pytest.raises(SystemExit, match="no metrics file at"):
    plot_metrics.main([f"x={tmp_path / 'missing'}", f"--out={out}"])
  with pytest.raises(SystemExit, match="no run logged"):
    plot_metrics.main([f"ok={tmp_path / 'ok'}", "--keys=loss_xyz", f"--out={out}"])
