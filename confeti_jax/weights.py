"""Import of pretrained and released PyTorch weights into the flax variable trees.

Files are read by weights_files.py (`.npz`, `.safetensors`; `.pth` only with torch), whose
names are re-exported here. A state dict (torch key -> numpy array) is turned into
{"params": ..., "batch_stats": ...} by a converter from `CONVERTERS` (format name ->
function); other modules register theirs with `@register("name")`. Mechanical renaming
rules (confeti_jax/models/resnet.py):

  stem.0/.3/.6 (mmseg) or conv1.0/.3/.6 (timm)   -> backbone/stem_conv1..3
  stem.1/.4/.7 (mmseg) or conv1.1/.4, bn1 (timm) -> backbone/stem_bn1..3
  conv1 / bn1 (torchvision, timm resnetNN)       -> backbone/stem_conv1 / stem_bn1, the
                                                    7x7 stem (config model.stem=7x7)
  layerI.J.convK / .bnK / .downsample.0 / .1     -> backbone/layerI_J/convK / bnK /
                                                    downsample_conv / downsample_bn
  decode_head.aspp_modules.K.conv                -> aspp_K
  conv weight (O, I, kh, kw) -> kernel (kh, kw, I, O); BN weight/bias -> scale/bias,
  running_mean/var -> batch_stats mean/var; num_batches_tracked and fc.* are dropped.

The AdaIN VGG-19 encoder takes pytorch-AdaIN's vgg_normalised.pth or torchvision's vgg19
(features.N; its mean/std normalisation becomes conv0, and it needs padding="zeros").

Any shape or key mismatch is an error listing the first missing / unexpected keys.
"""

import os
import re

import numpy as np
from flax import traverse_util

from confeti_jax import weights_mit

# Reading lives in weights_files.py; its names are re-exported so `weights.X` keeps working.
from confeti_jax.weights_files import (  # noqa: F401
  CONVERT_COMMAND,
  WeightsError,
  load_state_dict,
  torch_to_numpy,
  unwrap_checkpoint,
)

CONVERTERS = {}
_SHOW = 8  # keys listed in an error


def register(name):
  """Decorator adding a converter `fn(state_dict) -> variables` to CONVERTERS."""
  def wrap(fn):
    CONVERTERS[name] = fn
    return fn
  return wrap


# ----------------------------------------------------------------------------------------
# Key renaming.

_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
# Stem module names per source layout -> flax names ('deep' stems: 3 convs; torchvision: 1).
_STEM_MODULES = {
    "mmseg": {"stem.0": "stem_conv1", "stem.1": "stem_bn1", "stem.3": "stem_conv2",
              "stem.4": "stem_bn2", "stem.6": "stem_conv3", "stem.7": "stem_bn3"},
    "timm": {"conv1.0": "stem_conv1", "conv1.1": "stem_bn1", "conv1.3": "stem_conv2",
             "conv1.4": "stem_bn2", "conv1.6": "stem_conv3", "bn1": "stem_bn3"},
    "torchvision": {"conv1": "stem_conv1", "bn1": "stem_bn1"},
}
_LAYER = re.compile(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)$")
_IGNORED = re.compile(r"(num_batches_tracked$|^(head\.)?fc\.)")  # BN counters, classifier


def _leaf(module, leaf, array):
  """(collection, leaf name, converted array) of one torch tensor of a conv or BN module."""
  if "conv" in module:
    if leaf == "weight":
      return "params", "kernel", np.transpose(array, (2, 3, 1, 0))
    return "params", "bias", array
  collection, name = _BN_LEAVES[leaf]
  return collection, name, array


def _resnet_path(key, stem):
  """Flax module name inside 'backbone' of a backbone key, or None when not a backbone key."""
  m = _LAYER.match(key)
  if m:
    i, j, part, leaf = m.groups()
    part = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(part, part)
    return (f"layer{i}_{j}", part), leaf
  module, _, leaf = key.rpartition(".")
  name = _STEM_MODULES[stem].get(module)
  return ((name,), leaf) if name else None


def _backbone(state_dict, stem, prefix=""):
  """Converts the ResNet keys under `prefix`; returns (variables, keys not understood)."""
  flat, unknown = {}, []
  for key, array in state_dict.items():
    if not key.startswith(prefix) or _IGNORED.search(key):
      continue
    found = _resnet_path(key[len(prefix):], stem)
    if found is None:
      unknown.append(key)
      continue
    modules, leaf = found
    collection, name, value = _leaf(modules[-1], leaf, np.asarray(array, np.float32))
    flat[(collection, "backbone", *modules, name)] = value
  return flat, unknown


