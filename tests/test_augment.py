"""On-device image ops against torch: interpolation conventions and normalisation."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from confeti_jax import augment


def _torch_resize(x, size, mode, align_corners=None):
  t = torch.tensor(np.moveaxis(x, -1, 1))
  kw = {} if mode == "nearest" else {"align_corners": align_corners}
  return np.moveaxis(F.interpolate(t, size=size, mode=mode, **kw).numpy(), 1, -1)


@pytest.mark.parametrize("size", [(16, 24), (5, 7), (9, 9), (3, 2)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_bilinear_matches_torch(size, align_corners):
  x = np.random.default_rng(0).normal(size=(2, 9, 13, 3)).astype(np.float32)
  ours = augment.resize_bilinear(jnp.asarray(x), size, align_corners=align_corners)
  ref = _torch_resize(x, size, "bilinear", align_corners)
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(16, 24), (4, 5), (3, 13)])
def test_nearest_matches_torch(size):
  x = np.random.default_rng(1).integers(0, 19, size=(2, 9, 13, 1)).astype(np.float32)
  ours = augment.resize_nearest(jnp.asarray(x), size)
  np.testing.assert_array_equal(np.asarray(ours), _torch_resize(x, size, "nearest"))


def test_normalize_roundtrip():
  x = np.random.default_rng(2).integers(0, 256, size=(1, 4, 4, 3)).astype(np.uint8)
  y = augment.normalize(jnp.asarray(x))
  np.testing.assert_allclose(y[0, 0, 0], (x[0, 0, 0] - np.array(augment.IMAGENET_MEAN))
                             / np.array(augment.IMAGENET_STD), rtol=1e-6)
  np.testing.assert_allclose(augment.denormalize(y), x, atol=1e-4)
