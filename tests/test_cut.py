"""CUT: anti-aliasing filters, generator (taps), PatchGAN and patch MLPs against the torch
re-statement in tests/torch_cut.py, loaded through the weight converters; PatchNCE and
LSGAN against numpy; the whole G / D losses against torch; the D-then-G+F update order;
the extra-loss hook; FDA against numpy; stage 0 (method 'cut') end to end on the toy."""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from confeti_jax import augment, losses, methods, style, train, weights
from confeti_jax.models import cut
from tests import torch_cut as tc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import common, toy  # noqa: E402

torch.set_num_threads(2)
TOL = 1e-4


# -- networks ----------------------------------------------------------------------------
def test_antialias_filters_match_torch():
  for shape in ((2, 9, 11, 5), (1, 8, 8, 3)):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    c = shape[-1]
    with torch.no_grad():
      down, up = tc.TDownsample(c)(tc.nchw(x)), tc.TUpsample(c)(tc.nchw(x))
    got_down, got_up = cut.Downsample().apply({}, jnp.asarray(x)), cut.Upsample().apply(
        {}, jnp.asarray(x))
    assert got_up.shape == (shape[0], 2 * shape[1], 2 * shape[2], c)
    assert tc.rel_err(got_down, tc.nhwc(down)) <= TOL and tc.rel_err(got_up, tc.nhwc(up)) <= TOL


def test_generator_small_parity_and_encode_only():
  torch.manual_seed(0)
  net = tc.randomize(tc.t_generator(4, 2), 1)
  params = weights.convert(tc.numpy_state(net, "module."))["params"]  # detected as cut_generator
  x = tc.random_images(2, (2, 28, 20, 3))
  taps = (0, 4, 8, 12, 13, 15, 17)
  with torch.no_grad():
    ref_img, ref_taps = net(tc.nchw(x), taps)
    ref_enc = net(tc.nchw(x), taps[:4], encode_only=True)
  g = cut.ResnetGenerator(ngf=4, n_blocks=2)
  img, got_taps = g.apply({"params": params}, jnp.asarray(x), nce_layers=taps)
  assert img.shape == x.shape and tc.rel_err(img, tc.nhwc(ref_img)) <= TOL
  for index, got, ref in zip(taps, got_taps, ref_taps):
    assert tc.rel_err(got, tc.nhwc(ref)) <= TOL, index
  none, enc = g.apply({"params": params}, jnp.asarray(x), nce_layers=taps[:4], encode_only=True)
  assert none is None and len(enc) == 4
  for got, ref in zip(enc, ref_enc):
    assert tc.rel_err(got, tc.nhwc(ref)) <= TOL
  with pytest.raises(ValueError, match="nce_layers"):
    g.apply({"params": params}, jnp.asarray(x), nce_layers=(8, 4))


def test_generator_nine_block_index_map():
  """The reference taps 0,4,8,12,16 (padded input, both down convs pre-norm, ResBlocks 1
  and 5) with 9 blocks; at 512 and ngf 64 their shapes are docs/reference_code.md §4.2's."""
  net = tc.randomize(tc.t_generator(2, 9), 3)
  params = cut.convert_generator(tc.numpy_state(net))
  x = tc.random_images(4, (2, 16, 16, 3))
  nce = (0, 4, 8, 12, 16)
  with torch.no_grad():
    ref = net(tc.nchw(x), nce, encode_only=True)
  _, got = cut.ResnetGenerator(ngf=2, n_blocks=9).apply(
      {"params": params}, jnp.asarray(x), nce_layers=nce, encode_only=True)
  for index, g, r in zip(nce, got, ref):
    assert tc.rel_err(g, tc.nhwc(r)) <= TOL, index

  full = cut.ResnetGenerator()
  big = jnp.zeros((1, 512, 512, 3))
  shapes = jax.eval_shape(lambda: full.apply(full.init(jax.random.key(0), big), big,
                                             nce_layers=nce))
  assert shapes[0].shape == (1, 512, 512, 3)
  assert [t.shape[1:] for t in shapes[1]] == [(518, 518, 3), (512, 512, 128), (256, 256, 256),
                                              (128, 128, 256), (128, 128, 256)]
  assert len(cut.generator_layers(64, 9)) == 32


