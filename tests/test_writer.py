"""MetricWriter files, Chrono timing with a fake clock, ETA format and the NaN check."""

import json
import math
import os

import numpy as np
import pytest
from absl import logging

from confeti_jax import writer as writer_lib


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_jsonl_content_and_append_on_reopen(tmp_path):
  workdir = str(tmp_path / "run")
  with writer_lib.MetricWriter(workdir, total_steps=10, is_main=True, tensorboard=False) as w:
    w.write_scalars(1, {"loss": np.float32(0.5), "lr": 6e-5, "count": 3})
    w.write_scalars(2, {"loss": float("nan")})
  # A resumed run opens the same file and continues it.
  with writer_lib.MetricWriter(workdir, total_steps=10, is_main=True, tensorboard=False) as w:
    w.write_scalars(3, {"loss": 0.25})
  rows = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert rows == [{"step": 1, "loss": 0.5, "lr": 6e-5, "count": 3.0},
                  {"step": 2, "loss": None},
                  {"step": 3, "loss": 0.25}]
  assert isinstance(rows[0]["count"], float)


def test_tensorboard_scalars_and_images_written(tmp_path):
  pytest.importorskip("tensorboardX")
  workdir = str(tmp_path)
  w = writer_lib.MetricWriter(workdir, total_steps=10, is_main=True)
  w.write_scalars(5, {"loss": 1.0})
  w.write_images(5, {"sample": np.zeros((8, 12, 3), np.uint8), "mask": np.ones((8, 12),
                                                                              np.uint8)})
  with pytest.raises(ValueError, match="uint8"):
    w.write_images(5, {"bad": np.zeros((8, 12, 3), np.float32)})
  w.flush()
  w.close()
  w.close()  # closing twice is harmless
  tb_dir = os.path.join(workdir, "tensorboard")
  events = [f for f in os.listdir(tb_dir) if f.startswith("events.out.tfevents")]
  assert events and os.path.getsize(os.path.join(tb_dir, events[0])) > 100


def test_non_main_process_writes_nothing(tmp_path):
  workdir = str(tmp_path / "worker1")
  with writer_lib.MetricWriter(workdir, total_steps=10, is_main=False) as w:
    w.write_scalars(1, {"loss": 0.5})
    w.write_images(1, {"x": np.zeros((4, 4, 3), np.uint8)})
    line = w.log_progress(1, {"loss": 0.5})  # every process may still log
  assert not os.path.exists(workdir)
  assert line.startswith("step 1/10 (10%)")


def test_default_is_main_is_process_zero(tmp_path):
  w = writer_lib.MetricWriter(str(tmp_path), total_steps=1, tensorboard=False)
  assert w.is_main
  w.close()


def test_chrono_rate_eta_and_pauses():
  clock = FakeClock()
  chrono = writer_lib.Chrono(1200, clock=clock)
  chrono.start(100)
  clock.now += 10.0
  out = chrono.tick(120)  # 20 steps in 10 s
  assert out["steps_per_sec"] == pytest.approx(2.0)
  assert out["eta_seconds"] == pytest.approx(1080 / 2.0)
  clock.now += 4.0
  with chrono.paused():  # evaluation: 100 s that must not count
    clock.now += 100.0
  clock.now += 6.0
  chrono.pause()
  chrono.pause()  # repeated pause is one pause
  clock.now += 50.0
  chrono.resume()
  out = chrono.tick(160)  # 40 steps in 10 s of training time
  assert out["steps_per_sec"] == pytest.approx(4.0)
  assert out["eta_seconds"] == pytest.approx(1040 / 4.0)
  clock.now += 1.0
  assert chrono.tick(1200)["eta_seconds"] == 0.0


def test_chrono_first_tick_without_start_is_unknown():
  clock = FakeClock()
  chrono = writer_lib.Chrono(10, clock=clock)
  out = chrono.tick(0)
  assert math.isnan(out["steps_per_sec"]) and math.isnan(out["eta_seconds"])
  clock.now += 2.0
  assert chrono.tick(4)["steps_per_sec"] == pytest.approx(2.0)
  unbounded = writer_lib.Chrono(clock=clock)  # no total: rate only
  unbounded.start(0)
  clock.now += 1.0
  out = unbounded.tick(3)
  assert out["steps_per_sec"] == pytest.approx(3.0) and math.isnan(out["eta_seconds"])


@pytest.mark.parametrize("seconds,text", [
    (12, "12s"), (0, "0s"), (336, "5m36s"), (60, "1m00s"), (3720, "1h02m"),
    (90000, "25h00m"), (float("nan"), "?"), (None, "?"), (-1, "?"),
])
def test_format_eta(seconds, text):
  assert writer_lib.format_eta(seconds) == text


def test_log_progress_line(tmp_path, monkeypatch):
  logged = []
  monkeypatch.setattr(logging, "info", lambda fmt, *args: logged.append(fmt % args))
  w = writer_lib.MetricWriter(str(tmp_path), total_steps=1200, is_main=False)
  line = w.log_progress(120, {"loss": 0.53214, "lr": 6e-5, "steps_per_sec": 3.2109,
                              "eta_seconds": 336.0})
  assert line == "step 120/1200 (10%) | loss 0.532 | lr 6.0e-05 | 3.21 steps/s | ETA 5m36s"
  assert logged == [line]


def test_report_checks_times_writes_and_logs(tmp_path):
  clock = FakeClock()
  workdir = str(tmp_path)
  with writer_lib.MetricWriter(workdir, total_steps=100, is_main=True, tensorboard=False,
                               clock=clock) as w:
    w.chrono.start(0)
    clock.now += 5.0
    out = w.report(10, {"loss": np.float32(1.5)})
    assert out["steps_per_sec"] == pytest.approx(2.0)
    with pytest.raises(writer_lib.NonFiniteLossError):
      w.report(20, {"loss": np.float32(np.inf)})
  rows = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert len(rows) == 1 and rows[0]["step"] == 10 and rows[0]["eta_seconds"] == 45.0


def test_check_finite_message():
  writer_lib.check_finite({"loss": 0.1, "grad_norm": np.array([1.0, 2.0])}, step=7)
  with pytest.raises(writer_lib.NonFiniteLossError) as info:
    writer_lib.check_finite({"loss_seg": float("nan"), "loss_pcl": np.inf, "lr": 1e-4},
                            step=4321)
  assert isinstance(info.value, FloatingPointError)
  message = str(info.value)
  assert "loss_pcl" in message and "loss_seg" in message and "lr," not in message
  assert "4321" in message
  assert "checkpoint" in message and "learning rate" in message and "same command" in message
