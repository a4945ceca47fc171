"""CFContra: MinEnt + AdaIN-stylised source + class-centre memory-bank contrast.

Two stages, chosen by `method.stage`:

* 'style' (`AdaINTraining`, configs/adain_gta2cs.py): trains the AdaIN decoder with
  the frozen, imported VGG-19 encoder (content = source crops, style = target crops);
  `scripts/stylize_adain.py` then writes the stylised source set offline, as the
  official pre-generation script does (4 random style images interpolated, alpha 1).
  Training on that set is `--config.data.source.root=<stylised folder>`.
* 'segment' (`CFContra`, the default): ADVENT MinEnt (methods/minent.py) plus the
  class-centre contrast of the official code (shiyutang/Coarse-to-fine-UDA at HEAD,
  docs/peers.md §5):
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
    - the update is in place, and each call's backward multiplies its output gradient
      by the bank as it is *then*: torch runs the calls last-created first (src2tgt,
      tgt2src, tgt, src), so the tgt and src terms' feature gradients see a bank that
      src2tgt / tgt2src already moved. `bank_gradients='in_place'` (default) does the
      same; 'start' is the paper's reading (all four against the start-of-step banks).
    - the pseudo-label accuracy against target labels is logged (never trained on).

Warm-up: the code builds its centres before training, from 301 source and 1601 target
batches of 1 image. Here the same numbers of *images* (`warmup_*_images`, rounded up
to whole batches) are read during the first steps, while MinEnt trains; the contrast
starts when both banks exist. The source centres average the pixels labelled *and*
predicted c (`source_centres='correct'`, the code); 'labelled' is the paper's Eq. 9
(every pixel labelled c).

Size of the in-place effect, measured against a torch statement of the code (one
batch of 48 pixels, D = 32; tests/test_cfcontra.py): the contrast's feature gradients
under 'in_place' and 'start' differ by 1.6e-2 to 3.7e-2 relative (L2 norm of the
difference over the norm) for class-structured features near their centres, and by
about 7e-2 for random features and banks. On the toy model's projected layer4
features two steps after the warm-up (3 batches, 32x32 crops) they differ by 5e-2 to
8e-2 (source) and 3e-2 to 7e-2 (target). Not the "order 1e-4" once stated here.
"""

import math

import jax
import jax.numpy as jnp
import optax

from confeti_jax import augment, losses, models, panels, weights
from confeti_jax import prototypes as protos
from confeti_jax import state as state_lib
from confeti_jax.methods import base, minent
from confeti_jax.models import adain, heads

