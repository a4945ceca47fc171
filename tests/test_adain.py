"""AdaIN: the op and the losses against numpy/torch, VGG encoder and decoder parity with a
torch re-statement of the pytorch-AdaIN networks through the converters, style
interpolation, and stage 1 end to end (decoder training, then the stylisation script)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from confeti_jax import methods, train, weights
from confeti_jax.data import pipeline, sources
from confeti_jax.models import adain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import stylize_adain  # noqa: E402

from configs import toy  # noqa: E402


# -- torch re-statement of pytorch-AdaIN's net.py (module order = state-dict keys) -------
def _ch(n, width):
  return max(1, int(round(n * width)))


def torch_vgg(width=1.0, extra=True):
  c = lambda n: _ch(n, width)
  pad, relu = lambda: nn.ReflectionPad2d((1, 1, 1, 1)), nn.ReLU
  pool = lambda: nn.MaxPool2d((2, 2), (2, 2), (0, 0), ceil_mode=True)
  layers = [nn.Conv2d(3, 3, (1, 1)),
            pad(), nn.Conv2d(3, c(64), (3, 3)), relu(),                      # relu1_1 (3)
            pad(), nn.Conv2d(c(64), c(64), (3, 3)), relu(), pool(),
            pad(), nn.Conv2d(c(64), c(128), (3, 3)), relu(),                 # relu2_1 (10)
            pad(), nn.Conv2d(c(128), c(128), (3, 3)), relu(), pool(),
            pad(), nn.Conv2d(c(128), c(256), (3, 3)), relu()]                # relu3_1 (17)
  for _ in range(3):
    layers += [pad(), nn.Conv2d(c(256), c(256), (3, 3)), relu()]
  layers += [pool(), pad(), nn.Conv2d(c(256), c(512), (3, 3)), relu()]      # relu4_1 (30)
  if extra:  # the file holds VGG up to relu5_4; pytorch-AdaIN keeps [:31]
    layers += [pad(), nn.Conv2d(c(512), c(512), (3, 3)), relu()]
  return nn.Sequential(*layers)


def torchvision_vgg19_features(width=1.0):
  """torchvision vgg19().features up to relu4_1 (index 20): zero padding, floor pools."""
  c = lambda n: _ch(n, width)
  cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512]
  layers, channels = [], 3
  for v in cfg:
    if v == "M":
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [nn.Conv2d(channels, c(v), kernel_size=3, padding=1), nn.ReLU()]
      channels = c(v)
  return nn.Sequential(*layers)


def torch_decoder(width=1.0):
  c = lambda n: _ch(n, width)
  pad, relu = lambda: nn.ReflectionPad2d((1, 1, 1, 1)), nn.ReLU
  up = lambda: nn.Upsample(scale_factor=2, mode="nearest")
  return nn.Sequential(
      pad(), nn.Conv2d(c(512), c(256), (3, 3)), relu(), up(),
      pad(), nn.Conv2d(c(256), c(256), (3, 3)), relu(),
      pad(), nn.Conv2d(c(256), c(256), (3, 3)), relu(),
      pad(), nn.Conv2d(c(256), c(256), (3, 3)), relu(),
      pad(), nn.Conv2d(c(256), c(128), (3, 3)), relu(), up(),
      pad(), nn.Conv2d(c(128), c(128), (3, 3)), relu(),
      pad(), nn.Conv2d(c(128), c(64), (3, 3)), relu(), up(),
      pad(), nn.Conv2d(c(64), c(64), (3, 3)), relu(),
      pad(), nn.Conv2d(c(64), 3, (3, 3)))


def torch_taps(vgg, x):
  feats = []
  for lo, hi in ((0, 4), (4, 11), (11, 18), (18, 31)):
    x = vgg[lo:hi](x)
    feats.append(x)
  return feats


def torch_mean_std(feat, eps=1e-5):
  n, c = feat.shape[:2]
  var = feat.view(n, c, -1).var(dim=2) + eps
  return feat.view(n, c, -1).mean(dim=2).view(n, c, 1, 1), var.sqrt().view(n, c, 1, 1)


def torch_adain(content, style):
  c_mean, c_std = torch_mean_std(content)
  s_mean, s_std = torch_mean_std(style)
  return (content - c_mean) / c_std * s_std + s_mean


def _numpy_state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def _nhwc(t):
  return np.moveaxis(t.detach().numpy(), 1, -1)


def _rel(a, b):
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def small_nets():
  torch.manual_seed(0)
  vgg, dec = torch_vgg(0.25, extra=False), torch_decoder(0.25)
  return vgg, dec, adain.convert_vgg_normalised(_numpy_state(vgg)), \
      adain.convert_decoder(_numpy_state(dec))


# -- tests -------------------------------------------------------------------------------
def test_adain_op_matches_numpy():
  rng = np.random.default_rng(0)
  content = rng.normal(size=(2, 5, 6, 3)) * 2 + 1
  style = rng.normal(size=(2, 4, 7, 3)) * 0.5 - 2
  def stats(x):  # unbiased variance over H*W, eps 1e-5
    return x.mean(axis=(1, 2), keepdims=True), np.sqrt(x.var(axis=(1, 2), ddof=1,
                                                             keepdims=True) + 1e-5)
  (cm, cs), (sm, ss) = stats(content), stats(style)
  expected = (content - cm) / cs * ss + sm
  got = adain.adain(jnp.asarray(content, jnp.float32), jnp.asarray(style, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
  gm, gs = adain.mean_std(got)
  np.testing.assert_allclose(np.asarray(gm), sm, rtol=1e-4, atol=1e-5)


def test_vgg_encoder_parity_with_torch():
  """The real network (width 1) on an odd-sized image: ceil_mode pools, reflect pads."""
  torch.manual_seed(0)
  vgg = torch_vgg(1.0)
  params = weights.convert({k: v for k, v in _numpy_state(vgg).items()},
                           "vgg19_normalised")["params"]
  x = np.random.default_rng(1).random((2, 37, 45, 3)).astype(np.float32)
  got = adain.VGGEncoder().apply({"params": params}, jnp.asarray(x))
  with torch.no_grad():
    expected = torch_taps(vgg, _nchw(x))
  for tap, ref in zip(("relu1_1", "relu2_1", "relu3_1", "relu4_1"), expected):
    assert got[tap].shape == _nhwc(ref).shape
    assert _rel(got[tap], _nhwc(ref)) <= 1e-4, tap
  with pytest.raises(weights.WeightsError, match="29.weight"):
    adain.convert_vgg_normalised({k: v for k, v in _numpy_state(vgg).items()
                                  if not k.startswith("29.")})


def test_torchvision_vgg19_parity_with_torch():
  """torchvision VGG-19 weights (auto-detected): conv0 is its mean/std normalisation,
  padding='zeros' its zero padding and floor pools (odd sizes drop a row / column)."""
  torch.manual_seed(1)
  features = torchvision_vgg19_features()
  with torch.no_grad():
    for m in features:  # He-normal: keeps the scale through depth, as trained weights do
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.normal_(m.bias, std=0.1)
  state = {f"features.{k}": v for k, v in _numpy_state(features).items()}
  state["classifier.0.weight"] = np.zeros((4, 8), np.float32)  # dropped
  assert weights.detect_format(state) == "vgg19_torchvision"
  params = weights.convert(state)["params"]
  x = np.random.default_rng(4).random((2, 37, 45, 3)).astype(np.float32)  # RGB in [0, 1]
  got = adain.VGGEncoder(padding="zeros").apply({"params": params}, jnp.asarray(x))
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  with torch.no_grad():
    h = _nchw(((x - mean) / std).astype(np.float32))
    expected = []
    for lo, hi in ((0, 2), (2, 7), (7, 12), (12, 21)):  # relu1_1 .. relu4_1
      h = features[lo:hi](h)
      expected.append(_nhwc(h))
  assert got["relu4_1"].shape == (2, 4, 5, 512)
  for tap, ref in zip(("relu1_1", "relu2_1", "relu3_1", "relu4_1"), expected):
    assert got[tap].shape == ref.shape, tap
    assert _rel(got[tap], ref) <= 1e-4, tap
  with pytest.raises(ValueError, match="reflect"):
    adain.VGGEncoder(padding="replicate")
  with pytest.raises(weights.WeightsError, match="vgg19_bn"):
    weights.convert(dict(state, **{"features.1.running_mean": np.zeros(64)}))
  # The methods' entry point picks the layout and refuses the reflect-padded encoder.
  chosen = adain.convert_vgg(state, "zeros")
  jax.tree.map(np.testing.assert_array_equal, chosen, params)
  with pytest.raises(weights.WeightsError, match="vgg_padding=zeros"):
    adain.convert_vgg(state, "reflect")


def test_decoder_parity_and_losses_match_torch(small_nets):
  vgg, dec, enc_params, dec_params = small_nets
  rng = np.random.default_rng(2)
  content = rng.random((2, 32, 40, 3)).astype(np.float32)
  style = rng.random((2, 24, 32, 3)).astype(np.float32)
  encoder, decoder = adain.VGGEncoder(width=0.25), adain.Decoder(width=0.25)
  feat = rng.normal(size=(2, 4, 5, 128)).astype(np.float32)  # relu4_1 width at 0.25
  with torch.no_grad():
    ref = dec(_nchw(feat))
  assert _rel(decoder.apply({"params": dec_params}, jnp.asarray(feat)), _nhwc(ref)) <= 1e-4

  # pytorch-AdaIN Net.forward with alpha 0.8: content and style losses.
  with torch.no_grad():
    s_feats = torch_taps(vgg, _nchw(style))
    c_feat = torch_taps(vgg, _nchw(content))[-1]
    t = 0.8 * torch_adain(c_feat, s_feats[-1]) + 0.2 * c_feat
    g_feats = torch_taps(vgg, dec(t))
    loss_c = F.mse_loss(g_feats[-1], t)
    loss_s = sum(F.mse_loss(torch_mean_std(g)[0], torch_mean_std(s)[0])
                 + F.mse_loss(torch_mean_std(g)[1], torch_mean_std(s)[1])
                 for g, s in zip(g_feats, s_feats))
  lc, ls = adain.training_losses(encoder, decoder, enc_params, dec_params,
                                 jnp.asarray(content), jnp.asarray(style), alpha=0.8)
  np.testing.assert_allclose(float(lc), loss_c.item(), rtol=1e-4)
  np.testing.assert_allclose(float(ls), loss_s.item(), rtol=1e-4)


def test_style_interpolation_matches_the_script(small_nets):
  """CFContra's pre-generation: AdaIN per style, weighted sum, alpha mix, decode."""
  vgg, dec, enc_params, dec_params = small_nets
  rng = np.random.default_rng(3)
  content = rng.random((1, 32, 32, 3)).astype(np.float32)
  styles = rng.random((3, 32, 32, 3)).astype(np.float32)
  w = [0.5, 0.3, 0.2]
  with torch.no_grad():
    c = vgg(_nchw(content).expand(3, -1, -1, -1))
    base = torch_adain(c, vgg(_nchw(styles)))
    feat = sum(wi * base[i:i + 1] for i, wi in enumerate(w))
    expected = dec(0.7 * feat + 0.3 * c[0:1])
  got = adain.stylize(adain.VGGEncoder(width=0.25), adain.Decoder(width=0.25), enc_params,
                      dec_params, jnp.asarray(content), jnp.asarray(styles), w, alpha=0.7)
  assert _rel(got, _nhwc(expected)) <= 1e-4


