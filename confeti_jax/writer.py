"""Training logs: absl progress lines, metrics.jsonl, TensorBoard, steps/s and ETA.

Only process 0 writes files, so a multi-host run produces one metrics.jsonl and one
TensorBoard stream; every process may still print progress lines, which is what a
user tailing a worker's log expects. The JSON-lines file is the machine-readable
record (one object per logged step, appended, so a resumed run extends it), and
TensorBoard is a convenience for curves and sample images.

Non-finite losses are checked at log time on the host (where the metrics are fetched
anyway) and stop the run with a message saying what to do next.
"""

import contextlib
import json
import logging as logging_std
import math
import os
import time
import traceback

import jax
import numpy as np
from absl import logging

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOG_FILE = "train.log"


class NonFiniteLossError(FloatingPointError):
  """A logged loss or metric became NaN or infinite; training cannot usefully continue."""


def check_finite(scalars, step):
  """Raises NonFiniteLossError naming every non-finite entry of `scalars` at `step`.

  Called on host values at log time, so it costs no extra device sync. Checkpoints
  are written only from finite states, hence the last one on disk is still good.
  """
  bad = sorted(k for k, v in scalars.items() if not np.all(np.isfinite(np.asarray(v, float))))
  if bad:
    raise NonFiniteLossError(
        f"Non-finite value(s) for {', '.join(bad)} at step {step}. The last good checkpoint "
        "in the workdir is kept and nothing after it was saved. To resume, lower the "
        "learning rate (e.g. --config.optim.lr=...) or enable warm-up, and rerun the same "
        "command with the same --workdir: training continues from that checkpoint.")


def format_eta(seconds):
  """Compact duration for progress lines: '1h02m', '5m36s' or '12s' ('?' if unknown)."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def _format_value(value):
  """Three significant digits; scientific notation for very small or large magnitudes."""
  value = float(value)
  if value != 0 and math.isfinite(value) and not 1e-3 <= abs(value) < 1e4:
    return f"{value:.1e}"
  return f"{value:.3g}"


class Chrono:
  """Steps per second over the last reporting interval, and the ETA to `total_steps`.

  Without `total_steps` only the rate is known and the ETA is NaN.

  Time spent between `pause()` and `resume()` (evaluation, checkpointing) is left out
  of the rate, so steps/s measures training alone and the ETA does not jump after
  each evaluation. The clock is injectable so tests need no sleeping.
  """

  def __init__(self, total_steps=None, *, clock=time.monotonic):
    self.total_steps = None if total_steps is None else int(total_steps)
    self._clock = clock
    self._last_step = None
    self._last_time = None
    self._paused_total = 0.0
    self._paused_at = None

  def start(self, step):
    """Starts timing at `step` (the first step of this process, > 0 after a resume)."""
    self._last_step = int(step)
    self._last_time = self._clock()
    self._paused_total = 0.0
    self._paused_at = None

  def pause(self):
    """Stops counting time until `resume()`; nested or repeated pauses are ignored."""
    if self._paused_at is None:
      self._paused_at = self._clock()

  def resume(self):
    if self._paused_at is not None:
      self._paused_total += self._clock() - self._paused_at
      self._paused_at = None

  @contextlib.contextmanager
  def paused(self):
    """`with chrono.paused():` around work that should not count as training time."""
    self.pause()
    try:
      yield
    finally:
      self.resume()

  def tick(self, step):
    """Rate since the previous tick (or start) and ETA; starts the chrono if needed.

    Returns:
      {"steps_per_sec": float, "eta_seconds": float}; NaN until two points are known.
    """
    if self._last_step is None:
      self.start(step)
      return {"steps_per_sec": float("nan"), "eta_seconds": float("nan")}
    self.resume()
    now = self._clock()
    elapsed = now - self._last_time - self._paused_total
    done = int(step) - self._last_step
    rate = done / elapsed if elapsed > 0 and done > 0 else float("nan")
    if self.total_steps is None:
      eta = float("nan")
    else:
      remaining = max(self.total_steps - int(step), 0)
      eta = 0.0 if remaining == 0 else (remaining / rate if math.isfinite(rate) else float("nan"))
    self._last_step, self._last_time, self._paused_total = int(step), now, 0.0
    return {"steps_per_sec": rate, "eta_seconds": eta}


class MetricWriter:
  """Process-0 writer of scalars (JSON lines + TensorBoard) and images (TensorBoard).

  Usage:

    with MetricWriter(workdir, total_steps=config.train.steps) as writer:
      writer.chrono.start(step)
      ...
      writer.report(step, jax.device_get(metrics))   # check, time, write, log
      with writer.chrono.paused():
        evaluate(...)
  """

  def __init__(self, workdir, *, total_steps, is_main=None, tensorboard=True,
               clock=time.monotonic, resume_step=None):
    """`resume_step`: the step training restarts from; logged rows after it are dropped,
    as the steps they describe are trained again (a kill between log and save)."""
    self.workdir = workdir
    self.total_steps = int(total_steps)
    self.is_main = jax.process_index() == 0 if is_main is None else bool(is_main)
    self.chrono = Chrono(total_steps, clock=clock)
    self._jsonl = None
    self._tb = None
    if not self.is_main:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None:
      drop_rows_after(os.path.join(workdir, METRICS_FILE), resume_step)
    # Append + line buffering: a resumed run extends the file and a crash loses no line.
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", buffering=1)
    if tensorboard:
      self._tb = _summary_writer(os.path.join(workdir, TENSORBOARD_DIR))

  def write_scalars(self, step, scalars):
    """Appends {"step": step, **scalars} to metrics.jsonl and writes TensorBoard scalars.

    Values are converted to Python floats (non-finite ones are written as null so the
    file stays strict JSON); on other processes this does nothing.
    """
    if not self.is_main:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    record = {"step": int(step)}
    record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    if self._tb is not None:
      for key, value in values.items():
        self._tb.add_scalar(key, value, int(step))

  def write_eval(self, step, result, prefix="eval"):
    """TensorBoard scalars of one evaluation (`evaluate.summarize`'s dict): mIoU, the
    subsets' means (mIoU16/13), aAcc, mAcc and per-class IoU under `prefix`/IoU/.

    Not in metrics.jsonl, whose rows are training steps; eval/step_N.json holds them.
    Classes without an IoU (absent from prediction and ground truth) are left out.
    """
    if not self.is_main or self._tb is None:
      return
    scalars = {f"{prefix}/{k}": v for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "skipped"}
    scalars.update({f"{prefix}/IoU/{name.replace(' ', '_')}": v
                    for name, v in result.get("per_class_iou", {}).items()})
    for key, value in scalars.items():
      if value is not None:
        self._tb.add_scalar(key, float(value), int(step))

  def write_images(self, step, images):
    """Writes uint8 HWC (or HW) images to TensorBoard, e.g. CUT samples or overlays."""
    if not self.is_main or self._tb is None:
      return
    for key, image in images.items():
      image = np.asarray(image)
      if image.dtype != np.uint8:
        raise ValueError(f"image {key!r} must be uint8, got {image.dtype}")
      self._tb.add_image(key, image, int(step), dataformats="HWC" if image.ndim == 3 else "HW")

  def log_progress(self, step, scalars):
    """One absl INFO line: step, percent done, each scalar, steps/s and ETA if given.

    `steps_per_sec` and `eta_seconds` in `scalars` (as returned by `Chrono.tick`) are
    shown at the end in human units; every process may log.
    """
    scalars = dict(scalars)
    rate = scalars.pop("steps_per_sec", None)
    eta = scalars.pop("eta_seconds", None)
    percent = int(100 * step / self.total_steps) if self.total_steps else 100
    parts = [f"step {int(step)}/{self.total_steps} ({percent}%)"]
    parts += [f"{k} {_format_value(v)}" for k, v in scalars.items()]
    if rate is not None:
      rate = float(rate)
      parts.append(f"{rate:.2f} steps/s" if math.isfinite(rate) else "? steps/s")
    if eta is not None:
      parts.append(f"ETA {format_eta(float(eta))}")
    line = " | ".join(parts)
    logging.info("%s", line)
    return line

  def report(self, step, scalars):
    """check_finite, then Chrono.tick, write_scalars and log_progress in one call.

    Returns:
      The scalars with the timing entries added.
    """
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    check_finite(scalars, step)
    scalars.update(self.chrono.tick(step))
    self.write_scalars(step, scalars)
    self.log_progress(step, scalars)
    return scalars

  def flush(self):
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    """Flushes and closes the files; safe to call twice."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()
    return False


def read_rows(path):
  """The JSON objects of a metrics.jsonl; a torn last line (killed mid-write) is left out."""
  rows = []
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def drop_rows_after(path, step):
  """Rewrites metrics.jsonl (atomically) without the rows logged after `step`."""
  if not os.path.exists(path):
    return
  rows = read_rows(path)
  kept = [r for r in rows if int(r.get("step", 0)) <= int(step)]
  with open(path) as f:
    complete = all(line.endswith("\n") for line in f)
  if len(kept) == len(rows) and complete:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in kept)
  os.replace(tmp, path)
  logging.info("Dropped %d row(s) logged after step %d from %s", len(rows) - len(kept), step,
               path)


