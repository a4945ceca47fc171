"""Style modules that make source images look like the target: CUT (learned) and FDA (fixed).

CUT as CONFETI runs it (docs/reference_code.md §4): G translates source crops into the target
style, trained by LSGAN against a PatchGAN D plus PatchNCE between the input's and the
output's generator features (and the identity NCE on target crops). Everything here is
pure, so a method's jitted step calls `cut_update` once per iteration:

  1. G runs once on cat(x_s, x_t) (the reference's `forward`): fake_B, idt_B and the NCE
     key features of the real images;
  2. D step on L_D = 0.5 (MSE(D(fake_B.detach()), 0) + MSE(D(x_t), 1));
  3. G + F step on L_G = MSE(D'(fake_B), 1) + 0.5 (NCE(x_s, fake_B) + NCE(x_t, idt_B)),
     with D' the D just updated (the reference frees D only after its step), plus an
     optional extra loss of fake_B whose gradient also reaches G (CONFETI's L_SC).

`cut_update` is the whole iteration; CONFETI splits it into `generator_forward` (whose
fake_B the segmentor also uses) and `cut_step` (which takes L_SC's gradient w.r.t. fake_B).
Images in CUT's range [-1, 1]: `seg_to_cut` / `cut_to_seg` convert from / to the
segmentor's ImageNet normalisation exactly as dacs.py L359-370 and L405 do.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from confeti_jax import augment, losses, models
from confeti_jax import state as state_lib
from confeti_jax.models import cut


# -- ranges ------------------------------------------------------------------------------
def seg_to_cut(images):
  """Segmentor-normalised images -> G's input: ((img std + mean) / 255 - 0.5) / 0.5."""
  return (augment.denormalize(images) / 255.0 - 0.5) / 0.5


def cut_to_seg(images):
  """G's output in [-1, 1] -> the segmentor's normalisation: ((x 0.5 + 0.5) 255 - mean) / std."""
  return augment.normalize((images.astype(jnp.float32) * 0.5 + 0.5) * 255.0)


def pixels_to_cut(images):
  """uint8 / [0, 255] RGB -> [-1, 1] (the same numbers as seg_to_cut(normalize(x)))."""
  return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5


# -- the model ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CUTModel:
  """The static half of CUT: modules, loss settings, optimiser, weights to import."""

  generator: cut.ResnetGenerator
  discriminator: cut.NLayerDiscriminator
  patch_mlp: cut.PatchSampleMLP
  nce_layers: tuple = (0, 4, 8, 12, 16)
  num_patches: int = 256
  nce_t: float = 0.07
  lambda_gan: float = 1.0
  lambda_nce: float = 1.0
  nce_idt: bool = True
  tx: Any = None
  gen_weights: str = ""
  disc_weights: str = ""
  mlp_weights: str = ""


def build_cut(cut_cfg, dtype="float32", remat=False):
  """CUTModel from a `method.cut` sub-config (configs/common.py `cut_config`).

  `cut_cfg.dtype` / `cut_cfg.remat`, when set, win over the arguments (the segmentor's
  model.dtype / model.remat), so a method can run G in another precision.
  """
  dtype = models.parse_dtype(str(cut_cfg.get("dtype", "") or dtype))
  remat = bool(cut_cfg.get("remat", False) or remat)
  generator = cut.ResnetGenerator(ngf=int(cut_cfg.ngf), n_blocks=int(cut_cfg.n_blocks),
                                  dtype=dtype, remat=remat)
  num_layers = len(cut.generator_layers(int(cut_cfg.ngf), int(cut_cfg.n_blocks)))
  return CUTModel(
      generator=generator,
      discriminator=cut.NLayerDiscriminator(ndf=int(cut_cfg.ndf),
                                            n_layers=int(cut_cfg.n_layers_d), dtype=dtype),
      patch_mlp=cut.PatchSampleMLP(features=int(cut_cfg.netf_nc), dtype=dtype),
      nce_layers=cut.check_nce_layers(cut_cfg.nce_layers, num_layers),
      num_patches=int(cut_cfg.num_patches), nce_t=float(cut_cfg.nce_t),
      lambda_gan=float(cut_cfg.lambda_gan), lambda_nce=float(cut_cfg.lambda_nce),
      nce_idt=bool(cut_cfg.nce_idt),
      # torch Adam without weight decay; the reference's linear LambdaLR is never stepped.
      tx=optax.adam(float(cut_cfg.lr), b1=float(cut_cfg.b1), b2=float(cut_cfg.b2)),
      gen_weights=str(cut_cfg.gen_weights), disc_weights=str(cut_cfg.disc_weights),
      mlp_weights=str(cut_cfg.mlp_weights))


