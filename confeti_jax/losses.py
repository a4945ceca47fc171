"""Loss functions as pure `jnp` functions, computed in float32.

Every method's train step is a composition of these, so they take plain arrays
(NHWC logits, integer label maps) and return scalars or per-pixel maps, and never
read a config. The reductions reproduce the reference code's (mmseg 0.16)
conventions rather than the more common "mean over valid pixels", because the
difference changes the effective loss weight and hence the reported numbers.
"""

import jax
import jax.numpy as jnp

IGNORE_INDEX = 255


def _check_shapes(logits, labels, weight):
  """Fails at trace time with a readable message instead of a broadcast error later."""
  if logits.ndim != 4:
    raise ValueError(f"logits must be [B, H, W, K], got shape {logits.shape}")
  if labels.shape != logits.shape[:3]:
    raise ValueError(
        f"labels shape {labels.shape} does not match logits {logits.shape}; resize the "
        "logits to the label resolution first (augment.resize_bilinear)")
  if weight is not None and weight.shape != labels.shape:
    raise ValueError(f"weight shape {weight.shape} must equal labels shape {labels.shape}")


def pixelwise_cross_entropy(logits, labels, *, ignore_index=IGNORE_INDEX):
  """Per-pixel softmax cross-entropy [B, H, W] in float32; ignored pixels are exactly 0.

  This is torch `F.cross_entropy(..., reduction='none', ignore_index=...)`: the
  map is exposed on its own because several methods reweight or mask it (pseudo-label
  quality weights, ClassMix masks) before reducing.

  Args:
    logits: [B, H, W, K] class scores at label resolution, any float dtype.
    labels: [B, H, W] integer class indices; `ignore_index` marks unlabelled pixels.
    ignore_index: label value whose pixels contribute nothing.

  Returns:
    [B, H, W] float32 negative log-likelihood of the labelled class.
  """
  _check_shapes(logits, labels, None)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  valid = labels != ignore_index
  # Ignored pixels gather class 0 and are zeroed afterwards, so the gather index is
  # always in range and no NaN can leak through the mask (0 * -inf would).
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
  return jnp.where(valid, nll, 0.0)


def cross_entropy(logits, labels, *, weight=None, ignore_index=IGNORE_INDEX):
  """Pixel-weighted cross-entropy averaged over ALL B*H*W pixels (mmseg 0.16 semantics).

  mmseg 0.16 computes the unreduced CE (ignored pixels give 0), multiplies by the
  optional pixel weight and then takes a plain `.mean()` (`weight_reduce_loss` with
  no `avg_factor`). Ignored pixels therefore still count in the denominator, so a
  batch with many ignored pixels has a smaller loss than "mean over valid pixels"
  would give. confeti_spec.md §2.3 (last bullet) uses this for the source CE and the
  ClassMix CE with the pseudo-label quality weight.

  Args:
    logits: [B, H, W, K] class scores, already resized to the label resolution.
    labels: [B, H, W] integer labels with `ignore_index` for unlabelled pixels.
    weight: optional [B, H, W] per-pixel weight (e.g. the pseudo-label confidence).
    ignore_index: label value whose pixels contribute 0 (but are still counted).

  Returns:
    float32 scalar.
  """
  _check_shapes(logits, labels, weight)
  loss = pixelwise_cross_entropy(logits, labels, ignore_index=ignore_index)
  if weight is not None:
    loss = loss * weight.astype(jnp.float32)
  return jnp.sum(loss) / loss.size
