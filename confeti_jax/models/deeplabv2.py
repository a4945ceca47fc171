"""DeepLabV2 segmentor: ResNet-V1c backbone and the summed-ASPP classifier (DLV2Head).

The head is the reference's `DLV2Head`: four parallel 3x3 convolutions from layer4
straight to class logits, dilation = padding in (6, 12, 18, 24), with bias, and their
outputs summed. There is no normalisation, activation, dropout or extra 1x1 classifier.
Weights are N(0, 0.01) and biases 0 (the reference's `init_cfg` override on
`aspp_modules`).

Parameter layout (the optimiser relies on it): the backbone lives under the top-level
name 'backbone' and every head convolution under a top-level name starting with 'aspp_'
('aspp_0'..'aspp_3', torch `decode_head.aspp_modules.{k}.conv`). The learning-rate
grouping labels 'backbone' as the base group and everything else as the x10 head group.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from confeti_jax.models import heads
from confeti_jax.models.conv import Conv, ConvParams, on_cpu, summed_dilated_conv
from confeti_jax.models.resnet import ResNetV1c, check_stem

# Backbone names accepted by DeepLabV2, mapped to ResNet depths.
BACKBONES = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}

head_kernel_init = nn.initializers.normal(stddev=0.01)


def backbone_depth(name: str) -> int:
  """ResNet depth of a backbone name; fails with the allowed names so a config typo is clear."""
  if name not in BACKBONES:
    raise ValueError(
        f"Unknown backbone {name!r}; model.backbone must be one of {sorted(BACKBONES)}.")
  return BACKBONES[name]


def backbone_of(segmentor, **kwargs):
  """The ResNetV1c `segmentor` runs under 'backbone' (a function, not a method: flax would
  bind a module made in an unbound module's method to it). DACS's frozen ImageNet copy
  applies this same module to the student's initial backbone variables."""
  return ResNetV1c(depth=backbone_depth(segmentor.backbone), width=segmentor.width,
                   dtype=segmentor.dtype, remat=segmentor.remat, stem=segmentor.stem, **kwargs)


class DeepLabV2(nn.Module):
  """DeepLabV2 with a dilated ResNet-V1c (output stride 8), as the CONFETI segmentor.

  Attributes:
    num_classes: number of output classes (19 for Cityscapes).
    backbone: 'resnet18', 'resnet34', 'resnet50' or 'resnet101' (the reference).
    width: channel multiplier of the backbone, for miniature runs.
    stem: backbone stem, 'deep' (ResNet-V1c, the reference) or '7x7' (torchvision / timm
      'resnetNN' weights); see `resnet.ResNetV1c`.
    aspp_dilations: dilation (= padding) of each parallel head convolution.
    dtype: compute dtype; parameters stay float32 and the logits are returned as float32.
    remat: backbone stages whose blocks are rematerialised in the backward pass (same
      outputs, less memory): True, False or stage names (`resnet.remat_stages`).
    aux_classifier: ADVENT's multi-level head: a second summed-ASPP classifier on layer3
      ('aux_aspp_0'..'aux_aspp_3', in the x10 head group), its stride-8 logits returned
      as features['logits_aux']. Off by default (the CONFETI segmentor has none).
    cam_head: CONFETI's CAM head ('conv_cam', 1x1 layer4 -> classes, no bias):
      features['cam'] = ReLU(map), features['cam_scores'] = GAP of the pre-ReLU map.
    proj_dim: > 0 adds CONFETI's projection head ('conv_proj', 1x1 layer4 -> proj_dim, no
      bias): features['proj'], not normalised. Both heads use PyTorch's default conv
      init (the reference's init_cfg is a no-op for them, docs/reference_code.md §1) and sit in
      the x10 head group; they are float32 outputs.
  """

  num_classes: int = 19
  backbone: str = "resnet101"
  width: float = 1.0
  aspp_dilations: tuple[int, ...] = (6, 12, 18, 24)
  dtype: Any = jnp.float32
  remat: bool | str | tuple[str, ...] = False
  aux_classifier: bool = False
  cam_head: bool = False
  proj_dim: int = 0
  stem: str = "deep"

  def __post_init__(self):
    # Validate at construction so a bad config fails before any tracing or compilation.
    backbone_depth(self.backbone)
    check_stem(self.stem)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool):
    """Normalised float32 NHWC images -> (float32 logits at stride 8, backbone features).

    The features dict ('layer1'..'layer4', compute dtype) is what the CAM and projection
    heads read; 'layer4' is the tensor this head classifies.
    """
    feats = backbone_of(self, name="backbone")(x, train=train)
    if self.aux_classifier:
      feats = {**feats, "logits_aux": self._summed_aspp(feats["layer3"], "aux_aspp")}
    if self.cam_head:
      cam = self._conv1x1(feats["layer4"], self.num_classes, "conv_cam")
      feats = {**feats, "cam": nn.relu(cam), "cam_scores": jnp.mean(cam, axis=(1, 2))}
    if self.proj_dim:
      feats = {**feats, "proj": self._conv1x1(feats["layer4"], self.proj_dim, "conv_proj")}
    return self._summed_aspp(feats["layer4"], "aspp"), feats

  def _conv1x1(self, x, features, name):
    """A bias-free 1x1 convolution with PyTorch's default init, float32 output."""
    return Conv(features, 1, dtype=self.dtype, kernel_init=heads.torch_kernel_init,
                name=name)(x).astype(jnp.float32)

  def _summed_aspp(self, x, prefix):
    """Four parallel dilated 3x3 convolutions to class logits, summed in float32.

    On CPU the four are computed together (`conv.summed_dilated_conv`, 3x faster there);
    the parameters are the same either way.
    """
    if on_cpu():
      params = [ConvParams(self.num_classes, 3, use_bias=True, kernel_init=head_kernel_init,
                           name=f"{prefix}_{k}")(x.shape[-1])
                for k in range(len(self.aspp_dilations))]
      logits = summed_dilated_conv(x.astype(self.dtype),
                                   [kernel.astype(self.dtype) for kernel, _ in params],
                                   self.aspp_dilations)
      return logits + sum(bias for _, bias in params)
    logits = None
    for k, d in enumerate(self.aspp_dilations):
      branch = Conv(self.num_classes, 3, padding=d, dilation=d, use_bias=True,
                    dtype=self.dtype, kernel_init=head_kernel_init, name=f"{prefix}_{k}")(x)
      # Sum in float32 so a bfloat16 run does not round the logits four times.
      branch = branch.astype(jnp.float32)
      logits = branch if logits is None else logits + branch
    return logits
