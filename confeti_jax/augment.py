"""On-device image operations: (de)normalisation and PyTorch-compatible resizing.

Images travel from the loaders as uint8 NHWC (a quarter of the bytes of float32)
and are normalised inside the jitted step. The resize helpers reproduce the two
PyTorch interpolation conventions the reference code relies on, because
`jax.image.resize` differs from both: it antialiases when downsampling and its
'nearest' samples pixel centres.
"""

import jax
import jax.numpy as jnp

# ImageNet statistics in [0, 255] units, RGB (mmseg img_norm_cfg).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def normalize(images):
  """uint8 or float [0, 255] NHWC RGB -> float32 normalised with ImageNet statistics."""
  images = images.astype(jnp.float32)
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (images - mean) / std


def denormalize(images):
  """Inverse of `normalize`: float32 in [0, 255] units."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return images * std + mean


def _linear_weights(out_size, in_size, align_corners):
  """(out, in) interpolation matrix of 1-D linear resampling, PyTorch conventions."""
  out_idx = jnp.arange(out_size, dtype=jnp.float32)
  if align_corners:
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = out_idx * scale
  else:
    src = (out_idx + 0.5) * (in_size / out_size) - 0.5
    src = jnp.maximum(src, 0.0)
  lo = jnp.clip(jnp.floor(src).astype(jnp.int32), 0, in_size - 1)
  hi = jnp.minimum(lo + 1, in_size - 1)
  frac = src - lo.astype(jnp.float32)
  eye = jnp.eye(in_size, dtype=jnp.float32)
  return eye[lo] * (1.0 - frac)[:, None] + eye[hi] * frac[:, None]


def resize_bilinear(x, size, *, align_corners=False):
  """Bilinear resize of NHWC `x` to `size`=(h, w), as torch F.interpolate (no antialias).

  Written as two small matrix products so it is exact for up- and downsampling
  and cheap for the shapes used here (logits and feature maps).
  """
  h, w = size
  in_h, in_w = x.shape[1], x.shape[2]
  if (h, w) == (in_h, in_w):
    return x
  wy = _linear_weights(h, in_h, align_corners).astype(x.dtype)
  wx = _linear_weights(w, in_w, align_corners).astype(x.dtype)
  x = jnp.einsum("oh,bhwc->bowc", wy, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("pw,bowc->bopc", wx, x, precision=jax.lax.Precision.HIGHEST)


def resize_nearest(x, size):
  """Nearest resize of NHW[C] `x` with PyTorch's 'nearest' rule: src = floor(dst * in / out)."""
  h, w = size
  in_h, in_w = x.shape[1], x.shape[2]
  rows = jnp.floor(jnp.arange(h) * (in_h / h)).astype(jnp.int32)
  cols = jnp.floor(jnp.arange(w) * (in_w / w)).astype(jnp.int32)
  return x[:, rows][:, :, cols]
