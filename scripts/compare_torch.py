"""Times the same training step in JAX and in PyTorch on this machine, side by side.

  python scripts/compare_torch.py                          # R18, R50, R101, CUT generator
  python scripts/compare_torch.py --nets=r50 --size=256 --blocks=6
  python scripts/compare_torch.py --nets= --ops            # per-convolution microbenchmarks
  python scripts/compare_torch.py --cores=2 --json=bench/compare.json

Needs torch (the test extra: `pip install -e .[test]`). Both sides run in this one
process, pinned to the same `--cores` (CPU affinity, torch's thread count and, for one
core, XLA:CPU's Eigen threading off), and take turns: a block of `--steps` JAX steps, a
block of torch steps, and so on for `--blocks` pairs, so machine load hits both alike.
Reported per network: the median seconds per step of each side, the median of the
per-pair ratios JAX / torch, and the FLOPs of both steps (XLA's cost analysis; torch's
FlopCounterMode, which counts matmuls and convolutions only).

The step is the segmentor's (or generator's) own: train-mode forward, a per-pixel
cross-entropy on the stride-8 logits against fixed random labels (for the generator an
L1 loss to a fixed image), backward, AdamW. Weights are random and of the same shapes on
both sides; the torch networks are the tests' re-statements of mmseg's DeepLabV2 and of
CUT's ResnetGenerator (`tests/torch_deeplab.py`, `tests/torch_cut.py`).
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NETS = {"r18": ("deeplab", 18), "r50": ("deeplab", 50), "r101": ("deeplab", 101),
        "cut": ("generator", 9)}
# (name, kernel, stride, dilation, channels in, channels out, feature-map side)
OPS = (("1x1 1024->2048", 1, 1, 1, 1024, 2048, 32),
       ("1x1 256->64", 1, 1, 1, 256, 64, 64),
       ("3x3 64->64", 3, 1, 1, 64, 64, 64),
       ("3x3 s2 128->128", 3, 2, 1, 128, 128, 64),
       ("3x3 d2 256->256", 3, 1, 2, 256, 256, 32),
       ("3x3 d4 512->512", 3, 1, 4, 512, 512, 32),
       ("7x7 64->3 (to image)", 7, 1, 1, 64, 3, 128))


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--nets", default="r18,r50,r101,cut", help=f"comma list of {sorted(NETS)}")
  p.add_argument("--size", type=int, default=128, help="image side of the DeepLabV2 steps")
  p.add_argument("--cut_size", type=int, default=128, help="image side of the generator step")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--width", type=float, default=1.0, help="backbone channel multiplier")
  p.add_argument("--ops", action="store_true", help="also time single convolutions")
  p.add_argument("--steps", type=int, default=2, help="steps per timed block")
  p.add_argument("--blocks", type=int, default=4, help="interleaved A/B block pairs")
  p.add_argument("--cores", type=int, default=1, help="CPU cores both sides may use")
  p.add_argument("--json", default=None, help="also write the results here")
  return p.parse_args()


def pin(cores):
  """Same cores for both sides; must run before jax and torch start their thread pools."""
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
  if cores == 1:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()


# -- the two sides' steps ---------------------------------------------------------------------
def _numpy_like(shapes, rng):
  """Random float32 arrays of the given abstract tree (fan-in scaled kernels)."""
  import jax
  import numpy as np

  def fill(path, s):
    leaf = str(getattr(path[-1], "key", path[-1]))
    if leaf == "kernel":
      return np.asarray(rng.normal(0, (2.0 / max(1, np.prod(s.shape[:-1]))) ** 0.5, s.shape),
                        np.float32)
    value = 1.0 if leaf in ("scale", "var") else 0.0
    return np.full(s.shape, value, np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _flops(compiled):
  """XLA's FLOP count of a compiled program (one device)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def jax_step(kind, arg, args):
  """(jitted step, initial carry, FLOPs per step) of the JAX side."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from confeti_jax.models import DeepLabV2, conv, cut

  rng = np.random.default_rng(0)
  if kind == "deeplab":
    size = args.size
    model = DeepLabV2(num_classes=19, backbone=f"resnet{arg}", width=args.width)
    x = jnp.asarray(rng.normal(size=(args.batch, size, size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 19, (args.batch, (size + 7) // 8, (size + 7) // 8)))

    def loss_fn(params, stats):
      (logits, _), upd = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                     mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd
  else:
    size = args.cut_size
    model = cut.ResnetGenerator(ngf=64, n_blocks=arg)
    x = jnp.asarray(rng.uniform(-1, 1, (args.batch, size, size, 3)), jnp.float32)
    target = jnp.asarray(rng.uniform(-1, 1, x.shape), jnp.float32)

    def loss_fn(params, stats):
      out, _ = model.apply({"params": params}, x)
      return jnp.abs(out - target).mean(), {"batch_stats": stats}
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, **({"train": False} if kind == "deeplab" else {})))
  variables = _numpy_like(shapes, rng)
  params, stats = variables["params"], variables.get("batch_stats", {})
  tx = optax.adamw(1e-4, weight_decay=1e-2)

  def step(carry):
    params, stats, opt = carry
    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), upd["batch_stats"], opt
  carry = (params, stats, tx.init(params))
  compiled = jax.jit(step, donate_argnums=0,
                     compiler_options=conv.compiler_options()).lower(carry).compile()
  return compiled, carry, _flops(compiled)


def torch_step(kind, arg, args):
  """(step callable, FLOPs per step) of the PyTorch side."""
  import numpy as np
  import torch
  from torch.utils.flop_counter import FlopCounterMode

  from tests.torch_cut import t_generator
  from tests.torch_deeplab import TorchDeepLabV2

  rng = np.random.default_rng(0)
  torch.manual_seed(0)
  if kind == "deeplab":
    size = args.size
    net = TorchDeepLabV2(arg, args.width, 19)
    x = torch.from_numpy(rng.normal(size=(args.batch, 3, size, size)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 19, (args.batch, (size + 7) // 8,
                                                   (size + 7) // 8)))
    loss_fn = lambda: torch.nn.functional.cross_entropy(net(x)[0], labels)
  else:
    size = args.cut_size
    net = t_generator(64, arg)
    x = torch.from_numpy(rng.uniform(-1, 1, (args.batch, 3, size, size)).astype(np.float32))
    target = torch.from_numpy(rng.uniform(-1, 1, x.shape).astype(np.float32))
    loss_fn = lambda: (net(x)[0] - target).abs().mean()
  net.train()
  opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-2)

  def step():
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    opt.step()
  with FlopCounterMode(display=False) as counter:
    step()
  return step, float(counter.get_total_flops())


# -- single convolutions ----------------------------------------------------------------------
def jax_op(k, stride, dilation, cin, cout, side, batch, part):
  """The project's convolution (`resnet.conv`, as the backbone builds it) and one of its
  three passes, jitted: 'forward', 'input grad' or 'weight grad'."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from confeti_jax.models.conv import compiler_options
  from confeti_jax.models.resnet import conv

  rng = np.random.default_rng(0)
  layer = conv(cout, k, stride=stride, dilation=dilation)
  x = jnp.asarray(rng.normal(size=(batch, side, side, cin)), jnp.float32)
  params = _numpy_like(jax.eval_shape(lambda: layer.init(jax.random.key(0), x)), rng)
  fwd = lambda p, x: layer.apply(p, x)
  y, vjp = jax.vjp(fwd, params, x)
  g = jnp.ones_like(y)
  fn = {"forward": lambda p, x, g: fwd(p, x),
        "input grad": lambda p, x, g: jax.vjp(lambda x: fwd(p, x), x)[1](g)[0],
        "weight grad": lambda p, x, g: jax.vjp(lambda p: fwd(p, x), p)[1](g)[0]}[part]
  compiled = jax.jit(fn, compiler_options=compiler_options()).lower(params, x, g).compile()
  return (lambda: jax.block_until_ready(compiled(params, x, g))), _flops(compiled)


