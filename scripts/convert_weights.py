"""Converts a PyTorch checkpoint (.pth) into an .npz of numpy arrays under the torch key names.

Torch is needed only here, once, on any machine; training and evaluation read the .npz
(or a timm .safetensors) with numpy alone. The state dict is taken from mmcv's
{"state_dict": ...} (or {"model": ...}) wrapper when there is one; half and bfloat16
tensors are widened to float32; non-tensor entries (meta, optimizer) are dropped.

  python scripts/convert_weights.py resnet101_v1c-e67eebb6.pth r101_v1c.npz
  python scripts/convert_weights.py released_confeti.pth confeti_gta.npz --check
  python scripts/convert_weights.py latest_net_G.pth cut_G.npz --check
  python scripts/convert_weights.py latest_net_D.pth cut_D.npz --check --format=cut_discriminator

--check also runs the matching converter of confeti_jax/weights.py (detected from the key
names, or --format) and prints what it produced, so a wrong file is caught before a run.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_pth(path, unsafe_pickle=False):
  """{key: numpy} of a .pth; refuses arbitrary pickles unless unsafe_pickle (trusted files)."""
  try:
    import torch
  except ImportError:
    sys.exit("Reading a .pth needs torch: `pip install torch` (CPU is enough), then rerun.")
  from confeti_jax import weights

  try:
    obj = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
  except Exception as e:  # torch raises UnpicklingError and plain RuntimeErrors alike
    if unsafe_pickle:
      raise
    sys.exit(f"torch.load(weights_only=True) refused {path!r} ({type(e).__name__}: {e}).\n"
             "If you trust the file (e.g. an official release), rerun with --unsafe_pickle.")
  state_dict = weights.unwrap_checkpoint(obj)
  if not isinstance(state_dict, dict):
    sys.exit(f"{path!r} holds a {type(state_dict).__name__}, not a state dict.")
  return weights.torch_to_numpy(state_dict)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("input", help=".pth / .pt checkpoint")
  parser.add_argument("output", help=".npz to write")
  parser.add_argument("--check", action="store_true", help="run the flax converter on it")
  parser.add_argument("--format", default="auto",
                      help="converter for --check (confeti_jax.weights.CONVERTERS, e.g. "
                           "cut_generator, cut_discriminator, cut_patch_mlp)")
  parser.add_argument("--unsafe_pickle", action="store_true",
                      help="allow arbitrary pickled objects (trusted files only)")
  args = parser.parse_args(argv)
  if not args.output.endswith(".npz"):
    sys.exit("The output must end in .npz.")
  state_dict = read_pth(args.input, args.unsafe_pickle)
  if not state_dict:
    sys.exit(f"No tensors found in {args.input!r}.")
  tmp = args.output + ".tmp.npz"
  np.savez(tmp, **state_dict)
  os.replace(tmp, args.output)
  params = sum(int(np.prod(v.shape)) for v in state_dict.values())
  print(f"Wrote {len(state_dict)} arrays ({params:,} values) to {args.output}")
  if args.check:
    from flax import traverse_util

    from confeti_jax import weights

    fmt = weights.detect_format(state_dict) if args.format == "auto" else args.format
    flat = traverse_util.flatten_dict(weights.convert(state_dict, fmt))
    print(f"Format {fmt}: {len(flat)} flax leaves, e.g. "
          f"{['/'.join(k) for k in list(flat)[:3]]}")


if __name__ == "__main__":
  main()
