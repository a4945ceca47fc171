"""Loss functions as pure `jnp` functions, computed in float32.

Every method's train step is a composition of these, so they take plain arrays
(NHWC logits, integer label maps) and return scalars or per-pixel maps, and never
read a config. The reductions reproduce the reference code's (mmseg 0.16)
conventions rather than the more common "mean over valid pixels", because the
difference changes the effective loss weight and hence the reported numbers.
"""

import math

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
  would give. docs/reference_code.md §2.3 (last bullet) uses this for the source CE and the
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
  """Mean over masked cells of the per-cell L2 distance ||f1 - f2|| (DAFormer FD,
  docs/reference_code.md §2.6).

  The reference's `masked_feat_dist`: the channel-wise Euclidean norm of the difference
  at each cell of [B, h, w, C] feature maps, averaged over the cells where `mask` [B, h, w]
  is True (all cells when None). Two deliberate differences, both where the reference
  has no usable value: an empty mask gives 0 (the reference returns NaN, which it
  tolerates because the NaN does not reach the weights, but which our non-finite guard
  would stop on), and the gradient of the norm at a zero difference is 0 (as torch's
  `norm` backward), where a plain sqrt would give NaN.
  """
  dist = safe_norm(f1.astype(jnp.float32) - f2.astype(jnp.float32), keepdims=False)
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


def cam_bce(scores, labels, num_classes, *, ignore_index=IGNORE_INDEX):
  """CONFETI's CAM loss: BCE-with-logits of the GAP scores against image-level labels.

  The target of image i is multi-hot over the classes present in its label map (255
  and ids >= K excluded); the mean is over B x K (`CAMHead.losses`).

  Args:
    scores: [B, K] global-average-pooled pre-ReLU CAM scores.
    labels: [B, H, W] integer labels (any resolution).
  """
  labels = labels.astype(jnp.int32)
  present = jax.nn.one_hot(jnp.where(labels == ignore_index, num_classes, labels),
                           num_classes, dtype=jnp.float32)
  target = jnp.max(present.reshape(labels.shape[0], -1, num_classes), axis=1)
  x = scores.astype(jnp.float32)
  # max(x, 0) - x y + log(1 + exp(-|x|)): torch's numerically stable form.
  loss = jnp.maximum(x, 0.0) - x * target + jnp.log1p(jnp.exp(-jnp.abs(x)))
  return jnp.mean(loss)


def safe_norm(x, axis=-1, keepdims=True):
  """||x|| along `axis` whose gradient at the zero vector is 0, as torch's `norm` backward.

  `jnp.linalg.norm` differentiates sqrt at 0 into 0/0 = NaN, and 0 * NaN is NaN: a
  single all-zero row anywhere in a batch (a masked-out pixel, a class never seen)
  then turns the whole gradient into NaN, even where the row's loss weight is 0.
  """
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def l2_normalize(x, axis=-1, eps=1e-12):
  """torch F.normalize: x / max(||x||, eps), forward and gradient (a zero row stays 0;
  its gradient is the incoming one / eps, finite, where jnp.linalg.norm gives NaN)."""
  return x / jnp.maximum(safe_norm(x, axis=axis), eps)


def sample_pixels(key, valid, num_samples):
  """A uniform random subset of min(num_samples, #valid) valid pixels, fixed shape.

  The reference's `randperm(N)[:num_samples]` over the valid pixels: the valid pixels
  with the k smallest iid uniform keys. Returns (index [k], mask [k]) with
  k = min(num_samples, valid.size); the mask drops slots beyond the valid count.
  """
  flat = valid.reshape(-1)
  k = min(int(num_samples), flat.shape[0])
  keys = jnp.where(flat, jax.random.uniform(key, flat.shape), 2.0)
  neg_top, index = jax.lax.top_k(-keys, k)
  return index, neg_top > -2.0


