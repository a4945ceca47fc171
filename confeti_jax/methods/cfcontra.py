"""CFContra: MinEnt + AdaIN-stylised source + class-centre memory-bank contrast.

Two stages, chosen by `method.stage`:

* 'style' (`AdaINTraining`, configs/adain_gta2cs.py): trains the AdaIN decoder with
  the frozen, imported VGG-19 encoder (content = source crops, style = target crops);
  `scripts/stylize_adain.py` then writes the stylised source set offline, as the
  official pre-generation script does (4 random style images interpolated, alpha 1).
  Training on that set is `--config.data.source.root=<stylised folder>`.
* 'segment' (`CFContra`, the default): ADVENT MinEnt (methods/minent.py) plus the
  class-centre contrast of the official code (shiyutang/Coarse-to-fine-UDA at HEAD,
  peers.md §5):
    - features: layer4 through a projection head (`method.contrast.head`, paper
      Table 1; 'moco' in the code, which never trains it: `train_head=False`);
    - source and target banks of K unit centres in `state.banks`, initialised by a
      warm-up pass inside the first steps (prototypes.py);
    - target pseudo-labels: nearest source centre, ignored within margin t = 0.05;
    - four InfoNCE terms (src->src bank, tgt->tgt, tgt->src, src->tgt), tau 0.07,
      weight 1e-3 each; `terms='intra'` keeps the first two (paper Table 4);
    - after each step every bank moves by momentum 0.9 towards batch centres. In the
      code the update runs in the backward of each bank *call*, so with four terms the
      source bank also moves towards the target batch centres and vice versa
      (`bank_update='cross'`, applied in the order torch's autograd runs them);
      `bank_update='domain'` is the paper's Eq. 16-17 (each bank from its own domain).
    - the pseudo-label accuracy against target labels is logged (never trained on).

Warm-up: the code builds its centres before training, from 301 source and 1601 target
batches of 1 image. Here the same numbers of *images* (`warmup_*_images`, rounded up
to whole batches) are read during the first steps, while MinEnt trains; the contrast
starts when both banks exist. The gradients of the four terms use the banks as they
were at the start of the step (torch's in-place bank updates during the backward leak
a partly updated bank into two of the four gradients, an effect of order 1e-4).
"""

import math

import jax
import jax.numpy as jnp
import optax

from confeti_jax import augment, losses, models, weights
from confeti_jax import prototypes as protos
from confeti_jax import state as state_lib
from confeti_jax.methods import base, minent
from confeti_jax.models import adain, heads

HEAD_KEY = "proj_head"  # top-level name of the projection head in params / batch_stats


def _split(tree):
  """(segmentor part, projection-head part) of a params or batch_stats dict."""
  tree = dict(tree)
  return tree, tree.pop(HEAD_KEY, {})


def _join(seg, head):
  return {**seg, HEAD_KEY: head} if head else dict(seg)


