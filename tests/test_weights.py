"""Weight import: torch modules with the published key names and random weights, converted,
give the same outputs as torch (relative error <= 1e-4, float32); layouts and errors."""

import collections
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from confeti_jax import weights
from confeti_jax.models import DeepLabV2, ResNetV1c, stage_channels
from confeti_jax.models.resnet import scale_channels
from tests.torch_deeplab import TorchResNetV1c, _tconv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(2)
TOL = 1e-4


class TorchSegmentor(tnn.Module):
  """mmseg EncoderDecoder key names: backbone.*, decode_head.aspp_modules.K.conv.*."""

  def __init__(self, depth, width, num_classes, dilations=(6, 12, 18, 24)):
    super().__init__()
    self.backbone = TorchResNetV1c(depth, width)
    cin = stage_channels(depth, width)[3]
    self.decode_head = tnn.Module()
    self.decode_head.aspp_modules = tnn.ModuleList(
        tnn.Sequential(collections.OrderedDict(conv=_tconv(cin, num_classes, 3, 1, d, True)))
        for d in dilations)

  def forward(self, x):
    feats = self.backbone(x)
    return sum(m(feats[3]) for m in self.decode_head.aspp_modules)


class TorchVisionResNet(TorchResNetV1c):
  """torchvision's key names and stem (conv1 7x7 stride 2 + bn1 + ReLU, max-pool, fc),
  on the dilated stages of ResNetV1c (torchvision's replace_stride_with_dilation)."""

  def __init__(self, depth, width, num_classes=10):
    super().__init__(depth, width)
    del self.stem
    channels = scale_channels(64, width)
    self.conv1 = tnn.Conv2d(3, channels, 7, stride=2, padding=3, bias=False)
    self.bn1 = tnn.BatchNorm2d(channels)
    self.fc = tnn.Linear(stage_channels(depth, width)[3], num_classes)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    outs = []
    for i in range(4):
      x = getattr(self, f"layer{i + 1}")(x)
      outs.append(x)
    return outs


def _randomize(module, seed):
  """Non-trivial values everywhere, BN running statistics included."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in module.state_dict().items():
      if name.endswith("num_batches_tracked"):
        continue
      if name.endswith("running_var") or (name.endswith("weight") and t.ndim == 1):
        t.copy_(0.5 + torch.rand(t.shape, generator=g))
      elif t.ndim == 4:
        t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
      else:
        t.copy_(0.1 * torch.randn(t.shape, generator=g))
  return module.eval()


def _numpy_sd(module, prefix=""):
  return {prefix + k: v.numpy().copy() for k, v in module.state_dict().items()}


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _template(model, size=33):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                           train=False))


def _image(seed=3, size=33):
  x = np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def write_safetensors(path, tensors):
  """A .safetensors file written by hand from its specification (F32 tensors)."""
  header, offset, blobs = {}, 0, []
  for name, array in tensors.items():
    data = np.ascontiguousarray(array, np.float32).tobytes()
    header[name] = {"dtype": "F32", "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(data)]}
    offset += len(data)
    blobs.append(data)
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def test_backbone_parity_with_torch_through_every_file_format(tmp_path):
  tmodel = _randomize(TorchResNetV1c(18, 0.25), seed=0)
  sd = _numpy_sd(tmodel)
  np.savez(tmp_path / "r50.npz", **sd)
  torch.save({"meta": {"epoch": 1}, "state_dict": tmodel.state_dict()}, tmp_path / "r50.pth")
  timm = {k.replace("stem.0.", "conv1.0.").replace("stem.1.", "conv1.1.")
          .replace("stem.3.", "conv1.3.").replace("stem.4.", "conv1.4.")
          .replace("stem.6.", "conv1.6.").replace("stem.7.", "bn1."): v for k, v in sd.items()
          if not k.endswith("num_batches_tracked")}
  timm["fc.weight"] = np.zeros((10, 128), np.float32)  # the classifier is dropped
  write_safetensors(tmp_path / "r50c.safetensors", timm)

  _assert_backbone_parity(ResNetV1c(depth=18, width=0.25), tmodel, _image(),
                          [tmp_path / n for n in ("r50.npz", "r50.pth", "r50c.safetensors")])


def _assert_backbone_parity(model, tmodel, images, paths):
  """Every file loaded as the backbone of `model` reproduces `tmodel`'s four stages."""
  x, xt = images
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  with torch.no_grad():
    want = [w.numpy().transpose(0, 2, 3, 1) for w in tmodel(xt)]
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.asarray(x), train=False))
  template = {c: {"backbone": shapes[c]} for c in ("params", "batch_stats")}
  for path in paths:
    variables = weights.load_into(template, path, what="backbone")
    got = apply({c: variables[c]["backbone"] for c in variables}, jnp.asarray(x))
    for i in range(4):
      err = _rel_err(got[f"layer{i + 1}"], want[i])
      assert err <= TOL, (path, i, err)