def _import(params, path, fmt):
  """params replaced by the converted weights file (shapes checked), or as they are."""
  if not path:
    return params
  from confeti_jax import weights

  converted = weights.convert(weights.load_state_dict(path), fmt)
  return weights.merge({"params": params}, converted, source=repr(path))["params"]


def init_cut(key, model, image_size=(32, 32)):
  """(gen, disc, patch_mlp) OptGroups: xavier init or the imported weights, fresh Adam.

  Parameter shapes do not depend on the image size; the MLPs are sized from the taps
  (the reference creates them lazily on the first batch).
  """
  x = jnp.zeros((1, *image_size, 3), jnp.float32)

  def shapes():
    gen = model.generator.init(key, x, nce_layers=model.nce_layers)["params"]
    _, taps = model.generator.apply({"params": gen}, x, nce_layers=model.nce_layers,
                                    encode_only=True)
    ids = tuple(jnp.arange(min(model.num_patches, t.shape[1] * t.shape[2])) for t in taps)
    return (gen, model.discriminator.init(key, x)["params"],
            model.patch_mlp.init(key, taps, ids)["params"])

  gen, disc, mlp = cut.xavier_params(key, jax.eval_shape(shapes))
  gen = _import(gen, model.gen_weights, "cut_generator")
  disc = _import(disc, model.disc_weights, "cut_discriminator")
  mlp = _import(mlp, model.mlp_weights, "cut_patch_mlp")
  create = lambda p: state_lib.OptGroup.create(jax.tree.map(jnp.asarray, p), model.tx)
  return create(gen), create(disc), create(mlp)


def generate(model, gen_params, images):
  """G(images), both in [-1, 1] (stage 2 runs a frozen G like this)."""
  return model.generator.apply({"params": gen_params}, images)[0]


# -- losses ------------------------------------------------------------------------------
def d_loss(model, disc_params, fake_src, real_tgt):
  """L_D = 0.5 (MSE(D(fake.detach()), 0) + MSE(D(real), 1)) and its two halves."""
  apply = lambda x: model.discriminator.apply({"params": disc_params}, x)
  fake = losses.lsgan_loss(apply(jax.lax.stop_gradient(fake_src)), False)
  real = losses.lsgan_loss(apply(real_tgt), True)
  loss = 0.5 * (fake + real)
  return loss, {"loss_D": loss, "loss_D_fake": fake, "loss_D_real": real}


def _nce(model, gen_params, mlp_params, fake_taps, real_taps, key):
  """`calculate_NCE_loss`: ids drawn on the real (key) taps, reused for the fake (query)
  taps, PatchNCE per layer times lambda_NCE, averaged over the layers."""
  ids = cut.sample_patch_ids(key, real_taps, model.num_patches)
  feat_k = model.patch_mlp.apply({"params": mlp_params}, real_taps, ids)
  feat_q = model.patch_mlp.apply({"params": mlp_params}, fake_taps, ids)
  batch = real_taps[0].shape[0]
  total = sum(losses.patch_nce(q, k, batch, model.nce_t) * model.lambda_nce
              for q, k in zip(feat_q, feat_k))
  return total / len(model.nce_layers)