def prototype_contrast(key, features, labels, protos, *, temperature, num_samples,
                       ignore_index=IGNORE_INDEX):
  """CONFETI's pixel-to-prototype contrast L_PCL (unweighted; the caller applies 0.5).

  `ContrastiveHead.contrastive_loss`: L2-normalised features of num_samples random
  valid pixels, CE of v . P^T / tau against their labels, mean over the samples.
  Prototypes carry no gradient.

  Args:
    key: PRNG key of the pixel sampling.
    features: [B, h, w, D] student projections (not normalised).
    labels: [B, h, w] labels on the feature grid (PyTorch 'nearest' of the crop labels).
    protos: [K, D] prototypes.
  """
  d = features.shape[-1]
  v = features.astype(jnp.float32).reshape(-1, d)
  y = labels.reshape(-1).astype(jnp.int32)
  index, keep = sample_pixels(key, y != ignore_index, num_samples)
  v = l2_normalize(v[index])
  logits = jnp.matmul(v, jax.lax.stop_gradient(protos).T,
                      precision=jax.lax.Precision.HIGHEST) / temperature
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1),
                             jnp.where(keep, y[index], 0)[:, None], axis=-1)[:, 0]
  return jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


REG_VARIANTS = ("code", "diversity")


def prototype_regularizer(features, labels, protos, *, temperature, variant="code",
                          ignore_index=IGNORE_INDEX):
  """CONFETI's L_Reg before its weight: S = sum_c log p_c / (K ln K), p = softmax(v_bar.P/tau).

  v_bar is the mean of all valid L2-normalised pixel features (not only the sampled
  ones), P is detached.

  * 'code' (reference, `ContrastiveHead.reg_loss`, = SePiCo's code): returns +S. S is
    largest (-1) at the uniform p, so minimising it pushes the mean prediction *away*
    from uniform.
  * 'diversity' (the paper's stated intent, ProDA/SePiCo's text: keep features spread
    over the prototypes): returns -S, minimal (+1) at the uniform p.
  """
  if variant not in REG_VARIANTS:
    raise ValueError(f"regulariser variant {variant!r}; use one of {REG_VARIANTS}.")
  d = features.shape[-1]
  v = l2_normalize(features.astype(jnp.float32).reshape(-1, d))
  valid = (labels.reshape(-1) != ignore_index).astype(jnp.float32)
  mean = jnp.sum(v * valid[:, None], axis=0) / jnp.maximum(jnp.sum(valid), 1.0)
  logits = jnp.matmul(mean, jax.lax.stop_gradient(protos).T,
                      precision=jax.lax.Precision.HIGHEST) / temperature
  k = protos.shape[0]
  s = jnp.sum(jax.nn.log_softmax(logits)) / (k * math.log(k))
  return s if variant == "code" else -s


SC_VARIANTS = ("prototype", "mse", "ce")


def affine_1x1(x, params):
  """phi: a 1x1 convolution with bias on [..., D] features ({'kernel': [D, D'], 'bias'})."""
  return jnp.einsum("...d,de->...e", x.astype(jnp.float32), params["kernel"],
                    precision=jax.lax.Precision.HIGHEST) + params["bias"]


def semantic_consistency(variant, stylised, original, protos=None, phi=None):
  """CONFETI's L_SC before its weight (0.1), and the paper's Table 4 alternatives.

  * 'prototype' (reference, dacs.py L505-531): MSE between phi(proj(f(G(x)))) . P^T and
    proj(f(x)) . P^T, features not normalised, no temperature; the original side and P
    are detached. `stylised` / `original` are the projections [B, h, w, D].
  * 'mse' (Table 4 "MSE", our reading): MSE between phi(proj(f(G(x)))) and proj(f(x)).
  * 'ce' (Table 4 "L_CE", CyCADA-style, our reading): CE of the stylised image's logits
    against the argmax of the original's, at the logits' stride-8 grid; `stylised` /
    `original` are logits [B, h, w, K] and phi is unused.
  """
  if variant not in SC_VARIANTS:
    raise ValueError(f"semantic-consistency variant {variant!r}; use one of {SC_VARIANTS}.")
  original = jax.lax.stop_gradient(original.astype(jnp.float32))
  if variant == "ce":
    return cross_entropy(stylised.astype(jnp.float32), jnp.argmax(original, axis=-1))
  mapped = affine_1x1(stylised, phi)
  if variant == "mse":
    return jnp.mean(jnp.square(mapped - original))
  p = jax.lax.stop_gradient(protos.astype(jnp.float32)).T
  dot = lambda v: jnp.einsum("...d,dk->...k", v, p, precision=jax.lax.Precision.HIGHEST)
  return jnp.mean(jnp.square(dot(mapped) - dot(original)))


