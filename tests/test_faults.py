"""Fault injection: no single ordinary fault stops a run for good or loses its work.

One undisturbed tiny toy run (the `tiny=1` defaults: 3 steps, checkpoints at 2 and 3,
evaluation at 3, so the same compiled steps as test_train's end-to-end run) is the
reference; each test injects one fault (a damaged checkpoint, a truncated val image, a
full disk, a refused start) into a copy or a rerun, and checks that the run finishes
with the reference's numbers where the case allows it, or stops with a final line
naming the problem, the path and the fix.
"""

import errno
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from confeti_jax import checkpoint, evaluate, failures, run_config, train, writer
from confeti_jax.data import toy
from tests.test_train import ROOT, tiny_config

REFERENCE = {"train.steps": 3, "train.checkpoint_every_steps": 2, "eval.every_steps": 3}
TIMING = ("steps_per_sec", "eta_seconds")


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("toy_cache"))


@pytest.fixture(scope="module")
def reference(toy_cache, tmp_path_factory):
  """The undisturbed run's workdir."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  train.train_and_evaluate(tiny_config(toy_cache, **REFERENCE), workdir)
  return workdir


def _eval(workdir, step=3):
  with open(os.path.join(workdir, "eval", f"step_{step}.json")) as f:
    return json.load(f)


def _rows(workdir):
  strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}
  return [strip(r) for r in writer.read_rows(os.path.join(workdir, writer.METRICS_FILE))]


def _params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return ocp.PyTreeCheckpointer().restore(path)["seg"]["params"]


def _kept(workdir, folder="checkpoints"):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, folder)) if s.isdigit())


def _copy(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  return workdir


def _truncate_data_files(step_dir):
  for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def test_damaged_newest_checkpoint_falls_back_and_replays_to_the_same_result(
    reference, toy_cache, tmp_path, caplog):
  """Step 3's data files truncated (as by a kill after its rows were logged, before a
  good save): the rerun reports it, moves it aside, resumes from step 2 and ends where
  the undisturbed run did, each step logged once."""
  workdir = _copy(reference, tmp_path)
  _truncate_data_files(os.path.join(workdir, "checkpoints", "3"))
  with caplog.at_level("ERROR"):
    train.train_and_evaluate(tiny_config(toy_cache, **REFERENCE), workdir)
  assert "The checkpoint of step 3 cannot be read" in caplog.text
  assert _kept(workdir, checkpoint.UNREADABLE_DIR) == [3]
  assert _kept(workdir) == [2, 3]
  assert _rows(workdir) == _rows(reference)
  assert [r["step"] for r in _rows(workdir)] == [1, 2, 3]
  jax.tree.map(np.testing.assert_array_equal, _params(workdir, 3), _params(reference, 3))
  assert _eval(workdir)["per_class_iou"] == _eval(reference)["per_class_iou"]


def test_truncated_val_image_is_skipped_named_and_costs_no_checkpoint(
    reference, toy_cache, tmp_path):
  cache = str(tmp_path / "cache")
  config = tiny_config(cache, **{**REFERENCE, "train.stop_at_step": 2, "eval.every_steps": 2})
  shutil.copytree(toy.cache_folder(tiny_config(toy_cache).data.toy),
                  toy.cache_folder(config.data.toy))
  bad = sorted(glob.glob(os.path.join(toy.cache_folder(config.data.toy), "target",
                                      "leftImg8bit", "val", "*", "*.png")))[1]
  with open(bad, "r+b") as f:
    f.truncate(os.path.getsize(bad) // 2)  # the header stays readable, decoding fails
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  result = _eval(workdir, 2)
  assert result["skipped"] == 1 and result["skipped_files"] == [bad]
  assert result["num_images"] == config.data.toy.num_val - 1
  assert _kept(workdir) == [2]
  jax.tree.map(np.testing.assert_array_equal, _params(workdir, 2), _params(reference, 2))


def test_restart_from_an_earlier_step_sets_newer_aside_and_records_what_changed(
    reference, toy_cache, tmp_path, caplog):
  """What the divergence message proposes (tests/test_train.py checks the message):
  restore_step=2 with a changed setting trains 3 again to the reference's numbers."""
  workdir = _copy(reference, tmp_path)
  restart = tiny_config(toy_cache, **REFERENCE,
                        **{"train.restore_step": 2, "train.keep_checkpoints": 3})
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(restart, workdir)
  assert "train.keep_checkpoints: saved 2, now 3" in caplog.text
  assert _kept(workdir, checkpoint.SET_ASIDE_DIR) == [3] and _kept(workdir) == [2, 3]
  assert [r["step"] for r in _rows(workdir)] == [1, 2, 3]
  jax.tree.map(np.testing.assert_array_equal, _params(workdir, 3), _params(reference, 3))
  history = [json.loads(line)
             for line in open(os.path.join(workdir, run_config.HISTORY_FILE))]
  assert history[0]["event"] == "created" and history[0]["step"] == 0
  assert history[-1]["step"] == 2
  assert "train.keep_checkpoints: saved 2, now 3" in history[-1]["changes"]
  # The same command again resumes step 3; it does not go back to step 2 a second time.
  state = train.train_and_evaluate(restart, workdir)
  assert int(state.step) == 3 and _kept(workdir, checkpoint.SET_ASIDE_DIR) == [3]


