"""Measures a config's training step: compile time, s/step, images/s, peak memory, FLOPs.

  python scripts/benchmark.py --config=configs/toy.py
  python scripts/benchmark.py --config=configs/toy.py --config.model.backbone=resnet101 \
      --config.model.width=1.0 --config.data.crop_size='(512,512)' --config.train.batch_size=2

The step runs on synthetic uint8 batches of the config's crop size, so the figure
is the compiled step alone (the input pipeline runs in parallel workers in real
training). Timings are the median over `--repeats` blocks of `--steps` steps after
a warm-up; JSON goes to stdout and to --output.
"""

import json
import os
import resource
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per timed block.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed blocks; the median is reported.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON result.")
flags.mark_flags_as_required(["config"])


def synthetic_batch(config, rng):
  """A host batch shaped like the loaders' output (uint8 images, uint8 labels)."""
  b = config.train.batch_size
  h, w = config.data.crop_size

  def domain():
    return {"image": rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8),
            "label": rng.integers(0, config.num_classes, size=(b, h, w), dtype=np.uint8)}

  return {"source": domain(), "target": domain()}


def peak_memory_bytes(device):
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host_max_rss"


def measure(config, *, steps=5, repeats=3, warmup=2):
  import jax

  from confeti_jax import methods, sharding, train

  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.train.batch_size, mesh)
  method = methods.build(config)
  state, _, state_shardings = train.create_state(method, config, mesh)
  step_fn = train.make_train_step(method, config, mesh, state_shardings)
  batch = sharding.to_global(synthetic_batch(config, np.random.default_rng(0)), mesh)

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0

  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  block_times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    block_times.append((time.perf_counter() - t0) / steps)
  s_per_step = float(np.median(block_times))
  peak, peak_kind = peak_memory_bytes(jax.devices()[0])
  return {
      "method": config.method.name, "backbone": config.model.backbone,
      "width": config.model.width, "dtype": config.model.dtype,
      "crop_size": list(config.data.crop_size), "batch_size": config.train.batch_size,
      "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
      "backend": jax.default_backend(), "compile_s": round(compile_s, 3),
      "s_per_step": s_per_step, "s_per_step_blocks": block_times,
      "steps_per_s": 1.0 / s_per_step,
      "images_per_s": config.train.batch_size / s_per_step,  # per domain
      "flops_per_step": flops, "tflops_per_s": flops / s_per_step / 1e12,
      "peak_memory_gib": peak / 2**30, "peak_memory_kind": peak_kind,
      "jax_version": jax.__version__,
  }


def main(argv):
  del argv
  result = measure(_CONFIG.value, steps=_STEPS.value, repeats=_REPEATS.value,
                   warmup=_WARMUP.value)
  text = json.dumps(result, indent=2)
  print(text)
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