def _generator_objective(model, gen_params, mlp_params, disc_params, fake, real_taps, key,
                         num_source):
  """L_G from G's output on cat(x_s, x_t) and the real images' taps (keys, detached)."""
  fake_src = fake[:num_source]
  metrics, total = {}, 0.0
  if model.lambda_gan > 0:
    pred = model.discriminator.apply({"params": disc_params}, fake_src)
    metrics["loss_G_GAN"] = losses.lsgan_loss(pred, True) * model.lambda_gan
    total = total + metrics["loss_G_GAN"]
  if model.lambda_nce > 0:
    _, fake_taps = model.generator.apply({"params": gen_params}, fake,
                                         nce_layers=model.nce_layers, encode_only=True)
    real_taps = jax.lax.stop_gradient(real_taps)
    key_x, key_y = jax.random.split(key)
    split = lambda taps, lo, hi: tuple(t[lo:hi] for t in taps)
    metrics["loss_NCE"] = _nce(model, gen_params, mlp_params, split(fake_taps, 0, num_source),
                               split(real_taps, 0, num_source), key_x)
    nce = metrics["loss_NCE"]
    if model.nce_idt:
      n = fake.shape[0]
      metrics["loss_NCE_Y"] = _nce(model, gen_params, mlp_params,
                                   split(fake_taps, num_source, n),
                                   split(real_taps, num_source, n), key_y)
      nce = 0.5 * (nce + metrics["loss_NCE_Y"])
    total = total + nce
  metrics["loss_G"] = total
  return total, metrics


def _generator_inputs(model, xs, xt):
  return jnp.concatenate([xs, xt], axis=0) if model.nce_idt else xs


def g_loss(model, gen_params, mlp_params, disc_params, xs, xt, key):
  """L_G = lambda_GAN MSE(D(G(x_s)), 1) + 0.5 (NCE(x_s, G(x_s)) + NCE(x_t, G(x_t))).

  G runs once on cat(x_s, x_t) like the reference; `key` draws the patch ids of the
  two NCE terms. Returns (loss, metrics).
  """
  fake, real_taps = model.generator.apply({"params": gen_params}, _generator_inputs(model, xs, xt),
                                          nce_layers=model.nce_layers)
  return _generator_objective(model, gen_params, mlp_params, disc_params, fake, real_taps, key,
                              xs.shape[0])


class GeneratorForward(NamedTuple):
  """G's forward of one iteration, shared by the segmentor's losses and the CUT step.

  Attributes:
    fake: G(cat(x_s, x_t)) in [-1, 1] ([:num_source] = fake_B, the rest idt_B); G(x_s)
      alone when nce_idt is off.
    real_taps: the real images' features at nce_layers (the PatchNCE keys).
    pullback: vjp of (fake, real_taps) with respect to G's params.
    num_source: the number of source images in front.
  """

  fake: jax.Array
  real_taps: tuple
  pullback: Callable
  num_source: int


def generator_forward(model, gen_params, xs, xt):
  """The iteration's one G forward (the reference's `forward()`), kept differentiable."""
  def forward(params):
    return model.generator.apply({"params": params}, _generator_inputs(model, xs, xt),
                                 nce_layers=model.nce_layers)

  (fake, real_taps), pullback = jax.vjp(forward, gen_params)
  return GeneratorForward(fake, real_taps, pullback, xs.shape[0])


def cut_step(model, gen, disc, patch_mlp, forward, xt, key, fake_src_grad=None):
  """The reference's `gan_step` after `forward`: one D step, then one G + F step.

  Args:
    model: CUTModel; gen, disc, patch_mlp: OptGroups (gen's params = forward's).
    forward: `generator_forward` of this iteration.
    xt: the target crops in [-1, 1].
    key: draws the NCE patch ids.
    fake_src_grad: optional gradient of another loss with respect to fake_B (G(x_s),
      [-1, 1]), added to G's: CONFETI's L_SC, whose backward the reference runs into
      G's .grad before this step.

  Returns:
    (gen, disc, patch_mlp, metrics).
  """
  n = forward.num_source
  (_, d_metrics), d_grads = jax.value_and_grad(d_loss, argnums=1, has_aux=True)(
      model, disc.params, forward.fake[:n], xt)
  disc = disc.apply_gradients(d_grads)  # the G step sees the updated D

  def objective(gen_params, mlp_params, fake):
    return _generator_objective(model, gen_params, mlp_params, disc.params, fake,
                                forward.real_taps, key, n)

  (g_direct, mlp_grads, fake_grads), g_metrics = jax.grad(
      objective, argnums=(0, 1, 2), has_aux=True)(gen.params, patch_mlp.params, forward.fake)
  if fake_src_grad is not None:
    fake_grads = fake_grads.at[:n].add(fake_src_grad.astype(fake_grads.dtype))
  # The keys are detached: their cotangent is zero.
  (g_through_fake,) = forward.pullback(
      (fake_grads, jax.tree.map(jnp.zeros_like, forward.real_taps)))
  g_grads = jax.tree.map(jnp.add, g_direct, g_through_fake)
  return (gen.apply_gradients(g_grads), disc, patch_mlp.apply_gradients(mlp_grads),
          {**d_metrics, **g_metrics})