def _finish(flat, unknown, fmt):
  if unknown:
    raise WeightsError(f"{len(unknown)} keys do not belong to the {fmt} layout, e.g. "
                       f"{unknown[:_SHOW]}; is this the right format?")
  if not flat:
    raise WeightsError(f"No {fmt} keys found in the state dict.")
  return traverse_util.unflatten_dict(flat)


@register("mmseg_resnet_v1c")
def convert_mmseg_resnet(state_dict):
  """open-mmlab `resnet{50,101}_v1c-*.pth` (keys stem.N, layerI.J...; optional 'backbone.')."""
  prefix = "backbone." if any(k.startswith("backbone.") for k in state_dict) else ""
  return _finish(*_backbone(state_dict, "mmseg", prefix), "mmseg ResNet-V1c")


@register("timm_resnet_c")
def convert_timm_resnet(state_dict):
  """timm `resnet{50,101}c` (deep 3x3 stem conv1.0/.3/.6, bn1; no avg-down shortcut)."""
  if any(".downsample.2." in k for k in state_dict):
    raise WeightsError("This timm ResNet uses average-pool shortcuts (the 'd' variants); "
                       "ResNetV1c has plain strided 1x1 shortcuts. Use timm resnet101c or "
                       "open-mmlab resnet101_v1c weights.")
  return _finish(*_backbone(state_dict, "timm"), "timm ResNet-C")


@register("torchvision_resnet")
def convert_torchvision_resnet(state_dict):
  """torchvision / timm `resnet{50,101}` (single 7x7 stem conv1, bn1; fc.* dropped).

  Loads into ResNetV1c(stem="7x7") (config model.stem=7x7); the blocks are named and
  strided as in ResNet-V1c.
  """
  return _finish(*_backbone(state_dict, "torchvision"), "torchvision ResNet")


_ASPP = re.compile(r"decode_head\.aspp_modules\.(\d+)\.(?:conv|0)\.(weight|bias)$")


@register("mmseg_deeplabv2")
def convert_mmseg_deeplabv2(state_dict):
  """Whole mmseg DeepLabV2 segmentor (backbone.*, decode_head.aspp_modules.K.conv.*).

  The CONFETI/DAFormer UDA checkpoints hold the student under 'model.' beside the
  teacher ('ema_model.'), the ImageNet copy ('imnet_model.') and auxiliary heads; the
  student is what the reference evaluates, so 'model.' is taken when present.
  """
  prefix = "model." if any(k.startswith("model.") for k in state_dict) else ""
  student = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  flat, unknown = _backbone(student, "mmseg", "backbone.")
  for key, array in student.items():
    if key.startswith("backbone.") or _IGNORED.search(key):
      continue
    m = _ASPP.match(key)
    if not m:
      unknown.append(prefix + key)
      continue
    collection, name, value = _leaf("conv", m.group(2), np.asarray(array, np.float32))
    flat[(collection, f"aspp_{m.group(1)}", name)] = value
  return _finish(flat, unknown, "mmseg DeepLabV2")


@register("mit")
def convert_mit(state_dict):
  """SegFormer ImageNet `mit_bN.pth` (confeti_jax/weights_mit.py has the renaming)."""
  prefix = "backbone." if any(k.startswith("backbone.") for k in state_dict) else ""
  return _finish(*weights_mit.convert_mit(state_dict, prefix), "MiT")


@register("daformer")
def convert_daformer(state_dict):
  """Whole DAFormer / SegFormer segmentor (MiT backbone.*, decode_head.*; 'model.' taken)."""
  return _finish(*weights_mit.convert_daformer(state_dict), "DAFormer")


@register("vgg19_normalised")
def convert_vgg19_normalised(state_dict):
  """pytorch-AdaIN `vgg_normalised.pth` -> the AdaIN VGGEncoder (models/adain.py)."""
  from confeti_jax.models import adain  # flax-side module, imported on use
  return {"params": adain.convert_vgg_normalised(state_dict)}


