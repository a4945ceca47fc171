"""JAX's persistent compilation cache, on by default for user runs.

Compiling the training step, its initialisation and the evaluation takes longer than
the first hundred toy steps; with the cache a restarted or repeated run reads the
compiled programs from disk instead (measured in the README, "Speed"). The folder is
`xla/` in the project's cache folder (`$CONFETI_CACHE`, default `~/.cache/confeti_jax`,
the toy benchmark's too), capped at `MAX_BYTES` (least recently used entries go
first). JAX's own settings win:
`JAX_COMPILATION_CACHE_DIR=/path` picks another folder, and
`JAX_ENABLE_COMPILATION_CACHE=false` turns the cache off. A folder that cannot be
written turns it off with a warning; it never stops a run.
"""

import os
import tempfile

import jax
from absl import logging

MAX_BYTES = 2 * 1024**3


def default_folder():
  root = (os.environ.get("CONFETI_CACHE")
          or os.path.join(os.path.expanduser("~"), ".cache", "confeti_jax"))
  return os.path.join(root, "xla")


def enable():
  """Turns the cache on unless JAX's settings say otherwise; returns the folder or None."""
  if not jax.config.jax_enable_compilation_cache:
    return None
  folder = jax.config.jax_compilation_cache_dir
  if folder:  # chosen by the user (or the test suite): leave every setting as it is
    return folder
  folder = default_folder()
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder):
      pass
  except OSError as error:
    logging.warning("Compilation cache off: cannot write to %s (%s). Set "
                    "JAX_COMPILATION_CACHE_DIR to a writable folder to keep compiled "
                    "programs between runs.", folder, error)
    return None
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  logging.info("Compilation cache: %s", folder)
  return folder