@jax.custom_vjp
def _bank_logits(z, bank, backward_bank):
  """z . bank^T, whose gradient in z is taken against `backward_bank` instead."""
  return jnp.matmul(z, bank.T, precision=jax.lax.Precision.HIGHEST)


def _bank_logits_fwd(z, bank, backward_bank):
  return _bank_logits(z, bank, backward_bank), (bank, backward_bank)


def _bank_logits_bwd(res, g):
  bank, backward_bank = res
  dz = jnp.matmul(g, backward_bank, precision=jax.lax.Precision.HIGHEST)
  return dz, jnp.zeros_like(bank), jnp.zeros_like(backward_bank)


_bank_logits.defvjp(_bank_logits_fwd, _bank_logits_bwd)


def memory_bank_nce(features, labels, bank, *, temperature, ignore_index=IGNORE_INDEX,
                    backward_bank=None):
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
    backward_bank: [K, D] bank the gradient in `features` is taken against (None: `bank`).
      The code's `HM.backward` multiplies by the bank as it is when the backward runs,
      which other terms' in-place updates may already have moved (methods/cfcontra.py).

  Returns:
    float32 scalar; 0 when no pixel is labelled (the reference would give NaN).
  """
  z = features.astype(jnp.float32)
  z = l2_normalize(z)
  bank = jax.lax.stop_gradient(bank.astype(jnp.float32))
  if backward_bank is None:
    logits = jnp.matmul(z, bank.T, precision=jax.lax.Precision.HIGHEST) / temperature
  else:
    backward_bank = jax.lax.stop_gradient(backward_bank.astype(jnp.float32))
    logits = _bank_logits(z, bank, backward_bank) / temperature
  e = jnp.exp(logits - jnp.mean(logits))
  p = e / (jnp.sum(e, axis=-1, keepdims=True) + 1e-6)
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  nll = -jnp.log(jnp.take_along_axis(p, safe[:, None], axis=-1)[:, 0] + 1e-6)
  count = jnp.sum(valid)
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1).astype(jnp.float32)


# -- CUT (docs/reference_code.md §4.3) ----------------------------------------------------------


def patch_nce(feat_q, feat_k, batch_size, temperature=0.07):
  """PatchNCE of CUT (`PatchNCELoss`, negatives from the same image only).

  Patch i of the query must pick its own key among the same image's patches: logits
  [<q_i, k_i>, <q_i, k_j> for all j with the j = i entry set to -10] / T (1 + n columns),
  cross-entropy with target 0, averaged over all B * n patches. Keys carry no gradient.

  Args:
    feat_q, feat_k: [B * n, D] unit vectors, image-major (PatchSampleMLP's order).
    batch_size: B; the rows are split into B images of n patches (the reference reshapes
      by `opt.batch_size`).
    temperature: nce_T (0.07).
  """
  q = feat_q.astype(jnp.float32)
  k = jax.lax.stop_gradient(feat_k.astype(jnp.float32))
  dim = q.shape[-1]
  l_pos = jnp.sum(q * k, axis=-1, keepdims=True)
  qb, kb = q.reshape(batch_size, -1, dim), k.reshape(batch_size, -1, dim)
  l_neg = jnp.einsum("bpd,bqd->bpq", qb, kb, precision=jax.lax.Precision.HIGHEST)
  n = qb.shape[1]
  l_neg = jnp.where(jnp.eye(n, dtype=bool), -10.0, l_neg).reshape(-1, n)
  logits = jnp.concatenate([l_pos, l_neg], axis=1) / temperature
  return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0])


def lsgan_loss(pred, is_real):
  """LSGAN (`GANLoss('lsgan')`): mean squared error of the scores to 1 (real) or 0 (fake)."""
  target = 1.0 if is_real else 0.0
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))
