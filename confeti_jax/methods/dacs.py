"""Mean-teacher self-training with ClassMix: DACS as DAFormer/CONFETI's code runs it.

CONFETI's "Baseline (Sec. 3.1)" and the base every CONFETI variant adds to
(docs/reference_code.md §2, §12). One iteration, all inside one jitted step:

1. EMA teacher update, alpha_t = min(1 - 1/(t+1), 0.999), on parameters only (at t = 0
   this copies the student, the reference's initialisation).
2. The stylised source `s2t` (`stylize_source`; the raw source until a style module
   overrides it).
3. Teacher pseudo-labels on the target crops, one scalar quality weight q per batch, the
   top / bottom rows of the target weight map zeroed.
4. ClassMix of `s2t` into the target, strong jitter + blur on the mixed images.
5. Student loss = CE(s2t, source GT) + FD(student layer4 of s2t, ImageNet layer4 of the
   raw source) + weighted CE(mixed, mixed labels); one AdamW step on their sum (the
   reference accumulates the three backward passes before its single optimiser step).

BatchNorm as the reference: the student's two train-mode forwards (source, then mixed)
update its running statistics in that order; the teacher runs in train mode (batch
statistics) and updates its own statistics (`teacher_bn='batch'`). `teacher_bn='running'`
is our variant, not in the reference: the teacher runs in eval mode with running
statistics that follow the student's by the same EMA as the parameters.
"""

import math

import jax
import jax.numpy as jnp

from confeti_jax import augment, losses, models, panels, photometric
from confeti_jax import mic as mic_lib
from confeti_jax import state as state_lib
from confeti_jax.methods import base

# Named random streams folded into the step key.
STREAM_CLASSMIX = 1
STREAM_JITTER = 2
STREAM_BLUR = 3
STREAM_STYLE = 4
STREAM_MIC = 5

TEACHER_BN_MODES = ("batch", "running")


def scaled_rows(rows, height, ref_height):
  """Row count `rows` given at `ref_height`, scaled to `height` (round half up)."""
  if ref_height <= 0:
    return int(rows)
  return int(math.floor(rows * height / ref_height + 0.5))


def pseudo_weight_map(max_prob, threshold, ignore_top, ignore_bottom):
  """[B, H, W] target weights: scalar q everywhere, 0 on the ignored top / bottom rows.

  q = #{pixels with max prob >= threshold} / (B * H * W), one number for the whole batch
  (DACS `threshold_uniform`), so under a sharded batch it is global over the mesh.
  """
  q = jnp.mean((max_prob >= threshold).astype(jnp.float32))
  h = max_prob.shape[1]
  rows = jnp.arange(h)
  keep = (rows >= ignore_top) & (rows < h - ignore_bottom)
  weight = jnp.where(keep[None, :, None], q, 0.0)
  return jnp.broadcast_to(weight, max_prob.shape), q


