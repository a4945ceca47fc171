"""Photometric strong augmentation of DACS: colour jitter and Gaussian blur, on device.

The reference (DAFormer's `dacs_transforms.py`, docs/reference_code.md §2.3) pins kornia 0.6.7,
whose `ColorJitter` follows torchvision/PIL: multiplicative brightness, contrast blended
with the grey mean, saturation blended with the grey image (each clipped to [0, 1]) and
a hue rotation in HSV, applied in a random order. (Older kornia, whose jitter is now
called `ColorJiggle`, is additive and gives different images, so the version matters.)
Blur is kornia's `GaussianBlur2d` with reflect borders and a kernel of about a tenth of
the crop. Every function here takes its random parameters explicitly so the formulas
can be tested with fixed values; `strong_transform` draws them from keys.
"""

import math

import jax
import jax.numpy as jnp

from confeti_jax import augment

# kornia's rgb_to_grayscale weights (ITU-R 601 luma).
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
_TWO_PI = 2.0 * math.pi


def rgb_to_grayscale(x):
  """[..., 3] RGB -> [..., 1] luma."""
  w = jnp.asarray(GRAY_WEIGHTS, x.dtype)
  return jnp.sum(x * w, axis=-1, keepdims=True)


def rgb_to_hsv(x, eps=1e-8):
  """[..., 3] RGB in [0, 1] -> HSV with hue in [0, 2*pi), as kornia's `rgb_to_hsv`."""
  max_rgb = jnp.max(x, axis=-1)
  argmax = jnp.argmax(x, axis=-1)
  delta = max_rgb - jnp.min(x, axis=-1)
  s = delta / (max_rgb + eps)
  delta = jnp.where(delta == 0, 1.0, delta)
  rc, gc, bc = jnp.moveaxis(max_rgb[..., None] - x, -1, 0)
  # Hue of each "max channel" case; ties pick the first channel, which gives the same
  # hue as any other tied choice (and grey pixels have s = 0, so their hue is moot).
  cases = jnp.stack([bc - gc, (rc - bc) + 2.0 * delta, (gc - rc) + 4.0 * delta], axis=-1)
  h = jnp.take_along_axis(cases, argmax[..., None], axis=-1)[..., 0] / delta
  h = jnp.remainder(h / 6.0, 1.0) * _TWO_PI
  return jnp.stack([h, s, max_rgb], axis=-1)


def hsv_to_rgb(x):
  """Inverse of `rgb_to_hsv` (kornia's sector table; hue may be negative or > 2*pi)."""
  h, s, v = jnp.moveaxis(x, -1, 0)
  h6 = h / _TWO_PI * 6.0
  hi = jnp.remainder(jnp.floor(h6), 6.0)
  f = jnp.remainder(h6, 6.0) - hi
  p = v * (1.0 - s)
  q = v * (1.0 - f * s)
  t = v * (1.0 - (1.0 - f) * s)
  idx = hi.astype(jnp.int32)[..., None]
  pick = lambda *vals: jnp.take_along_axis(jnp.stack(vals, axis=-1), idx, axis=-1)[..., 0]
  # Sector 0..5 -> (r, g, b) = (v,t,p), (q,v,p), (p,v,t), (p,q,v), (t,p,v), (v,p,q).
  r = pick(v, q, p, p, t, v)
  g = pick(t, v, v, q, p, p)
  b = pick(p, p, t, v, v, q)
  return jnp.stack([r, g, b], axis=-1)


def adjust_brightness(x, factor):
  """kornia `adjust_brightness_accumulative`: x * factor, clipped."""
  return jnp.clip(x * factor, 0.0, 1.0)


def adjust_contrast(x, factor):
  """kornia `adjust_contrast_with_mean_subtraction`: blend with the mean grey level."""
  mean = jnp.mean(rgb_to_grayscale(x), axis=(-3, -2, -1), keepdims=True)
  return jnp.clip(x * factor + mean * (1.0 - factor), 0.0, 1.0)


def adjust_saturation(x, factor):
  """kornia `adjust_saturation_with_gray_subtraction`: blend with the grey image."""
  return jnp.clip((1.0 - factor) * rgb_to_grayscale(x) + factor * x, 0.0, 1.0)


def adjust_hue(x, radians):
  """kornia `adjust_hue`: rotate the hue by `radians` (C fmod, no clipping)."""
  hsv = rgb_to_hsv(x)
  h = jnp.fmod(hsv[..., 0] + radians, _TWO_PI)
  return hsv_to_rgb(jnp.stack([h, hsv[..., 1], hsv[..., 2]], axis=-1))


def color_jitter_image(image, factors, order):
  """One HWC image in [0, 1]: the four ops of kornia 0.6.7 `ColorJitter` in `order`.

  Args:
    image: [H, W, 3] float in [0, 1].
    factors: [4] = (brightness, contrast, saturation, hue) with hue in turns
      (kornia's `hue_factor`; multiplied by 2*pi here as kornia does).
    order: [4] int permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue).
  """
  ops = (
      lambda x: adjust_brightness(x, factors[0]),
      lambda x: adjust_contrast(x, factors[1]),
      lambda x: adjust_saturation(x, factors[2]),
      lambda x: adjust_hue(x, factors[3] * _TWO_PI),
  )
  for k in range(4):
    image = jax.lax.switch(order[k], ops, image)
  return image


