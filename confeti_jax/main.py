"""Entry point, intentionally short: flags, distributed init, then train or evaluate.

  python -m confeti_jax.main --config=configs/toy.py --workdir=workdirs/toy
  python -m confeti_jax.main --config=configs/toy.py --workdir=workdirs/toy --mode=eval
  python -m confeti_jax.main --config=configs/toy.py --workdir=DIR --config.train.steps=100

Multi-host: on TPU pods and SLURM `jax.distributed.initialize()` finds its peers
by itself (--distributed=auto); elsewhere pass --coordinator_address,
--num_processes and --process_id to every process, e.g. two CPU hosts:

  python -m confeti_jax.main --config=... --workdir=/shared/run \
      --coordinator_address=10.0.0.1:12345 --num_processes=2 --process_id=0  # and =1

Each process reads its slice of every global batch (train.batch_size stays global) and
writes its part of each checkpoint, so the workdir must be on a filesystem all of them
see; process 0 alone writes metrics and evaluation reports. SIGTERM to any process
stops all of them at the same step, after a checkpoint. CPU hosts talk over gloo.

Determinism: given the seed, a CPU run is reproducible bit for bit, also across a
stop and resume (tests/test_train.py). On GPU, XLA's autotuner may pick different
convolution and GEMM kernels from one compilation to the next, and some kernels
accumulate with atomics. For run-to-run identical numbers (slower) start with

  XLA_FLAGS="--xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0"

(deterministic_ops implies --xla_gpu_exclude_nondeterministic_ops). Caveat, not
verified here for lack of a GPU: XLA has had no deterministic select-and-scatter, the
gradient of max pooling that ResNet-V1c's stem uses, and refuses to compile it under
these flags ("UNIMPLEMENTED: ... select-and-scatter ... does not have a deterministic
implementation", google/flax#4233).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# Config files import `configs.common`; make the repository root importable
# however the entry point is launched.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/toy.py[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, eval.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "stylize", "visualize"],
    "train (every stage of a multi-stage method, resuming), eval (the latest checkpoint of "
    "the last stage), stylize (the generator's stylised source images as PNGs), visualize "
    "(prediction grid, CONFETI's CAM maps and a feature t-SNE in workdir/visualize/).")
_COMPARE = flags.DEFINE_list(
    "compare", [], "--mode=visualize: more workdirs whose predictions join the grid.")
_NUM_IMAGES = flags.DEFINE_integer(
    "num_images", 4, "--mode=visualize: target val images (rows) in the grid.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize(): 'auto' when a coordinator is given or detectable.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

flags.mark_flags_as_required(["config", "workdir"])

_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS")


def _maybe_initialize_distributed():
  """Initialises multi-process JAX before any other JAX call, when asked or detected."""
  import jax

  wanted = _DISTRIBUTED.value == "on" or (
      _DISTRIBUTED.value == "auto"
      and (_COORDINATOR.value or any(os.environ.get(k) for k in _CLUSTER_ENV)))
  if not wanted:
    return
  jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _maybe_initialize_distributed()
  # After distributed init: these touch JAX.
  from confeti_jax import compile_cache, failures, writer

  writer.quiet_library_logs()
  compile_cache.enable()
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    _run(config, workdir)
  except Exception as error:  # noqa: BLE001 - every fatal error ends in one final line
    failures.exit_with_final_line(error, workdir)


def _run(config, workdir):
  from confeti_jax import evaluate, run_config, stages, stylize, train, visualize

  logging.info("%s", run_config.summary(config, os.path.abspath(workdir)))
  plan = stages.plan_for(config, workdir)  # None: a single-stage method
  if _MODE.value == "train":
    if plan:
      stages.run(config, workdir, plan)
    else:
      train.train_and_evaluate(config, workdir)
  elif _MODE.value == "eval":
    if plan:
      _, config, workdir = plan[-1]
    evaluate.run(config, workdir)
  elif _MODE.value == "visualize":
    visualize.main_mode(config, workdir, compare=_COMPARE.value, num_images=_NUM_IMAGES.value)
  else:
    stylize.main_mode(config, workdir)


if __name__ == "__main__":
  app.run(main)