def test_discriminator_parity_and_patch_size():
  net = tc.randomize(tc.t_discriminator(4), 5)
  params = weights.convert(tc.numpy_state(net))["params"]  # detected as cut_discriminator
  x = tc.random_images(6, (2, 40, 36, 3))
  with torch.no_grad():
    ref, _ = net(tc.nchw(x))
  got = cut.NLayerDiscriminator(ndf=4).apply({"params": params}, jnp.asarray(x))
  assert tc.rel_err(got, tc.nhwc(ref)) <= TOL
  d = cut.NLayerDiscriminator()
  big = jnp.zeros((1, 512, 512, 3))
  assert jax.eval_shape(lambda: d.apply(d.init(jax.random.key(0), big), big)).shape == (
      1, 62, 62, 1)


def test_patch_mlp_parity_and_patch_ids():
  rng = np.random.default_rng(7)
  taps = [rng.normal(size=(2, h, w, c)).astype(np.float32)
          for h, w, c in ((9, 9, 3), (6, 5, 8), (3, 3, 8))]
  ids = cut.sample_patch_ids(jax.random.key(0), [jnp.asarray(t) for t in taps], 16)
  assert [len(i) for i in ids] == [16, 16, 9]
  for i, t in zip(ids, taps):
    assert len(set(np.asarray(i).tolist())) == len(i) and int(i.max()) < t.shape[1] * t.shape[2]
  net = tc.randomize(tc.TPatchSampleF([3, 8, 8], nc=32), 8)
  params = weights.convert(tc.numpy_state(net))["params"]  # detected as cut_patch_mlp
  with torch.no_grad():
    ref = net([tc.nchw(t) for t in taps], [np.asarray(i) for i in ids])
  got = cut.PatchSampleMLP(features=32).apply({"params": params}, [jnp.asarray(t) for t in taps],
                                              ids)
  for g, r in zip(got, ref):
    assert g.shape == tuple(r.shape) and tc.rel_err(g, r.numpy()) <= TOL


def test_converters_reject_wrong_files():
  sd = tc.numpy_state(tc.t_generator(2, 1))
  with pytest.raises(weights.WeightsError, match="model.4.weight"):
    cut.convert_generator({k: v for k, v in sd.items() if not k.startswith("model.4.")})
  bad = dict(sd, **{"model.7.filt": np.ones_like(sd["model.7.filt"])})
  with pytest.raises(weights.WeightsError, match="anti-aliasing"):
    cut.convert_generator(bad)
  with pytest.raises(weights.WeightsError, match="unexpected"):
    cut.convert_patch_mlp({"mlp_0.1.weight": np.zeros((2, 2))})


# -- losses ------------------------------------------------------------------------------
def test_patch_nce_matches_numpy_and_detaches_keys():
  rng = np.random.default_rng(9)
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  q, k = unit(rng.normal(size=(10, 6))), unit(rng.normal(size=(10, 6)))
  expected = []
  for b in range(2):  # 2 images of 5 patches: negatives from the same image only
    for i in range(5):
      row = [q[5 * b + i] @ k[5 * b + i]] + [
          -10.0 if j == i else q[5 * b + i] @ k[5 * b + j] for j in range(5)]
      logits = np.array(row) / 0.07
      expected.append(np.log(np.exp(logits).sum()) - logits[0])
  got = losses.patch_nce(jnp.asarray(q), jnp.asarray(k), 2)
  np.testing.assert_allclose(float(got), np.mean(expected), rtol=1e-5)
  ref = tc.t_patch_nce(torch.tensor(q), torch.tensor(k), 2).mean().item()
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  grad_k = jax.grad(lambda kk: losses.patch_nce(jnp.asarray(q), kk, 2))(jnp.asarray(k))
  assert float(jnp.abs(grad_k).max()) == 0.0