class CFContra(minent.MinEnt):
  """Stage 'segment': MinEnt + memory-bank contrast (`method.stage='style'` builds
  `AdaINTraining` instead, so one registry name covers both stages)."""

  name = "cfcontra"

  def __new__(cls, config):
    if config.method.stage == "style":
      return AdaINTraining(config)
    if config.method.stage != "segment":
      raise ValueError(f"method.stage={config.method.stage!r}; use 'segment' (train the "
                       "segmentor) or 'style' (train the AdaIN decoder).")
    return super().__new__(cls)

  def __init__(self, config):
    super().__init__(config)
    c = config.method.contrast
    self.contrast = bool(c.enabled)
    self.temperature, self.momentum = float(c.temperature), float(c.momentum)
    self.threshold = float(c.threshold)
    if c.terms not in ("all", "intra"):
      raise ValueError(f"method.contrast.terms={c.terms!r}; use 'all' (four terms) or "
                       "'intra' (src->src and tgt->tgt only).")
    if c.bank_update not in ("cross", "domain"):
      raise ValueError(f"method.contrast.bank_update={c.bank_update!r}; use 'cross' (the "
                       "official code) or 'domain' (the paper's Eq. 16-17).")
    self.terms, self.bank_update = c.terms, c.bank_update
    self.weights = {"src": float(c.weight_src), "tgt": float(c.weight_tgt),
                    "tgt2src": float(c.weight_tgt2src), "src2tgt": float(c.weight_src2tgt)}
    batch = int(config.train.batch_size)
    self.warmup_source = math.ceil(int(c.warmup_source_images) / batch)
    self.warmup_total = self.warmup_source + math.ceil(int(c.warmup_target_images) / batch)
    self.head = heads.ProjectionHead(kind=heads.check_head(c.head), features=int(c.proj_dim),
                                     dtype=models.parse_dtype(config.model.dtype))
    depth = models.deeplabv2.backbone_depth(config.model.backbone)
    self.feature_dim = models.stage_channels(depth, float(config.model.width))[3]
    self.bank_dim = int(c.proj_dim) or self.feature_dim
    if self.contrast and not c.train_head:
      self.tx = state_lib.segmentor_optimizer(config.optim, self.total_steps,
                                              frozen=(HEAD_KEY,))

  # -- state ---------------------------------------------------------------------
  def init_state(self, key):
    state = super().init_state(key)
    if not self.contrast:
      return state
    x = jnp.zeros((1, 1, 1, self.feature_dim), jnp.float32)
    head_vars = self.head.init(jax.random.fold_in(key, 1), x, train=False)
    params = _join(state.seg.params, head_vars.get("params", {}))
    return state.replace(
        seg=state_lib.OptGroup.create(params, self.tx),
        batch_stats=_join(state.batch_stats, head_vars.get("batch_stats", {})),
        banks=protos.Banks.zeros(self.num_classes, self.bank_dim))

  def apply_eval(self, variables, images):
    """The segmentor alone: the projection head plays no part in inference."""
    return super().apply_eval({k: _split(v)[0] for k, v in variables.items()}, images)

  # -- contrast ------------------------------------------------------------------
  def project(self, params, batch_stats, features):
    """Projection-head features (float32) and its BatchNorm statistics."""
    if not batch_stats:
      return self.head.apply({"params": params}, features, train=True).astype(jnp.float32), {}
    out, updates = self.head.apply({"params": params, "batch_stats": batch_stats}, features,
                                   train=True, mutable=["batch_stats"])
    return out.astype(jnp.float32), updates["batch_stats"]

  def contrast_terms(self, f_s, labels_s, f_t, labels_t, banks):
    """The InfoNCE terms against the banks as they were at the start of the step."""
    d = f_s.shape[-1]
    f_s, f_t = f_s.reshape(-1, d), f_t.reshape(-1, d)
    labels_s, labels_t = labels_s.reshape(-1), labels_t.reshape(-1)
    nce = lambda f, y, bank: losses.memory_bank_nce(f, y, bank, temperature=self.temperature)
    terms = {"src": nce(f_s, labels_s, banks.source), "tgt": nce(f_t, labels_t, banks.target)}
    if self.terms == "all":
      terms["tgt2src"] = nce(f_t, labels_t, banks.source)
      terms["src2tgt"] = nce(f_s, labels_s, banks.target)
    return terms

  def update_banks(self, banks, step, f_s, labels_s, pred_s, f_t, labels_t):
    """Warm-up accumulation / initialisation, then the momentum updates of the code."""
    k, upd = self.num_classes, lambda bank, c: protos.momentum_update(bank, c, self.momentum)
    ws, wt = self.warmup_source, self.warmup_total
    keep = lambda cond, new, old: jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)
    s_sum, s_count = keep(step < ws, protos.accumulate(
        banks.source_sum, banks.source_count, f_s,
        protos.correctly_predicted(labels_s, pred_s), k), (banks.source_sum, banks.source_count))
    source = jnp.where(step == ws - 1, protos.finalize(s_sum, s_count), banks.source)
    t_sum, t_count = keep((step >= ws) & (step < wt), protos.accumulate(
        banks.target_sum, banks.target_count, f_t, labels_t, k),
        (banks.target_sum, banks.target_count))
    target = jnp.where(step == wt - 1, protos.finalize(t_sum, t_count), banks.target)

    c_s, c_t = protos.batch_centres(f_s, labels_s, k), protos.batch_centres(f_t, labels_t, k)
    if self.terms == "all" and self.bank_update == "cross":
      # torch runs the four backward calls last-created first: src2tgt, tgt2src, tgt, src.
      new_source, new_target = upd(upd(source, c_t), c_s), upd(upd(target, c_s), c_t)
    else:
      new_source, new_target = upd(source, c_s), upd(target, c_t)
    active = step >= wt
    return banks.replace(
        source=jnp.where(active, new_source, source), target=jnp.where(active, new_target, target),
        source_sum=s_sum, source_count=s_count, target_sum=t_sum, target_count=t_count)

  # -- step ----------------------------------------------------------------------
  def train_step(self, state, batch, key):
    if not self.contrast:
      return super().train_step(state, batch, key)
    del key  # nothing random
    src_images = augment.normalize(batch["source"]["image"])
    src_labels = batch["source"]["label"].astype(jnp.int32)
    tgt_images = augment.normalize(batch["target"]["image"])
    banks, step = state.banks, state.step

    def loss_fn(params):
      seg_params, head_params = _split(params)
      seg_bs, head_bs = _split(state.batch_stats)
      src_loss, metrics_s, logits_s, feats_s, seg_bs = self.source_losses(
          seg_params, seg_bs, src_images, src_labels)
      tgt_loss, metrics_t, _, feats_t, seg_bs = self.target_losses(seg_params, seg_bs,
                                                                   tgt_images)
      f_s, head_bs = self.project(head_params, head_bs, feats_s["layer4"])
      f_t, head_bs = self.project(head_params, head_bs, feats_t["layer4"])
      grid = f_s.shape[1:3]
      labels_s = augment.resize_nearest(src_labels, grid)
      labels_t = protos.nearest_centre_labels(jax.lax.stop_gradient(f_t), banks.source,
                                              self.threshold)
      terms = self.contrast_terms(f_s, labels_s, f_t, labels_t, banks)
      gate = (step >= self.warmup_total).astype(jnp.float32)
      contrast = gate * sum(self.weights[n] * v for n, v in terms.items())
      metrics = {**metrics_s, **metrics_t, **{f"loss_contra_{n}": v for n, v in terms.items()},
                 "loss_contra": contrast, "contrast_active": gate}
      aux = dict(f_s=f_s, f_t=f_t, labels_s=labels_s, labels_t=labels_t,
                 pred_s=jnp.argmax(logits_s, axis=-1).astype(jnp.int32),
                 batch_stats=_join(seg_bs, head_bs), metrics=metrics)
      return src_loss + tgt_loss + contrast, jax.lax.stop_gradient(aux)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.seg.params)
    seg = state.seg.apply_gradients(grads)
    new_banks = self.update_banks(banks, step, aux["f_s"], aux["labels_s"], aux["pred_s"],
                                  aux["f_t"], aux["labels_t"])
    truth = augment.resize_nearest(batch["target"]["label"].astype(jnp.int32),
                                   aux["labels_t"].shape[1:3])
    acc, coverage, acc_code = protos.pseudo_label_stats(aux["labels_t"], truth)
    metrics = {"loss": loss, **aux["metrics"], "pseudo_acc": acc, "pseudo_coverage": coverage,
               "pseudo_acc_code": acc_code, "grad_norm": base.global_norm(grads),
               **self.learning_rates(step)}
    return state.replace(step=step + 1, seg=seg, batch_stats=aux["batch_stats"],
                         banks=new_banks), metrics


