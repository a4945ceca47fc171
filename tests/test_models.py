"""Tests of the ResNet-V1c / DeepLabV2 modules, with parity against a PyTorch re-statement.

The torch network (`tests/torch_deeplab.py`) restates the mmseg ResNetV1c + DLV2Head
topology in plain torch.nn, with mmseg's state-dict key names, so the parity test also
checks that flax parameter paths map mechanically onto those keys (strict load, every key
covered).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import traverse_util
from torch import nn as tnn

from confeti_jax.models import DeepLabV2, build_segmentor, parse_dtype, stage_channels
from confeti_jax.models.resnet import ARCH_SETTINGS, ResNetV1c
from tests.torch_deeplab import TorchDeepLabV2

torch.set_num_threads(2)


# ----------------------------------------------------------------------------------------------
# Helpers.


def _torch_key(path):
  """Flax variable path (collection first) -> mmseg-style torch state-dict key."""
  collection, *mods, leaf = path
  out = []
  for m in mods:
    if m.startswith("stem_"):  # stem_conv{k} -> stem.{3(k-1)}, stem_bn{k} -> stem.{3(k-1)+1}
      k = int(m[-1]) - 1
      out += ["stem", str(3 * k + (0 if "conv" in m else 1))]
    elif m.startswith("layer"):
      i, j = m.split("_")
      out += [i, j]
    elif m.startswith("aspp_"):
      out += ["aspp_modules", m.split("_")[1], "conv"]
    elif m.startswith("downsample_"):
      out += ["downsample", "0" if m.endswith("conv") else "1"]
    else:
      out.append(m)
  if collection == "batch_stats":
    leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
  else:
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
  return ".".join(out + [leaf])


def _random_variables(model, x, seed=0):
  """Variables of the model's shape, filled with numpy draws (no slow jitted init needed).

  BN scale/bias/statistics are non-trivial so the parity test exercises their mapping.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.tree.map(lambda s: s, shapes))
  out = {}
  for path, s in flat.items():
    leaf = path[-1]
    if leaf == "kernel":
      fan_in = int(np.prod(s.shape[:-1]))
      v = rng.normal(0.0, np.sqrt(2.0 / fan_in), s.shape)
    elif leaf in ("scale", "var"):
      v = rng.uniform(0.5, 1.5, s.shape)
    else:  # bias, mean
      v = rng.normal(0.0, 0.1, s.shape)
    out[path] = jnp.asarray(v, jnp.float32)
  return traverse_util.unflatten_dict(out)


def _to_torch(variables, tmodel):
  """Copies flax variables into the torch module; strict, every torch key must be covered."""
  sd = tmodel.state_dict()
  covered = set()
  for path, v in traverse_util.flatten_dict(variables).items():
    key = _torch_key(path)
    assert key in sd, f"{path} -> {key} has no torch counterpart"
    a = np.asarray(v)
    if a.ndim == 4:
      a = a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    assert sd[key].shape == a.shape, key
    sd[key] = torch.from_numpy(a.copy())
    covered.add(key)
  missing = {k for k in sd if not k.endswith("num_batches_tracked")} - covered
  assert not missing, missing
  tmodel.load_state_dict(sd, strict=True)


def _close(a, b, tol=1e-4):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


def _nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


