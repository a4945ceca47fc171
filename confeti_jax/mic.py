"""MIC's masked image consistency (Hoyer et al., CVPR 2023) for the self-training methods.

As the MIC code runs it with DAFormer (`mask_mode='separatetrgaug'`, `mask_alpha` and
`mask_pseudo_threshold` 'same'): the target image gets its own strong augmentation
(DACS's colour jitter and blur with fresh random draws), then a block mask: a grid of
round(H / b) x round(W / b) cells (b = 32 at 512 crops, 64 for HRDA's high resolution),
each kept with probability 1 - ratio (ratio 0.7), upsampled nearest to the image and
multiplied in (masked pixels become 0 in the normalised image). The student sees the
masked image and is trained with cross-entropy on the host method's pseudo-labels and
pixel weights from the unmasked target (the same teacher pass), weight 1.
"""

import jax
import jax.numpy as jnp

from confeti_jax import augment, photometric

STREAM_MASK = 31
STREAM_JITTER = 32
STREAM_BLUR = 33


def block_mask(key, batch, size, ratio, block):
  """[B, H, W, 1] float mask of kept (1) and dropped (0) b x b blocks."""
  h, w = size
  grid = (batch, max(1, round(h / block)), max(1, round(w / block)), 1)
  keep = (jax.random.uniform(key, grid) > ratio).astype(jnp.float32)
  return augment.resize_nearest(keep, (h, w))


def masked_target(key, target, *, ratio, block, jitter_strength, jitter_p, blur):
  """The augmented, block-masked normalised target images the student trains on."""
  images = photometric.strong_transform(
      jax.random.fold_in(key, STREAM_JITTER), jax.random.fold_in(key, STREAM_BLUR), target,
      jitter_strength=jitter_strength, jitter_p=jitter_p, blur=blur)
  mask = block_mask(jax.random.fold_in(key, STREAM_MASK), target.shape[0], target.shape[1:3],
                    ratio, block)
  return jax.lax.stop_gradient(images * mask)