def test_lsgan_and_range_conversions():
  pred = jnp.asarray([[0.2, 1.5], [-0.5, 1.0]])
  assert np.isclose(float(losses.lsgan_loss(pred, True)), np.mean((np.asarray(pred) - 1) ** 2))
  assert np.isclose(float(losses.lsgan_loss(pred, False)), np.mean(np.asarray(pred) ** 2))
  pixels = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 4, 4, 3)), jnp.uint8)
  x = style.pixels_to_cut(pixels)
  np.testing.assert_allclose(style.seg_to_cut(augment.normalize(pixels)), x, atol=1e-5)
  np.testing.assert_allclose(style.cut_to_seg(x), augment.normalize(pixels), atol=1e-4)
  assert float(x.min()) >= -1 and float(x.max()) <= 1


# -- the CUT step --------------------------------------------------------------------------
SMALL = dict(ngf=2, ndf=2, n_blocks=1, nce_layers=(0, 4, 8, 12), num_patches=16, netf_nc=8)
STEP_KEY = 1


class _Cfg(dict):
  """A dict readable like a ConfigDict (attribute access, .get)."""

  __getattr__ = dict.__getitem__


@pytest.fixture(scope="module")
def small_cut():
  """A tiny CUT with non-trivial weights (the 0.02 xavier init makes outputs nearly
  constant), SGD(1) so that a step subtracts exactly the gradient, and the jitted
  functions the tests share (compiling is what costs time here)."""
  cfg = common.cut_config()
  cfg.update(SMALL)
  model = dataclasses.replace(style.build_cut(_Cfg(cfg)), tx=optax.sgd(1.0))
  gen, disc, mlp = style.init_cut(jax.random.key(0), model)
  rescale = lambda group: group.replace(params=jax.tree.map(lambda p: p * 40.0, group.params))
  gen, disc, mlp = rescale(gen), rescale(disc), rescale(mlp)
  xs = jnp.asarray(tc.random_images(10, (2, 24, 24, 3)))
  xt = jnp.asarray(tc.random_images(11, (2, 24, 24, 3)))
  key = jax.random.key(STEP_KEY)
  fns = dict(
      generate=jax.jit(lambda gp: style.generate(model, gp, xs)),
      d_loss=jax.jit(jax.value_and_grad(lambda dp, fake: style.d_loss(model, dp, fake, xt)[0])),
      g_loss=jax.jit(jax.value_and_grad(
          lambda gp, mp, dp: style.g_loss(model, gp, mp, dp, xs, xt, key), argnums=(0, 1),
          has_aux=True)),
      update=jax.jit(lambda g, d, m, weight: style.cut_update(
          model, g, d, m, xs, xt, key, extra_g_loss_fn=_hook, extra_params=weight)),
  )
  return model, gen, disc, mlp, xs, xt, fns


