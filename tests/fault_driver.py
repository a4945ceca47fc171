"""Test helper: `python -m confeti_jax.main` with a fault injected, for tests/test_faults.py.

CONFETI_FAULT=disk_full:N makes every checkpoint write from step N on and every
evaluation report fail as a full disk does (OSError ENOSPC), which a test cannot
arrange portably with a real filesystem (mounting a small tmpfs needs root).
"""

import errno
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _disk_full(first_step):
  import orbax.checkpoint as ocp

  from confeti_jax import evaluate

  def no_space(path):
    return OSError(errno.ENOSPC, "No space left on device", path)

  save = ocp.CheckpointManager.save

  def failing_save(self, step, *args, **kwargs):
    if int(step) >= first_step:
      raise no_space(os.path.join(str(self.directory), str(step)))
    return save(self, step, *args, **kwargs)

  def failing_report(path, text):
    del text
    raise no_space(path)

  ocp.CheckpointManager.save = failing_save
  evaluate._write_atomic = failing_report


if __name__ == "__main__":
  fault = os.environ.get("CONFETI_FAULT", "")
  if fault.startswith("disk_full:"):
    _disk_full(int(fault.split(":")[1]))
  from absl import app

  from confeti_jax import main
  app.run(main.main)
