"""The DAFormer segmentor: MiT encoder + DAFormer head (or SegFormer's all-MLP head).

DAFormer head (DAFormer `daformer_head.py`, the `mit_b5` / `daformer_sepaspp` config):
each encoder stage is embedded to 256 channels by a per-token Linear, resized (bilinear,
align_corners=False) to stride 4 and concatenated (1024 channels); the fusion is an
ASPP without image pooling: a 1x1 ConvModule and three depthwise-separable ConvModules
(3x3 depthwise at dilation 6 / 12 / 18, each conv followed by BN + ReLU, then a 1x1
pointwise conv + BN + ReLU), 256 channels each, concatenated and fused by a 3x3
ConvModule to 256; then Dropout2d(0.1) and the 1x1 classifier (with bias). ConvModule
convolutions have no bias (they are followed by BN, mmcv's 'auto' bias).

SegFormer head (`segformer_head.py`): the same per-stage Linear embeddings (768 channels,
256 for MiT-B0), concatenated, a 1x1 ConvModule, Dropout2d(0.1), the classifier.

Returns float32 logits at stride 4 and the features: the encoder's 'layer1'..'layer4'
and 'fused' (the head's 256-channel map before dropout, stride 4). CONFETI's CAM and
projection heads read 'fused', as the DAFormer-based prototype methods (SePiCo) attach
theirs to the decoder's features; CFContra's banks read 'layer4' as on DeepLabV2.
Parameter layout: the encoder under 'backbone' (base learning rate), everything else in
the x10 head group, as the DAFormer recipe. Dropout and stochastic depth run exactly
when a 'dropout' RNG is given (the student; the teacher never drops, as DAFormer),
whatever `train` (BatchNorm's mode) is.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from confeti_jax import augment
from confeti_jax.models import heads
from confeti_jax.models.conv import Conv
from confeti_jax.models.mit import MixVisionTransformer, check_variant
from confeti_jax.models.resnet import batch_norm

DECODERS = ("daformer", "segformer")
ASPP_DILATIONS = (1, 6, 12, 18)
EMBED_DIM = 256
DROPOUT = 0.1

# mmcv ConvModule: kaiming normal, fan_out, ReLU gain; the classifier N(0, 0.01).
conv_module_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
classifier_init = nn.initializers.normal(0.01)


def segformer_embed_dim(variant):
  return 256 if variant == "mit_b0" else 768


class ConvModule(nn.Module):
  """mmcv ConvModule: bias-free conv, BatchNorm, ReLU (`groups` > 1: depthwise)."""

  features: int
  kernel: int
  dilation: int = 1
  groups: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    pad = self.dilation * (self.kernel - 1) // 2
    if self.groups == 1:
      x = Conv(self.features, self.kernel, padding=pad, dilation=self.dilation,
               dtype=self.dtype, kernel_init=conv_module_init, name="conv")(x)
    else:
      x = nn.Conv(self.features, (self.kernel, self.kernel), padding=((pad, pad), (pad, pad)),
                  kernel_dilation=self.dilation, feature_group_count=self.groups,
                  use_bias=False, dtype=self.dtype, kernel_init=conv_module_init,
                  name="conv")(x)
    return nn.relu(batch_norm(train, dtype=self.dtype, name="bn")(x))


class DAFormer(nn.Module):
  """MiT + DAFormer (or SegFormer) head; the interface of `DeepLabV2`.

  Attributes:
    num_classes: output classes.
    backbone: 'mit_b0' .. 'mit_b5'.
    decoder: 'daformer' or 'segformer'.
    dtype: compute dtype; logits and heads are float32.
    remat: encoder stages recomputed in the backward pass.
    cam_head / proj_dim: CONFETI's heads (1x1, no bias) on the fused features.
  """

  num_classes: int = 19
  backbone: str = "mit_b5"
  decoder: str = "daformer"
  dtype: Any = jnp.float32
  remat: bool | str | tuple[str, ...] = False
  cam_head: bool = False
  proj_dim: int = 0

  def __post_init__(self):
    check_variant(self.backbone)
    if self.decoder not in DECODERS:
      raise ValueError(f"Unknown decoder {self.decoder!r}; model.decoder must be one of "
                       f"{list(DECODERS)}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool):
    feats = backbone_of(self, name="backbone")(x, train=train)
    levels = [feats[f"layer{i}"] for i in range(1, 5)]
    width = EMBED_DIM if self.decoder == "daformer" else segformer_embed_dim(self.backbone)
    size = levels[0].shape[1:3]
    embedded = []
    for i, level in enumerate(levels):
      e = nn.Dense(width, dtype=self.dtype, kernel_init=heads.torch_kernel_init,
                   bias_init=heads.torch_bias_init(level.shape[-1]), name=f"embed_{i}")(level)
      if e.shape[1:3] != size:
        e = augment.resize_bilinear(e, size).astype(self.dtype)
      embedded.append(e)
    x = jnp.concatenate(embedded, axis=-1)
    if self.decoder == "daformer":
      fused = self._aspp_fusion(x, train)
    else:
      fused = ConvModule(width, 1, dtype=self.dtype, name="fuse")(x, train)
    feats = {**feats, "fused": fused}
    if self.cam_head:
      cam = self._conv1x1(fused, self.num_classes, "conv_cam")
      feats = {**feats, "cam": nn.relu(cam), "cam_scores": jnp.mean(cam, axis=(1, 2))}
    if self.proj_dim:
      feats = {**feats, "proj": self._conv1x1(fused, self.proj_dim, "conv_proj")}
    y = nn.Dropout(DROPOUT, broadcast_dims=(1, 2), name="dropout")(
        fused, deterministic=not self.has_rng("dropout"))
    logits = Conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                  kernel_init=classifier_init, name="conv_seg")(y)
    return logits.astype(jnp.float32), feats

  def _aspp_fusion(self, x, train):
    """ASPPWrapper(sep=True, dilations 1/6/12/18, no pooling) + the 3x3 bottleneck."""
    outs = []
    for k, d in enumerate(ASPP_DILATIONS):
      if d == 1:
        outs.append(ConvModule(EMBED_DIM, 1, dtype=self.dtype, name=f"aspp_{k}")(x, train))
        continue
      y = ConvModule(x.shape[-1], 3, dilation=d, groups=x.shape[-1], dtype=self.dtype,
                     name=f"aspp_{k}_depthwise")(x, train)
      outs.append(ConvModule(EMBED_DIM, 1, dtype=self.dtype, name=f"aspp_{k}_pointwise")(
          y, train))
    return ConvModule(EMBED_DIM, 3, dtype=self.dtype, name="bottleneck")(
        jnp.concatenate(outs, axis=-1), train)

  def _conv1x1(self, x, features, name):
    return Conv(features, 1, dtype=self.dtype, kernel_init=heads.torch_kernel_init,
                name=name)(x).astype(jnp.float32)


def backbone_of(segmentor, **kwargs):
  """The MiT encoder `segmentor` runs under 'backbone' (DACS's ImageNet copy reuses it)."""
  return MixVisionTransformer(variant=segmentor.backbone, dtype=segmentor.dtype,
                              remat=segmentor.remat, **kwargs)