class AdaINTraining:
  """Stage 'style': the AdaIN decoder trained on source content and target style crops.

  pytorch-AdaIN's recipe (peers.md §2.1): the normalised VGG-19 encoder to relu4_1,
  frozen, its weights imported (`method.style.vgg_weights`, an .npz of
  vgg_normalised.pth); content weight 1, style weight 10; Adam 1e-4 with
  lr_t = lr / (1 + 5e-5 t). The encoder sits in `state.imnet`, the decoder in
  `state.gen`; there is no segmentor, so nothing is evaluated (eval.every_steps=0).
  With `style.random_encoder=True` (the toy, which has no ImageNet weights) a random
  encoder is drawn instead (He-normal, no biases: `adain.random_encoder_params`):
  random-feature AdaIN, a stand-in and not the reference.
  """

  name = "cfcontra_style"

  def __init__(self, config):
    s = config.method.style
    self.num_classes = int(config.num_classes)
    self.model_name = "cfcontra/adain_decoder"
    self.encoder = adain.VGGEncoder(width=float(s.vgg_width),
                                    padding=str(s.get("vgg_padding", "reflect")))
    self.decoder = adain.Decoder(width=float(s.vgg_width))
    self.content_weight, self.style_weight = float(s.content_weight), float(s.style_weight)
    self.alpha = float(s.alpha)
    lr, decay = float(s.lr), float(s.lr_decay)
    self.schedule = lambda count: lr / (1.0 + decay * jnp.asarray(count, jnp.float32))
    self.tx = optax.adam(self.schedule)
    self.vgg_weights, self.random_encoder = str(s.vgg_weights), bool(s.random_encoder)
    if self.vgg_weights and float(s.vgg_width) != 1.0:
      raise ValueError("method.style.vgg_weights hold the full VGG-19; set "
                       "method.style.vgg_width=1.0 to import them.")

  def encoder_params(self, key, x):
    """The imported VGG weights (read when the state is built), or a random draw (toy)."""
    if self.vgg_weights:
      return adain.convert_vgg(weights.load_state_dict(self.vgg_weights), self.encoder.padding)
    if not self.random_encoder:
      raise ValueError(
          "The AdaIN stage needs the VGG-19 encoder weights: convert vgg_normalised.pth with "
          "`python scripts/convert_weights.py vgg_normalised.pth vgg.npz` and pass "
          "--config.method.style.vgg_weights=vgg.npz (random_encoder=True: toy runs only).")
    return adain.random_encoder_params(self.encoder, key, x)

  def init_state(self, key):
    x = jnp.zeros((1, 16, 16, 3), jnp.float32)
    encoder = self.encoder_params(jax.random.fold_in(key, 0), x)
    feat = self.encoder.apply({"params": encoder}, x)["relu4_1"]
    decoder = self.decoder.init(jax.random.fold_in(key, 1), feat)["params"]
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), seg=None, batch_stats=None,
                                imnet=encoder, gen=state_lib.OptGroup.create(decoder, self.tx))

  def train_step(self, state, batch, key):
    del key
    content = batch["source"]["image"].astype(jnp.float32) / 255.0
    style = batch["target"]["image"].astype(jnp.float32) / 255.0

    def loss_fn(params):
      lc, ls = adain.training_losses(self.encoder, self.decoder, state.imnet, params,
                                     content, style, self.alpha)
      return self.content_weight * lc + self.style_weight * ls, (lc, ls)

    (loss, (lc, ls)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.gen.params)
    metrics = {"loss": loss, "loss_content": lc, "loss_style": ls,
               "grad_norm": base.global_norm(grads), "lr_decoder": self.schedule(state.step)}
    return state.replace(step=state.step + 1, gen=state.gen.apply_gradients(grads)), metrics

  def _no_segmentor(self, *args):
    raise ValueError("method.stage='style' trains the AdaIN decoder and has no segmentor to "
                     "evaluate; set --config.eval.every_steps=0.")

  inference_variables = inference_subtree = variables_from_subtree = _no_segmentor
  apply_eval = _no_segmentor