def loss_at(rows, step):
  """The logged "loss" at `step` (None when that step was not logged)."""
  for row in reversed(rows):
    if int(row.get("step", -1)) == int(step):
      return row.get("loss")
  return None


@contextlib.contextmanager
def run_log(workdir, dump=None):
  """Copies this process's log lines (absl and library warnings) to workdir/train.log,
  appended across resumes; `dump` (e.g. the full config) goes to that file only, so the
  console keeps a one-line summary. Process 0 only, as the other outputs."""
  if jax.process_index() != 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  handler = logging_std.FileHandler(os.path.join(workdir, LOG_FILE))
  handler.setFormatter(logging.PythonFormatter())
  handler.addFilter(_LibraryInfoFilter())
  root = logging_std.getLogger()
  root.addHandler(handler)
  try:
    if dump:
      handler.stream.write(f"{dump.rstrip()}\n")
      handler.flush()
    yield
  except BaseException:
    handler.stream.write(traceback.format_exc())  # the console gets failures.py's last line
    raise
  finally:
    root.removeHandler(handler)
    handler.close()


def _summary_writer(logdir):
  """tensorboardX SummaryWriter, or None (with a warning) when it is not installed."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    logging.warning("tensorboardX is not installed; writing %s only.", METRICS_FILE)
    return None
  return SummaryWriter(logdir)


class _LibraryInfoFilter(logging_std.Filter):
  """Drops INFO chatter of orbax/grain/absl internals so the progress line stays readable."""

  _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}grain{os.sep}")

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or not any(
        part in record.pathname for part in self._NOISY)


def quiet_library_logs():
  """Keeps library INFO logs out of the console and log files (warnings still show)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())