@register("vgg19_torchvision")
def convert_vgg19_torchvision(state_dict):
  """torchvision `vgg19` (features.N; classifier.* dropped) -> the AdaIN VGGEncoder.

  conv0 is synthesised as torchvision's ImageNet mean/std normalisation of RGB in [0, 1].
  torchvision pads with zeros and pools with floor: a torchvision VGG must run with
  VGGEncoder(padding="zeros") (config method.style.vgg_padding=zeros) to reproduce its
  features.
  """
  from confeti_jax.models import adain
  return {"params": adain.convert_vgg_torchvision(state_dict)}


@register("cut_generator")
def convert_cut_generator(state_dict):
  """CUT `latest_net_G.pth` (keys model.N[.conv_block.J], optional 'module.') -> G."""
  from confeti_jax.models import cut  # flax-side module, imported on use
  return {"params": cut.convert_generator(state_dict)}


@register("cut_discriminator")
def convert_cut_discriminator(state_dict):
  """CUT `latest_net_D.pth` (PatchGAN, keys model.N) -> D."""
  from confeti_jax.models import cut
  return {"params": cut.convert_discriminator(state_dict)}


@register("cut_patch_mlp")
def convert_cut_patch_mlp(state_dict):
  """CUT `latest_net_F.pth` (keys mlp_I.0 / mlp_I.2) -> the patch MLPs."""
  from confeti_jax.models import cut
  return {"params": cut.convert_patch_mlp(state_dict)}


def aux_head_kernels(state_dict):
  """1x1 kernels of the CONFETI auxiliary heads ('aux_heads.I.<conv>.weight' -> HWIO).

  {"aux_heads_I": {conv name: {"kernel"[, "bias"]}}}, for the heads' own modules to
  place; the segmentor converter above leaves them out.
  """
  out = {}
  for key, array in state_dict.items():
    m = re.match(r"aux_heads\.(\d+)\.(\w+)\.(weight|bias)$", key)
    if m:
      _, name, value = _leaf("conv", m.group(3), np.asarray(array, np.float32))
      out.setdefault(f"aux_heads_{m.group(1)}", {}).setdefault(m.group(2), {})[name] = value
  return out


def detect_format(state_dict):
  """The CONVERTERS name for a state dict, from its key names."""
  keys = list(state_dict)
  has = lambda pattern: any(re.search(pattern, k) for k in keys)
  if has(r"(^|\.)decode_head\.aspp_modules\."):
    return "mmseg_deeplabv2"
  if has(r"(^|\.)backbone\.patch_embed1\.") and has(r"(^|\.)decode_head\."):
    return "daformer"
  if has(r"^(backbone\.)?patch_embed1\.proj\.weight$"):
    return "mit"
  if has(r"^(backbone\.)?stem\.0\.weight$"):
    return "mmseg_resnet_v1c"
  if has(r"^conv1\.0\.weight$"):
    return "timm_resnet_c"
  if has(r"^(module\.)?model\.\d+\.conv_block\."):
    return "cut_generator"
  if has(r"^(module\.)?model\.0\.weight$"):
    return "cut_discriminator"
  if has(r"^(module\.)?mlp_\d+\.0\.weight$"):
    return "cut_patch_mlp"
  if has(r"^conv1\.weight$"):
    return "torchvision_resnet"
  if has(r"^(module\.)?features\.\d+\.weight$"):
    return "vgg19_torchvision"
  raise WeightsError(f"Unknown weights layout (first keys {keys[:_SHOW]}); known formats: "
                     f"{sorted(CONVERTERS)}.")


def convert(state_dict, fmt="auto"):
  """Flax variables from a numpy state dict with the named (or detected) converter."""
  fmt = detect_format(state_dict) if fmt == "auto" else fmt
  if fmt not in CONVERTERS:
    raise WeightsError(f"Unknown weights format {fmt!r}; known: {sorted(CONVERTERS)}.")
  return CONVERTERS[fmt](state_dict)


# ----------------------------------------------------------------------------------------
# Fitting converted weights into a model's variables.


def _torch_name(path):
  """A flax variable path as the mmseg state-dict key it comes from, for error messages."""
  collection, *modules, leaf = path
  out = []
  for m in modules:
    if m.startswith("stem_"):
      k = 3 * (int(m[-1]) - 1) + (0 if "conv" in m else 1)
      out += ["stem", str(k)]
    elif m.startswith("layer"):
      out.append(m.replace("_", "."))
    elif m.startswith("downsample_"):
      out += ["downsample", "0" if m.endswith("conv") else "1"]
    elif m.startswith("aspp_"):
      out += ["decode_head.aspp_modules", m[len("aspp_"):], "conv"]
    else:
      out.append(m)
  names = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
           "var": "running_var"}
  return ".".join(out + [names.get(leaf, leaf)]) + f" ({collection}/{'/'.join(path[1:])})"