def test_losses_match_torch(small_cut):
  """L_D and L_G (GAN + both NCE terms, patch ids shared) against the reference formulas."""
  model, gen, disc, mlp, xs, xt, fns = small_cut
  (loss_g, metrics), _ = fns["g_loss"](gen.params, mlp.params, disc.params)
  loss_d, _ = fns["d_loss"](disc.params, fns["generate"](gen.params))

  # torch nets carrying the same weights (flax -> torch by the converters' inverse).
  tg, td = tc.t_generator(2, 1), tc.t_discriminator(2)
  tf = tc.TPatchSampleF([3, 4, 8, 8], nc=8)
  _load_torch(tg, gen.params, cut.generator_layers(2, 1))
  _load_torch(td, disc.params, cut.discriminator_layers(2, 3))
  for name, p in mlp.params.items():
    _, i, fc = name.split("_")
    lin = getattr(tf, f"mlp_{i}")[0 if fc == "fc1" else 2]
    lin.weight.data = torch.tensor(np.asarray(p["kernel"]).T.copy())
    lin.bias.data = torch.tensor(np.asarray(p["bias"]))
  real_a, real_b = tc.nchw(xs), tc.nchw(xt)
  nce = model.nce_layers
  key_x, key_y = jax.random.split(jax.random.key(STEP_KEY))

  def t_nce(src, tgt, key):
    feat_k = tg(src, nce, encode_only=True)
    feat_q = tg(tgt, nce, encode_only=True)
    taps = [jnp.asarray(tc.nhwc(f)) for f in feat_k]
    ids = [np.asarray(i) for i in cut.sample_patch_ids(key, taps, model.num_patches)]
    pool_k, pool_q = tf(feat_k, ids), tf(feat_q, ids)
    return sum(tc.t_patch_nce(q, k, 2).mean() for q, k in zip(pool_q, pool_k)) / len(nce)

  with torch.no_grad():
    fake_all, _ = tg(torch.cat([real_a, real_b]), nce)
    fake_b, idt_b = fake_all[:2], fake_all[2:]
    ref_g = ((td(fake_b)[0] - 1) ** 2).mean() + 0.5 * (t_nce(real_a, fake_b, key_x)
                                                      + t_nce(real_b, idt_b, key_y))
    ref_d = 0.5 * ((td(fake_b)[0] ** 2).mean() + ((td(real_b)[0] - 1) ** 2).mean())
  assert metrics["loss_NCE"] > 0 and metrics["loss_G_GAN"] > 0
  np.testing.assert_allclose(float(loss_g), ref_g.item(), rtol=TOL)
  np.testing.assert_allclose(float(loss_d), ref_d.item(), rtol=TOL)


def _load_torch(net, params, layers):
  """Writes flax params into a torch tc.TSequentialNet (the converter run backwards)."""
  def put(conv, p):
    conv.weight.data = torch.tensor(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy())
    conv.bias.data = torch.tensor(np.asarray(p["bias"]))
  for index, layer in enumerate(layers):
    if layer.kind == "block":
      put(net.model[index].conv_block[1], params[layer.name]["conv1"])
      put(net.model[index].conv_block[5], params[layer.name]["conv2"])
    elif layer.kind.startswith("conv"):
      put(net.model[index], params[layer.name])


def test_cut_update_steps_d_then_g(small_cut):
  """D moves in the D step only; G and F in the G step, against the updated D; the
  one-forward update gives the same gradients as differentiating g_loss from scratch."""
  model, gen, disc, mlp, xs, xt, fns = small_cut
  new_gen, new_disc, new_mlp, out = fns["update"](gen, disc, mlp, jnp.float32(0.0))

  fake = fns["generate"](gen.params)
  np.testing.assert_allclose(out["fake"], fake, atol=1e-5)
  _, d_grads = fns["d_loss"](disc.params, fake)
  _assert_tree_close(_step(disc, new_disc), d_grads)

  _, (g_grads, mlp_grads) = fns["g_loss"](gen.params, mlp.params, new_disc.params)
  _assert_tree_close(_step(gen, new_gen), g_grads)
  _assert_tree_close(_step(mlp, new_mlp), mlp_grads)
  _, (stale, _) = fns["g_loss"](gen.params, mlp.params, disc.params)
  assert _tree_diff(stale, g_grads) > 0.1 * _tree_max(g_grads)  # the pre-step D differs

  # The hook (weight 0 above) now adds w * mean(G(x_s)^2): its gradient reaches G only
  # (w large enough for its gradient to stand out of the rounding of the CUT step's).
  hooked_gen, hooked_disc, hooked_mlp, hooked = fns["update"](gen, disc, mlp, jnp.float32(1e3))
  hook_grads = jax.jit(jax.grad(lambda gp: 1e3 * jnp.mean(style.generate(model, gp, xs) ** 2)))(
      gen.params)
  _assert_tree_close(_step(new_gen, hooked_gen), hook_grads)
  _assert_tree_close(_step(disc, hooked_disc), _step(disc, new_disc))
  _assert_tree_close(_step(mlp, hooked_mlp), _step(mlp, new_mlp))
  np.testing.assert_allclose(hooked["extra_grads"], jnp.mean(fake**2), rtol=1e-4)
  assert hooked["extra_aux"]["mean"].shape == ()
  assert {"loss_D", "loss_G", "loss_G_GAN", "loss_NCE", "loss_NCE_Y", "loss_extra"} <= set(
      hooked["metrics"])