def test_random_encoder_keeps_the_spatial_signal():
  """The toy's stand-in encoder (He-normal, no biases) carries the image to relu4_1; the
  PyTorch default init (made to be overwritten by VGG weights) leaves ~1e-4 of it there,
  and a decoder trained on that learns a constant image."""
  encoder = adain.VGGEncoder(width=0.125)
  x = jax.random.uniform(jax.random.key(3), (2, 32, 32, 3))
  params = adain.random_encoder_params(encoder, jax.random.key(0), x)
  for name, layer in params.items():
    assert not np.any(np.asarray(layer["bias"])), name
    fan_in = np.prod(layer["kernel"].shape[:-1])
    assert abs(float(jnp.std(layer["kernel"])) * np.sqrt(fan_in / 2.0) - 1.0) < 0.35, name
  relu4_1 = jax.jit(lambda p: encoder.apply({"params": p}, x)["relu4_1"])
  spatial = lambda p: (lambda f: float(f.std(axis=(1, 2)).mean() / jnp.abs(f).mean()))(
      relu4_1(p))
  assert spatial(params) > 0.1
  assert spatial(jax.jit(encoder.init)(jax.random.key(0), x)["params"]) < 1e-2


def test_style_stage_trains_then_the_script_stylises(tmp_path):
  """Stage 1 through train.train_and_evaluate (random encoder: the toy has no VGG
  weights), then scripts/stylize_adain.py on the toy source with the saved networks."""
  config = toy.get_config("method=cfcontra,tiny=1")
  config.data.toy.cache_dir = str(tmp_path / "cache")
  config.method.stage = "style"
  config.method.style.random_encoder = True
  config.method.style.vgg_width = 0.125
  config.data.crop_size = (32, 32)
  config.train.steps = 2
  config.eval.every_steps = 0
  workdir = str(tmp_path / "adain")
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 2 and state.seg is None
  method = methods.build(config)
  np.testing.assert_allclose(float(method.schedule(2)), 1e-4 / (1 + 5e-5 * 2), rtol=1e-6)
  # The encoder is frozen: still its initial draw (to the last bit but one: the draw is
  # jitted inside train, eager here).
  init_key = jax.random.fold_in(jax.random.key(config.seed), 0x5EED)
  enc0 = method.encoder_params(jax.random.fold_in(init_key, 0), jnp.zeros((1, 16, 16, 3)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0),
               jax.device_get(enc0), jax.device_get(state.imnet))

  networks = stylize_adain.load_networks(adain_workdir=workdir)
  roots = pipeline.resolve_roots(config.data)
  content_root = roots["source"]
  style_dir = os.path.join(roots["target"], "leftImg8bit", "train")
  out = str(tmp_path / "stylised")
  n = stylize_adain.stylize_folder(networks, content_root, style_dir, out, num_styles=2,
                                   size=(32, 64), limit=3)
  assert n == 3
  names = sorted(os.listdir(os.path.join(out, "images")))[:3]
  for name in names:
    with Image.open(os.path.join(out, "images", name)) as im, \
        Image.open(os.path.join(content_root, "images", name)) as orig:
      assert im.size == orig.size and im.mode == "RGB"
  assert len(os.listdir(os.path.join(out, "labels"))) == 3
  assert stylize_adain.stylize_folder(networks, content_root, style_dir, out, num_styles=2,
                                      size=(32, 64), limit=3) == 0  # resumes: all done
  # Target images in the Cityscapes layout, styles from the source: a folder that
  # CityscapesSource reads, each image at its original size and path, labels linked.
  target_root, out_t = roots["target"], str(tmp_path / "stylised_cs")
  assert stylize_adain.stylize_folder(networks, target_root, os.path.join(content_root, "images"),
                                      out_t, num_styles=2, size=(32, 64), limit=2,
                                      layout="cityscapes") == 2
  original, stylised = sources.CityscapesSource(target_root, "train"), sources.CityscapesSource(
      out_t, "train")
  assert len(stylised) == 2
  for k in range(2):
    assert (os.path.relpath(stylised.image_paths[k], out_t)
            == os.path.relpath(original.image_paths[k], target_root))
    a, b = stylised[k], original[k]
    assert a["image"].shape == b["image"].shape and not np.array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
