"""Measures a config's training step: compile time, s/step, images/s, memory, FLOP/s.

  python scripts/benchmark.py --config=configs/toy.py --json=bench/toy.json
  python scripts/benchmark.py --config=configs/gta2cs.py --config.train.batch_size=2 \
      --sweep='batch_size=2,4;dtype=float32,bfloat16;remat=none,layer3,all'
  python scripts/benchmark.py --config=configs/toy.py --sweep=default

The step runs on synthetic uint8 batches of the config's crop size, so the figure
is the compiled step alone (the input pipeline runs in parallel workers in real
training). Timings are the median over `--repeats` blocks of `--steps` steps after
a warm-up. `--sweep` takes `key=v1,v2;key2=...` over batch_size, dtype and remat (or
any dotted config key; '+' joins stage names inside one remat value, 'none' is off),
or `default` (batch B and 2B x float32/bfloat16 x remat none/all); every point runs
in a fresh process (`--isolate`), so peak-memory counters and an out-of-memory point
do not spill into the next one. `--compile_only` lowers the step from shapes and
reports the compiled figures alone (compile_s, XLA memory, FLOPs): a paper-size step on
a laptop, or a quick "does batch 4 fit" on the device itself.

Per point: compile_s; s_per_step (median) and images_per_s (per domain); memory:
peak_memory_bytes (device allocator peak where the backend reports one, else the
process's peak RSS, see peak_memory_kind) and the compiled step's own figures
(xla_temp_bytes: activations and scratch; xla_peak_estimate_bytes: arguments +
outputs + temporaries - donated aliases, per device); flops_per_step (XLA cost
analysis, summed over devices), achieved tflops_per_s and, for a device in
PEAK_BF16_TFLOPS, its fraction of the dense bfloat16 peak (null elsewhere, e.g. CPU).
The FLOPs are those executed, recomputation included: with remat the fraction is the
hardware's utilisation, not the model's.

XLA:CPU does not turn remat into a smaller peak: its scheduler keeps unrolled
recomputation from lowering the temporaries (measured on ResNet-50, 256x256, batch 2:
0.90 GiB without, 0.94 with layer3, 1.00 with all stages). Measure remat on a GPU/TPU.
"""

import copy
import itertools
import json
import multiprocessing
import os
import resource
import sys
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per timed block.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed blocks; the median is reported.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_JSON = flags.DEFINE_string("json", None, "Where to write the JSON result.")
_OUTPUT = flags.DEFINE_string("output", None, "Alias of --json.")
_SWEEP = flags.DEFINE_string("sweep", "", "'default' or 'key=v1,v2;key2=...' (see above).")
_ISOLATE = flags.DEFINE_bool("isolate", True, "Run each sweep point in a fresh process.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile from shapes and report FLOPs and XLA memory; no steps.")
flags.mark_flags_as_required(["config"])

# Dense bfloat16 peak per chip (vendor data sheets), matched against device_kind in order.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0),
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
)
SWEEP_KEYS = {"batch_size": "train.batch_size", "dtype": "model.dtype",
              "remat": "model.remat"}


def peak_bf16_tflops(device_kind):
  """The dense bf16 peak of `device_kind` in TFLOP/s, or None for an unknown device."""
  kind = device_kind.lower()
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in kind:
      return tflops
  return None


def parse_sweep(spec, config):
  """'key=v1,v2;key2=...' or 'default' -> list of {dotted key: value} points (product)."""
  if not spec:
    return [{}]
  if spec == "default":
    b = int(config.train.batch_size)
    axes = {"train.batch_size": [b, 2 * b], "model.dtype": ["float32", "bfloat16"],
            "model.remat": ["", "all"]}
  else:
    axes = {}
    for part in filter(None, spec.split(";")):
      key, _, values = part.partition("=")
      key = SWEEP_KEYS.get(key.strip(), key.strip())
      axes[key] = [_typed(config, key, v.strip()) for v in values.split(",")]
  return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _typed(config, key, text):
  node = config
  for part in key.split("."):
    node = node[part]
  if key == "model.remat":
    return "" if text.lower() in ("none", "off", "") else text.replace("+", ",")
  if isinstance(node, bool):
    return text.lower() in ("1", "true", "yes")
  return type(node)(text)


def with_overrides(config, overrides):
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def synthetic_batch(config, rng):
  """A host batch shaped like the loaders' output (uint8 images, uint8 labels)."""
  b = config.train.batch_size
  h, w = config.data.crop_size

  def domain():
    return {"image": rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8),
            "label": rng.integers(0, config.num_classes, size=(b, h, w), dtype=np.uint8)}

  return {"source": domain(), "target": domain()}


