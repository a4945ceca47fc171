"""`make demo-quick` as a user runs it (the tiny toy): one result block, a named grid."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_prints_its_result_once_and_names_its_grid(tmp_path):
  workdir = tmp_path / "demo"
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "demo.py"),
       f"--config={os.path.join(ROOT, 'configs', 'toy.py')}:tiny=1", f"--workdir={workdir}",
       f"--config.data.toy.cache_dir={tmp_path / 'toy'}"],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  console = out.stdout + out.stderr
  assert out.returncode == 0, console[-3000:]
  assert console.count("target val mIoU") == 1, console[-3000:]
  grid = workdir / "visualize" / "grid.png"
  assert grid.is_file() and str(grid) in out.stdout
  assert (workdir / "demo.txt").read_text().count("source val mIoU") == 1
  # The config dump is in the workdir, not on the console.
  assert "Config:\n" not in console and "Config:" in (workdir / "train.log").read_text()
  assert "could not be restored" not in console