class DACS(base.SegmentorMethod):
  """Student + EMA teacher + frozen ImageNet backbone, ClassMix self-training."""

  name = "dacs"

  def __init__(self, config):
    super().__init__(config)
    m = config.method
    self.alpha = float(m.alpha)
    self.teacher_bn = str(m.teacher_bn)
    if self.teacher_bn not in TEACHER_BN_MODES:
      raise ValueError(f"method.teacher_bn={self.teacher_bn!r}; use one of {TEACHER_BN_MODES}.")
    self.pseudo_threshold = float(m.pseudo_threshold)
    height = self.crop_size[0]
    self.ignore_top = scaled_rows(m.psweight_ignore_top, height, m.psweight_ref_height)
    self.ignore_bottom = scaled_rows(m.psweight_ignore_bottom, height, m.psweight_ref_height)
    self.jitter_strength = float(m.color_jitter_strength)
    self.jitter_p = float(m.color_jitter_p)
    self.blur = bool(m.blur)
    self.fd_lambda = float(m.fd_lambda)
    self.fd_classes = tuple(int(c) for c in m.fd_classes)
    self.fd_min_ratio = float(m.fd_scale_min_ratio)
    mic = m.get("mic", {"enabled": False})
    self.mic = dict(mic) if mic["enabled"] else None
    # The FD model needs only the backbone: the module the segmentor builds under
    # 'backbone', so the student's initial backbone variables apply to it unchanged.
    self.imnet_backbone = models.backbone_of(self.model)

  # -- state ---------------------------------------------------------------------
  def init_state(self, key):
    state = super().init_state(key)
    variables = {"params": state.seg.params, "batch_stats": state.batch_stats}
    teacher = state_lib.copy_tree(variables)
    imnet = None
    if self.fd_lambda > 0:
      imnet = state_lib.copy_tree({"params": variables["params"]["backbone"],  # MiT: no BN
                                   "batch_stats": variables["batch_stats"].get("backbone", {})})
    return state.replace(teacher=teacher, imnet=imnet)

  # -- hooks and pieces --------------------------------------------------------------
  def stylize_source(self, state, images, key):
    """The source images the segmentor trains on (`s2t`); identity without a style module.

    A style module (CUT, AdaIN, FDA) overrides this to return its stylised source in
    the segmentor's normalisation; the losses detach it as the reference does.
    """
    del state, key
    return images

  def update_teacher(self, state):
    """EMA of the student's parameters; BN statistics per `teacher_bn`."""
    teacher = state.teacher
    params = state_lib.ema_update(teacher["params"], state.seg.params, state.step, self.alpha)
    stats = teacher["batch_stats"]
    if self.teacher_bn == "running":
      stats = state_lib.ema_update(stats, state.batch_stats, state.step, self.alpha)
    return {"params": params, "batch_stats": stats}

  def teacher_predict(self, teacher, images):
    """Teacher (max prob, argmax) at crop resolution, and its updated BN statistics."""
    if self.teacher_bn == "batch":
      logits, _, stats = self.forward_train(teacher["params"], teacher["batch_stats"], images)
    else:
      logits, stats = self.apply_eval(teacher, images), teacher["batch_stats"]
    logits = augment.resize_bilinear(logits.astype(jnp.float32), images.shape[1:3])
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.max(probs, axis=-1), jnp.argmax(probs, axis=-1).astype(jnp.int32), stats

  def fd_target(self, state, raw_source, labels):
    """ImageNet layer4 of the raw source (eval mode, no gradient) and the thing-class mask.

    The mask is `downscale_label_ratio` of the source GT to the feature grid: cells whose
    majority label (>= fd_scale_min_ratio of the cell) is a thing class.
    """
    feats = self.imnet_backbone.apply(state.imnet, raw_source, train=False)["layer4"]
    scale = labels.shape[2] // feats.shape[2]
    cells = augment.downscale_label_ratio(labels, scale, self.fd_min_ratio, self.num_classes)
    if cells.shape[1:3] != feats.shape[1:3]:
      raise ValueError(f"FD mask {cells.shape[1:3]} does not match features {feats.shape[1:3]};"
                       " use a crop size divisible by the output stride (8).")
    mask = jnp.isin(cells, jnp.asarray(self.fd_classes, jnp.int32))
    return jax.lax.stop_gradient(feats), mask

  # -- step ------------------------------------------------------------------------
  def prepare(self, state, batch, key, s2t=None):
    """Everything before the student's losses (steps 1-6 above), as a dict.

    `s2t` is a stylised source the caller already made (in the segmentor's
    normalisation); otherwise `stylize_source` makes it.

    Keys: raw_source, src_labels, target, s2t (detached), teacher (EMA-updated, with
    its BN statistics after the target pass), pseudo, max_prob, tgt_weight, q, mask
    (ClassMix, True = source pixel), mixed (augmented, detached), mixed_labels,
    mixed_weight, and imnet_feats / fd_mask when the feature distance is on.
    """
    raw_source = augment.normalize(batch["source"]["image"])
    src_labels = batch["source"]["label"].astype(jnp.int32)
    target = augment.normalize(batch["target"]["image"])

    teacher = self.update_teacher(state)
    if s2t is None:
      s2t = self.stylize_source(state, raw_source, jax.random.fold_in(key, STREAM_STYLE))
    s2t = jax.lax.stop_gradient(s2t)

    max_prob, pseudo, teacher_stats = self.teacher_predict(teacher, target)
    teacher = {"params": teacher["params"], "batch_stats": teacher_stats}
    tgt_weight, q = pseudo_weight_map(max_prob, self.pseudo_threshold, self.ignore_top,
                                      self.ignore_bottom)

    mask = augment.class_mix_masks(jax.random.fold_in(key, STREAM_CLASSMIX), src_labels)
    mixed = augment.one_mix(mask, s2t, target)
    mixed = photometric.strong_transform(
        jax.random.fold_in(key, STREAM_JITTER), jax.random.fold_in(key, STREAM_BLUR), mixed,
        jitter_strength=self.jitter_strength, jitter_p=self.jitter_p, blur=self.blur)
    out = dict(
        raw_source=raw_source, src_labels=src_labels, target=target, s2t=s2t,
        teacher=teacher, pseudo=pseudo, max_prob=max_prob, tgt_weight=tgt_weight, q=q,
        mask=mask, mixed=jax.lax.stop_gradient(mixed),
        mixed_labels=augment.one_mix(mask, src_labels, pseudo),
        mixed_weight=augment.one_mix(mask, jnp.ones_like(tgt_weight), tgt_weight))
    if self.fd_lambda > 0:
      out["imnet_feats"], out["fd_mask"] = self.fd_target(state, raw_source, src_labels)
    if self.mic:
      out["mic_image"] = mic_lib.masked_target(
          jax.random.fold_in(key, STREAM_MIC), target, ratio=float(self.mic["mask_ratio"]),
          block=int(self.mic["block_size"]), jitter_strength=self.jitter_strength,
          jitter_p=self.jitter_p, blur=self.blur)
    return out

  def mic_loss(self, params, stats, prep, key):
    """MIC's masked-target CE on the teacher's pseudo-labels (0 and no forward if off)."""
    if not self.mic:
      return jnp.zeros((), jnp.float32), stats
    loss, (_, _, stats) = self.segmentation_loss(
        params, stats, prep["mic_image"], prep["pseudo"], weight=prep["tgt_weight"],
        dropout_key=base.dropout_key(key, 3))
    return float(self.mic["weight"]) * loss, stats

  def fd_loss(self, aux, prep):
    """The weighted ImageNet feature distance of the student's source layer4 (0 if off)."""
    if self.fd_lambda <= 0:
      return jnp.zeros((), jnp.float32)
    return self.fd_lambda * losses.masked_feature_distance(
        aux["layer4"], prep["imnet_feats"], prep["fd_mask"])

  stylizes = False  # whether `s2t` differs from the raw source (a style module runs)

  def panel(self, batch, prep, mixed_logits):
    """The debug panel DAFormer's code draws: source side, target with the teacher's
    pseudo-label and confidence, the ClassMix image and label, the student's prediction."""
    tiles = self.source_panel(batch, prep["raw_source"])
    if self.stylizes:
      tiles["stylised source"] = panels.image(prep["s2t"])
    tiles["target"] = panels.image(prep["target"])
    if "label" in batch["target"]:
      tiles["target GT"] = panels.label(batch["target"]["label"])
    tiles["pseudo-label"] = panels.label(prep["pseudo"])
    tiles[f"confidence (q: >={self.pseudo_threshold:g})"] = panels.heat(prep["max_prob"])
    tiles["mixed"] = panels.image(prep["mixed"])
    tiles["mixed label"] = panels.label(prep["mixed_labels"])
    tiles["prediction on mixed"] = panels.prediction(mixed_logits)
    if self.mic:
      tiles["MIC masked target"] = panels.image(prep["mic_image"])
    return tiles

  def step_metrics(self, batch, prep, loss, parts, grads, step, mixed_logits=None):
    metrics = {"loss": loss, **parts, "pseudo_weight": prep["q"],
               "grad_norm": base.global_norm(grads), **self.learning_rates(step)}
    if "label" in batch["target"]:
      metrics["pseudo_acc"] = pseudo_label_accuracy(prep["pseudo"], batch["target"]["label"])
    return panels.attach(metrics, self.panel_images and mixed_logits is not None,
                         lambda: self.panel(batch, prep, mixed_logits))

  def train_step(self, state, batch, key):
    prep = self.prepare(state, batch, key)

    def loss_fn(params):
      # Source first, then mixed: the order the reference updates BN running statistics.
      src_loss, (_, aux, stats) = self.segmentation_loss(
          params, state.batch_stats, prep["s2t"], prep["src_labels"],
          dropout_key=base.dropout_key(key, 0))
      fd_loss = self.fd_loss(aux, prep)
      mix_loss, (mix_logits, _, stats) = self.segmentation_loss(
          params, stats, prep["mixed"], prep["mixed_labels"], weight=prep["mixed_weight"],
          dropout_key=base.dropout_key(key, 1))
      parts = {"loss_src_seg": src_loss, "loss_fd": fd_loss, "loss_mix_seg": mix_loss}
      if self.mic:
        parts["loss_mic"], stats = self.mic_loss(params, stats, prep, key)
      return sum(parts.values()), (stats, parts, mix_logits)

    (loss, (stats, parts, mix_logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.seg.params)
    seg = state.seg.apply_gradients(grads)
    metrics = self.step_metrics(batch, prep, loss, parts, grads, state.step, mix_logits)
    new_state = state.replace(step=state.step + 1, seg=seg, batch_stats=stats,
                              teacher=prep["teacher"])
    return new_state, metrics


def pseudo_label_accuracy(pseudo, labels, ignore_index=255):
  """Fraction of labelled target pixels whose pseudo-label is right (logging only)."""
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_index
  correct = jnp.sum((pseudo == labels) & valid)
  return jnp.where(jnp.any(valid), correct / jnp.maximum(jnp.sum(valid), 1), 0.0)
