"""ResNet-V1c backbone (deep stem, dilated, output stride 8), as the reference mmseg 0.16 code.

The reference segmentor is DeepLabV2 on an OpenMMLab ResNet-V1c: a three-convolution
"deep" stem instead of the 7x7 one, `style='pytorch'` bottlenecks (stride on the 3x3
convolution), strides (1, 2, 1, 1) and dilations (1, 1, 2, 4) so that layer3 and layer4
keep stride 8, and `contract_dilation=True` (the first block of a dilated stage uses half
the dilation). Every padding is written out symmetrically because 'SAME' pads stride-2
convolutions on the bottom/right only, which would shift every feature map by a pixel
relative to the PyTorch weights this module has to load.

`stem="7x7"` swaps the deep stem for torchvision's single 7x7 stride-2 convolution, BN,
ReLU (then the same max-pool), so that torchvision / timm `resnet{50,101}` weights load
(`conv1` / `bn1` -> stem_conv1 / stem_bn1; the rest of the tree is unchanged, as their
bottlenecks also stride the 3x3 convolution). ADVENT's Caffe-style DeepLab ResNet strides
the first 1x1 convolution instead; that variant is not reproduced.

Parameter names are chosen so that an mmseg state-dict key maps mechanically::

  stem.0 / stem.1 (conv / BN)      -> stem_conv1 / stem_bn1
  stem.3 / stem.4                  -> stem_conv2 / stem_bn2
  stem.6 / stem.7                  -> stem_conv3 / stem_bn3
  layer{i}.{j}.conv{k} / .bn{k}    -> layer{i}_{j}/conv{k} / layer{i}_{j}/bn{k}
  layer{i}.{j}.downsample.0 / .1   -> layer{i}_{j}/downsample_conv / downsample_bn
  conv `weight` (O, I, kh, kw)     -> `kernel` (kh, kw, I, O)
  BN weight / bias                 -> params scale / bias
  BN running_mean / running_var    -> batch_stats mean / var

BatchNorm: flax `momentum=0.9` is PyTorch `momentum=0.1`. One small, documented
approximation remains: flax folds the *biased* batch variance into `var` while PyTorch
folds the unbiased one (a factor n / (n - 1), n = batch * height * width per channel).
Normalisation in train mode uses the biased variance in both frameworks, so train-mode
outputs agree exactly; only the running variance drifts slightly lower.

Initialisation follows mmcv's ResNet init (Kaiming normal, fan_out, ReLU gain; BN scale 1,
bias 0). mmcv additionally zero-initialises the last BN of each block when training from
scratch; that is not done here because the reference always loads ImageNet weights.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from confeti_jax.models.conv import Conv, own_buffer

# depth -> (block kind, blocks per stage), as mmseg's ResNet.arch_settings.
ARCH_SETTINGS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}
_STEM_CHANNELS = 64
STEMS = ("deep", "7x7")  # mmseg/timm 'c' three 3x3 convolutions | torchvision one 7x7
_BASE_CHANNELS = 64

# Kaiming normal (not truncated), fan_out, gain sqrt(2): mmcv `kaiming_init` defaults.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def scale_channels(channels: int, width: float) -> int:
  """Channel count under the width multiplier, so tiny test/toy models keep the topology."""
  return max(1, int(round(channels * width)))


def stage_channels(depth: int, width: float = 1.0) -> tuple[int, int, int, int]:
  """Output channels of layer1..layer4, e.g. (256, 512, 1024, 2048) for depth 50/101."""
  kind = _check_depth(depth)[0]
  return tuple(
      scale_channels(_BASE_CHANNELS * 2**i * _EXPANSION[kind], width) for i in range(4))


def _check_depth(depth: int):
  if depth not in ARCH_SETTINGS:
    raise ValueError(f"ResNet depth must be one of {sorted(ARCH_SETTINGS)}, got {depth!r}.")
  return ARCH_SETTINGS[depth]


def check_stem(stem: str) -> str:
  """Fails on an unknown stem name, so a config typo is caught before any tracing."""
  if stem not in STEMS:
    raise ValueError(f"Unknown ResNet stem {stem!r}; model.stem must be one of {STEMS}.")
  return stem


def conv(features, kernel, *, stride=1, dilation=1, dtype=jnp.float32, name=None):
  """Bias-free k x k convolution with PyTorch's symmetric padding `dilation * (k - 1) / 2`."""
  return Conv(features, kernel, stride=stride, padding=dilation * (kernel - 1) // 2,
              dilation=dilation, dtype=dtype, kernel_init=conv_kernel_init, name=name)


