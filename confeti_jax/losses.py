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


def masked_feature_distance(f1, f2, mask=None):
  """Mean over masked cells of the per-cell L2 distance ||f1 - f2|| (DAFormer FD, §2.6).

  The reference's `masked_feat_dist`: the channel-wise Euclidean norm of the difference
  at each cell of [B, h, w, C] feature maps, averaged over the cells where `mask` [B, h, w]
  is True (all cells when None). Two deliberate differences, both where the reference
  has no usable value: an empty mask gives 0 (the reference returns NaN, which it
  tolerates because the NaN does not reach the weights, but which our non-finite guard
  would stop on), and the gradient of the norm at a zero difference is 0 (as torch's
  `norm` backward), where a plain sqrt would give NaN.
  """
  diff = f1.astype(jnp.float32) - f2.astype(jnp.float32)
  sq = jnp.sum(jnp.square(diff), axis=-1)
  positive = sq > 0
  dist = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  if mask is None:
    return jnp.mean(dist)
  count = jnp.sum(mask)
  total = jnp.sum(jnp.where(mask, dist, 0.0))
  return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def entropy_map(logits):
  """Per-pixel entropy of softmax(logits) divided by log K, in [0, 1], float32 [B, H, W].

  ADVENT's normalised entropy (-sum_c p log2(p + 1e-30) / log2 K): the same number,
  written with log_softmax so that no 0 * log 0 is ever formed.
  """
  logits = logits.astype(jnp.float32)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1) / jnp.log(float(logits.shape[-1]))


def entropy_loss(logits):
  """ADVENT MinEnt loss: the normalised entropy averaged over every pixel of the batch.

  Apply it to logits already upsampled to the input size, as ADVENT does.
  """
  return jnp.mean(entropy_map(logits))


def memory_bank_nce(features, labels, bank, *, temperature, ignore_index=IGNORE_INDEX):
  """InfoNCE of pixel features against a bank of K class centres (CFContra's memory).

  The official code's `HybridMemory.forward`: features are L2-normalised, the logits
  are z . bank^T / temperature, and its "masked softmax" is e = exp(l - mean(l)) with
  the mean taken over the whole N x K logit matrix, p = e / (sum_k e + 1e-6), loss =
  NLL of log(p + 1e-6) averaged over labelled pixels. The two epsilons make it differ
  (slightly) from a plain softmax cross-entropy, so they are kept. The bank is memory,
  not a parameter: no gradient flows into it.

  Args:
    features: [N, D] pixel features (any scale).
    labels: [N] integer class (positive centre) per pixel; `ignore_index` = unlabelled.
    bank: [K, D] class centres (L2-normalised by the caller's update rule).
    temperature: the softmax temperature tau (0.07 in the reference).
    ignore_index: label of pixels that contribute nothing.

  Returns:
    float32 scalar; 0 when no pixel is labelled (the reference would give NaN).
  """
  z = features.astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  bank = jax.lax.stop_gradient(bank.astype(jnp.float32))
  logits = jnp.matmul(z, bank.T, precision=jax.lax.Precision.HIGHEST) / temperature
  e = jnp.exp(logits - jnp.mean(logits))
  p = e / (jnp.sum(e, axis=-1, keepdims=True) + 1e-6)
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  nll = -jnp.log(jnp.take_along_axis(p, safe[:, None], axis=-1)[:, 0] + 1e-6)
  count = jnp.sum(valid)
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1).astype(jnp.float32)
