"""Class prototypes on the device: CONFETI's CAM-weighted top-n prototypes and CFContra's
class-centre memory banks.

Every function here has fixed shapes and no host round-trip, so both life cycles run
inside the jitted step.

CONFETI (docs/reference_code.md §3.3, `Prototypes`): one K x 512 bank, updated each step
from *teacher* projections of the mixed image. Features and CAM are upsampled to the
label resolution (bilinear, align_corners=True); per class the top-32 pixels by CAM
weight give a CAM-weighted mean, L2-normalised, folded in by EMA 0.999 (the first
update of a class copies it); all rows are renormalised after the update. Only the
selected pixels' upsampled features are ever formed (4 bilinear taps each), never the
full-resolution feature map.

CFContra (docs/peers.md §5, paper §3.2.2): two banks of K class centres (source and
target, K x D, unit rows):

* warm-up: the official code initialises the banks from pickles made by a pass over
  301 source batches (per image and class c, the mean feature of pixels both
  labelled c and predicted c) and then 1601 target batches (pixels pseudo-labelled
  by the nearest source centre with margin t). Per-image means are summed with a
  count per class (`accumulate`) and turned into unit centres (`finalize`).
* pseudo-labels: the nearest source centre by Euclidean distance between the raw
  (unnormalised) feature and the unit centre; ignored when the two nearest
  distances differ by less than t = 0.05 (`nearest_centre_labels`).
* update: c <- 0.9 c + 0.1 m, then c / |c|, where m is the L2-normalised per-class
  batch mean (`batch_centres`; zero for an absent class, which keeps its direction).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from confeti_jax import augment, losses

IGNORE_INDEX = 255
_HIGHEST = jax.lax.Precision.HIGHEST


@struct.dataclass
class Banks:
  """Source and target class-centre banks and their warm-up accumulators (float32)."""

  source: jax.Array        # [K, D] unit rows (zero until initialised)
  target: jax.Array        # [K, D]
  source_sum: jax.Array    # [K, D] sum of per-image class means during the warm-up
  source_count: jax.Array  # [K] number of (image, class) means summed
  target_sum: jax.Array
  target_count: jax.Array

  @classmethod
  def zeros(cls, num_classes, dim):
    z, c = jnp.zeros((num_classes, dim), jnp.float32), jnp.zeros((num_classes,), jnp.float32)
    return cls(source=z, target=z, source_sum=z, source_count=c, target_sum=z,
               target_count=c)


def image_class_means(features, labels, num_classes):
  """Per-image, per-class masked mean features, as the reference computes them.

  The reference divides adaptive-average-pooled sums, mean(f * m) / (mean(m) + 1e-6),
  i.e. sum(f * m) / (count + 1e-6 * h * w); labels >= K (255 = ignore) join no class.

  Args:
    features: [B, h, w, D] features.
    labels: [B, h, w] integer labels on the same grid.
    num_classes: K.

  Returns:
    ([B, K, D] means, zero where a class is absent; [B, K] pixel counts).
  """
  b, h, w, _ = features.shape
  masks = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # >= K -> all zero
  sums = jnp.einsum("bhwk,bhwd->bkd", masks, features.astype(jnp.float32), precision=_HIGHEST)
  counts = jnp.sum(masks, axis=(1, 2))
  hw = float(h * w)
  means = (sums / hw) / (counts / hw + 1e-6)[..., None]
  return means, counts


def batch_centres(features, labels, num_classes):
  """[K, D] unit batch centres: the reference's `calculate_average`.

  The mean over the batch of each image's class mean (an image lacking the class adds
  a zero vector), then L2-normalised; with batch 1 (the reference) this is the paper's
  Eq. 14-15 per-class batch mean. Absent classes give a zero row.
  """
  means, _ = image_class_means(features, labels, num_classes)
  return losses.l2_normalize(jnp.mean(means, axis=0))


def momentum_update(bank, centres, momentum):
  """c <- momentum * c + (1 - momentum) * m, then c / |c| (left as is when |c| = 0).

  All K rows are updated, as the reference does (index = arange(K)); a zero row of
  `centres` therefore rescales c by `momentum` and the renormalisation restores it.
  """
  new = momentum * bank + (1.0 - momentum) * centres
  norm = losses.safe_norm(new)
  return jnp.where(norm != 0, new / jnp.where(norm != 0, norm, 1.0), new)


def centre_distances(features, bank):
  """[..., K] Euclidean distances |f - c_k| without forming [..., K, D].

  |f|^2 - 2 f.c + |c|^2 at full float32 precision (a bf16/TF32 matmul would move the
  distances by more than the 0.05 margin on large features).
  """
  f = features.astype(jnp.float32)
  bank = bank.astype(jnp.float32)
  sq = (jnp.sum(f * f, axis=-1, keepdims=True)
        - 2.0 * jnp.einsum("...d,kd->...k", f, bank, precision=_HIGHEST)
        + jnp.sum(bank * bank, axis=-1))
  return jnp.sqrt(jnp.maximum(sq, 0.0))


def nearest_centre_labels(features, bank, threshold, ignore_index=IGNORE_INDEX):
  """Pseudo-labels: the nearest centre, ignored when the two nearest are within `threshold`.

  The reference's `get_pseudo_labels` with ignore_instances=True: the second distance
  is the minimum after every entry equal to the minimum is replaced by 1000 (so an
  exact tie is *kept*), and a pixel is ignored when |d1 - d2| < threshold.

  Args:
    features: [..., D] raw features (not normalised, as in the reference).
    bank: [K, D] source centres.
    threshold: margin t (0.05 in the reference).
    ignore_index: the label of ignored pixels.

  Returns:
    int32 [...] labels in [0, K) or `ignore_index`.
  """
  d = centre_distances(features, bank)
  d1 = jnp.min(d, axis=-1)
  nearest = jnp.argmin(d, axis=-1).astype(jnp.int32)
  d2 = jnp.min(jnp.where(d == d1[..., None], 1000.0, d), axis=-1)
  return jnp.where(jnp.abs(d1 - d2) < threshold, ignore_index, nearest)


def accumulate(total, count, features, labels, num_classes):
  """Adds each image's class means for the classes present in it (warm-up pass)."""
  means, counts = image_class_means(features, labels, num_classes)
  present = (counts > 0).astype(jnp.float32)
  return total + jnp.einsum("bk,bkd->kd", present, means, precision=_HIGHEST), \
      count + jnp.sum(present, axis=0)