def torch_op(k, stride, dilation, cin, cout, side, batch, part):
  import torch
  from torch.utils.flop_counter import FlopCounterMode

  torch.manual_seed(0)
  x = torch.randn(batch, cin, side, side)
  w = torch.randn(cout, cin, k, k) * (2.0 / (cin * k * k)) ** 0.5
  pad = dilation * (k - 1) // 2
  conv = lambda: torch.nn.functional.conv2d(x, w, None, stride, pad, dilation)
  g = torch.ones_like(conv())
  mask = {"forward": None, "input grad": [True, False, False],
          "weight grad": [False, True, False]}[part]

  def fn():
    with torch.no_grad():
      if mask is None:
        return conv()
      return torch.ops.aten.convolution_backward(
          g, x, w, None, [stride] * 2, [pad] * 2, [dilation] * 2, False, [0, 0], 1, mask)
  with FlopCounterMode(display=False) as counter:
    fn()
  return fn, float(counter.get_total_flops())


# -- timing ------------------------------------------------------------------------------------
def interleaved(run_a, run_b, steps, blocks):
  """Seconds per step of each side, block by block, A then B, after one warm-up each."""
  run_a(), run_b()
  a, b = [], []
  for _ in range(blocks):
    for run, out in ((run_a, a), (run_b, b)):
      t0 = time.perf_counter()
      for _ in range(steps):
        run()
      out.append((time.perf_counter() - t0) / steps)
  return a, b


