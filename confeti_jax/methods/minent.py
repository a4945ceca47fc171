"""ADVENT MinEnt: source cross-entropy plus the normalised entropy of target predictions.

ADVENT (Vu et al. 2019, docs/peers.md §3.1) and the CFContra code built on it:

* source: CE of the logits upsampled (bilinear, align_corners=True) to the label size,
  averaged over the *labelled* pixels (ADVENT's `cross_entropy_2d`, unlike mmseg's mean
  over all pixels); with the multi-level head the layer3 classifier adds 0.1 x its CE.
* target: the entropy of softmax(upsampled logits), divided by log K and averaged over
  all pixels, weight 1e-3 (main) and 2e-4 (the multi-level head).
* one backward of the summed loss; source and target go through the network in two
  forward passes, so BatchNorm sees each domain on its own.

`method.multi_level` switches ADVENT's layer3 classifier on (the reference default).
`method.bn_eval`: ADVENT keeps the network in train() mode, so BatchNorm normalises with
batch statistics (and updates running ones) while its scale/bias are frozen
(`optim.freeze_bn`); bn_eval=True normalises with the running statistics instead (the
usual meaning of "frozen BN"). On a MiT backbone the student's two forwards drop
(DAFormer head dropout 0.1, stochastic depth) in either BatchNorm mode, as DAFormer's
student does; DeepLabV2 has no dropout, so nothing changes there. The optimiser (ADVENT:
SGD 2.5e-4, momentum 0.9, wd 5e-4, heads x10, poly 0.9 over 250k of 120k steps) comes
from `config.optim`; the toy keeps its AdamW.
"""

import math

import jax
import jax.numpy as jnp

from confeti_jax import augment, losses, models, panels
from confeti_jax.methods import base


def valid_mean_cross_entropy(logits, labels):
  """ADVENT's `cross_entropy_2d`: CE averaged over labelled pixels (0 if there are none)."""
  nll = losses.pixelwise_cross_entropy(logits, labels)
  count = jnp.sum(labels != losses.IGNORE_INDEX)
  return jnp.sum(nll) / jnp.maximum(count, 1).astype(jnp.float32)


def upsample(logits, size):
  """ADVENT's nn.Upsample(mode='bilinear', align_corners=True) to the input size."""
  return augment.resize_bilinear(logits, size, align_corners=True)


class MinEnt(base.SegmentorMethod):
  """DeepLabV2 (optionally multi-level) trained with source CE + target entropy."""

  name = "minent"

  def __init__(self, config):
    super().__init__(config)
    m = config.method
    self.ent_weight = float(m.ent_weight)
    self.ent_weight_aux = float(m.ent_weight_aux)
    self.seg_weight_aux = float(m.seg_weight_aux)
    self.multi_level = bool(m.multi_level)
    self.bn_eval = bool(m.bn_eval)
    if self.multi_level:
      if models.is_transformer(config.model.backbone):
        raise ValueError("ADVENT's multi-level head (method.multi_level) exists for DeepLabV2 "
                         "only; pass --config.method.multi_level=False with a MiT backbone.")
      self.model = self.model.clone(aux_classifier=True)

  # -- forward -------------------------------------------------------------------
  def forward(self, params, batch_stats, images, dropout_key=None):
    """(stride-8 logits, features, BN statistics) in the configured BatchNorm mode.

    `dropout_key` drops in either mode (MiT / DAFormer head; DeepLabV2 has no dropout).
    """
    if self.bn_eval:
      logits, feats = self.model.apply({"params": params, "batch_stats": batch_stats},
                                       images, train=False, rngs=base.dropout_rngs(dropout_key))
      return logits, feats, batch_stats
    return self.forward_train(params, batch_stats, images, dropout_key)

  def source_losses(self, params, batch_stats, images, labels, dropout_key=None):
    """Source CE (+ aux CE): (loss, metrics, logits, features, BN statistics)."""
    logits, feats, batch_stats = self.forward(params, batch_stats, images, dropout_key)
    size = labels.shape[1:3]
    seg = valid_mean_cross_entropy(upsample(logits, size), labels)
    metrics = {"loss_src_seg": seg}
    loss = seg
    if self.multi_level:
      seg_aux = valid_mean_cross_entropy(upsample(feats["logits_aux"], size), labels)
      metrics["loss_src_seg_aux"] = seg_aux
      loss = loss + self.seg_weight_aux * seg_aux
    return loss, metrics, logits, feats, batch_stats

  def target_losses(self, params, batch_stats, images, dropout_key=None):
    """Weighted target entropy (+ aux): (loss, metrics, logits, features, BN statistics)."""
    logits, feats, batch_stats = self.forward(params, batch_stats, images, dropout_key)
    size = images.shape[1:3]
    ent = losses.entropy_loss(upsample(logits, size))
    metrics = {"loss_ent": ent}
    loss = self.ent_weight * ent
    if self.multi_level:
      ent_aux = losses.entropy_loss(upsample(feats["logits_aux"], size))
      metrics["loss_ent_aux"] = ent_aux
      loss = loss + self.ent_weight_aux * ent_aux
    return loss, metrics, logits, feats, batch_stats

  # -- step ----------------------------------------------------------------------
  def panel(self, batch, src_images, src_logits, tgt_images, tgt_logits, extra=None):
    """Source side, the target with the student's prediction and its normalised entropy
    (what MinEnt minimises), then `extra` tiles (CFContra's pseudo-labels)."""
    tiles = self.source_panel(batch, src_images, src_logits)
    tiles["target"] = panels.image(tgt_images)
    if "label" in batch["target"]:
      tiles["target GT"] = panels.label(batch["target"]["label"])
    size = tgt_images.shape[1:3]
    tiles["target prediction"] = panels.prediction(tgt_logits, size)
    probs = jax.nn.softmax(upsample(tgt_logits[:1].astype(jnp.float32), size), axis=-1)
    entropy = -jnp.sum(probs * jnp.log(probs + 1e-30), axis=-1)
    tiles["target entropy / log K"] = panels.heat(entropy, math.log(self.num_classes))
    tiles.update(extra or {})
    return tiles

  def train_step(self, state, batch, key):
    src_images = augment.normalize(batch["source"]["image"])
    src_labels = batch["source"]["label"].astype(jnp.int32)
    tgt_images = augment.normalize(batch["target"]["image"])

    def loss_fn(params):
      src_loss, src_metrics, src_logits, _, bs = self.source_losses(
          params, state.batch_stats, src_images, src_labels, base.dropout_key(key, 0))
      tgt_loss, tgt_metrics, tgt_logits, _, bs = self.target_losses(
          params, bs, tgt_images, base.dropout_key(key, 1))
      return src_loss + tgt_loss, ({**src_metrics, **tgt_metrics}, bs, src_logits, tgt_logits)

    (loss, (metrics, batch_stats, src_logits, tgt_logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.seg.params)
    seg = state.seg.apply_gradients(grads)
    metrics = {"loss": loss, **metrics, "grad_norm": base.global_norm(grads),
               **self.learning_rates(state.step)}
    metrics = panels.attach(metrics, self.panel_images, lambda: self.panel(
        batch, src_images, src_logits, tgt_images, tgt_logits))
    return state.replace(step=state.step + 1, seg=seg, batch_stats=batch_stats), metrics
