"""What drawing training image panels costs on the steps that do not write one.

Compiles the same config's train step twice, with `train.image_every_steps=0` (no
panel in the program) and with panels on (the step's extra outputs, never fetched:
what every step but the N-th does), then times blocks of steps interleaved A, B, A, B
on one state each, and prints the medians, their ratio and both programs' FLOPs.

  python scripts/panel_cost.py --config=configs/toy.py:method=dacs --blocks=8 --steps=5
"""

import os
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_ROOT, "configs", "toy.py") + ":method=dacs", "Config file.",
    lock_config=False)
_BLOCKS = flags.DEFINE_integer("blocks", 8, "Timed blocks per side (interleaved).")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per block.")


def compiled_step(config, image_every, batch):
  """(compiled step, its fresh state, FLOPs) of `config` with the given panel interval."""
  import jax

  from confeti_jax import methods, sharding, train

  config = config.copy_and_resolve_references()
  config.train.image_every_steps = image_every
  mesh = sharding.make_mesh()
  method = methods.build(config)
  key = jax.random.key(int(config.seed), impl="rbg")
  abstract = jax.eval_shape(method.init_state, key)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  state = jax.jit(method.init_state, out_shardings=shardings)(key)
  compiled = train.make_train_step(method, config, mesh, shardings).lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, state, float(cost.get("flops", 0.0))


def main(argv):
  del argv
  import jax

  from confeti_jax import sharding, train
  from confeti_jax.data import pipeline

  config = _CONFIG.value
  src, tgt = pipeline.make_train_iterators(config)  # one real batch, reused for every step
  batch, _ = train.next_global_batch({"source": src, "target": tgt}, sharding.make_mesh())
  every = int(config.train.image_every_steps) or 100
  sides = {"off": compiled_step(config, 0, batch), "on": compiled_step(config, every, batch)}
  states = {name: side[1] for name, side in sides.items()}
  times = {name: [] for name in sides}
  for name in sides:  # warm-up, untimed
    states[name] = sides[name][0](states[name], batch)[0]
    jax.block_until_ready(states[name])
  for _ in range(_BLOCKS.value):
    for name, (compiled, _, _) in sides.items():
      state = states[name]
      t0 = time.perf_counter()
      for _ in range(_STEPS.value):
        state, metrics, *_ = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      times[name].append((time.perf_counter() - t0) / _STEPS.value)
      states[name] = state
  med = {name: float(np.median(t)) for name, t in times.items()}
  for name in sides:
    print(f"panels {name:3s}: median {med[name] * 1e3:8.1f} ms/step over {_BLOCKS.value} "
          f"blocks of {_STEPS.value}; {sides[name][2] / 1e9:.2f} GFLOP/step")
  ratios = [b / a for a, b in zip(times["off"], times["on"])]
  print(f"on / off: {med['on'] / med['off']:.4f} (median of pairs {np.median(ratios):.4f}; "
        f"{config.method.name}, crop {tuple(config.data.crop_size)}, batch "
        f"{config.train.batch_size}, {jax.default_backend()})")


if __name__ == "__main__":
  app.run(main)