def finalize(total, count):
  """Unit centres from the warm-up sums: mean of the per-image means, L2-normalised.

  A class never seen in the warm-up gets a zero row (the reference asserts that all K
  appear); the first momentum update then sets it to that class's batch centre.
  """
  return losses.l2_normalize(total / jnp.maximum(count, 1.0)[:, None])


def correctly_predicted(labels, predictions, ignore_index=IGNORE_INDEX):
  """Labels kept only where the prediction agrees (the source warm-up's pixel set)."""
  return jnp.where(labels == predictions, labels, ignore_index)


def pseudo_label_stats(pseudo, truth, ignore_index=IGNORE_INDEX):
  """Logging only: (accuracy of assigned labels, coverage, the code's accuracy).

  accuracy = correct / assigned, coverage = assigned / labelled, and the reference's
  `current_pseudo_acc` = correct / labelled (an ignored pseudo-label counts as wrong;
  it subsamples every 300th pixel, this uses all). Pixels without ground truth are left
  out; ratios are 0 when their denominator is.
  """
  labelled = truth != ignore_index
  assigned = labelled & (pseudo != ignore_index)
  correct = jnp.sum(assigned & (pseudo == truth)).astype(jnp.float32)
  n_assigned = jnp.sum(assigned).astype(jnp.float32)
  n_labelled = jnp.sum(labelled).astype(jnp.float32)
  return (correct / jnp.maximum(n_assigned, 1.0), n_assigned / jnp.maximum(n_labelled, 1.0),
          correct / jnp.maximum(n_labelled, 1.0))


