"""CONFETI: DACS + CAM-weighted mixed prototypes, pixel-to-prototype contrast, regulariser,
and the jointly trained CUT generator with the prototypical semantic consistency L_SC.

The paper's method (§3.2, supplement) as the official code runs it (docs/reference_code.md §3-5,
§12), all inside the one jitted step:

1. [joint stage] G runs once on cat(x_s, x_t); its source half is the stylised source
   `s2t` (detached for every segmentation loss and the ClassMix paste). A frozen G
   (second stage, or `style_training='frozen'`) or FDA makes `s2t` otherwise.
2. DACS's preparation (`DACS.prepare`): EMA teacher, teacher pseudo-labels, q, ClassMix,
   strong augmentation.
3. Prototype update, before any student loss, from the *teacher* on the mixed image:
   projection + ReLU'd CAM, upsampled (align_corners=True) to the crop; per class the
   top-32 pixels by CAM, CAM-weighted mean, EMA 0.999. Until step `pcl_after` (3000)
   the weights are uniform and only source-pasted pixels count.
4. Student losses: source CE + CAM BCE [+ PCL + reg after 3000] + FD; [joint] L_SC
   through the frozen student (gradient only to G and phi); mixed weighted CE [+ CAM
   BCE after 2000] [+ PCL + reg from 3000]; [joint] the raw target's PCL + reg on
   unthresholded pseudo-labels, x q, after 3000. One AdamW step on the sum.
5. [joint] CUT: one D step, then one G + F step whose image gradient adds L_SC's.

Student BN statistics are updated in the reference's order (joint: s2t, x, G(x) for
L_SC, mixed, target; second stage: s2t, mixed). Gates compare the 0-based step with the
reference's inequalities (CAM mixed `> 2000`, PCL source `> 3000`, PCL mixed `>= 3000`,
CAM weights `> 3000`, target `> 3000`) as `jnp.where` / `lax.cond` on `state.step`.

Variants (paper Tables 3-5): `pixel_alignment=False` is model B; `proto.pcl=False`
models D/E; `stages` one- or two-stage; `style` cut/fda/gpa; `style_training` joint/frozen
(models A, C); `sc_loss` prototype/mse/ce/none; `proto.source` / `proto.weighting`.
Approximation: parameters that get no gradient in a step (e.g. the projection head
before step 3000) still receive AdamW's weight decay here; torch skips them.
"""

import os

import jax
import jax.numpy as jnp
import optax

from confeti_jax import augment, gpa, losses, stages, style
from confeti_jax import prototypes as protos_lib
from confeti_jax import state as state_lib
from confeti_jax.methods import base, dacs
from confeti_jax.models import heads

STREAM_PCL_SOURCE = 11
STREAM_PCL_MIXED = 12
STREAM_PCL_TARGET = 13
STREAM_PATCHES = 14
STREAM_CUT_INIT = 15
STREAM_PROTO_TIES = 17

PHI_KEY = "reg_proj"  # the reference's name for phi, a top-level entry of the student params

PROTO_SOURCES = ("mixed", "source")
WEIGHTINGS = ("cam", "uniform", "mean")
TARGET_PCL = ("joint", "always", "never")
STYLES = ("cut", "fda", "gpa")
STYLE_TRAINING = ("joint", "frozen")
SC_LOSSES = losses.SC_VARIANTS + ("none",)


def _check(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"method.{name}={value!r}; use one of {allowed}.")
  return value


def parse_stages(text):
  stages_ = sorted({int(s) for s in str(text).split(",") if s.strip()})
  if not stages_ or any(s not in (0, 1, 2) for s in stages_):
    raise ValueError(f"method.stages={text!r}; use a subset of 0,1,2 such as '0,1,2' or '2'.")
  return stages_


