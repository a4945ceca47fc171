"""DACS augmentation against independent re-statements.

ClassMix (batch-union class draw, masks, mixing), kornia 0.6.7 colour jitter and Gaussian
blur (restated in torch, NCHW, with fixed parameters), the FD label downscaling (numpy)
and the masked feature distance (torch).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from confeti_jax import augment, losses, photometric

# -- ClassMix ------------------------------------------------------------------------


def _labels_with_ignore_and_absent():
  """Image 0 holds {0, 3, 255}, image 1 holds {5, 7}: classes absent from one image exist."""
  lab = np.zeros((2, 6, 8), np.uint8)
  lab[0, :, 4:] = 3
  lab[0, 0, :] = 255
  lab[1] = 5
  lab[1, 3:, :] = 7
  return lab


def test_class_mix_masks_follow_a_half_subset_of_the_batch_union():
  lab = _labels_with_ignore_and_absent()
  union = {0, 3, 5, 7, 255}  # n = 5 -> ceil(5/2) = 3 classes per image
  counts = {c: 0 for c in union}
  masks_fn = jax.jit(augment.class_mix_masks)
  trials = 400
  for seed in range(trials):
    masks = np.asarray(masks_fn(jax.random.key(seed), jnp.asarray(lab)))
    assert masks.shape == lab.shape and masks.dtype == bool
    chosen_all = []
    for i in range(2):
      # The mask is a function of the label value: every pixel of a class agrees.
      chosen = {int(c) for c in np.unique(lab[i][masks[i]])}
      rest = {int(c) for c in np.unique(lab[i][~masks[i]])}
      assert not chosen & rest
      chosen_all.append(chosen)
      np.testing.assert_array_equal(masks[i], np.isin(lab[i], sorted(chosen)))
    for c in chosen_all[0] | chosen_all[1]:
      counts[c] += 1
  # Each class is drawn for image i with probability 3/5. Image 0 shows {0, 3, 255},
  # image 1 shows {5, 7}; a class counts once per trial here, as it lives in one image.
  for c, k in counts.items():
    assert abs(k / trials - 0.6) < 0.08, (c, k)


def test_class_mix_subset_size_and_independence_across_images():
  # Both images hold all four classes: exactly ceil(4/2) = 2 per image, drawn independently.
  lab = np.tile(np.repeat(np.array([1, 2, 9, 255], np.uint8), 2)[None, None], (2, 3, 1))
  same = 0
  for seed in range(60):
    masks = np.asarray(augment.class_mix_masks(jax.random.key(seed), jnp.asarray(lab)))
    sets = [frozenset(np.unique(lab[i][masks[i]]).tolist()) for i in range(2)]
    assert all(len(s) == 2 for s in sets)
    same += sets[0] == sets[1]
  assert same < 30  # 1/6 expected; identical draws would give 60


def test_one_mix_images_labels_and_weights_match_the_reference_formula():
  rng = np.random.default_rng(0)
  m = rng.random((2, 5, 7)) < 0.5
  src, tgt = rng.normal(size=(2, 2, 5, 7, 3)).astype(np.float32)
  mf = m[..., None].astype(np.float32)
  np.testing.assert_allclose(augment.one_mix(jnp.asarray(m), src, tgt), mf * src + (1 - mf) * tgt)
  ys = rng.integers(0, 19, (2, 5, 7))
  ys[0, 0] = 255
  yt = rng.integers(0, 19, (2, 5, 7))
  np.testing.assert_array_equal(augment.one_mix(jnp.asarray(m), ys, yt),
                                m * ys + (1 - m) * yt)
  w = np.full((2, 5, 7), 0.3, np.float32)
  np.testing.assert_allclose(augment.one_mix(jnp.asarray(m), np.ones_like(w), w),
                             m * 1.0 + (1 - m) * w)


# -- colour jitter: torch re-statement of kornia 0.6.7 ---------------------------------


def _t_gray(x):
  return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _t_rgb_to_hsv(x, eps=1e-8):
  maxc, argmax = x.max(1)
  minc = x.min(1).values
  delta = maxc - minc
  s = delta / (maxc + eps)
  delta = torch.where(delta == 0, torch.ones_like(delta), delta)
  rc, gc, bc = (maxc.unsqueeze(1) - x).unbind(1)
  cand = torch.stack([bc - gc, rc - bc + 2 * delta, gc - rc + 4 * delta], 1) / delta[:, None]
  h = torch.gather(cand, 1, argmax[:, None])[:, 0]
  h = (h / 6.0) % 1.0 * 2 * math.pi
  return torch.stack([h, s, maxc], 1)


def _t_hsv_to_rgb(x):
  h, s, v = x[:, 0] / (2 * math.pi), x[:, 1], x[:, 2]
  hi = torch.floor(h * 6) % 6
  f = (h * 6) % 6 - hi
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  table = torch.stack([v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q], 1)
  hi = hi.long()
  return torch.gather(table, 1, torch.stack([hi, hi + 6, hi + 12], 1))


def _t_jitter(x, b, c, s, h, order):
  ops = [
      lambda y: (y * b).clamp(0, 1),
      lambda y: (y * c + _t_gray(y).mean((-2, -1), keepdim=True) * (1 - c)).clamp(0, 1),
      lambda y: ((1 - s) * _t_gray(y) + s * y).clamp(0, 1),
      lambda y: _t_hsv_to_rgb(_hue_shift(_t_rgb_to_hsv(y), h * 2 * math.pi)),
  ]
  for k in order:
    x = ops[k](x)
  return x


def _hue_shift(hsv, rad):
  return torch.cat([torch.fmod(hsv[:, :1] + rad, 2 * math.pi), hsv[:, 1:]], 1)


def _image01(seed, h=9, w=11):
  rng = np.random.default_rng(seed)
  x = rng.random((h, w, 3)).astype(np.float32)
  x[0, 0] = 0.5  # grey pixel (s = 0)
  x[0, 1] = (0.8, 0.8, 0.2)  # tied maxima
  x[0, 2] = (1.0, 0.0, 0.0)
  return x


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 0)))[None]


def _nhwc(t):
  return np.moveaxis(t[0].numpy(), 0, -1)


@pytest.mark.parametrize("factors,order", [
    ((1.15, 0.85, 1.2, 0.13), (0, 1, 2, 3)),
    ((0.8, 1.2, 0.81, -0.2), (3, 2, 1, 0)),
    ((1.2, 1.05, 0.9, -0.07), (2, 0, 3, 1)),
    ((0.9, 0.8, 1.1, 0.19), (1, 3, 0, 2)),
])
def test_color_jitter_matches_kornia_formulas(factors, order):
  x = _image01(sum(order) + int(factors[0] * 10))
  ours = photometric.color_jitter_image(jnp.asarray(x), jnp.asarray(factors, jnp.float32),
                                        jnp.asarray(order))
  ref = _nhwc(_t_jitter(_nchw(x), *factors, order))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5)


def test_hsv_round_trip_and_hue_wraps_both_ways():
  x = _image01(3)
  back = photometric.hsv_to_rgb(photometric.rgb_to_hsv(jnp.asarray(x)))
  np.testing.assert_allclose(np.asarray(back), x, atol=1e-5)
  for rad in (-1.2, 0.9, 2 * math.pi - 0.1):
    ours = photometric.adjust_hue(jnp.asarray(x), rad)
    ref = _t_hsv_to_rgb(_hue_shift(_t_rgb_to_hsv(_nchw(x)), rad))
    np.testing.assert_allclose(np.asarray(ours), _nhwc(ref), atol=2e-5)


def test_jitter_params_ranges_and_orders():
  factors, orders = photometric.sample_jitter_params(jax.random.key(0), 256, 0.2)
  factors, orders = np.asarray(factors), np.asarray(orders)
  assert factors[:, :3].min() >= 0.8 and factors[:, :3].max() <= 1.2
  assert factors[:, 3].min() >= -0.2 and factors[:, 3].max() <= 0.2
  assert factors[:, 3].min() < -0.15 and factors[:, 3].max() > 0.15
  assert all(sorted(o) == [0, 1, 2, 3] for o in orders.tolist())
  assert len({tuple(o) for o in orders.tolist()}) > 12  # orders differ per image


# -- Gaussian blur -----------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(512, 51), (640, 63), (128, 13), (64, 7), (20, 1), (30, 3)])
def test_blur_kernel_size(n, k):
  assert photometric.blur_kernel_size(n) == k


def _t_blur(x, sigma, ks):
  """kornia GaussianBlur2d: normalised 1-D Gaussians, reflect pad, depthwise correlation."""
  def kern(k):
    t = torch.arange(k, dtype=torch.float32) - k // 2
    if k % 2 == 0:
      t = t + 0.5
    g = torch.exp(-t.pow(2.0) / float(2 * sigma**2))
    return g / g.sum()
  kh, kw = ks
  c = x.shape[1]
  x = F.pad(x, [(kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2], mode="reflect")
  x = F.conv2d(x, kern(kh).view(1, 1, kh, 1).repeat(c, 1, 1, 1), groups=c)
  return F.conv2d(x, kern(kw).view(1, 1, 1, kw).repeat(c, 1, 1, 1), groups=c)


def test_gaussian_blur_matches_kornia_with_reflect_border():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 30, 25, 3)).astype(np.float32)
  sigmas = np.array([0.15, 1.15], np.float32)
  size = (photometric.blur_kernel_size(30), photometric.blur_kernel_size(25))
  assert size == (3, 3)
  ours = np.asarray(photometric.gaussian_blur(jnp.asarray(x), jnp.asarray(sigmas), size))
  for i in range(2):
    np.testing.assert_allclose(ours[i], _nhwc(_t_blur(_nchw(x[i]), float(sigmas[i]), size)),
                               atol=1e-5)
  # A larger kernel (the size 64-pixel crops get) exercises the reflect border more.
  big = np.asarray(photometric.gaussian_blur(jnp.asarray(x), jnp.asarray([0.7, 1.0]), (7, 7)))
  np.testing.assert_allclose(big[1], _nhwc(_t_blur(_nchw(x[1]), 1.0, (7, 7))), atol=1e-5)


def test_strong_transform_composes_jitter_in_unit_range_then_blur():
  rng = np.random.default_rng(5)
  raw = rng.integers(0, 256, (2, 16, 16, 3)).astype(np.float32)
  x = augment.normalize(jnp.asarray(raw))
  kj, kb = jax.random.key(1), jax.random.key(2)
  # p = -1: the jitter always fires; p = 1: never. blur=False isolates the jitter.
  never = photometric.strong_transform(kj, kb, x, jitter_p=1.0, blur=False)
  np.testing.assert_array_equal(np.asarray(never), np.asarray(x))
  out = photometric.strong_transform(kj, kb, x, jitter_p=-1.0, blur=False)
  factors, orders = photometric.sample_jitter_params(jax.random.split(kj)[1], 2, 0.2)
  for i in range(2):
    f = np.asarray(factors[i])
    ref = _nhwc(_t_jitter(_nchw(raw[i] / 255.0), *f, np.asarray(orders[i]).tolist()))
    ref = (ref * 255.0 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
    np.testing.assert_allclose(np.asarray(out[i]), ref, atol=1e-4)


# -- ImageNet feature distance --------------------------------------------------------


def _np_downscale_label_ratio(gt, scale, min_ratio, n_classes, ignore=255):
  b, h, w = gt.shape
  g = gt.astype(np.int64).copy()
  g[g == ignore] = n_classes
  onehot = np.eye(n_classes + 1)[g]  # [b, h, w, C+1]
  th, tw = h // scale, w // scale
  pooled = onehot[:, :th * scale, :tw * scale].reshape(b, th, scale, tw, scale, -1)
  pooled = pooled.mean(axis=(2, 4))
  out = pooled.argmax(-1)
  out[out == n_classes] = ignore
  out[pooled.max(-1) < min_ratio] = ignore
  return out


def test_downscale_label_ratio_matches_numpy():
  rng = np.random.default_rng(6)
  # Blocky labels so many 8x8 cells have a clear majority, plus noise and ignore pixels.
  gt = np.kron(rng.integers(0, 19, (2, 5, 6)), np.ones((8, 8), np.int64))
  noise = rng.random(gt.shape) < 0.2
  gt[noise] = rng.integers(0, 19, noise.sum())
  gt[rng.random(gt.shape) < 0.05] = 255
  gt[0, :8, :8] = 255  # a cell that is all ignore
  gt = np.pad(gt, ((0, 0), (0, 3), (0, 5)), constant_values=4)  # floor pooling drops these
  ours = np.asarray(augment.downscale_label_ratio(jnp.asarray(gt.astype(np.uint8)), 8, 0.75,
                                                  19))
  ref = _np_downscale_label_ratio(gt, 8, 0.75, 19)
  np.testing.assert_array_equal(ours, ref)
  assert (ref == 255).any() and (ref != 255).any() and ours[0, 0, 0] == 255


def test_masked_feature_distance_matches_torch_and_guards_empty_mask():
  rng = np.random.default_rng(7)
  f1, f2 = rng.normal(size=(2, 2, 4, 5, 6)).astype(np.float32)
  mask = rng.random((2, 4, 5)) < 0.4
  t1, t2 = torch.from_numpy(f1).permute(0, 3, 1, 2), torch.from_numpy(f2).permute(0, 3, 1, 2)
  dist = torch.norm(t1 - t2, dim=1, p=2)
  np.testing.assert_allclose(losses.masked_feature_distance(f1, f2, jnp.asarray(mask)),
                             dist[torch.from_numpy(mask)].mean().item(), rtol=1e-5)
  np.testing.assert_allclose(losses.masked_feature_distance(f1, f2), dist.mean().item(),
                             rtol=1e-5)
  # Empty mask: 0 instead of the reference's NaN; equal features: zero, finite gradient.
  assert float(losses.masked_feature_distance(f1, f2, jnp.zeros((2, 4, 5), bool))) == 0.0
  grad = jax.grad(lambda a: losses.masked_feature_distance(a, f1, jnp.asarray(mask)))(f1)
  assert np.all(np.asarray(grad) == 0.0)
