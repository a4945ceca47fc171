"""Class-centre memory banks of CFContra: warm-up init, pseudo-labels, momentum updates.

Two banks of K class centres (source and target, K x D, unit rows) live in the
`TrainState`. Every function here has fixed shapes and no host round-trip, so
the whole bank life cycle runs inside the jitted step (peers.md §5, paper §3.2.2):

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
from flax import struct

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


def l2_normalize(x, axis=-1, eps=1e-12):
  """torch F.normalize: x / max(|x|, eps), so a zero vector stays zero."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


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
  return l2_normalize(jnp.mean(means, axis=0))


def momentum_update(bank, centres, momentum):
  """c <- momentum * c + (1 - momentum) * m, then c / |c| (left as is when |c| = 0).

  All K rows are updated, as the reference does (index = arange(K)); a zero row of
  `centres` therefore rescales c by `momentum` and the renormalisation restores it.
  """
  new = momentum * bank + (1.0 - momentum) * centres
  norm = jnp.linalg.norm(new, axis=-1, keepdims=True)
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
  return l2_normalize(total / jnp.maximum(count, 1.0)[:, None])


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