def cut_update(model, gen, disc, patch_mlp, xs, xt, key, extra_g_loss_fn=None,
               extra_params=None):
  """One CUT iteration: G forward, a D step, then a G + F step against the updated D.

  Args:
    model: CUTModel; gen, disc, patch_mlp: OptGroups.
    xs, xt: source / target crops in [-1, 1] (NHWC, the same count each).
    key: draws the NCE patch ids.
    extra_g_loss_fn: optional `fn(fake_src, extra_params) -> (loss, aux)`; its gradient
      with respect to fake_src (G(x_s), [-1, 1]) is added to G's (CONFETI's L_SC through
      the frozen student), and its gradient with respect to extra_params is returned.
    extra_params: the pytree differentiated in extra_g_loss_fn (None: nothing).

  Returns:
    (gen, disc, patch_mlp, out) with out = {"fake": G(x_s) of the pre-step G (no
    gradient), "metrics": losses, "extra_grads": gradient for extra_params, "extra_aux"}.
  """
  forward = generator_forward(model, gen.params, xs, xt)
  fake_src = forward.fake[:forward.num_source]
  fake_src_grad = extra_grads = extra_aux = None
  extra_metrics = {}
  if extra_g_loss_fn is not None:
    extra_loss, extra_vjp, extra_aux = jax.vjp(extra_g_loss_fn, fake_src, extra_params,
                                               has_aux=True)
    fake_src_grad, extra_grads = extra_vjp(jnp.ones_like(extra_loss))
    extra_metrics["loss_extra"] = extra_loss
  gen, disc, patch_mlp, metrics = cut_step(model, gen, disc, patch_mlp, forward, xt, key,
                                           fake_src_grad)
  out = {"fake": jax.lax.stop_gradient(fake_src), "metrics": {**metrics, **extra_metrics},
         "extra_grads": extra_grads, "extra_aux": extra_aux}
  return gen, disc, patch_mlp, out


# -- FDA ---------------------------------------------------------------------------------
def fda_source_to_target(src, tgt, beta):
  """Fourier Domain Adaptation (Yang & Soatto 2020): src with tgt's low-frequency amplitude.

  FDA's training code (`FDA_source_to_target`, torch): per image and channel, the 2-D
  FFT amplitude of src inside the four b x b corners of the unshifted spectrum (the
  frequencies -b..b-1 in each axis), b = floor(min(H, W) beta), is replaced by tgt's;
  src's phase is kept. The inverse is torch's `irfft(onesided=False)`, a complex-to-real
  transform that reads the first W // 2 + 1 columns only, i.e. `irfft2` of that half.
  The band is not conjugate-symmetric, so this differs slightly from taking the real
  part of a full inverse FFT. FDA applies it to raw [0, 255] images (before mean
  subtraction); the output is not clipped.

  Args:
    src, tgt: [B, H, W, C] images of the same shape; beta: the band size (FDA's L).
  """
  if src.shape != tgt.shape:
    raise ValueError(f"FDA pairs images one to one; got {src.shape} and {tgt.shape}.")
  h, w = src.shape[1], src.shape[2]
  b = int(np.floor(min(h, w) * beta))
  to_planes = lambda x: jnp.moveaxis(x.astype(jnp.float32), -1, 1)
  spec_src, spec_tgt = jnp.fft.fft2(to_planes(src)), jnp.fft.fft2(to_planes(tgt))
  band = lambda n: (np.arange(n) < b) | (np.arange(n) >= n - b)
  mask = jnp.asarray(band(h)[:, None] & band(w)[None, :])
  amplitude = jnp.where(mask, jnp.abs(spec_tgt), jnp.abs(spec_src))
  phase = jnp.angle(spec_src)
  spec = amplitude * jnp.cos(phase) + 1j * (amplitude * jnp.sin(phase))
  out = jnp.fft.irfft2(spec[..., :w // 2 + 1], s=(h, w))
  return jnp.moveaxis(out, 1, -1)