class CONFETI(dacs.DACS):
  """DACS student/teacher with CAM and projection heads, prototypes and a style module.

  `method.stage` 0 builds the stand-alone CUT training (`methods/cut.py`) instead, so
  one registry name covers the whole pipeline (`stage_plan`).
  """

  name = "confeti"

  def __new__(cls, config):
    if int(config.method.stage) == 0:
      from confeti_jax.methods import cut as cut_method
      return cut_method.CUTTraining(config)
    return super().__new__(cls)

  def __init__(self, config):
    m = config.method
    p = m.proto
    self.proto_enabled = bool(p.enabled)
    self.proto_dim = int(p.dim)
    super().__init__(config)
    if self.proto_enabled:
      # The segmentor gains the CAM head and the projection head (x10 head group).
      self.model = self.model.clone(cam_head=True, proj_dim=self.proto_dim)
    self.stage = int(m.stage)
    if self.stage not in (1, 2):
      raise ValueError(f"method.stage={self.stage}; use 0 (CUT), 1 (joint) or 2 (second).")
    self.proto_source = _check("proto.source", str(p.source), PROTO_SOURCES)
    self.weighting = _check("proto.weighting", str(p.weighting), WEIGHTINGS)
    self.target_pcl = _check("proto.target_pcl", str(p.target_pcl), TARGET_PCL)
    self.reg_variant = _check("proto.reg_variant", str(p.reg_variant), losses.REG_VARIANTS)
    self.pcl = bool(p.pcl)
    self.top_n, self.momentum = int(p.top_n), float(p.momentum)
    self.cam_weight, self.pcl_weight = float(p.cam_weight), float(p.pcl_weight)
    self.reg_weight, self.temperature = float(p.reg_weight), float(p.temperature)
    self.num_samples = int(p.num_samples)
    self.cam_mix_after, self.pcl_after = int(p.cam_mix_after), int(p.pcl_after)

    self.pixel_alignment = bool(m.pixel_alignment)
    self.style = _check("style", str(m.style), STYLES)
    self.style_training = _check("style_training", str(m.style_training), STYLE_TRAINING)
    self.sc_loss = _check("sc_loss", str(m.sc_loss), SC_LOSSES)
    self.sc_weight, self.fda_beta = float(m.sc_weight), float(m.fda_beta)
    self.cut_from = str(m.cut_from)
    uses_cut = self.pixel_alignment and self.style == "cut"
    self.cut = style.build_cut(m.cut, dtype=str(config.model.dtype)) if uses_cut else None
    # The generator trains only in the joint stage; the second stage (and the offline
    # ablation) runs a frozen one.
    self.trains_generator = (uses_cut and self.stage == 1
                             and self.style_training == "joint")
    self.sc_active = self.trains_generator and self.sc_loss != "none"
    if self.sc_active and self.sc_loss != "ce" and not self.proto_enabled:
      raise ValueError(f"method.sc_loss={self.sc_loss!r} reads the projection head; enable "
                       "method.proto or use sc_loss='ce' / 'none'.")
    self.frozen_tx = optax.set_to_zero()  # one object: it is static pytree metadata
    self._restored = self.load_cut_checkpoint() if self.cut is not None and self.cut_from else None
    # A frozen generator without weights is an error in training; the benchmark sets this
    # (a random G costs the same per step as the trained one).
    self.allow_random_generator = False

  @property
  def trains_target_pcl(self):
    """Target PCL: the reference runs it only while the generator trains (stage 1 + CUT)."""
    if not (self.proto_enabled and self.pcl):
      return False
    if self.target_pcl == "joint":
      return self.trains_generator
    return self.target_pcl == "always"

  @property
  def has_phi(self):
    return self.sc_active and self.sc_loss in ("prototype", "mse")

  def gates(self, step):
    """The reference's warm-up gates at 0-based `step` (bool scalars; step may be traced)."""
    step = jnp.asarray(step)
    after = step > self.pcl_after
    return {"cam_mix": step > self.cam_mix_after, "pcl_source": after,
            "pcl_mixed": step >= self.pcl_after, "pcl_target": after,
            "cam_weights": after, "all_pixels": after}

  # -- pipeline ------------------------------------------------------------------
  @classmethod
  def stage_plan(cls, config, workdir):
    """[(name, config, workdir)] of the stages in `method.stages` (docs/reference_code.md §5).

    Stage 0 trains CUT alone; stage 1 is the joint stage, its generator taken from
    stage 0 when that is in the plan (or was run), else imported (cut.gen_weights) or
    random; stage 2 trains a fresh segmentor at `stage2_crop` with the generator
    frozen from stage 1 (or imported). None without pixel alignment: one stage in place.
    A style without a generator (FDA, GPA) has no stage 0: nothing would read its CUT.
    """
    m = config.method
    if not m.pixel_alignment:
      return None
    wanted = parse_stages(m.stages)
    if m.style != "cut" and 0 in wanted:
      wanted = [s for s in wanted if s != 0]
      if not wanted:
        raise ValueError(f"method.stages={m.stages!r} trains only CUT, which "
                         f"method.style={m.style!r} does not use.")
    plan = []
    for s in wanted:
      updates = {"method.stage": s, "method.stages": str(s)}
      previous = os.path.join(workdir, f"stage{s - 1}")
      if s == 0:
        updates.update({"train.steps": int(m.stage0_steps), "eval.every_steps": 0})
      elif not m.cut_from and (s - 1 in wanted or os.path.isdir(previous)):
        updates["method.cut_from"] = previous
      elif s == 2 and not m.cut_from and not m.cut.gen_weights:
        updates["method.cut_from"] = previous  # fails early, naming stage 1
      if s == 2:
        updates["data.crop_size"] = tuple(m.stage2_crop)
      plan.append((f"stage{s}", stages.derive(config, **updates),
                   os.path.join(workdir, f"stage{s}")))
    return plan

  # -- state ---------------------------------------------------------------------
  def load_cut_checkpoint(self):
    """G (and D, F in the joint stage) params from `cut_from`'s latest checkpoint.

    Read on the host when the method is built: the jitted initialisation then takes
    them as constants (a checkpoint cannot be read inside a trace).
    """
    abstract = jax.eval_shape(lambda k: style.init_cut(k, self.cut), jax.random.key(0))
    names = ("gen", "disc", "patch_mlp") if self.trains_generator else ("gen",)
    groups = dict(zip(("gen", "disc", "patch_mlp"), abstract))
    what = f"CONFETI stage {self.stage} (method.cut_from)"
    return stages.restore_params(
        self.cut_from, {n: {"params": groups[n].params} for n in names}, what)

  def init_cut_state(self, key):
    """(gen, disc, patch_mlp): trained jointly with fresh Adam states, or G frozen."""
    gen, disc, mlp = style.init_cut(key, self.cut)
    groups = dict(zip(("gen", "disc", "patch_mlp"), (gen, disc, mlp)))
    if self._restored is not None:
      groups = {n: state_lib.OptGroup.create(
          jax.tree.map(jnp.asarray, self._restored[n]["params"]), self.cut.tx)
          if n in self._restored else g for n, g in groups.items()}
    elif not (self.trains_generator or self.cut.gen_weights or self.allow_random_generator):
      raise ValueError(
          f"CONFETI stage {self.stage} runs a frozen generator but has none: set "
          "method.cut_from to the workdir of a joint-stage run, or method.cut.gen_weights "
          "to a converted latest_net_G.pth.")
    if not self.trains_generator:
      return state_lib.OptGroup.create(groups["gen"].params, self.frozen_tx), None, None
    return groups["gen"], groups["disc"], groups["patch_mlp"]

  def init_state(self, key):
    state = super().init_state(key)
    if self.proto_enabled:
      state = state.replace(
          protos=protos_lib.Prototypes.zeros(self.num_classes, self.proto_dim))
    if self.has_phi:  # phi: 1x1 conv D -> D with bias, torch default init, segmentor AdamW
      k1, k2 = jax.random.split(jax.random.fold_in(key, STREAM_CUT_INIT + 1))
      d = self.proto_dim
      phi = {"kernel": heads.torch_kernel_init(k1, (d, d)),
             "bias": heads.torch_bias_init(d)(k2, (d,))}
      state = state.replace(seg=state_lib.OptGroup.create(
          {**state.seg.params, PHI_KEY: phi}, self.tx))
    if self.cut is not None:
      gen, disc, mlp = self.init_cut_state(jax.random.fold_in(key, STREAM_CUT_INIT))
      state = state.replace(gen=gen, disc=disc, patch_mlp=mlp)
    return state

  def update_teacher(self, state):
    """DACS's EMA over the student without phi (the reference has no EMA copy of it)."""
    student = {k: v for k, v in state.seg.params.items() if k != PHI_KEY}
    return super().update_teacher(state.replace(seg=state.seg.replace(params=student)))

  # -- prototypes ----------------------------------------------------------------
  def teacher_features(self, teacher, images):
    """Teacher projection and ReLU'd CAM of `images` (no gradient) and its BN statistics."""
    if self.teacher_bn == "batch":
      _, feats, stats = self.forward_train(teacher["params"], teacher["batch_stats"], images)
    else:
      _, feats = self.model.apply(teacher, images, train=False)
      stats = teacher["batch_stats"]
    return jax.lax.stop_gradient(feats["proj"]), jax.lax.stop_gradient(feats["cam"]), stats

  def update_prototypes(self, protos, prep, step, key):
    """Step 7 of the reference: the prototype update from teacher features (§3.3).

    `proto.weighting`: 'cam' (reference: top-32 by CAM weight, uniform in the warm-up),
    'uniform' (top-32 with weight 1 throughout), 'mean' (every class pixel, weight 1:
    the paper's 'w/o CAM' of Table 5). Ties among equal weights fall to a random subset
    keyed by `key` (the reference's unstable argsort). Returns the new prototypes and
    the teacher after its extra pass (BN statistics).
    """
    teacher = prep["teacher"]
    if self.proto_source == "mixed":
      images, labels = prep["mixed"], prep["mixed_labels"]
      # Warm-up: only pixels pasted from the source image.
      eligible = jnp.where(self.gates(step)["all_pixels"], True, prep["mask"])
    else:  # Table 5 'source prototype': the stylised source image and its ground truth.
      images, labels = prep["s2t"], prep["src_labels"]
      eligible = jnp.ones(labels.shape, bool)
    proj, cam, stats = self.teacher_features(teacher, images)
    uniform = jnp.ones(labels.shape + (self.num_classes,), jnp.float32)
    if self.weighting == "mean":
      means, n_sel, w_sum = protos_lib.class_means_all_pixels(
          proj, labels, eligible, num_classes=self.num_classes)
    else:
      weights = uniform
      if self.weighting == "cam":
        cam_up = augment.resize_bilinear(cam, labels.shape[1:3], align_corners=True)
        weights = jnp.where(self.gates(step)["cam_weights"], cam_up, uniform)
      means, n_sel, w_sum = protos_lib.cam_weighted_class_means(
          proj, labels, weights, eligible, num_classes=self.num_classes, top_n=self.top_n,
          tie_key=key)
    new = protos_lib.update_prototypes(protos, means, n_sel, w_sum, momentum=self.momentum)
    return new, {"params": teacher["params"], "batch_stats": stats}

  # -- losses ----------------------------------------------------------------------
  def feature_terms(self, key, aux, labels, protos, gate):
    """PCL and regulariser of one domain's student projections, each times `gate`."""
    small = augment.resize_nearest(labels, aux["proj"].shape[1:3])
    pcl = losses.prototype_contrast(key, aux["proj"], small, protos,
                                    temperature=self.temperature, num_samples=self.num_samples)
    reg = losses.prototype_regularizer(aux["proj"], small, protos,
                                       temperature=self.temperature, variant=self.reg_variant)
    return gate * self.pcl_weight * pcl, gate * self.reg_weight * reg

  def semantic_consistency(self, params, stats, raw_source, fake_src, protos):
    """Weighted L_SC through the frozen student: gradients reach only G (via `fake_src`,
    in [-1, 1]) and phi. Two train-mode forwards (x, then G(x)) update BN statistics."""
    frozen = {k: v if k == PHI_KEY else jax.lax.stop_gradient(v) for k, v in params.items()}
    logits_x, aux_x, stats = self.forward_train(frozen, stats, raw_source)
    logits_g, aux_g, stats = self.forward_train(frozen, stats, style.cut_to_seg(fake_src))
    if self.sc_loss == "ce":
      loss = losses.semantic_consistency("ce", logits_g, logits_x)
    else:
      loss = losses.semantic_consistency(self.sc_loss, aux_g["proj"], aux_x["proj"], protos,
                                         params[PHI_KEY])
    return self.sc_weight * loss, stats

  @property
  def stylizes(self):
    return self.pixel_alignment

  def stylised_source(self, state, batch):
    """(s2t or None, the joint generator's forward or None) for this step."""
    if not self.pixel_alignment:
      return None, None
    if self.style == "fda":
      out = style.fda_source_to_target(batch["source"]["image"], batch["target"]["image"],
                                       self.fda_beta)
      return augment.normalize(out), None
    if self.style == "gpa":
      out = gpa.gpa_source_to_target(batch["source"]["image"], batch["target"]["image"])
      return augment.normalize(out), None
    xs = style.pixels_to_cut(batch["source"]["image"])
    if not self.trains_generator:
      return style.cut_to_seg(style.generate(self.cut, state.gen.params, xs)), None
    xt = style.pixels_to_cut(batch["target"]["image"])
    forward = style.generator_forward(self.cut, state.gen.params, xs, xt)
    return style.cut_to_seg(forward.fake[:xs.shape[0]]), forward

  # -- step ------------------------------------------------------------------------
  def train_step(self, state, batch, key):
    if not (self.proto_enabled or self.pixel_alignment):
      return super().train_step(state, batch, key)
    s2t, forward = self.stylised_source(state, batch)
    prep = self.prepare(state, batch, key, s2t=s2t)
    step = state.step
    p, protos = None, state.protos
    if self.proto_enabled:
      protos, prep["teacher"] = self.update_prototypes(
          state.protos, prep, step, jax.random.fold_in(key, STREAM_PROTO_TIES))
      p = protos.protos
    gates = self.gates(step)
    f32 = lambda c: jnp.asarray(c, jnp.float32)
    gate_src = f32(self.pcl) * f32(gates["pcl_source"])
    gate_mix = f32(self.pcl) * f32(gates["pcl_mixed"])
    gate_cam_mix = f32(gates["cam_mix"])
    fake_src = forward.fake[:prep["s2t"].shape[0]] if forward is not None else None

    def loss_fn(params, fake_src):
      parts = {}
      src_loss, (_, aux, stats) = self.segmentation_loss(
          params, state.batch_stats, prep["s2t"], prep["src_labels"],
          dropout_key=base.dropout_key(key, 0))
      parts["loss_src_seg"] = src_loss
      if self.proto_enabled:
        parts["loss_src_cam"] = self.cam_weight * losses.cam_bce(
            aux["cam_scores"], prep["src_labels"], self.num_classes)
        parts["loss_src_pcl"], parts["loss_src_reg"] = self.feature_terms(
            jax.random.fold_in(key, STREAM_PCL_SOURCE), aux, prep["src_labels"], p, gate_src)
      if self.sc_active:
        parts["loss_sc"], stats = self.semantic_consistency(
            params, stats, prep["raw_source"], fake_src, p)
      parts["loss_fd"] = self.fd_loss(aux, prep)

      mix_loss, (mix_logits, aux, stats) = self.segmentation_loss(
          params, stats, prep["mixed"], prep["mixed_labels"], weight=prep["mixed_weight"],
          dropout_key=base.dropout_key(key, 1))
      parts["loss_mix_seg"] = mix_loss
      if self.proto_enabled:
        parts["loss_mix_cam"] = gate_cam_mix * self.cam_weight * losses.cam_bce(
            aux["cam_scores"], prep["mixed_labels"], self.num_classes)
        parts["loss_mix_pcl"], parts["loss_mix_reg"] = self.feature_terms(
            jax.random.fold_in(key, STREAM_PCL_MIXED), aux, prep["mixed_labels"], p, gate_mix)
      if self.mic:
        parts["loss_mic"], stats = self.mic_loss(params, stats, prep, key)

      if self.trains_target_pcl:
        def target_terms(stats):
          _, aux, new_stats = self.forward_train(params, stats, prep["target"],
                                                 base.dropout_key(key, 2))
          pcl, reg = self.feature_terms(jax.random.fold_in(key, STREAM_PCL_TARGET), aux,
                                        prep["pseudo"], p, prep["q"])
          return pcl, reg, new_stats

        def skipped(stats):  # no forward: BN statistics untouched, as the reference
          return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), stats

        parts["loss_tgt_pcl"], parts["loss_tgt_reg"], stats = jax.lax.cond(
            gates["pcl_target"], target_terms, skipped, stats)
      return sum(parts.values()), (stats, parts, mix_logits)

    argnums = (0, 1) if self.sc_active else 0
    (loss, (stats, parts, mix_logits)), grads = jax.value_and_grad(
        loss_fn, argnums=argnums, has_aux=True)(state.seg.params, fake_src)
    grads, fake_grad = grads if self.sc_active else (grads, None)
    seg = state.seg.apply_gradients(grads)
    metrics = self.step_metrics(batch, prep, loss, parts, grads, step, mix_logits)
    new_state = state.replace(step=step + 1, seg=seg, batch_stats=stats,
                              teacher=prep["teacher"], protos=protos)
    if self.proto_enabled:
      metrics["protos_initialised"] = jnp.sum(protos.counts > 0).astype(jnp.float32)
    if self.trains_generator:
      gen, disc, mlp, cut_metrics = style.cut_step(
          self.cut, state.gen, state.disc, state.patch_mlp, forward,
          style.pixels_to_cut(batch["target"]["image"]), jax.random.fold_in(key, STREAM_PATCHES),
          fake_src_grad=fake_grad)
      metrics.update({f"cut_{k}": v for k, v in cut_metrics.items()})
      new_state = new_state.replace(gen=gen, disc=disc, patch_mlp=mlp)
    return new_state, metrics