# ----------------------------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("depth", [18, 50])
def test_parity_with_torch(depth):
  """Eval (running stats) and train (batch stats) logits/layer4 match, and so do BN updates."""
  model = DeepLabV2(num_classes=5, backbone=f"resnet{depth}", width=0.25)
  tmodel = TorchDeepLabV2(depth, 0.25, 5)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 65, 65, 3)), jnp.float32)
  variables = _random_variables(model, x)
  _to_torch(variables, tmodel)

  logits, feats = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  tmodel.eval()
  with torch.no_grad():
    t_logits, t_feats = tmodel(_nchw(x))
  assert logits.shape == (2, 9, 9, 5) and logits.dtype == jnp.float32
  _close(logits, t_logits.numpy().transpose(0, 2, 3, 1))
  _close(feats["layer4"], t_feats[3].numpy().transpose(0, 2, 3, 1))

  (logits, feats), updates = jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
  tmodel.train()
  counts = {}  # BN module name -> elements per channel of its input (for n / (n - 1))
  hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: counts.__setitem__(
      name, inp[0].numel() // inp[0].shape[1])) for name, m in tmodel.named_modules()
      if isinstance(m, tnn.BatchNorm2d)]
  with torch.no_grad():
    t_logits, t_feats = tmodel(_nchw(x))
  for h in hooks:
    h.remove()
  _close(logits, t_logits.numpy().transpose(0, 2, 3, 1))
  _close(feats["layer4"], t_feats[3].numpy().transpose(0, 2, 3, 1))

  t_sd = tmodel.state_dict()
  old = traverse_util.flatten_dict(variables["batch_stats"])
  new = traverse_util.flatten_dict(updates["batch_stats"])
  assert set(old) == set(new)
  for path, v in new.items():
    key = _torch_key(("batch_stats",) + path)
    t_new = t_sd[key].numpy()
    if path[-1] == "mean":
      _close(v, t_new, 1e-5)
    else:  # flax folds the biased batch variance in, torch the unbiased one.
      n = counts[key.rsplit(".", 1)[0]]
      o = np.asarray(old[path], np.float64)
      expected = 0.9 * o + (t_new - 0.9 * o) * (n - 1) / n
      _close(v, expected, 1e-5)


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_output_stride_and_channels(depth):
  model = DeepLabV2(num_classes=19, backbone=f"resnet{depth}")
  x = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  logits, feats = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  chans = (64, 128, 256, 512) if depth < 50 else (256, 512, 1024, 2048)
  assert stage_channels(depth) == chans
  assert feats["layer1"].shape == (2, 16, 24, chans[0])
  for i in (2, 3, 4):
    assert feats[f"layer{i}"].shape == (2, 8, 12, chans[i - 1])
  assert logits.shape == (2, 8, 12, 19) and logits.dtype == jnp.float32
  params = variables["params"]
  assert set(params) == {"backbone", "aspp_0", "aspp_1", "aspp_2", "aspp_3"}
  num_blocks = ARCH_SETTINGS[depth][1]
  assert f"layer4_{num_blocks[3] - 1}" in params["backbone"]
  assert "downsample_conv" in params["backbone"]["layer2_0"]
  assert "bias" not in params["backbone"]["stem_conv1"]


def test_init_distributions():
  """Head N(0, 0.01) with zero bias; backbone Kaiming normal fan_out (mmcv ResNet init)."""
  model = DeepLabV2(num_classes=19, backbone="resnet18", width=0.25)
  x = jnp.zeros((1, 32, 32, 3))
  # The rbg key compiles much faster on CPU than threefry; the distributions are the same.
  params = jax.jit(lambda k: model.init(k, x, train=False))(
      jax.random.key(0, impl="rbg"))["params"]
  for k in range(4):
    w = np.asarray(params[f"aspp_{k}"]["kernel"])
    assert abs(w.std() - 0.01) < 5e-4 and abs(w.mean()) < 5e-4
    np.testing.assert_array_equal(params[f"aspp_{k}"]["bias"], 0.0)
  w = np.asarray(params["backbone"]["layer4_1"]["conv2"]["kernel"])  # 3x3x128x128
  assert abs(w.std() / np.sqrt(2.0 / (9 * w.shape[-1])) - 1.0) < 0.03
  bn = params["backbone"]["layer4_1"]["bn2"]
  np.testing.assert_array_equal(bn["scale"], 1.0)
  np.testing.assert_array_equal(bn["bias"], 0.0)