def block_output(y, identity):
  """relu(y + identity) in its own buffer on CPU (`conv.own_buffer`)."""
  return own_buffer(nn.relu(y + identity))


def batch_norm(train, *, dtype=jnp.float32, name=None):
  """BatchNorm matching torch.nn.BatchNorm2d defaults (momentum 0.1, eps 1e-5).

  Statistics are computed in float32 by flax even for a bfloat16 `dtype`; under jit with a
  data-sharded batch the mean is global over the mesh, as SyncBN would be.
  """
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
      param_dtype=jnp.float32, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions; as mmseg, only the first one is dilated (the second pads 1)."""

  features: int
  out_features: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    # `train` is positional so that nn.remat can mark it static (static_argnums=(2,)).
    identity = x
    y = conv(self.features, 3, stride=self.stride, dilation=self.dilation, dtype=self.dtype,
             name="conv1")(x)
    y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(y))
    y = conv(self.out_features, 3, dtype=self.dtype, name="conv2")(y)
    y = batch_norm(train, dtype=self.dtype, name="bn2")(y)
    if self.downsample:
      identity = conv(self.out_features, 1, stride=self.stride, dtype=self.dtype,
                      name="downsample_conv")(x)
      identity = batch_norm(train, dtype=self.dtype, name="downsample_bn")(identity)
    return block_output(y, identity)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, dilated: 'pytorch' style) -> 1x1 expansion block."""

  features: int
  out_features: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    identity = x
    y = conv(self.features, 1, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(y))
    y = conv(self.features, 3, stride=self.stride, dilation=self.dilation, dtype=self.dtype,
             name="conv2")(y)
    y = nn.relu(batch_norm(train, dtype=self.dtype, name="bn2")(y))
    y = conv(self.out_features, 1, dtype=self.dtype, name="conv3")(y)
    y = batch_norm(train, dtype=self.dtype, name="bn3")(y)
    if self.downsample:
      identity = conv(self.out_features, 1, stride=self.stride, dtype=self.dtype,
                      name="downsample_conv")(x)
      identity = batch_norm(train, dtype=self.dtype, name="downsample_bn")(identity)
    return block_output(y, identity)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
# Rematerialised twins: same parameter names and outputs, activations recomputed in the
# backward pass. Argument 2 (`train`, counting `self` as 0) must be static.
_REMAT_BLOCKS = {k: nn.remat(v, static_argnums=(2,)) for k, v in _BLOCKS.items()}


STAGES = ("layer1", "layer2", "layer3", "layer4")


def remat_stages(remat) -> frozenset:
  """The stages to rematerialise: bool (all / none), 'all', '', 'layer3,layer4' or a tuple.

  Per stage because the memory is not spread evenly: with output stride 8 every block
  of layer1..layer4 stores activations of the same order of size, so ResNet-101's layer3
  (23 of its 33 blocks) holds most of it and is the one stage worth recomputing first.
  The saving is the accelerator scheduler's to realise: XLA:CPU does not lower its peak
  (scripts/benchmark.py --sweep='remat=none,layer3,all' measures it).
  """
  if isinstance(remat, str):
    text = remat.strip().lower()
    if text in ("", "false", "0", "none"):
      return frozenset()
    if text in ("true", "1", "all"):
      return frozenset(STAGES)
    remat = tuple(s.strip() for s in text.split(",") if s.strip())
  elif isinstance(remat, (bool, int)) or remat is None:
    return frozenset(STAGES) if remat else frozenset()
  unknown = sorted(set(remat) - set(STAGES))
  if unknown:
    raise ValueError(f"model.remat names unknown stages {unknown}; use 'all', '' or a "
                     f"comma-separated subset of {', '.join(STAGES)}.")
  return frozenset(remat)


