"""Torch (CPU) re-statement of CUT's networks.py and PatchNCE, the reference the CUT
tests compare the Flax modules against; module order follows the state-dict keys."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn as tnn


# -- torch re-statement of CUT's networks.py (module order = the state-dict keys) ------
def t_filter(size):
  row = np.array({3: [1.0, 2.0, 1.0], 4: [1.0, 3.0, 3.0, 1.0]}[size])
  filt = torch.tensor(row[:, None] * row[None, :], dtype=torch.float32)
  return filt / filt.sum()


class TDownsample(tnn.Module):
  def __init__(self, channels):
    super().__init__()
    self.register_buffer("filt", t_filter(3)[None, None].repeat(channels, 1, 1, 1))
    self.pad = tnn.ReflectionPad2d([1, 1, 1, 1])

  def forward(self, x):
    return F.conv2d(self.pad(x), self.filt, stride=2, groups=x.shape[1])


class TUpsample(tnn.Module):
  def __init__(self, channels):
    super().__init__()
    self.register_buffer("filt", (t_filter(4) * 4)[None, None].repeat(channels, 1, 1, 1))
    self.pad = tnn.ReplicationPad2d([1, 1, 1, 1])

  def forward(self, x):
    y = F.conv_transpose2d(self.pad(x), self.filt, stride=2, padding=2, groups=x.shape[1])
    return y[:, :, 1:, 1:][:, :, :-1, :-1]


class TResnetBlock(tnn.Module):
  def __init__(self, dim):
    super().__init__()
    self.conv_block = tnn.Sequential(
        tnn.ReflectionPad2d(1), tnn.Conv2d(dim, dim, 3), tnn.InstanceNorm2d(dim), tnn.ReLU(True),
        tnn.ReflectionPad2d(1), tnn.Conv2d(dim, dim, 3), tnn.InstanceNorm2d(dim))

  def forward(self, x):
    return x + self.conv_block(x)


class TSequentialNet(tnn.Module):
  """Holds `model` (keys model.N...) and runs the reference generator's tap loop."""

  def __init__(self, layers):
    super().__init__()
    self.model = tnn.Sequential(*layers)

  def forward(self, x, layers=(), encode_only=False):
    feats = []
    for index, layer in enumerate(self.model):
      x = layer(x)
      if index in layers:
        feats.append(x)
      if layers and index == layers[-1] and encode_only:
        return feats
    return x, feats


def t_generator(ngf, n_blocks):
  norm = tnn.InstanceNorm2d
  layers = [tnn.ReflectionPad2d(3), tnn.Conv2d(3, ngf, 7), norm(ngf), tnn.ReLU(True)]
  for i in range(2):
    m = 2**i
    layers += [tnn.Conv2d(ngf * m, ngf * m * 2, 3, padding=1), norm(ngf * m * 2), tnn.ReLU(True),
               TDownsample(ngf * m * 2)]
  layers += [TResnetBlock(ngf * 4) for _ in range(n_blocks)]
  for i in range(2):
    m = 2 ** (2 - i)
    layers += [TUpsample(ngf * m), tnn.Conv2d(ngf * m, ngf * m // 2, 3, padding=1),
               norm(ngf * m // 2), tnn.ReLU(True)]
  layers += [tnn.ReflectionPad2d(3), tnn.Conv2d(ngf, 3, 7), tnn.Tanh()]
  return TSequentialNet(layers)


def t_discriminator(ndf, n_layers=3):
  lrelu = lambda: tnn.LeakyReLU(0.2, True)
  layers = [tnn.Conv2d(3, ndf, 4, padding=1), lrelu(), TDownsample(ndf)]
  mult = 1
  for n in range(1, n_layers):
    prev, mult = mult, min(2**n, 8)
    layers += [tnn.Conv2d(ndf * prev, ndf * mult, 4, padding=1), tnn.InstanceNorm2d(ndf * mult),
               lrelu(), TDownsample(ndf * mult)]
  prev, mult = mult, min(2**n_layers, 8)
  layers += [tnn.Conv2d(ndf * prev, ndf * mult, 4, padding=1), tnn.InstanceNorm2d(ndf * mult),
             lrelu(), tnn.Conv2d(ndf * mult, 1, 4, padding=1)]
  return TSequentialNet(layers)


class TPatchSampleF(tnn.Module):
  def __init__(self, channels, nc=256):
    super().__init__()
    for i, c in enumerate(channels):
      setattr(self, f"mlp_{i}", tnn.Sequential(tnn.Linear(c, nc), tnn.ReLU(), tnn.Linear(nc, nc)))

  def forward(self, feats, patch_ids):
    out = []
    for i, (feat, ids) in enumerate(zip(feats, patch_ids)):
      x = feat.permute(0, 2, 3, 1).flatten(1, 2)[:, torch.tensor(np.asarray(ids)).long(), :]
      x = x.flatten(0, 1)
      x = getattr(self, f"mlp_{i}")(x)
      out.append(x / (x.pow(2).sum(1, keepdim=True).pow(0.5) + 1e-7))
    return out


def t_patch_nce(q, k, batch_size, temperature=0.07):
  n, dim = q.shape
  k = k.detach()
  l_pos = torch.bmm(q.view(n, 1, -1), k.view(n, -1, 1)).view(n, 1)
  qb, kb = q.view(batch_size, -1, dim), k.view(batch_size, -1, dim)
  npatches = qb.size(1)
  l_neg = torch.bmm(qb, kb.transpose(2, 1))
  l_neg.masked_fill_(torch.eye(npatches, dtype=torch.bool)[None], -10.0)
  out = torch.cat((l_pos, l_neg.view(-1, npatches)), dim=1) / temperature
  return F.cross_entropy(out, torch.zeros(n, dtype=torch.long), reduction="none")


def randomize(module, seed):
  """He-scaled weights, small biases: parameters only (the `filt` buffers stay fixed)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in module.named_parameters():
      if p.ndim > 1:
        p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
  return module


def numpy_state(module, prefix=""):
  return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def nhwc(t):
  return np.moveaxis(t.detach().numpy(), 1, -1)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def random_images(seed, shape):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)