def _stem_kind(paths):
  """'deep' or '7x7': the ResNet stem among flat variable paths (None: no backbone)."""
  modules = {p[2] for p in paths if len(p) > 3 and p[1] == "backbone"}
  if "stem_conv2" in modules:
    return "deep"
  return "7x7" if "stem_conv1" in modules else None


def merge(variables, converted, *, select=lambda name: True, source="weights"):
  """`variables` with every leaf whose top-level module satisfies `select` replaced.

  Every selected model leaf must be provided with the same shape and nothing
  else may be provided; otherwise a WeightsError lists the first differences (first the
  model.stem to set when the file's ResNet stem is the other kind). Leaves
  become float32 numpy arrays (or keep the model's dtype), ready for jnp.asarray.
  """
  flat_model = traverse_util.flatten_dict(variables)
  flat_new = traverse_util.flatten_dict(converted)
  inside = lambda path: select(path[1])
  wanted = {p for p in flat_model if inside(p)}
  missing = sorted(_torch_name(p) for p in wanted - flat_new.keys())
  unexpected = sorted(_torch_name(p) for p in flat_new.keys() - wanted)
  wrong = sorted(f"{_torch_name(p)}: file {tuple(flat_new[p].shape)} vs model "
                 f"{tuple(flat_model[p].shape)}" for p in wanted & flat_new.keys()
                 if tuple(flat_new[p].shape) != tuple(flat_model[p].shape))
  if missing or unexpected or wrong:
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatch", wrong)):
      if items:
        parts.append(f"{len(items)} {title}: {items[:_SHOW]}")
    file_stem, model_stem = _stem_kind(flat_new), _stem_kind(wanted)
    if file_stem and model_stem and file_stem != model_stem:
      parts.insert(0, f"the file has a {file_stem} ResNet stem and the model a {model_stem} "
                      f"one: set --config.model.stem={file_stem}")
    raise WeightsError(f"{source} does not fit the model ({'; '.join(parts)}).")
  out = dict(flat_model)
  for path in wanted:
    out[path] = np.asarray(flat_new[path], dtype=flat_model[path].dtype)
  return traverse_util.unflatten_dict(out)


def load_into(variables, path, *, what="backbone", fmt="auto"):
  """Loads the weights file at `path` into `variables` (what = 'backbone' or 'segmentor').

  Errors name the path, the key layout that was expected and the conversion command.
  """
  layouts = {
      "backbone": ("an ImageNet backbone: open-mmlab resnet101_v1c (keys stem.N, "
                   "layerI.J.convK) or timm resnet101c with model.stem=deep, torchvision / "
                   "timm resnet101 (conv1, bn1, layerI.J...) with model.stem=7x7, or "
                   "SegFormer mit_bN.pth (patch_embedI, blockI.J) with model.backbone=mit_bN",
                   lambda m: m == "backbone"),
      "segmentor": ("a whole mmseg DeepLabV2 (backbone.*, decode_head.aspp_modules.K.conv.*) "
                    "or DAFormer / SegFormer (MiT backbone.*, decode_head.*), optionally "
                    "under 'model.' as in CONFETI/DAFormer checkpoints",
                    lambda m: m in ("backbone", "bottleneck", "conv_seg", "fuse")
                    or m.startswith(("aspp_", "embed_"))),
  }
  expected, select = layouts[what]
  path = os.fspath(path)
  try:
    converted = convert(load_state_dict(path), fmt)
    if what == "backbone" and len(converted.get("params", {})) > 1:  # a whole segmentor
      converted = {c: {"backbone": t["backbone"]} for c, t in converted.items()}
    return merge(variables, converted, select=select, source=f"{path!r}")
  except WeightsError as e:
    raise WeightsError(
        f"Cannot load {path!r} as {what}: {e} Expected {expected}, with the model's "
        f"backbone/stem/width/num_classes. Convert a PyTorch .pth with `{CONVERT_COMMAND}`."
    ) from e
