"""Torch (CPU) re-statement of mmseg's ResNetV1c + DLV2Head, with mmseg's state-dict key
names: the reference the model and weight tests compare the Flax modules against, and the
PyTorch side of `scripts/compare_torch.py`."""

import collections

import torch
from torch import nn as tnn

from confeti_jax.models import stage_channels
from confeti_jax.models.resnet import ARCH_SETTINGS, scale_channels


def _tconv(cin, cout, k, stride=1, dilation=1, bias=False):
  return tnn.Conv2d(cin, cout, k, stride=stride, padding=dilation * (k - 1) // 2,
                    dilation=dilation, bias=bias)


class TorchBlock(tnn.Module):
  """Basic (two 3x3, second undilated) or bottleneck (1x1, 3x3 strided, 1x1) block."""

  def __init__(self, kind, cin, mid, cout, stride, dilation, downsample):
    super().__init__()
    self.kind = kind
    if kind == "basic":
      self.conv1 = _tconv(cin, mid, 3, stride, dilation)
      self.bn1 = tnn.BatchNorm2d(mid)
      self.conv2 = _tconv(mid, cout, 3)
      self.bn2 = tnn.BatchNorm2d(cout)
    else:
      self.conv1 = _tconv(cin, mid, 1)
      self.bn1 = tnn.BatchNorm2d(mid)
      self.conv2 = _tconv(mid, mid, 3, stride, dilation)
      self.bn2 = tnn.BatchNorm2d(mid)
      self.conv3 = _tconv(mid, cout, 1)
      self.bn3 = tnn.BatchNorm2d(cout)
    self.downsample = (tnn.Sequential(_tconv(cin, cout, 1, stride), tnn.BatchNorm2d(cout))
                      if downsample else None)

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.kind == "bottleneck":
      y = self.bn3(self.conv3(torch.relu(y)))
    return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class TorchResNetV1c(tnn.Module):
  """Deep stem, strides (1, 2, 1, 1), dilations (1, 1, 2, 4), contract_dilation."""

  def __init__(self, depth, width):
    super().__init__()
    kind, num_blocks = ARCH_SETTINGS[depth]
    exp = 1 if kind == "basic" else 4
    ch = lambda c: scale_channels(c, width)
    self.stem = tnn.Sequential(
        _tconv(3, ch(32), 3, 2), tnn.BatchNorm2d(ch(32)), tnn.ReLU(),
        _tconv(ch(32), ch(32), 3), tnn.BatchNorm2d(ch(32)), tnn.ReLU(),
        _tconv(ch(32), ch(64), 3), tnn.BatchNorm2d(ch(64)), tnn.ReLU())
    self.maxpool = tnn.MaxPool2d(3, 2, 1)
    cin = ch(64)
    for i, (n, s, d) in enumerate(zip(num_blocks, (1, 2, 1, 1), (1, 1, 2, 4))):
      mid, cout = ch(64 * 2**i), ch(64 * 2**i * exp)
      blocks = []
      for j in range(n):
        stride = s if j == 0 else 1
        dil = (d // 2 if d > 1 else d) if j == 0 else d
        blocks.append(TorchBlock(kind, cin, mid, cout, stride, dil,
                                 j == 0 and (stride != 1 or cin != cout)))
        cin = cout
      setattr(self, f"layer{i + 1}", tnn.Sequential(*blocks))

  def forward(self, x):
    x = self.maxpool(self.stem(x))
    outs = []
    for i in range(4):
      x = getattr(self, f"layer{i + 1}")(x)
      outs.append(x)
    return outs


class TorchDeepLabV2(tnn.Module):
  """Backbone + DLV2 head: summed dilated 3x3 convolutions on layer4."""

  def __init__(self, depth, width, num_classes, dilations=(6, 12, 18, 24)):
    super().__init__()
    self.backbone = TorchResNetV1c(depth, width)
    cin = stage_channels(depth, width)[3]
    self.aspp_modules = tnn.ModuleList(
        tnn.Sequential(collections.OrderedDict(conv=_tconv(cin, num_classes, 3, 1, d, True)))
        for d in dilations)

  def forward(self, x):
    feats = self.backbone(x)
    return sum(m(feats[3]) for m in self.aspp_modules), feats