def test_bfloat16_keeps_float32_params_and_logits():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 64, 64, 3)), jnp.float32)
  ref = DeepLabV2(num_classes=7, backbone="resnet18", width=0.25)
  variables = _random_variables(ref, x)
  bf16 = DeepLabV2(num_classes=7, backbone="resnet18", width=0.25, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda: bf16.init(jax.random.key(0), x, train=False))
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))
  for train in (False, True):
    fn = lambda m, v: m.apply(v, x, train=train, mutable=["batch_stats"])
    (want, _), _ = jax.jit(lambda v: fn(ref, v))(variables)
    (got, feats), upd = jax.jit(lambda v: fn(bf16, v))(variables)
    assert got.dtype == jnp.float32 and feats["layer4"].dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(upd))
    # bfloat16 keeps ~3 significant digits; over 18 layers the logits drift by ~1% (running
    # stats) to ~5% (batch stats) relative RMS on this random network.
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    rel_rms = np.sqrt(np.mean((got - want)**2) / np.mean(want**2))
    assert rel_rms < 0.1, (train, rel_rms)


def test_remat_gives_same_outputs_and_gradients():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 32, 3)), jnp.float32)
  plain = DeepLabV2(num_classes=3, backbone="resnet18", width=0.125)
  remat = DeepLabV2(num_classes=3, backbone="resnet18", width=0.125, remat=True)
  variables = _random_variables(plain, x)
  assert jax.tree.structure(variables) == jax.tree.structure(
      jax.eval_shape(lambda: remat.init(jax.random.key(0), x, train=False)))

  def loss_fn(model):
    def f(params):
      (logits, feats), upd = model.apply(
          {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
          mutable=["batch_stats"])
      return jnp.mean(logits**2) + jnp.mean(feats["layer3"]), (logits, upd)
    return jax.jit(jax.value_and_grad(f, has_aux=True))

  (l0, aux0), g0 = loss_fn(plain)(variables["params"])
  (l1, aux1), g1 = loss_fn(remat)(variables["params"])
  _close(l1, l0, 1e-6)
  jax.tree.map(lambda a, b: _close(a, b, 1e-5), (aux1, g1), (aux0, g0))


def test_7x7_stem_gives_the_deep_stems_stage_shapes():
  """torchvision's single 7x7 stem: same strides and widths, one conv + BN in the stem."""
  x = jax.ShapeDtypeStruct((2, 65, 97, 3), jnp.float32)
  shapes = {}
  for stem in ("deep", "7x7"):
    model = ResNetV1c(depth=50, width=0.25, stem=stem)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    shapes[stem] = {k: v.shape for k, v in feats.items()}
    stems = sorted(k for k in variables["params"] if k.startswith("stem_"))
    assert stems == (["stem_bn1", "stem_conv1"] if stem == "7x7" else
                     ["stem_bn1", "stem_bn2", "stem_bn3", "stem_conv1", "stem_conv2",
                      "stem_conv3"])
  assert shapes["7x7"] == shapes["deep"]
  assert shapes["7x7"]["layer4"] == (2, 9, 13, 512)
  assert variables["params"]["stem_conv1"]["kernel"].shape == (7, 7, 3, 16)
  with pytest.raises(ValueError, match=r"'deep', '7x7'"):
    ResNetV1c(stem="5x5")
  with pytest.raises(ValueError, match="model.stem"):
    DeepLabV2(stem="caffe")


def test_bad_names_raise():
  with pytest.raises(ValueError, match="resnet101"):
    DeepLabV2(backbone="resnet152")
  with pytest.raises(ValueError, match="bfloat16"):
    parse_dtype("float16")
  assert parse_dtype("bfloat16") == jnp.bfloat16


def test_build_segmentor_from_config():
  cfg = ml_collections.ConfigDict(dict(
      backbone="resnet34", width=0.5, dtype="bfloat16", aspp_dilations=[6, 12]))
  model = build_segmentor(cfg, num_classes=16)
  assert (model.backbone, model.width, model.num_classes) == ("resnet34", 0.5, 16)
  assert model.dtype == jnp.bfloat16 and model.aspp_dilations == (6, 12) and not model.remat
  cfg.remat = True
  assert build_segmentor(cfg, 16).remat
  cfg.backbone = "vgg16"
  with pytest.raises(ValueError, match="resnet18"):
    build_segmentor(cfg, 16)
