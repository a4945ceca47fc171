"""Cross-entropy against torch (mmseg 0.16 reduction) and a hand-computed case."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from confeti_jax import losses


def _random_case(seed, b=2, h=5, w=7, k=4, ignore_frac=0.3):
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=3.0, size=(b, h, w, k)).astype(np.float32)
  labels = rng.integers(0, k, size=(b, h, w)).astype(np.int32)
  labels[rng.random((b, h, w)) < ignore_frac] = 255
  weight = rng.random((b, h, w)).astype(np.float32)
  return logits, labels, weight


def _torch_ce(logits, labels, weight=None):
  """mmseg 0.16: unreduced CE (ignore 255) times weight, then a plain mean."""
  loss = F.cross_entropy(torch.from_numpy(logits).permute(0, 3, 1, 2),
                         torch.from_numpy(labels).long(), reduction="none", ignore_index=255)
  if weight is not None:
    loss = loss * torch.from_numpy(weight)
  return loss, loss.mean().item()


@pytest.mark.parametrize("use_weight", [False, True])
def test_cross_entropy_matches_torch(use_weight):
  logits, labels, weight = _random_case(0)
  weight = weight if use_weight else None
  _, expected = _torch_ce(logits, labels, weight)
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                             weight=None if weight is None else jnp.asarray(weight))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_pixelwise_matches_torch_and_ignored_pixels_are_zero():
  logits, labels, _ = _random_case(1)
  expected, _ = _torch_ce(logits, labels)
  got = losses.pixelwise_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(got)[labels == 255] == 0.0)


def test_hand_computed_tiny_case():
  # One image, 1x3 pixels, 2 classes. Pixel 0: logits (0, 0), label 0 -> log 2.
  # Pixel 1: logits (ln 3, 0), label 0 -> -log(3/4) = log(4/3). Pixel 2: ignored.
  logits = jnp.asarray([[[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]]])
  labels = jnp.asarray([[[0, 0, 255]]])
  expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 3.0  # ignored pixel counts in the mean
  np.testing.assert_allclose(float(losses.cross_entropy(logits, labels)), expected, rtol=1e-6)
  weight = jnp.asarray([[[0.5, 2.0, 7.0]]])
  expected_w = (0.5 * math.log(2.0) + 2.0 * math.log(4.0 / 3.0)) / 3.0
  np.testing.assert_allclose(float(losses.cross_entropy(logits, labels, weight=weight)),
                             expected_w, rtol=1e-6)


def test_all_ignored_is_zero_and_gradient_finite():
  logits = jnp.ones((1, 2, 2, 3))
  labels = jnp.full((1, 2, 2), 255)
  assert float(losses.cross_entropy(logits, labels)) == 0.0
  grad = jax.grad(lambda x: losses.cross_entropy(x, labels))(logits)
  assert np.all(np.asarray(grad) == 0.0)


def test_bfloat16_logits_computed_in_float32_and_jittable():
  logits, labels, weight = _random_case(2)
  _, expected = _torch_ce(logits.astype(np.float32), labels, weight)
  fn = jax.jit(lambda x, y, w: losses.cross_entropy(x, y, weight=w))
  got = fn(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels), jnp.asarray(weight))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), expected, rtol=2e-2)


def test_custom_ignore_index_and_shape_errors():
  logits, labels, _ = _random_case(3, ignore_frac=0.0)
  labels_ign = np.where(labels == 1, 3, labels).astype(np.int32)  # treat class 3 as ignore
  loss = F.cross_entropy(torch.from_numpy(logits).permute(0, 3, 1, 2),
                         torch.from_numpy(labels_ign).long(), ignore_index=3, reduction="none")
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels_ign), ignore_index=3)
  np.testing.assert_allclose(float(got), loss.mean().item(), rtol=1e-6)
  with pytest.raises(ValueError, match="resize the logits"):
    losses.cross_entropy(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 8, 8), jnp.int32))
  with pytest.raises(ValueError, match="weight shape"):
    losses.cross_entropy(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4), jnp.int32),
                         weight=jnp.ones((1, 4)))
