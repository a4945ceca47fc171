"""The last line of a run that cannot go on: the problem, the path and the fix.

A run that stops for good prints the full traceback to the log first, then one line,
last, that a user reading the end of a job's output acts on. Faults are recognised
through the whole exception chain, since the library error that reaches the top
often wraps the cause (a full disk inside a tensorstore write inside orbax).
"""

import errno
import logging as logging_std
import os
import sys
import threading

from absl import logging

from confeti_jax import checkpoint, writer
from confeti_jax.data import sources

PREFIX = "confeti_jax stopped:"
# Errors whose message already says what failed and what to do.
_SELF_EXPLAINING = (checkpoint.CheckpointError, checkpoint.NoIntactCheckpointError,
                    writer.NonFiniteLossError, sources.DatasetError, FileNotFoundError,
                    ValueError)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _chain(error):
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  return seen


def _one_line(text):
  return " ".join(str(text).split())


def final_line(error, workdir):
  """The one line naming the problem, the path and the fix for `error`."""
  chain = _chain(error)
  for e in chain:
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC or "No space left on device" in str(e):
      path = getattr(e, "filename", None) or workdir
      return (f"{PREFIX} the disk is full (writing {path}). Free space on that filesystem, "
              "or copy the workdir elsewhere and pass that --workdir, then rerun the same "
              "command: training resumes from the newest intact checkpoint.")
    if code in _NOT_WRITABLE:
      path = getattr(e, "filename", None) or workdir
      return (f"{PREFIX} cannot write {path} ({e.strerror}). Make the workdir writable "
              "(or pass another --workdir) and rerun the same command.")
  if isinstance(error, _SELF_EXPLAINING):
    return f"{PREFIX} {_one_line(error)}"
  return (f"{PREFIX} unexpected {type(error).__name__}: {_one_line(error)[:500]} (workdir "
          f"{workdir}). The traceback above shows where; rerunning the same command resumes "
          "from the newest intact checkpoint.")


def _drop(*args):
  del args


def exit_with_final_line(error, workdir):
  """Logs the traceback, prints the final line last on stderr and exits with status 1.

  Background threads of the checkpoint writer that failed with the same cause (a full
  disk fails every pending write) would print their own tracebacks when they end or
  are collected, after the final line; from here on they are dropped, and the process
  ends with os._exit once the streams are flushed (the trainer has already closed its
  checkpointer, so no write is cut short).
  """
  logging.error("The run cannot go on; the traceback of the cause follows.", exc_info=error)
  line = final_line(error, workdir)
  threading.excepthook = _drop
  sys.unraisablehook = _drop
  logging_std.getLogger("asyncio").setLevel(logging_std.CRITICAL)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.write(line + "\n")
  sys.stderr.flush()
  os._exit(1)