def sample_jitter_params(key, batch, strength):
  """Per-image kornia `ColorJitterGenerator` draws: factors [B, 4] and orders [B, 4].

  brightness, contrast, saturation ~ U(max(0, 1 - s), 1 + s); hue ~ U(-s, s) (s <= 0.5);
  the order is one `randperm(4)` per image (the reference builds one transform per image).
  """
  if not 0.0 <= strength <= 0.5:
    raise ValueError(f"colour-jitter strength must lie in [0, 0.5] (hue bound), got {strength}")
  k_factor, k_order = jax.random.split(key)
  u = jax.random.uniform(k_factor, (batch, 4), jnp.float32)
  low = jnp.asarray([max(0.0, 1.0 - strength)] * 3 + [-strength], jnp.float32)
  high = jnp.asarray([1.0 + strength] * 3 + [strength], jnp.float32)
  factors = low + u * (high - low)
  orders = jax.vmap(lambda k: jax.random.permutation(k, 4))(jax.random.split(k_order, batch))
  return factors, orders


def blur_kernel_size(n):
  """DAFormer's kernel size for an image side n: 51 for 512, 63 for 640 (always odd)."""
  c = math.ceil(0.1 * n)
  return int(math.floor(c - 0.5 + c % 2))


def gaussian_kernel1d(size, sigma):
  """kornia `gaussian`: normalised exp(-x^2 / 2 sigma^2) on x = arange(size) - size // 2."""
  x = jnp.arange(size, dtype=jnp.float32) - size // 2
  if size % 2 == 0:
    x = x + 0.5
  g = jnp.exp(-(x**2) / (2.0 * jnp.asarray(sigma, jnp.float32) ** 2))
  return g / jnp.sum(g)


def _filter_axis(image, kernel, axis):
  """Correlates [H, W, C] `image` with a 1-D kernel along `axis` (0 or 1), reflect border."""
  k = kernel.shape[0]
  pad = [(0, 0)] * 3
  pad[axis] = ((k - 1) // 2, k // 2)
  x = jnp.pad(image, pad, mode="reflect")[None]
  c = image.shape[-1]
  shape = (k, 1) if axis == 0 else (1, k)
  rhs = jnp.tile(kernel.reshape(*shape, 1, 1), (1, 1, 1, c)).astype(image.dtype)
  out = jax.lax.conv_general_dilated(
      x, rhs, window_strides=(1, 1), padding="VALID", feature_group_count=c,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
  return out[0]


def gaussian_blur(images, sigmas, kernel_size):
  """kornia `GaussianBlur2d(kernel_size, (sigma, sigma))`, reflect border, per image.

  Args:
    images: [B, H, W, C] float.
    sigmas: [B] standard deviation of each image's kernel.
    kernel_size: (kh, kw) static kernel size.
  """
  kh, kw = kernel_size

  def one(image, sigma):
    image = _filter_axis(image, gaussian_kernel1d(kh, sigma), 0)
    return _filter_axis(image, gaussian_kernel1d(kw, sigma), 1)

  return jax.vmap(one)(images, sigmas)


def strong_transform(jitter_key, blur_key, images, *, jitter_strength=0.2, jitter_p=0.2,
                     blur=True):
  """DACS strong augmentation of normalised mixed images: jitter, then blur.

  One uniform draw per call decides jitter (applied when U > jitter_p) and one decides
  blur (U > 0.5), shared by the batch as in the reference; the factors, op order and
  sigma ~ U(0.15, 1.15) are drawn per image. Jitter works in [0, 1] space
  (de-normalise / 255, jitter, re-normalise); blur works on the normalised image.
  """
  b, h, w, _ = images.shape
  k_apply, k_params = jax.random.split(jitter_key)

  def jitter(x):
    factors, orders = sample_jitter_params(k_params, b, jitter_strength)
    x01 = augment.denormalize(x) / 255.0
    x01 = jax.vmap(color_jitter_image)(x01, factors, orders)
    return augment.normalize(x01 * 255.0)

  apply_jitter = jax.random.uniform(k_apply, ()) > jitter_p
  images = jax.lax.cond(apply_jitter, jitter, lambda x: x, images)
  if blur:
    kb_apply, kb_sigma = jax.random.split(blur_key)
    sigmas = jax.random.uniform(kb_sigma, (b,), jnp.float32, 0.15, 1.15)
    size = (blur_kernel_size(h), blur_kernel_size(w))
    apply_blur = jax.random.uniform(kb_apply, ()) > 0.5
    images = jax.lax.cond(apply_blur, lambda x: gaussian_blur(x, sigmas, size),
                          lambda x: x, images)
  return images