class ResNetV1c(nn.Module):
  """OpenMMLab ResNet-V1c with dilated stages; returns every stage output.

  Attributes:
    depth: 18, 34 (BasicBlock) or 50, 101 (Bottleneck).
    width: channel multiplier for miniature runs; 1.0 is the real network.
    strides: stride of the first block of each stage.
    dilations: dilation of each stage.
    contract_dilation: the first block of a stage with dilation d > 1 uses d // 2.
    stem: 'deep' (three 3x3 convolutions, ResNet-V1c) or '7x7' (torchvision / timm
      'resnetNN': one 7x7 stride-2 convolution named stem_conv1 / stem_bn1).
    dtype: compute dtype (e.g. bfloat16); parameters and BN statistics stay float32.
    remat: stages whose residual blocks are recomputed in the backward pass, trading
      compute for activation memory: True (every stage), False, or stage names, e.g.
      ('layer1', 'layer2') or the config string 'layer1,layer2' (`remat_stages`).
  """

  depth: int = 101
  width: float = 1.0
  strides: tuple[int, ...] = (1, 2, 1, 1)
  dilations: tuple[int, ...] = (1, 1, 2, 4)
  contract_dilation: bool = True
  dtype: Any = jnp.float32
  remat: bool | str | tuple[str, ...] = False
  stem: str = "deep"

  def __post_init__(self):
    check_stem(self.stem)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool) -> dict:
    """NHWC image batch -> {'layer1': stride 4, ..., 'layer4': stride 8 with the defaults}."""
    kind, num_blocks = _check_depth(self.depth)
    ch = lambda c: scale_channels(c, self.width)
    remat = remat_stages(self.remat)

    x = x.astype(self.dtype)
    if self.stem == "7x7":  # (features, kernel, stride) per conv + BN + ReLU
      stem = ((ch(_STEM_CHANNELS), 7, 2),)
    else:
      stem = ((ch(_STEM_CHANNELS // 2), 3, 2), (ch(_STEM_CHANNELS // 2), 3, 1),
              (ch(_STEM_CHANNELS), 3, 1))
    for k, (features, kernel, stride) in enumerate(stem, start=1):
      x = conv(features, kernel, stride=stride, dtype=self.dtype, name=f"stem_conv{k}")(x)
      x = nn.relu(batch_norm(train, dtype=self.dtype, name=f"stem_bn{k}")(x))
    # flax pads max-pooling with -inf (the reduction's identity), as PyTorch does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    in_features = ch(_STEM_CHANNELS)
    outputs = {}
    for i, blocks in enumerate(num_blocks):
      planes = _BASE_CHANNELS * 2**i
      features, out_features = ch(planes), ch(planes * _EXPANSION[kind])
      dilation = self.dilations[i]
      first_dilation = dilation // 2 if (self.contract_dilation and dilation > 1) else dilation
      block_cls = (_REMAT_BLOCKS if f"layer{i + 1}" in remat else _BLOCKS)[kind]
      for j in range(blocks):
        stride = self.strides[i] if j == 0 else 1
        x = block_cls(
            features=features, out_features=out_features, stride=stride,
            dilation=first_dilation if j == 0 else dilation,
            downsample=(j == 0 and (stride != 1 or in_features != out_features)),
            dtype=self.dtype, name=f"layer{i + 1}_{j}")(x, train)
        in_features = out_features
      outputs[f"layer{i + 1}"] = x
    return outputs
