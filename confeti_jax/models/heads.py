"""Per-pixel projection heads for CFContra's class-centre contrast (paper Table 1).

The contrast compares pixel features with class centres; the paper remaps the
DeepLab layer4 features with a small MLP first so that the features the classifier
reads and the ones the contrast pulls apart are decoupled (paper §3.2.2, Table 6:
None 44.4, Linear 44.0, SimCLR 44.8, BYOL 44.9, MoCo 45.4 mIoU). Each head is the
official code's `nn.Sequential` applied to every pixel (`Linear` = a 1x1
convolution on NHWC features):

  none    identity
  linear  Linear(D, D')
  moco    Linear(D, D) - ReLU - Linear(D, D')
  byol    Linear(D, D) - BatchNorm1d - ReLU - Linear(D, D')
  simclr  Linear(D, D) - BatchNorm1d - ReLU - Linear(D, D') - BatchNorm1d

D' = D (2048 in the reference) unless `features` is set. BatchNorm1d normalises over
all pixels of the batch, as the reference's view(-1, D) does. Weights use PyTorch's
default `nn.Linear` initialisation, because the official code never trains its head
(it is not in the optimiser), so that random draw is what shapes its features.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

HEADS = ("none", "linear", "moco", "byol", "simclr")

# torch kaiming_uniform_(a=sqrt(5)): U(-b, b) with b = 1 / sqrt(fan_in).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in):
  """PyTorch's default bias draw for Linear/Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def check_head(kind):
  if kind not in HEADS:
    raise ValueError(f"Unknown projection head {kind!r}; method.contrast.head must be one of "
                     f"{list(HEADS)} (CFContra Table 1).")
  return kind


class ProjectionHead(nn.Module):
  """One of the paper's Table 1 heads, applied per pixel to [..., D] features.

  Attributes:
    kind: 'none', 'linear', 'moco', 'byol' or 'simclr'.
    features: output width D'; 0 keeps the input width (the reference: 2048 -> 2048).
    dtype: compute dtype; parameters and BatchNorm statistics stay float32.
  """

  kind: str = "moco"
  features: int = 0
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_head(self.kind)
    super().__post_init__()

  def _dense(self, width, fan_in, name):
    return nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in), name=name)

  def _norm(self, train, name):
    # torch BatchNorm1d defaults: momentum 0.1 (flax 0.9), eps 1e-5, affine.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=self.dtype, param_dtype=jnp.float32, name=name)

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.kind == "none":
      return x
    d_in = x.shape[-1]
    d_out = self.features or d_in
    if self.kind == "linear":
      return self._dense(d_out, d_in, "fc1")(x)
    h = self._dense(d_in, d_in, "fc1")(x)
    if self.kind in ("byol", "simclr"):
      h = self._norm(train, "bn1")(h)
    h = nn.relu(h)
    y = self._dense(d_out, d_in, "fc2")(h)
    if self.kind == "simclr":
      y = self._norm(train, "bn2")(y)
    return y
