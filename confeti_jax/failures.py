"""The last line of a run that cannot go on: the problem, the path and the fix.

A run that stops for good prints the full traceback to the log first, then one line,
last, that a user reading the end of a job's output acts on. Faults are recognised
through the whole exception chain, since the library error that reaches the top
often wraps the cause (a full disk inside a tensorstore write inside orbax).
"""

import errno
import logging as logging_std
import sys

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


def exit_with_final_line(error, workdir):
  """Logs the traceback, prints the final line last on stderr and exits with status 1."""
  logging.error("The run cannot go on; the traceback of the cause follows.", exc_info=error)
  line = final_line(error, workdir)
  logging.flush()
  # Tasks of the checkpoint writer that failed with the same cause would be reported by
  # asyncio when collected, after the final line; they are already in the traceback.
  logging_std.getLogger("asyncio").setLevel(logging_std.CRITICAL)
  sys.stdout.flush()
  sys.stderr.write(line + "\n")
  sys.stderr.flush()
  sys.exit(1)