def test_torchvision_resnet_parity_through_every_file_format(tmp_path):
  """torchvision / timm resnetNN keys (7x7 stem) into ResNetV1c(stem='7x7')."""
  tmodel = _randomize(TorchVisionResNet(50, 0.25), seed=7)
  sd = _numpy_sd(tmodel)
  assert weights.detect_format(sd) == "torchvision_resnet"
  np.savez(tmp_path / "tv.npz", **sd)
  torch.save(tmodel.state_dict(), tmp_path / "tv.pth")
  write_safetensors(tmp_path / "tv.safetensors",
                    {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")})

  _assert_backbone_parity(ResNetV1c(depth=50, width=0.25, stem="7x7"), tmodel, _image(seed=4),
                          [tmp_path / n for n in ("tv.npz", "tv.pth", "tv.safetensors")])

  # Each stem's weights into the other stem's model: the error names the config fix.
  deep = _template(DeepLabV2(backbone="resnet50", width=0.25))
  with pytest.raises(weights.WeightsError, match=r"(?s)tv\.npz.*model\.stem=7x7"):
    weights.load_into(deep, tmp_path / "tv.npz")
  np.savez(tmp_path / "v1c.npz", **_numpy_sd(TorchResNetV1c(50, 0.25)))
  seven = _template(DeepLabV2(backbone="resnet50", width=0.25, stem="7x7"))
  with pytest.raises(weights.WeightsError, match=r"model\.stem=deep"):
    weights.load_into(seven, tmp_path / "v1c.npz")


def test_released_segmentor_parity_with_torch(tmp_path):
  """A CONFETI-style checkpoint: student under 'model.', teacher and aux heads beside it."""
  tmodel = _randomize(TorchSegmentor(50, 0.25, 19), seed=1)
  sd = _numpy_sd(tmodel, "model.")
  sd.update(_numpy_sd(_randomize(TorchSegmentor(50, 0.25, 19), seed=2), "ema_model."))
  sd["aux_heads.0.conv_cam.weight"] = np.ones((19, 512, 1, 1), np.float32)
  sd["aux_heads.1.conv_proj.weight"] = np.ones((512, 512, 1, 1), np.float32)
  np.savez(tmp_path / "confeti.npz", **sd)
  assert weights.detect_format(sd) == "mmseg_deeplabv2"

  model = DeepLabV2(num_classes=19, backbone="resnet50", width=0.25)
  x, xt = _image(size=41)
  variables = weights.load_into(_template(model, 41), tmp_path / "confeti.npz",
                                what="segmentor")
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
  with torch.no_grad():
    want = tmodel(xt).numpy().transpose(0, 2, 3, 1)
  assert _rel_err(logits, want) <= TOL
  aux = weights.aux_head_kernels(sd)
  assert aux["aux_heads_0"]["conv_cam"]["kernel"].shape == (1, 1, 512, 19)
  # The same file loaded as 'backbone' takes only the backbone, from the student.
  backbone = weights.load_into(_template(model, 41), tmp_path / "confeti.npz")
  np.testing.assert_array_equal(backbone["params"]["backbone"]["stem_conv1"]["kernel"],
                                sd["model.backbone.stem.0.weight"].transpose(2, 3, 1, 0))


def test_resnet101_v1c_key_layout_fits_deeplabv2_exactly(tmp_path):
  """The key set of open-mmlab resnet101_v1c (mmseg names) covers the model, nothing else."""
  with torch.device("meta"):
    shapes = {k: tuple(v.shape) for k, v in TorchResNetV1c(101, 1.0).state_dict().items()}
  # 106 convolutions (3 stem, 33 blocks x 3, 4 shortcuts), each followed by a BN with 5
  # tensors (weight, bias, running mean / var, num_batches_tracked).
  assert len(shapes) == 106 * 6
  sd = {k: np.zeros(s, np.float16) for k, s in shapes.items()}  # small file, same layout
  np.savez(tmp_path / "r101.npz", **sd)
  variables = weights.load_into(_template(DeepLabV2(backbone="resnet101")), tmp_path / "r101.npz")
  assert sum(x.size for x in jax.tree.leaves(variables["params"]["backbone"])) == sum(
      int(np.prod(s)) for k, s in shapes.items() if "running" not in k and "num_b" not in k)
  assert variables["params"]["backbone"]["layer3_22"]["conv3"]["kernel"].shape == (1, 1, 256, 1024)


def test_mismatches_and_unknown_layouts_are_clear_errors(tmp_path):
  sd = _numpy_sd(TorchResNetV1c(18, 0.25))
  path = tmp_path / "r18.npz"
  np.savez(path, **sd)
  wide = _template(DeepLabV2(backbone="resnet18", width=0.5))
  with pytest.raises(weights.WeightsError, match=r"(?s)r18\.npz.*shape mismatch.*"
                     r"layer1\.0\.bn1\.running_mean.*convert_weights\.py"):
    weights.load_into(wide, path)
  deeper = _template(DeepLabV2(backbone="resnet34", width=0.25))
  with pytest.raises(weights.WeightsError, match=r"missing: \['backbone\.layer1\.2\."):
    weights.load_into(deeper, path)
  np.savez(tmp_path / "extra.npz", **sd, **{"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1))})
  same = _template(DeepLabV2(backbone="resnet18", width=0.25))
  with pytest.raises(weights.WeightsError, match=r"1 unexpected: \['backbone\.layer5\.0\.conv1"):
    weights.load_into(same, tmp_path / "extra.npz")
  with pytest.raises(weights.WeightsError, match=r"do not belong.*\['head\.proj\.weight'\]"):
    weights.convert(dict(sd, **{"head.proj.weight": np.zeros(1)}))
  assert weights.detect_format({"conv1.weight": 0, "bn1.weight": 0}) == "torchvision_resnet"
  with pytest.raises(weights.WeightsError, match="average-pool"):
    weights.convert({"conv1.0.weight": 0, "layer1.0.downsample.2.weight": 0}, "timm_resnet_c")
  with pytest.raises(weights.WeightsError, match=r"nowhere\.npz.*convert_weights"):
    weights.load_into(wide, tmp_path / "nowhere.npz")


def test_convert_weights_script_writes_torch_key_names(tmp_path):
  tmodel = _randomize(TorchSegmentor(18, 0.125, 19), seed=4)
  torch.save({"meta": {"iter": 4000}, "state_dict": tmodel.state_dict(),
              "optimizer": {}}, tmp_path / "seg.pth")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_weights.py"),
                        str(tmp_path / "seg.pth"), str(tmp_path / "seg.npz"), "--check"],
                       capture_output=True, text=True, check=True)
  assert "Format mmseg_deeplabv2" in out.stdout
  with np.load(tmp_path / "seg.npz") as f:
    assert set(f.files) == set(tmodel.state_dict())
    np.testing.assert_array_equal(f["decode_head.aspp_modules.2.conv.weight"],
                                  tmodel.decode_head.aspp_modules[2].conv.weight.detach().numpy())


def test_method_init_loads_pretrained_and_released_weights(tmp_path):
  from confeti_jax import methods
  from configs import toy

  config = toy.get_config("tiny=1")
  depth, width = int(config.model.backbone[len("resnet"):]), config.model.width
  backbone = _numpy_sd(_randomize(TorchResNetV1c(depth, width), seed=5))
  np.savez(tmp_path / "imnet.npz", **backbone)
  config.model.pretrained = str(tmp_path / "imnet.npz")
  variables = jax.jit(methods.build(config).init_segmentor)(jax.random.key(0))
  np.testing.assert_array_equal(variables["params"]["backbone"]["layer2_0"]["conv1"]["kernel"],
                                backbone["layer2.0.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["backbone"]["stem_bn2"]["var"],
                                backbone["stem.4.running_var"])
  # init_from (a released segmentor) goes through the same hook: checked without compiling.
  seg = _numpy_sd(_randomize(TorchSegmentor(depth, width, 19), seed=6), "model.")
  np.savez(tmp_path / "released.npz", **seg)
  config.model.init_from = str(tmp_path / "released.npz")
  jax.eval_shape(methods.build(config).init_state, jax.random.key(0))
  seg["model.decode_head.aspp_modules.3.conv.bias"] = np.zeros(7, np.float32)
  np.savez(tmp_path / "released.npz", **seg)
  with pytest.raises(weights.WeightsError, match=r"aspp_modules\.3\.conv\.bias.*\(7,\)"):
    jax.eval_shape(methods.build(config).init_state, jax.random.key(0))
  config.model.init_from = str(tmp_path / "missing.npz")
  with pytest.raises(weights.WeightsError, match=r"missing\.npz.*does not exist"):
    jax.eval_shape(methods.build(config).init_state, jax.random.key(0))
