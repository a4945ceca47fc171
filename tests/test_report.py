"""scripts/report.py: one self-contained HTML page from a workdir's files, no training."""

import base64
import io
import json
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import report  # noqa: E402

CLASSES = ["road", "sidewalk", "traffic light", "bicycle"]


def _eval_record(step, miou, ious):
  return {"step": step, "model": "dacs/deeplabv2_resnet18", "dataset": "toy cityscapes val",
          "miou": miou, "per_class_iou": dict(zip(CLASSES, ious)), "num_images": 4}


def _fake_workdir(folder):
  """A workdir as a two-evaluation training leaves it, with one PNG in eval/."""
  os.makedirs(os.path.join(folder, "eval"))
  with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
    for step in range(1, 6):
      f.write(json.dumps({"step": step, "loss": 3.0 / step, "loss_src_seg": 2.0 / step,
                          "lr_backbone": 1e-4 * step, "pseudo_acc": 0.1 * step,
                          "pseudo_weight": 0.2 * step, "grad_norm": 4.0}) + "\n")
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"method": {"name": "dacs"}, "model": {"backbone": "resnet18"},
               "data": {"source": {"kind": "gta5"}, "target": {"kind": "cityscapes"}}}, f)
  first = _eval_record(2, 41.25, [80.5, 12.75, None, 30.5])
  second = _eval_record(4, 37.5, [77.25, 10.5, 0.0, 62.25])
  for record in (first, second):
    with open(os.path.join(folder, "eval", f"step_{record['step']}.json"), "w") as f:
      json.dump(record, f)
  for name, record in (("latest.json", second), ("best.json", first)):
    with open(os.path.join(folder, "eval", name), "w") as f:
      json.dump(record, f)
  pixels = np.zeros((6, 8, 3), np.uint8)
  pixels[:, :4] = (255, 0, 0)
  Image.fromarray(pixels).save(os.path.join(folder, "eval", "grid.png"))


def test_the_page_holds_the_files_numbers_and_image_and_nothing_external(tmp_path, capsys):
  workdir = str(tmp_path / "run_a")
  _fake_workdir(workdir)
  out = str(tmp_path / "out" / "report.html")
  report.main([f"--workdir={workdir}", f"--out={out}"])
  assert capsys.readouterr().out.strip().endswith(out)
  text = open(out).read()
  for short in ("road", "side.", "light", "bike"):  # the papers' column names
    assert f">{short}</th>" in text
  for value in ("41.2", "37.5", "80.5", "62.2", "12.8"):  # mIoU, per-class IoU (.1f)
    assert value in text
  assert "run_a" in text and "dacs/deeplabv2_resnet18" in text
  with open(os.path.join(workdir, "eval", "grid.png"), "rb") as f:
    grid_uri = "data:image/png;base64," + base64.b64encode(f.read()).decode()
  assert grid_uri in text and "eval/grid.png</figcaption>" in text
  curves = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
  assert len(curves) >= 2  # the curves figure and grid.png
  assert all(Image.open(io.BytesIO(base64.b64decode(c))).size[0] > 0 for c in curves)
  assert "<details>" in text and "&quot;dacs&quot;" in text  # the escaped config
  assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text)
  assert not [n for n in os.listdir(tmp_path / "out") if n != "report.html"]  # no temp file


def test_the_stages_of_a_pipeline_each_get_curves(tmp_path):
  workdir = tmp_path / "confeti"
  for stage in ("stage1", "stage2"):
    _fake_workdir(str(workdir / stage))
  out = report.write_report([str(workdir)], str(tmp_path / "report.html"))
  text = open(out).read()
  assert "confeti / stage1" in text and "confeti / stage2" in text
  assert 'id="run-confeti-stage1"' in text and 'id="run-confeti-stage2"' in text


def test_a_folder_that_is_no_workdir_names_the_path_and_the_fix(tmp_path):
  bad = tmp_path / "not_a_run"
  bad.mkdir()
  with pytest.raises(SystemExit) as error:
    report.main([f"--workdir={bad}", f"--out={tmp_path / 'report.html'}"])
  message = str(error.value)
  assert str(bad) in message and "metrics.jsonl" in message and "--workdir" in message
  assert not (tmp_path / "report.html").exists()