HEAD_KEY = "proj_head"  # top-level name of the projection head in params / batch_stats
# The four terms: the bank each is taken against and the domain of its features.
_TERM_BANK = {"src": "source", "tgt": "target", "tgt2src": "source", "src2tgt": "target"}
_TERM_FEATURES = {"src": "source", "tgt": "target", "tgt2src": "target", "src2tgt": "source"}
# torch's autograd runs the four HybridMemory backward calls last-created first.
_BACKWARD_ORDER = ("src2tgt", "tgt2src", "tgt", "src")


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
    if c.bank_gradients not in ("in_place", "start"):
      raise ValueError(f"method.contrast.bank_gradients={c.bank_gradients!r}; use "
                       "'in_place' (the official code) or 'start' (start-of-step banks).")
    if c.source_centres not in ("correct", "labelled"):
      raise ValueError(f"method.contrast.source_centres={c.source_centres!r}; use 'correct' "
                       "(the official code) or 'labelled' (the paper's Eq. 9).")
    self.terms, self.bank_update = c.terms, c.bank_update
    self.bank_gradients, self.source_centres = c.bank_gradients, c.source_centres
    self.weights = {"src": float(c.weight_src), "tgt": float(c.weight_tgt),
                    "tgt2src": float(c.weight_tgt2src), "src2tgt": float(c.weight_src2tgt)}
    batch = int(config.train.batch_size)
    self.warmup_source = math.ceil(int(c.warmup_source_images) / batch)
    self.warmup_total = self.warmup_source + math.ceil(int(c.warmup_target_images) / batch)
    self.head = heads.ProjectionHead(kind=heads.check_head(c.head), features=int(c.proj_dim),
                                     dtype=models.parse_dtype(config.model.dtype))
    self.feature_dim = models.layer4_channels(config.model)
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

  def backward_pass(self, source, target, c_s, c_t):
    """The banks' in-place life during the code's backward.

    Runs the terms in torch's backward order; each records the bank it sees, then
    moves that bank towards its features' batch centres (cross-domain moves only with
    `bank_update='cross'`). Returns ({term: bank its gradient sees}, final source,
    final target).
    """
    current, seen = {"source": source, "target": target}, {}
    for name in _BACKWARD_ORDER:
      if name not in self.term_names:
        continue
      bank, domain = _TERM_BANK[name], _TERM_FEATURES[name]
      seen[name] = current[bank]
      if self.bank_update == "cross" or domain == bank:
        centres = c_s if domain == "source" else c_t
        current[bank] = protos.momentum_update(current[bank], centres, self.momentum)
    return seen, current["source"], current["target"]

  @property
  def term_names(self):
    return ("src", "tgt", "tgt2src", "src2tgt") if self.terms == "all" else ("src", "tgt")

  def contrast_terms(self, f_s, labels_s, f_t, labels_t, banks):
    """The InfoNCE terms: forward values against the start-of-step banks, the feature
    gradients against the banks `bank_gradients` names."""
    k, d = self.num_classes, f_s.shape[-1]
    stop = jax.lax.stop_gradient
    seen = {}
    if self.bank_gradients == "in_place":
      seen, _, _ = self.backward_pass(banks.source, banks.target,
                                      protos.batch_centres(stop(f_s), labels_s, k),
                                      protos.batch_centres(stop(f_t), labels_t, k))
    flat = {"source": (f_s.reshape(-1, d), labels_s.reshape(-1)),
            "target": (f_t.reshape(-1, d), labels_t.reshape(-1))}
    start = {"source": banks.source, "target": banks.target}
    terms = {}
    for name in self.term_names:
      feats, labels = flat[_TERM_FEATURES[name]]
      terms[name] = losses.memory_bank_nce(feats, labels, start[_TERM_BANK[name]],
                                           temperature=self.temperature,
                                           backward_bank=seen.get(name))
    return terms

  def update_banks(self, banks, step, f_s, labels_s, pred_s, f_t, labels_t):
    """Warm-up accumulation / initialisation, then the momentum updates of the code."""
    k = self.num_classes
    ws, wt = self.warmup_source, self.warmup_total
    keep = lambda cond, new, old: jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)
    warm_labels = (protos.correctly_predicted(labels_s, pred_s)
                   if self.source_centres == "correct" else labels_s)
    s_sum, s_count = keep(step < ws, protos.accumulate(
        banks.source_sum, banks.source_count, f_s, warm_labels, k),
        (banks.source_sum, banks.source_count))
    source = jnp.where(step == ws - 1, protos.finalize(s_sum, s_count), banks.source)
    t_sum, t_count = keep((step >= ws) & (step < wt), protos.accumulate(
        banks.target_sum, banks.target_count, f_t, labels_t, k),
        (banks.target_sum, banks.target_count))
    target = jnp.where(step == wt - 1, protos.finalize(t_sum, t_count), banks.target)

    c_s, c_t = protos.batch_centres(f_s, labels_s, k), protos.batch_centres(f_t, labels_t, k)
    _, new_source, new_target = self.backward_pass(source, target, c_s, c_t)
    active = step >= wt
    return banks.replace(
        source=jnp.where(active, new_source, source), target=jnp.where(active, new_target, target),
        source_sum=s_sum, source_count=s_count, target_sum=t_sum, target_count=t_count)

  # -- step ----------------------------------------------------------------------
  def train_step(self, state, batch, key):
    if not self.contrast:
      return super().train_step(state, batch, key)
    src_images = augment.normalize(batch["source"]["image"])
    src_labels = batch["source"]["label"].astype(jnp.int32)
    tgt_images = augment.normalize(batch["target"]["image"])
    banks, step = state.banks, state.step

    def loss_fn(params):
      seg_params, head_params = _split(params)
      seg_bs, head_bs = _split(state.batch_stats)
      src_loss, metrics_s, logits_s, feats_s, seg_bs = self.source_losses(
          seg_params, seg_bs, src_images, src_labels, base.dropout_key(key, 0))
      tgt_loss, metrics_t, logits_t, feats_t, seg_bs = self.target_losses(
          seg_params, seg_bs, tgt_images, base.dropout_key(key, 1))
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
      aux = dict(f_s=f_s, f_t=f_t, labels_s=labels_s, labels_t=labels_t, logits_s=logits_s,
                 logits_t=logits_t,
                 pred_s=jnp.argmax(_on_grid(logits_s, grid), axis=-1).astype(jnp.int32),
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
    metrics = panels.attach(metrics, self.panel_images, lambda: self.panel(
        batch, src_images, aux["logits_s"], tgt_images, aux["logits_t"],
        extra={"pseudo-label (nearest source centre)": panels.label(
            augment.resize_nearest(aux["labels_t"], tgt_images.shape[1:3]))}))
    return state.replace(step=step + 1, seg=seg, batch_stats=aux["batch_stats"],
                         banks=new_banks), metrics


class AdaINTraining:
  """Stage 'style': the AdaIN decoder trained on source content and target style crops.

  pytorch-AdaIN's recipe (docs/peers.md §2.1): the normalised VGG-19 encoder to relu4_1,
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


def _on_grid(logits, grid):
  """Logits at the feature grid: DeepLabV2's already are (stride 8); DAFormer's (stride
  4) are resized bilinearly to the MiT layer4 grid (stride 32), an approximation the
  reference (DeepLab only) never needed."""
  if logits.shape[1:3] == tuple(grid):
    return logits
  return augment.resize_bilinear(logits.astype(jnp.float32), grid)
