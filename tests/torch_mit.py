"""A torch statement of SegFormer's MiT encoder and the DAFormer / SegFormer heads, with
the module names of the mmseg code (so its state_dict has the checkpoints' keys), for
the parity tests. Written from the architecture (confeti_jax/models/mit.py docstring),
plain torch only (no mmcv / timm)."""

import torch
from torch import nn
from torch.nn import functional as F

from confeti_jax.models import mit as mit_lib


class Attention(nn.Module):
  def __init__(self, dim, heads, sr):
    super().__init__()
    self.heads, self.sr_ratio = heads, sr
    self.q = nn.Linear(dim, dim)
    self.kv = nn.Linear(dim, 2 * dim)
    self.proj = nn.Linear(dim, dim)
    if sr > 1:
      self.sr = nn.Conv2d(dim, dim, sr, stride=sr)
      self.norm = nn.LayerNorm(dim)

  def forward(self, x, h, w):
    b, n, c = x.shape
    d = c // self.heads
    q = self.q(x).reshape(b, n, self.heads, d).transpose(1, 2)
    ctx = x
    if self.sr_ratio > 1:
      ctx = self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
      ctx = self.norm(ctx)
    kv = self.kv(ctx).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
    attn = (q @ kv[0].transpose(-2, -1)) * d ** -0.5
    out = (attn.softmax(-1) @ kv[1]).transpose(1, 2).reshape(b, n, c)
    return self.proj(out)


class DWConv(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

  def forward(self, x, h, w):
    b, n, c = x.shape
    return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.fc1 = nn.Linear(dim, 4 * dim)
    self.dwconv = DWConv(4 * dim)
    self.fc2 = nn.Linear(4 * dim, dim)

  def forward(self, x, h, w):
    return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
  def __init__(self, dim, heads, sr):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads, sr)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim)

  def forward(self, x, h, w):
    x = x + self.attn(self.norm1(x), h, w)
    return x + self.mlp(self.norm2(x), h, w)


class PatchEmbed(nn.Module):
  def __init__(self, cin, dim, kernel, stride):
    super().__init__()
    self.proj = nn.Conv2d(cin, dim, kernel, stride, kernel // 2)
    self.norm = nn.LayerNorm(dim)

  def forward(self, x):
    x = self.proj(x)
    h, w = x.shape[2:]
    return self.norm(x.flatten(2).transpose(1, 2)), h, w


class MiT(nn.Module):
  def __init__(self, variant="mit_b0"):
    super().__init__()
    dims, depths = mit_lib.MIT_VARIANTS[variant]
    cin = 3
    for i, (dim, depth) in enumerate(zip(dims, depths)):
      kernel, stride = mit_lib.PATCH_EMBED[i]
      setattr(self, f"patch_embed{i + 1}", PatchEmbed(cin, dim, kernel, stride))
      setattr(self, f"block{i + 1}", nn.ModuleList(
          [Block(dim, mit_lib.NUM_HEADS[i], mit_lib.SR_RATIOS[i]) for _ in range(depth)]))
      setattr(self, f"norm{i + 1}", nn.LayerNorm(dim, eps=1e-6))
      cin = dim

  def forward(self, x):
    outs = []
    for i in range(1, 5):
      x, h, w = getattr(self, f"patch_embed{i}")(x)
      for blk in getattr(self, f"block{i}"):
        x = blk(x, h, w)
      x = getattr(self, f"norm{i}")(x)
      x = x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
      outs.append(x)
    return outs


class MLP(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.proj = nn.Linear(cin, cout)

  def forward(self, x):
    return self.proj(x.flatten(2).transpose(1, 2))


class ConvModule(nn.Module):
  def __init__(self, cin, cout, kernel, dilation=1, groups=1):
    super().__init__()
    pad = dilation * (kernel - 1) // 2
    self.conv = nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, groups=groups,
                          bias=False)
    self.bn = nn.BatchNorm2d(cout)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class SepConv(nn.Module):
  def __init__(self, cin, cout, dilation):
    super().__init__()
    self.depthwise_conv = ConvModule(cin, cin, 3, dilation, groups=cin)
    self.pointwise_conv = ConvModule(cin, cout, 1)

  def forward(self, x):
    return self.pointwise_conv(self.depthwise_conv(x))


class Fusion(nn.Module):
  def __init__(self, cin, ch, dilations=(1, 6, 12, 18)):
    super().__init__()
    self.aspp_modules = nn.ModuleList(
        [ConvModule(cin, ch, 1) if d == 1 else SepConv(cin, ch, d) for d in dilations])
    self.bottleneck = ConvModule(len(dilations) * ch, ch, 3)

  def forward(self, x):
    return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], 1))


class Head(nn.Module):
  """DAFormer head (embed_layers, fuse_layer) or SegFormer head (linear_c, linear_fuse)."""

  def __init__(self, dims, num_classes, decoder="daformer", width=256):
    super().__init__()
    self.decoder = decoder
    embeds = nn.ModuleDict({str(i): MLP(c, width) for i, c in enumerate(dims)})
    if decoder == "daformer":
      self.embed_layers, self.fuse_layer = embeds, Fusion(4 * width, width)
      self.conv_seg = nn.Conv2d(width, num_classes, 1)
    else:
      self.linear_c, self.linear_fuse = embeds, ConvModule(4 * width, width, 1)
      self.linear_pred = nn.Conv2d(width, num_classes, 1)

  def forward(self, feats):
    embeds = self.embed_layers if self.decoder == "daformer" else self.linear_c
    size = feats[0].shape[2:]
    cs = []
    for i, f in enumerate(feats):
      c = embeds[str(i)](f).transpose(1, 2).reshape(f.shape[0], -1, *f.shape[2:])
      if c.shape[2:] != size:
        c = F.interpolate(c, size=size, mode="bilinear", align_corners=False)
      cs.append(c)
    x = torch.cat(cs, 1)
    if self.decoder == "daformer":
      return self.conv_seg(self.fuse_layer(x))
    return self.linear_pred(self.linear_fuse(x))


class Segmentor(nn.Module):
  def __init__(self, variant="mit_b0", num_classes=19, decoder="daformer", width=256):
    super().__init__()
    self.backbone = MiT(variant)
    self.decode_head = Head(mit_lib.MIT_VARIANTS[variant][0], num_classes, decoder, width)

  def forward(self, x):
    feats = self.backbone(x)
    return self.decode_head(feats), feats


def randomise_batch_norms(model, seed=0):
  """Non-trivial BN affine parameters and running statistics (eval-mode parity)."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
      with torch.no_grad():
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
  return model
