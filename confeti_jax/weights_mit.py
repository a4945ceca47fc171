"""Key renaming of MiT encoders and DAFormer / SegFormer segmentors (torch -> flax).

Pure numpy; `weights.py` registers these as the formats 'mit' (SegFormer's ImageNet
`mit_b0..b5.pth`, keys patch_embedI / blockI.J / normI, optionally under 'backbone.')
and 'daformer' (a whole segmentor: backbone.* and decode_head.*; released DAFormer /
HRDA / MIC checkpoints hold the student under 'model.', which is taken). Rules
(confeti_jax/models/mit.py and daformer.py):

  patch_embedI.proj / .norm            -> backbone/patch_embedI/proj / norm
  blockI.J.norm1|norm2|attn.*|mlp.*    -> backbone/blockI_J/... (mlp.dwconv.dwconv -> mlp/dwconv)
  normI                                -> backbone/normI
  decode_head.embed_layers.I.proj      -> embed_I            (DAFormer head)
  decode_head.linear_c.I.proj          -> embed_I            (SegFormer head)
  decode_head.fuse_layer.aspp_modules.0.{conv,bn}                 -> aspp_0/{conv,bn}
  decode_head.fuse_layer.aspp_modules.K.depthwise_conv.{conv,bn}  -> aspp_K_depthwise/...
  decode_head.fuse_layer.aspp_modules.K.pointwise_conv.{conv,bn}  -> aspp_K_pointwise/...
  decode_head.fuse_layer.bottleneck.{conv,bn} -> bottleneck/...; linear_fuse -> fuse
  decode_head.conv_seg / linear_pred    -> conv_seg

Linear weight (out, in) -> kernel (in, out); conv (O, I, kh, kw) -> (kh, kw, I, O);
LayerNorm weight -> scale; BN running stats -> batch_stats. The ImageNet classifier
(head.*) and BN counters are dropped.
"""

import re

import numpy as np

_DROPPED = re.compile(r"(num_batches_tracked$|^head\.)")
_LINEARS = ("q", "kv", "proj", "fc1", "fc2")
_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_HEAD = [
    (re.compile(r"(?:embed_layers|linear_c)\.(\d)\.proj$"), lambda m: (f"embed_{m[1]}",), "linear"),
    (re.compile(r"fuse_layer\.aspp_modules\.0\.(conv|bn)$"), lambda m: ("aspp_0", m[1]), None),
    (re.compile(r"fuse_layer\.aspp_modules\.(\d)\.(depthwise|pointwise)_conv\.(conv|bn)$"),
     lambda m: (f"aspp_{m[1]}_{m[2]}", m[3]), None),
    (re.compile(r"fuse_layer\.bottleneck\.(conv|bn)$"), lambda m: ("bottleneck", m[1]), None),
    (re.compile(r"linear_fuse\.(conv|bn)$"), lambda m: ("fuse", m[1]), None),
    (re.compile(r"(?:conv_seg|linear_pred)$"), lambda m: ("conv_seg",), "conv"),
]


def _leaf(kind, leaf, array):
  """(collection, flax leaf, array) for a tensor of a 'linear', 'conv', 'norm' or 'bn'."""
  if kind == "bn":
    collection, name = _BN[leaf]
    return collection, name, array
  if leaf == "bias":
    return "params", "bias", array
  if kind == "norm":
    return "params", "scale", array
  if kind == "linear":
    return "params", "kernel", array.T
  return "params", "kernel", np.transpose(array, (2, 3, 1, 0))


def _encoder_module(key):
  """(flax modules inside 'backbone', kind) of an encoder module name, or None."""
  m = re.fullmatch(r"patch_embed(\d)\.(proj|norm)", key)
  if m:
    return (f"patch_embed{m[1]}", m[2]), "conv" if m[2] == "proj" else "norm"
  m = re.fullmatch(r"norm(\d)", key)
  if m:
    return (key,), "norm"
  m = re.fullmatch(r"block(\d)\.(\d+)\.(.+)", key)
  if not m:
    return None
  rest = m[3].replace("mlp.dwconv.dwconv", "mlp.dwconv").split(".")
  last = rest[-1]
  kind = ("linear" if last in _LINEARS else "norm" if last.startswith("norm")
          else "conv")  # attn.sr, mlp.dwconv
  return (f"block{m[1]}_{m[2]}", *rest), kind


def convert_mit(state_dict, prefix=""):
  """(flat flax variables, keys not understood) of the encoder keys under `prefix`."""
  flat, unknown = {}, []
  for key, array in state_dict.items():
    if not key.startswith(prefix) or _DROPPED.search(key[len(prefix):]):
      continue
    module, _, leaf = key[len(prefix):].rpartition(".")
    found = _encoder_module(module)
    if found is None:
      unknown.append(key)
      continue
    modules, kind = found
    collection, name, value = _leaf(kind, leaf, np.asarray(array, np.float32))
    flat[(collection, "backbone", *modules, name)] = value
  return flat, unknown


def convert_daformer(state_dict):
  """(flat flax variables, keys not understood) of a whole DAFormer/SegFormer segmentor."""
  prefix = "model." if any(k.startswith("model.") for k in state_dict) else ""
  student = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  flat, unknown = convert_mit(student, "backbone.")
  for key, array in student.items():
    if key.startswith("backbone.") or _DROPPED.search(key):
      continue
    module, _, leaf = key.removeprefix("decode_head.").rpartition(".")
    for pattern, names, kind in _HEAD:
      m = pattern.fullmatch(module)
      if m and key.startswith("decode_head."):
        modules = names(m)
        collection, name, value = _leaf(kind or modules[-1], leaf, np.asarray(array, np.float32))
        flat[(collection, *modules, name)] = value
        break
    else:
      unknown.append(prefix + key)
  return flat, unknown
