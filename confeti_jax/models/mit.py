"""SegFormer's Mix Transformer encoder (MiT-B0..B5), as DAFormer, HRDA and MIC run it.

Four stages, each an overlapping patch embedding (a strided convolution: 7x7 / 4 for the
first, 3x3 / 2 after, then LayerNorm eps 1e-5) and `depth` transformer blocks:

  x = x + DropPath(Attention(LN(x)));  x = x + DropPath(MixFFN(LN(x)))   (LN eps 1e-6)

Attention is "efficient" self-attention: keys and values come from the tokens reduced
by a sr x sr stride-sr convolution (sr 8 / 4 / 2 / 1 per stage) and a LayerNorm (eps
1e-5); heads 1 / 2 / 5 / 8, scale head_dim^-0.5. It runs through
`jax.nn.dot_product_attention`, which takes the fused cuDNN kernel on GPU where it
applies; its XLA form computes the logits and the softmax in float32 for bfloat16
inputs. Mix-FFN is Linear(C, 4C), a 3x3 depthwise convolution with bias, exact GELU,
Linear(4C, C). Each stage ends with a LayerNorm (eps 1e-6). Stochastic depth rises
linearly from 0 to `drop_path_rate` (0.1) over all blocks; it is applied exactly when a
'dropout' RNG is given (the student's forwards), never to the teacher, as DAFormer. It
does not follow `train` (BatchNorm's mode), so a method that normalises with running
statistics (MinEnt's `bn_eval`) still drops.

Outputs {'layer1'..'layer4'} at strides 4 / 8 / 16 / 32, the names ResNet uses, so the
feature distance and the heads read them alike. Parameter names mirror the torch
modules (`patch_embed1.proj`, `block1.0.attn.q` -> 'block1_0'/'attn'/'q', ...), which
`weights.py` relies on. Initialisation as the reference's `_init_weights`: Linear
N(0, 0.02) (timm's trunc_normal_ truncates at +-2 in absolute value, i.e. at 100 std),
zero biases; LayerNorm 1 / 0; convolutions N(0, sqrt(2 / fan_out)) with
fan_out = k*k*out / groups.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from confeti_jax.models.conv import Conv, ConvParams
from confeti_jax.models.resnet import remat_stages

# variant -> (embedding widths, blocks per stage)
MIT_VARIANTS = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}
NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
PATCH_EMBED = ((7, 4), (3, 2), (3, 2), (3, 2))  # (kernel, stride) per stage

dense_init = nn.initializers.normal(0.02)


def conv_fan_out_init(groups=1):
  """N(0, sqrt(2 / fan_out)), fan_out = k*k*out / groups (MiT's `_init_weights`)."""

  def init(key, shape, dtype=jnp.float32):
    fan_out = shape[0] * shape[1] * shape[3] / groups
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_out)

  return init


def check_variant(name):
  if name not in MIT_VARIANTS:
    raise ValueError(f"Unknown MiT variant {name!r}; use one of {sorted(MIT_VARIANTS)}.")
  return MIT_VARIANTS[name]


def drop_path(module, x, rate):
  """timm's DropPath: each sample's residual branch dropped with probability `rate`
  (only when the caller gives a 'dropout' RNG)."""
  if rate == 0.0 or not module.has_rng("dropout"):
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


def patch_conv(x, kernel):
  """A convolution whose stride equals its kernel size (no padding) as one matrix product
  over non-overlapping patches; rows / columns past the last whole patch are dropped, as
  torch's floor division drops them. Same result as lax.conv, a far smaller program."""
  s = kernel.shape[0]
  b, h, w, c = x.shape
  x = x[:, :h // s * s, :w // s * s].reshape(b, h // s, s, w // s, s, c)
  return jnp.einsum("bhpwqc,pqco->bhwo", x, kernel)


def _dense(features, dtype, name):
  return nn.Dense(features, dtype=dtype, kernel_init=dense_init, name=name)


class EfficientAttention(nn.Module):
  """Multi-head attention whose keys and values are spatially reduced by `sr_ratio`."""

  dim: int
  num_heads: int
  sr_ratio: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, hw):
    b, n, c = x.shape
    head_dim = c // self.num_heads
    q = _dense(c, self.dtype, "q")(x)
    context = x
    if self.sr_ratio > 1:
      kernel, bias = ConvParams(c, self.sr_ratio, use_bias=True,
                                kernel_init=conv_fan_out_init(), name="sr")(c)
      context = patch_conv(x.reshape(b, *hw, c).astype(self.dtype), kernel.astype(self.dtype))
      context = context + bias.astype(self.dtype)
      context = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(
          context.reshape(b, -1, c))
    kv = _dense(2 * c, self.dtype, "kv")(context)
    heads = lambda t: t.reshape(b, t.shape[1], self.num_heads, head_dim)
    out = jax.nn.dot_product_attention(heads(q), heads(kv[..., :c]), heads(kv[..., c:]),
                                       scale=head_dim ** -0.5)
    return _dense(c, self.dtype, "proj")(out.reshape(b, n, c))


