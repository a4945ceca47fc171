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


# -- ClassMix (DACS `get_class_masks` / `one_mix`, docs/reference_code.md §2.3) ------------------
_LABEL_VALUES = 256  # uint8 label maps: every id a label can hold, 255 (ignore) included


def class_mix_masks(key, labels):
  """ClassMix masks [B, H, W] bool (True = paste the source pixel), DACS semantics.

  The candidate classes are the label values present anywhere in the *batch* (so 255
  and classes absent from image i can be drawn, as in the reference); each image draws
  ceil(n / 2) of the n candidates without replacement, independently, and its mask
  marks its own pixels whose label is among them. A uniform random k-subset is drawn
  as the k smallest of iid uniform scores, which keeps shapes fixed under jit.

  Args:
    key: PRNG key of the ClassMix stream.
    labels: [B, H, W] integer source labels (values < 256).
  """
  labels = labels.astype(jnp.int32)
  present = jnp.zeros((_LABEL_VALUES,), bool).at[labels.reshape(-1)].set(True)
  n = jnp.sum(present)
  k = (n + n % 2) // 2

  def choose(k_i):
    scores = jnp.where(present, jax.random.uniform(k_i, (_LABEL_VALUES,)), 2.0)
    rank = jnp.argsort(jnp.argsort(scores))
    return present & (rank < k)

  chosen = jax.vmap(choose)(jax.random.split(key, labels.shape[0]))
  return jax.vmap(lambda c, lab: c[lab])(chosen, labels)


def one_mix(mask, source, target):
  """`mask ? source : target` per pixel, for images [B,H,W,C] or maps [B,H,W]."""
  if source.ndim == mask.ndim + 1:
    mask = mask[..., None]
  return jnp.where(mask, source, target)


def downscale_label_ratio(labels, scale, min_ratio, num_classes, ignore_index=255):
  """mmseg `downscale_label_ratio`: majority label of each scale x scale cell, [B, h, w].

  One-hot with ignore as an extra class, average-pooled (floor, no padding) and
  arg-maxed; a cell whose majority covers less than `min_ratio` of it, or whose majority
  is the ignore class, becomes `ignore_index`. Ties take the lowest class id (they only
  matter for min_ratio <= 0.5).
  """
  if scale < 1:
    raise ValueError(f"scale must be >= 1, got {scale}")
  b, h, w = labels.shape
  th, tw = h // scale, w // scale
  labels = labels[:, :th * scale, :tw * scale].astype(jnp.int32)
  labels = jnp.where(labels == ignore_index, num_classes, labels)
  onehot = jax.nn.one_hot(labels, num_classes + 1, dtype=jnp.float32)
  ratio = onehot.reshape(b, th, scale, tw, scale, num_classes + 1).mean(axis=(2, 4))
  out = jnp.argmax(ratio, axis=-1)
  out = jnp.where((out == num_classes) | (jnp.max(ratio, axis=-1) < min_ratio),
                  ignore_index, out)
  return out.astype(jnp.int32)