def _main(workdir, cache, *flags, fault=""):
  cmd = [sys.executable, os.path.join(ROOT, "tests", "fault_driver.py"),
         "--config=configs/toy.py:tiny=1", f"--workdir={workdir}",
         f"--config.data.toy.cache_dir={cache}", "--config.train.steps=3",
         "--config.train.checkpoint_every_steps=2", "--config.eval.every_steps=2", *flags]
  env = dict(os.environ, CONFETI_FAULT=fault)
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_full_disk_ends_in_one_final_line_and_the_rerun_completes(reference, toy_cache,
                                                                   tmp_path):
  """Saving step 3 and every report fail with ENOSPC: the failed evaluation at step 2 is
  logged and training goes on; the run stops with the disk-full line last, step 2
  intact; the rerun on a freed disk ends where the undisturbed run did."""
  workdir = str(tmp_path / "run")
  proc = _main(workdir, toy_cache, fault="disk_full:3")
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(failures.PREFIX) and "the disk is full" in last, last
  assert "Evaluation at step 2 failed; training goes on" in proc.stderr
  assert _kept(workdir) == [2]
  train.train_and_evaluate(tiny_config(toy_cache, **{**REFERENCE, "eval.every_steps": 2}),
                           workdir)
  jax.tree.map(np.testing.assert_array_equal, _params(workdir, 3), _params(reference, 3))
  assert _eval(workdir)["per_class_iou"] == _eval(reference)["per_class_iou"]


def test_a_start_that_fails_its_data_checks_leaves_no_config_and_names_the_path(tmp_path):
  workdir, missing = str(tmp_path / "run"), str(tmp_path / "no_such_gta5")
  flags = ["--config.data.toy.enabled=False", f"--config.data.source.root={missing}",
           f"--config.data.target.root={tmp_path}"]
  proc = _main(workdir, str(tmp_path), *flags)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(failures.PREFIX) and missing in last, last
  assert not os.path.exists(os.path.join(workdir, run_config.CONFIG_FILE))


def test_eval_mode_prints_the_miou_before_a_report_write_fails(reference, toy_cache,
                                                               monkeypatch, caplog):
  def no_space(path, text):
    raise OSError(errno.ENOSPC, "No space left on device", path)

  monkeypatch.setattr(evaluate, "_write_atomic", no_space)
  with caplog.at_level("INFO"), pytest.raises(OSError) as info:
    evaluate.run(tiny_config(toy_cache, **REFERENCE), reference)
  assert f"mIoU {_eval(reference)['miou']:.2f}" in caplog.text
  assert "the disk is full" in failures.final_line(info.value, reference)


def test_final_line_finds_the_cause_through_the_exception_chain(tmp_path):
  try:
    try:
      raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "config.json"))
    except OSError as cause:
      raise checkpoint.CheckpointError("writing failed") from cause
  except checkpoint.CheckpointError as error:
    line = failures.final_line(error, str(tmp_path))
  assert line == (f"{failures.PREFIX} cannot write {tmp_path / 'config.json'} (Read-only file "
                  "system). Make the workdir writable (or pass another --workdir) and rerun "
                  "the same command.")
  assert failures.final_line(KeyError("x"), "/w").startswith(
      f"{failures.PREFIX} unexpected KeyError: 'x' (workdir /w)")


def test_eval_mode_reads_the_newest_intact_step_and_moves_nothing(reference, toy_cache,
                                                                  tmp_path, caplog):
  workdir = _copy(reference, tmp_path)
  _truncate_data_files(os.path.join(workdir, "checkpoints", "3"))
  with caplog.at_level("ERROR"):
    evaluate.run(tiny_config(toy_cache, **REFERENCE), workdir)
  assert "The checkpoint of step 3 cannot be read" in caplog.text
  with open(os.path.join(workdir, "eval", "latest.json")) as f:
    assert json.load(f)["step"] == 2
  assert _kept(workdir) == [2, 3]
  assert not os.path.exists(os.path.join(workdir, checkpoint.UNREADABLE_DIR))