# -- CONFETI: CAM-weighted top-n prototypes (docs/reference_code.md §3.3) --------------------------


@struct.dataclass
class Prototypes:
  """CONFETI's class prototypes (K x D, unit or zero rows) and per-class update counts.

  The reference keeps `update_count` as a plain tensor that is not checkpointed; here it
  is part of the state, so a resumed run continues exactly.
  """

  protos: jax.Array  # [K, D] float32
  counts: jax.Array  # [K] float32: pixels selected so far per class

  @classmethod
  def zeros(cls, num_classes, dim):
    return cls(protos=jnp.zeros((num_classes, dim), jnp.float32),
               counts=jnp.zeros((num_classes,), jnp.float32))


def _align_corners_taps(out_size, in_size):
  """(lo, hi, frac) numpy arrays of 1-D bilinear resampling with align_corners=True."""
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  src = np.arange(out_size, dtype=np.float64) * scale
  lo = np.clip(np.floor(src).astype(np.int32), 0, in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (src - lo).astype(np.float32)


def gather_upsampled(features, index, out_hw):
  """Values at flat pixels `index` (over B x H x W) of `features` upsampled to `out_hw`.

  Bilinear with align_corners=True, computed from the 4 low-resolution taps of each
  requested pixel: the same numbers as upsampling the whole map, at n x D cost.

  Args:
    features: [B, h, w, D] low-resolution features.
    index: int32 [...] flat pixel indices into [B, H, W] at the output resolution.
    out_hw: (H, W).

  Returns:
    float32 [..., D].
  """
  b, h, w, d = features.shape
  out_h, out_w = out_hw
  y_lo, y_hi, y_frac = (jnp.asarray(a) for a in _align_corners_taps(out_h, h))
  x_lo, x_hi, x_frac = (jnp.asarray(a) for a in _align_corners_taps(out_w, w))
  batch, rest = index // (out_h * out_w), index % (out_h * out_w)
  y, x = rest // out_w, rest % out_w
  flat = features.astype(jnp.float32).reshape(b * h * w, d)

  def tap(yy, xx):
    return flat[(batch * h + yy) * w + xx]

  fy, fx = y_frac[y][..., None], x_frac[x][..., None]
  top = tap(y_lo[y], x_lo[x]) * (1.0 - fx) + tap(y_lo[y], x_hi[x]) * fx
  bottom = tap(y_hi[y], x_lo[x]) * (1.0 - fx) + tap(y_hi[y], x_hi[x]) * fx
  return top * (1.0 - fy) + bottom * fy


def cam_weighted_class_means(features, labels, weights, eligible, *, num_classes, top_n,
                             tie_key=None, ignore_index=IGNORE_INDEX):
  """Per class, the weighted mean of the top-n pixels by weight (the reference's loop).

  For class c the candidates are the eligible pixels labelled c; the n with the largest
  weight are taken and f_c = sum(w F) / sum(w) over them, L2-normalised.

  Ties matter in the warm-up, when every weight is 1: the reference takes
  `argsort(w, descending=True)[:32]`, an unstable sort whose order among equal weights
  is arbitrary. `lax.top_k` puts the lowest flat index first, which would always pick
  the top-left pixels of each class. With `tie_key` the pixels are first put in a random
  order drawn from it, so ties fall to a reproducible random subset (the closest
  deterministic reading of an arbitrary order); without it, raster order.

  Args:
    features: [B, h, w, D] projections (not normalised), upsampled on the fly.
    labels: [B, H, W] labels at the output resolution (`ignore_index` = none).
    weights: [B, H, W, K] per-class weights at the output resolution (CAM or ones).
    eligible: [B, H, W] bool, pixels allowed at all (e.g. source-pasted only).
    num_classes: K.
    top_n: pixels per class (32 in the reference).
    tie_key: PRNG key of the random order among equal weights (None: raster order).

  Returns:
    (means [K, D] unit or zero rows, n_selected [K], weight_sums [K]).
  """
  b, h_out, w_out = labels.shape
  member = _class_members(labels, eligible, num_classes, ignore_index)  # [B, H, W, K]
  scores = jnp.where(member, weights.astype(jnp.float32), -jnp.inf)
  scores = scores.reshape(b * h_out * w_out, num_classes)             # [N, K]
  order = None
  if tie_key is not None:
    order = jax.random.permutation(tie_key, scores.shape[0])
    scores = scores[order]
  n = min(int(top_n), scores.shape[0])
  top_w, index = jax.lax.top_k(scores.T, n)                           # [K, n]
  if order is not None:
    index = order[index]
  selected = top_w > -jnp.inf
  top_w = jnp.where(selected, top_w, 0.0)
  feats = gather_upsampled(features, index, (h_out, w_out))           # [K, n, D]
  weight_sums = jnp.sum(top_w, axis=1)
  sums = jnp.einsum("kn,knd->kd", top_w, feats, precision=_HIGHEST)
  means = losses.l2_normalize(sums / jnp.where(weight_sums > 0, weight_sums, 1.0)[:, None])
  return means, jnp.sum(selected, axis=1).astype(jnp.float32), weight_sums


def class_means_all_pixels(features, labels, eligible, *, num_classes,
                           ignore_index=IGNORE_INDEX):
  """Per class, the plain mean of the upsampled features over every eligible pixel
  labelled c (the paper's 'w/o CAM' prototypes of Table 5), L2-normalised.

  The upsampled map is never formed: the mean of bilinearly upsampled features equals
  the low-resolution features weighted by the upsampling's adjoint applied to each
  class mask. Returns (means [K, D], pixel counts [K], pixel counts [K]), the shape of
  `cam_weighted_class_means`'s output.
  """
  b, h_out, w_out = labels.shape
  member = _class_members(labels, eligible, num_classes, ignore_index).astype(jnp.float32)
  h, w = features.shape[1:3]
  upsample = lambda x: augment.resize_bilinear(x, (h_out, w_out), align_corners=True)
  adjoint = jax.linear_transpose(upsample, jax.ShapeDtypeStruct((b, h, w, num_classes),
                                                                jnp.float32))
  (mass,) = adjoint(member)                                           # [B, h, w, K]
  sums = jnp.einsum("bhwk,bhwd->kd", mass, features.astype(jnp.float32), precision=_HIGHEST)
  counts = jnp.sum(member, axis=(0, 1, 2))
  means = losses.l2_normalize(sums / jnp.maximum(counts, 1.0)[:, None])
  return means, counts, counts


def _class_members(labels, eligible, num_classes, ignore_index):
  classes = jnp.arange(num_classes, dtype=jnp.int32)
  return ((labels[..., None] == classes) & (labels != ignore_index)[..., None]
          & eligible[..., None])


def update_prototypes(protos, means, n_selected, weight_sums, *, momentum):
  """Folds per-class means into the prototypes exactly as `Prototypes.update_prototypes`.

  A class with selected pixels adds them to its count; if their weights sum to 0 it is
  skipped (count still grows). Its first update copies the mean; later ones are EMA
  with rate a = min(1 - 1/(count + 1), 1 - momentum), i.e. 0.001: the intended
  cumulative-average warm-up of the reference is a no-op because of the min, and is
  kept that way. Finally every row is L2-normalised (never-seen rows stay 0).
  """
  counts_before = protos.counts
  counts = counts_before + n_selected
  update = (n_selected > 0) & (weight_sums > 0)
  rate = jnp.minimum(1.0 - 1.0 / (counts + 1.0), 1.0 - momentum)[:, None]
  blended = jnp.where((counts_before == 0)[:, None], means,
                      (1.0 - rate) * protos.protos + rate * means)
  new = jnp.where(update[:, None], blended, protos.protos)
  return Prototypes(protos=losses.l2_normalize(new), counts=counts)
