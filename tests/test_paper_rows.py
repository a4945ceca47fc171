"""Every paper row (configs/paper_rows.py) is a valid command, real and in miniature, and
the table runner trains, reuses and tabulates runs.

Loading every row checks its config arguments and overrides against the config files,
its stage plan, and builds the method of its first stage (option names are validated
there). One row is trained end to end through scripts/paper_tables.py on the tiny toy;
`make paper-rows` trains every row that way (3 steps per stage), too long for the suite.
"""

import ast
import json
import os
import subprocess
import sys

import pytest

from confeti_jax import methods, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import result_tables  # noqa: E402

from configs import paper_rows  # noqa: E402
from tests.test_configs import _exec  # noqa: E402


def _with_overrides(config, overrides):
  """`--config.KEY=VALUE` as the command line applies it (literal, else a string)."""
  for item in overrides:
    key, _, raw = item.partition("=")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    assert leaf in node, f"override {key} names no config key"
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return config


def _load(row, toy):
  config_arg = paper_rows.toy_config_arg(row) if toy else paper_rows.config_arg(row)
  if toy:
    config_arg += ",tiny=1"
  overrides = paper_rows.overrides(row, toy=toy)
  if row.needs:
    overrides.append("data.source.root=/stylised")
  return _with_overrides(_exec(os.path.join(ROOT, config_arg)), overrides)


@pytest.mark.parametrize("toy", [False, True], ids=["paper", "toy"])
def test_every_row_loads_plans_and_builds(toy, tmp_path):
  assert len(paper_rows.ROWS) >= 50 and set(r.table for r in paper_rows.ROWS) == set(
      paper_rows.TABLES)
  for row in paper_rows.ROWS:
    config = _load(row, toy)
    assert config.method.name == row.method, row.id
    assert len(row.paper) == len(paper_rows.TABLES[row.table].metrics), row.id
    plan = stages.plan_for(config, str(tmp_path / row.id.replace(".", "_")))
    first = plan[0][1] if plan else config
    methods.build(first)  # validates every method option of the row


def test_table3_models_are_the_papers_definitions():
  by_model = {m: _load(paper_rows.ROWS_BY_ID[f"confeti.t3.{m}"], toy=False).method
              for m in "ABCDE"}
  full = _load(paper_rows.ROWS_BY_ID["confeti.t3.confeti"], toy=False).method
  # (style transfer offline / joint / two-stage, PCL) as the paper's Table 3 marks them.
  def marks(m):
    styled = m.pixel_alignment
    return (styled and m.style_training == "frozen", styled and m.style_training == "joint",
            styled and "2" in m.stages, m.proto.enabled and m.proto.pcl)
  assert marks(by_model["A"]) == (True, False, False, False)
  assert marks(by_model["B"]) == (False, False, False, True)
  assert marks(by_model["C"]) == (True, False, False, True)
  assert marks(by_model["D"]) == (False, True, False, False)
  assert marks(by_model["E"]) == (False, True, True, False)
  assert marks(full) == (False, True, True, True)
  assert not by_model["A"].proto.enabled and by_model["D"].proto.enabled  # D keeps L_SC


def test_full_resolution_row_crops_1024_and_slides():
  config = _load(paper_rows.ROWS_BY_ID["confeti.t1.confeti_full"], toy=False)
  assert tuple(config.data.crop_size) == (1024, 1024) == tuple(config.method.stage2_crop)
  assert tuple(config.data.source.scale) == (2560, 1440)
  assert config.eval.mode == "slide" and tuple(config.eval.stride) == (512, 512)
  with pytest.raises(ValueError, match="res=full fixes the crops"):
    _exec(os.path.join(ROOT, "configs/gta2cs.py:res=full,crop=640"))


def test_same_runs_are_shared_and_rows_needing_adain_are_refused():
  import paper_tables

  shared = paper_tables.shared_run_ids(paper_rows.ROWS)
  confeti_rows = ["confeti.t1.confeti", "confeti.t3.confeti", "confeti.t4.cut",
                  "confeti.t4.sc", "confeti.t5.mixed_cut"]
  assert {shared[r] for r in confeti_rows} == {"confeti.t1.confeti"}
  assert shared["confeti.t5.none_cut"] == "confeti.t3.A"
  assert shared["confeti.t3.D"] != shared["confeti.t3.E"]
  with pytest.raises(ValueError, match="--adain_source"):
    paper_tables.run_plan(paper_rows.ROWS_BY_ID["cfcontra.t2.cfcontra"])


def test_tables_render_train_metrics_and_synthia_columns(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps({"step": i, "pseudo_acc": float(i)}) + "\n" for i in range(1, 21)))
  iou = {c: 50.0 for c in __import__("confeti_jax.data.labels", fromlist=["x"]).CLASSES}
  result = {"miou": 40.0, "miou16": 42.0, "miou13": 47.5, "per_class_iou": iou}
  text = result_tables.table([("row", [(result, str(tmp_path))] * 2)],
                             metrics=("miou16", "miou13", "train:pseudo_acc"),
                             paper={"row": (58.7, 67.4, None)})
  head, _, line = text.splitlines()
  assert "terr." not in head and "truck" not in head and head.count("|") == 16 + 3 + 4
  # pseudo_acc: the mean of the last 10% of its 20 logged rows (19, 20).
  assert "42.00 ± 0.00 | 47.50 ± 0.00 | 19.50 ± 0.00 | 58.7 / 67.4 / -" in line


def test_runner_trains_rows_in_miniature_then_reuses_them(tmp_path):
  """Two rows of CFContra's Table 4 that are one run (MinEnt is also a row of Tables 2
  and 3) through the CLI on the tiny toy: trained once, tabulated with the logged
  losses; a rerun reuses the finished run. (`make paper-rows` trains every row.)"""
  cmd = [sys.executable, "scripts/paper_tables.py", "--setting=toy", "--tiny",
         "--rows=cfcontra.t4.minent,cfcontra.t3.entropy", "--seeds=0", f"--root={tmp_path}"]
  first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
  assert [p.name for p in (tmp_path / "runs").iterdir()] == ["cfcontra.t2.minent"]
  table = (tmp_path / "cfcontra.t4.md").read_text()
  line = next(row for row in table.splitlines() if row.startswith("| MinEnt |"))
  # CE and entropy from metrics.jsonl; MinEnt logs no pseudo-label accuracy.
  assert line.endswith("| - | 0.148 / 0.148 / - |") and line.count("±") == 2
  assert "| entropy | 1 |" in (tmp_path / "cfcontra.t3.md").read_text()
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert again.returncode == 0 and "0.0 min trained" in again.stdout
  assert first.stdout.splitlines()[-1] == f"Tables written: {tmp_path / 'tables.md'}"
