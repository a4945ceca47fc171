"""Entry point, intentionally short: flags, distributed init, then train or evaluate.

  python -m confeti_jax.main --config=configs/toy.py --workdir=workdirs/toy
  python -m confeti_jax.main --config=configs/toy.py --workdir=workdirs/toy --mode=eval
  python -m confeti_jax.main --config=configs/toy.py --workdir=DIR --config.train.steps=100

Multi-host: on TPU pods and SLURM `jax.distributed.initialize()` finds its peers
by itself (--distributed=auto); elsewhere pass --coordinator_address,
--num_processes and --process_id to every process.
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
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to run.")
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
  from confeti_jax import evaluate, train, writer  # after distributed init: they touch JAX

  writer.quiet_library_logs()

  config = _CONFIG.value
  logging.info("Config:\n%s", config)
  if _MODE.value == "train":
    train.train_and_evaluate(config, _WORKDIR.value)
  else:
    evaluate.run(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