def _hook(fake_src, weight):
  value = jnp.mean(fake_src**2)
  return weight * value, {"mean": value}


def _tree_max(tree):
  return max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))


def _tree_diff(a, b):
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _step(old, new):
  """What one SGD(1) step subtracted: the gradient it used."""
  return jax.tree.map(jnp.subtract, old.params, new.params)


def _assert_tree_close(a, b, scale=None):
  """Leaves equal up to 1e-4 of the whole tree's largest value (biases in front of an
  InstanceNorm get gradients that are rounding noise; they are compared on that scale)."""
  scale = _tree_max(b) if scale is None else scale
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4 * scale)


# -- FDA ---------------------------------------------------------------------------------
def _numpy_fda(src, tgt, beta):
  """FDA's torch `FDA_source_to_target` in numpy: corner swap, c2r of the half spectrum."""
  s, t = np.moveaxis(src, -1, 1).astype(np.float64), np.moveaxis(tgt, -1, 1).astype(np.float64)
  fs, ft = np.fft.fft2(s), np.fft.fft2(t)
  amp_s, pha_s, amp_t = np.abs(fs), np.angle(fs), np.abs(ft)
  h, w = s.shape[-2:]
  b = int(np.floor(min(h, w) * beta))
  for rows in (slice(0, b), slice(h - b, h)):
    for cols in (slice(0, b), slice(w - b, w)):
      amp_s[..., rows, cols] = amp_t[..., rows, cols]
  spec = np.cos(pha_s) * amp_s + 1j * np.sin(pha_s) * amp_s
  return np.moveaxis(np.fft.irfft2(spec[..., :w // 2 + 1], s=(h, w)), 1, -1)


def test_fda_matches_numpy():
  rng = np.random.default_rng(12)
  src = rng.uniform(0, 255, (2, 20, 24, 3)).astype(np.float32)
  tgt = rng.uniform(0, 255, (2, 20, 24, 3)).astype(np.float32)
  for beta in (0.1, 0.25):
    got = style.fda_source_to_target(jnp.asarray(src), jnp.asarray(tgt), beta)
    assert tc.rel_err(got, _numpy_fda(src, tgt, beta)) <= TOL
  same = style.fda_source_to_target(jnp.asarray(src), jnp.asarray(tgt), 0.0)
  np.testing.assert_allclose(same, src, atol=1e-3)  # an empty band changes nothing


# -- stage 0 -------------------------------------------------------------------------------
def test_stage0_trains_on_the_toy(tmp_path):
  config = toy.get_config("method=cut,tiny=1")
  config.data.toy.cache_dir = str(tmp_path / "cache")
  config.data.crop_size = (32, 32)
  config.train.checkpoint_every_steps = 100  # one save, at the end
  assert config.eval.every_steps == 0 and config.method.cut.n_blocks == 5
  config.method.cut.n_blocks = 1  # the smallest generator: compiling is the cost here
  config.method.cut.nce_layers = (0, 4, 8, 12)
  workdir = str(tmp_path / "cut")
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 3 and state.seg is None
  for group in (state.gen, state.disc, state.patch_mlp):  # three Adam steps each
    assert int(group.opt_state[0].count) == 3
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert all(np.isfinite(rows[-1][k]) for k in ("loss_D", "loss_G", "loss_NCE", "loss_NCE_Y"))
  with pytest.raises(ValueError, match="every_steps=0"):
    methods.build(config).inference_variables(state)
