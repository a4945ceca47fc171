"""Test set-up: 8 simulated CPU devices, absl flags parsed (grain reads them), and one
persistent compilation cache for the session: the subprocess tests (resume, SIGTERM,
multi-host) compile the same toy steps again in every process they start.

The suite is mostly XLA:CPU compilation of tiny programs, so it compiles with LLVM at
-O0 (about half the compile time of the toy step; the HLO, hence what is computed, is
the same). User runs keep XLA's defaults; comparisons within a test use one setting.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # inherited by the subprocesses
  _CACHE = tempfile.mkdtemp(prefix="confeti_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_platforms", "cpu")
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()