class MixFFN(nn.Module):
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, hw):
    b, n, _ = x.shape
    hidden = self.dim * MLP_RATIO
    y = _dense(hidden, self.dtype, "fc1")(x).reshape(b, *hw, hidden)
    # The one grouped convolution of the project (conv.Conv has no groups).
    y = nn.Conv(hidden, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=hidden,
                use_bias=True, dtype=self.dtype, kernel_init=conv_fan_out_init(hidden),
                name="dwconv")(y)
    y = nn.gelu(y.reshape(b, n, hidden), approximate=False)
    return _dense(self.dim, self.dtype, "fc2")(y)


class MiTBlock(nn.Module):
  dim: int
  num_heads: int
  sr_ratio: int
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, hw):
    # `hw` is positional so nn.remat can mark it static.
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)
    y = EfficientAttention(self.dim, self.num_heads, self.sr_ratio, self.dtype,
                           name="attn")(norm("norm1")(x), hw)
    x = x + drop_path(self, y, self.drop_path_rate)
    y = MixFFN(self.dim, self.dtype, name="mlp")(norm("norm2")(x), hw)
    return x + drop_path(self, y, self.drop_path_rate)


_REMAT_BLOCK = nn.remat(MiTBlock, static_argnums=(2,))


class PatchEmbed(nn.Module):
  dim: int
  kernel: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = Conv(self.dim, self.kernel, stride=self.stride, padding=self.kernel // 2,
             use_bias=True, dtype=self.dtype, kernel_init=conv_fan_out_init(), name="proj")(x)
    b, h, w, c = x.shape
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x.reshape(b, h * w, c)), (h, w)


class MixVisionTransformer(nn.Module):
  """MiT encoder: NHWC images -> {'layer1': stride 4, ..., 'layer4': stride 32}.

  Attributes:
    variant: 'mit_b0' .. 'mit_b5'.
    drop_path_rate: the last block's stochastic-depth rate (DAFormer: 0.1).
    dtype: compute dtype; parameters stay float32.
    remat: stages whose blocks are recomputed in the backward pass (`resnet.remat_stages`).
  """

  variant: str = "mit_b5"
  drop_path_rate: float = 0.1
  dtype: Any = jnp.float32
  remat: bool | str | tuple[str, ...] = False

  def __post_init__(self):
    check_variant(self.variant)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool) -> dict:
    del train  # LayerNorm only: no mode; stochastic depth follows the 'dropout' RNG
    dims, depths = check_variant(self.variant)
    rates = np.linspace(0.0, self.drop_path_rate, sum(depths))
    remat = remat_stages(self.remat)
    x = x.astype(self.dtype)
    outputs, k = {}, 0
    for i, (dim, depth) in enumerate(zip(dims, depths)):
      kernel, stride = PATCH_EMBED[i]
      tokens, hw = PatchEmbed(dim, kernel, stride, self.dtype, name=f"patch_embed{i + 1}")(x)
      block = _REMAT_BLOCK if f"layer{i + 1}" in remat else MiTBlock
      for j in range(depth):
        tokens = block(dim, NUM_HEADS[i], SR_RATIOS[i], float(rates[k]), self.dtype,
                       name=f"block{i + 1}_{j}")(tokens, hw)
        k += 1
      tokens = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=f"norm{i + 1}")(tokens)
      x = tokens.reshape(x.shape[0], *hw, dim)
      outputs[f"layer{i + 1}"] = x
    return outputs