def summary(name, a, b, flops_a, flops_b):
  ratios = [x / y for x, y in zip(a, b)]
  row = {"name": name, "jax_s": statistics.median(a), "torch_s": statistics.median(b),
         "ratio": statistics.median(ratios), "ratio_min": min(ratios),
         "ratio_max": max(ratios), "jax_gflop": flops_a / 1e9, "torch_gflop": flops_b / 1e9}
  print(f"{name:<28} jax {row['jax_s']:8.4f} s  torch {row['torch_s']:8.4f} s  "
        f"jax/torch {row['ratio']:.2f}x ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})  "
        f"GFLOP jax {row['jax_gflop']:.2f} torch {row['torch_gflop']:.2f}", flush=True)
  return row


def main():
  args = _parse()
  pin(args.cores)
  import jax
  import torch
  torch.set_num_threads(args.cores)
  torch.set_num_interop_threads(1)
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
        f"{args.cores} core(s), batch {args.batch}, {args.blocks} blocks x {args.steps} steps",
        flush=True)
  rows = []
  for name in filter(None, args.nets.split(",")):
    kind, arg = NETS[name]
    t0 = time.perf_counter()
    compiled, carry, flops_j = jax_step(kind, arg, args)
    compile_s = time.perf_counter() - t0
    holder = [carry]

    def run_jax():
      holder[0] = jax.block_until_ready(compiled(holder[0]))
    step_t, flops_t = torch_step(kind, arg, args)
    a, b = interleaved(run_jax, step_t, args.steps, args.blocks)
    side = args.size if kind == "deeplab" else args.cut_size
    label = (f"DeepLabV2-R{arg} {side}px" if kind == "deeplab" else f"CUT generator {side}px")
    rows.append({**summary(label, a, b, flops_j, flops_t), "jax_compile_s": compile_s})
  if args.ops:
    for name, *spec in OPS:
      for part in ("forward", "input grad", "weight grad"):
        run_a, flops_a = jax_op(*spec, args.batch, part)
        run_b, flops_b = torch_op(*spec, args.batch, part)
        a, b = interleaved(run_a, run_b, max(args.steps, 3), args.blocks)
        rows.append(summary(f"{name} {spec[-1]}px {part}", a, b, flops_a, flops_b))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({"cores": args.cores, "batch": args.batch, "jax": jax.__version__,
                 "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