def peak_memory_bytes(device):
  """The device allocator's peak, or the process's peak RSS where none is reported (CPU)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host_max_rss"


def _compiled_memory(compiled):
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    m = None
  if m is None:
    return {"xla_temp_bytes": None, "xla_peak_estimate_bytes": None}
  return {"xla_temp_bytes": int(m.temp_size_in_bytes),
          "xla_peak_estimate_bytes": int(m.argument_size_in_bytes + m.output_size_in_bytes
                                         + m.temp_size_in_bytes - m.alias_size_in_bytes)}


def measure(config, *, steps=5, repeats=3, warmup=2, compile_only=False):
  """Compiles and times one config's train step on every local device; returns a dict.

  `compile_only` lowers from shapes and stops after the compiled figures (FLOPs, XLA
  memory): a paper-size step on a small machine, or a quick fit check on a device.
  """
  import jax

  from confeti_jax import methods, sharding, train

  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.train.batch_size, mesh)
  method = methods.build(config)
  if hasattr(method, "allow_random_generator"):  # CONFETI's stage 2 without a stage-1 run
    method.allow_random_generator = True
  # An rbg key for the (unmeasured) initialisation: the same shapes, and it compiles in
  # seconds where per-parameter threefry takes tens of seconds on CPU.
  init_key = jax.random.key(int(config.seed), impl="rbg")
  abstract = jax.eval_shape(method.init_state, init_key)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  step_fn = train.make_train_step(method, config, mesh, shardings)
  host_batch = synthetic_batch(config, np.random.default_rng(0))
  if compile_only:  # shapes alone: nothing is initialised or run
    state = abstract
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host_batch)
  else:
    state = jax.jit(method.init_state, out_shardings=shardings)(init_key)
    batch = sharding.to_global(host_batch, mesh)

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # XLA reports the per-device program of the SPMD partition.
  flops = float(cost.get("flops", 0.0)) * mesh.devices.size if cost else 0.0
  device = jax.local_devices()[0]
  result = {
      "method": config.method.name, "stage": config.method.get("stage"),
      "backbone": config.model.backbone, "width": config.model.width,
      "dtype": config.model.dtype, "remat": str(config.model.get("remat", "")),
      "crop_size": list(config.data.crop_size), "batch_size": config.train.batch_size,
      "devices": int(mesh.devices.size), "device_kind": device.device_kind,
      "backend": jax.default_backend(), "compile_s": round(compile_s, 3),
      **_compiled_memory(compiled), "flops_per_step": flops,
      "jax_version": jax.__version__,
  }
  if compile_only:
    return result

  for _ in range(warmup):
    state, *_ = compiled(state, batch)
  jax.block_until_ready(state)
  block_times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics, *_ = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    block_times.append((time.perf_counter() - t0) / steps)
  s_per_step = float(np.median(block_times))
  peak, peak_kind = peak_memory_bytes(device)
  tflops = flops / s_per_step / 1e12
  peak_tflops = peak_bf16_tflops(device.device_kind)
  return {
      **result, "s_per_step": s_per_step, "s_per_step_blocks": block_times,
      "steps_per_s": 1.0 / s_per_step,
      "images_per_s": config.train.batch_size / s_per_step,  # per domain
      "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
      "tflops_per_s": tflops, "peak_bf16_tflops_per_device": peak_tflops,
      "fraction_of_bf16_peak": (tflops / mesh.devices.size / peak_tflops
                                if peak_tflops else None),
  }


def _child(config, kwargs, queue):
  from absl import flags as absl_flags

  absl_flags.FLAGS.mark_as_parsed()  # grain and friends read absl flags
  try:
    queue.put(measure(config, **kwargs))
  except Exception as e:  # noqa: BLE001 - reported in the result, the sweep goes on
    queue.put({"error": f"{type(e).__name__}: {e}"})


def measure_isolated(config, **kwargs):
  """`measure` in a fresh process: its own memory peak, and a crash stays a result."""
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  proc = ctx.Process(target=_child, args=(config, kwargs, queue))
  proc.start()
  try:
    result = queue.get(timeout=3600)
  except Exception:  # noqa: BLE001 - the child died (e.g. killed for memory)
    result = {"error": f"benchmark process exited with code {proc.exitcode}"}
  proc.join()
  return result


def run(config, sweep="", *, isolate=True, **kwargs):
  """Every sweep point of `config` (one without a sweep); a list of result dicts."""
  points = parse_sweep(sweep, config)
  results = []
  for overrides in points:
    point = with_overrides(config, overrides)
    if isolate and len(points) > 1:
      result = measure_isolated(point, **kwargs)
    else:
      result = measure(point, **kwargs)
    results.append({"overrides": overrides, **result})
    logging.info("%s", _row(results[-1]))
  return results


def _row(r):
  if "error" in r:
    return f"{r['overrides']}: {r['error']}"
  gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "-"
  head = (f"batch {r['batch_size']} {r['dtype']} remat={r['remat'] or 'none'}: "
          f"compile {r['compile_s']:.1f} s | XLA temp {gib(r['xla_temp_bytes'])} GiB | "
          f"{r['flops_per_step'] / 1e9:.1f} GFLOP/step")
  if "s_per_step" not in r:  # --compile_only
    return head
  frac = r["fraction_of_bf16_peak"]
  return (f"{head} | {r['s_per_step'] * 1e3:.1f} ms/step | {r['images_per_s']:.1f} img/s | "
          f"peak {gib(r['peak_memory_bytes'])} GiB ({r['peak_memory_kind']}) | "
          f"{r['tflops_per_s']:.3f} TFLOP/s" + (f" ({100 * frac:.1f}% of bf16 peak)"
                                               if frac is not None else ""))


def main(argv):
  del argv
  results = run(_CONFIG.value, _SWEEP.value, isolate=_ISOLATE.value, steps=_STEPS.value,
                repeats=_REPEATS.value, warmup=_WARMUP.value,
                compile_only=_COMPILE_ONLY.value)
  report = {"config_args": [a for a in sys.argv[1:] if a.startswith("--config")],
            "sweep": _SWEEP.value, "results": results}
  text = json.dumps(report, indent=2)
  print(text)
  path = _JSON.value or _OUTPUT.value
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
