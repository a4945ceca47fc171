"""AdaIN style transfer (Huang & Belongie 2017) as CFContra uses it (docs/peers.md §2, §5).

* `VGGEncoder`: the "normalised" VGG-19 up to relu4_1 (the first 31 modules of
  `vgg_normalised.pth`): a 1x1 3->3 convolution that folds in the Caffe
  preprocessing (inputs are RGB in [0, 1]), then reflect-padded 3x3 convolutions with
  ReLU and 2x2 max-pooling with ceil_mode. Frozen; its weights are imported, either
  `vgg_normalised.pth` or torchvision's VGG-19 (`convert_vgg_torchvision`: conv0 becomes
  its ImageNet mean/std normalisation; run with padding="zeros", which also floors pools).
* `Decoder`: the mirror up to relu4_1: reflect-padded 3x3 convolutions, ReLU after all
  but the last, nearest x2 upsampling, no normalisation.
* `adain`: (c - mu_c) / sigma_c * sigma_s + mu_s per sample and channel, sigma =
  sqrt(unbiased var + 1e-5) (torch `.var` is unbiased).
* Training losses: content = MSE(relu4_1 of the decoded image, the AdaIN target t),
  style = sum over relu1_1..relu4_1 of MSE(means) + MSE(stds), weights 1 and 10.

Parameter names mirror VGG's layer names ('conv1_1' ... 'conv4_1', 'conv0' the 1x1);
the decoder's layer that undoes encoder layer X is named X. `convert_*` map the torch
state dicts (numpy arrays under torch `nn.Sequential` keys) onto these params.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from confeti_jax.augment import IMAGENET_MEAN, IMAGENET_STD  # [0, 255] units
from confeti_jax.models.conv import Conv
from confeti_jax.models.heads import torch_bias_init, torch_kernel_init
from confeti_jax.weights import WeightsError

# (name, out channels) per conv, with 'pool' between VGG blocks, up to relu4_1.
_ENCODER = (("conv1_1", 64), ("conv1_2", 64), "pool", ("conv2_1", 128), ("conv2_2", 128),
            "pool", ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), ("conv3_4", 256),
            "pool", ("conv4_1", 512))
_TAPS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1")
# The mirror: (name, out channels) per conv, 'up' = nearest x2; the last conv is linear.
_DECODER = (("conv4_1", 256), "up", ("conv3_4", 256), ("conv3_3", 256), ("conv3_2", 256),
            ("conv3_1", 128), "up", ("conv2_2", 128), ("conv2_1", 64), "up", ("conv1_2", 64),
            ("conv1_1", 3))

# torch nn.Sequential indices of the convolutions in vgg_normalised.pth / decoder.pth.
VGG_TORCH_KEYS = {"0": "conv0", "2": "conv1_1", "5": "conv1_2", "9": "conv2_1",
                  "12": "conv2_2", "16": "conv3_1", "19": "conv3_2", "22": "conv3_3",
                  "25": "conv3_4", "29": "conv4_1"}
# torchvision vgg19 `features.N` indices of the convolutions up to relu4_1 (max-pools at 4,
# 9, 18); its input is (RGB in [0, 1] - mean) / std, which conv0 is built to produce.
VGG_TORCHVISION_KEYS = {"0": "conv1_1", "2": "conv1_2", "5": "conv2_1", "7": "conv2_2",
                        "10": "conv3_1", "12": "conv3_2", "14": "conv3_3", "16": "conv3_4",
                        "19": "conv4_1"}
DECODER_TORCH_KEYS = {"1": "conv4_1", "5": "conv3_4", "8": "conv3_3", "11": "conv3_2",
                      "14": "conv3_1", "18": "conv2_2", "21": "conv2_1", "25": "conv1_2",
                      "28": "conv1_1"}


def _width(channels, width):
  return channels if channels == 3 else max(1, int(round(channels * width)))


def _conv(features, in_features, kernel, dtype, name):
  """A PyTorch-initialised Conv2d with bias; padding is done by the caller (reflect)."""
  return Conv(features, kernel, use_bias=True, dtype=dtype, kernel_init=torch_kernel_init,
              bias_init=torch_bias_init(in_features * kernel * kernel), name=name)


def reflect_pad(x):
  """nn.ReflectionPad2d(1) on NHWC."""
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")


def zero_pad(x):
  """Conv2d(padding=1)'s zero padding on NHWC."""
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def max_pool_ceil(x):
  """nn.MaxPool2d(2, 2, ceil_mode=True): odd sizes keep a last, partial window."""
  pad = ((0, x.shape[1] % 2), (0, x.shape[2] % 2))
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding=pad)


def max_pool_floor(x):
  """nn.MaxPool2d(2, 2) (ceil_mode=False): an odd last row / column is dropped."""
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


# padding -> (pad before each 3x3 conv, 2x2 pool): pytorch-AdaIN's vgg_normalised layout,
# or torchvision's VGG (zero padding, floor pooling).
_ENCODER_LAYOUTS = {"reflect": (reflect_pad, max_pool_ceil), "zeros": (zero_pad, max_pool_floor)}


class VGGEncoder(nn.Module):
  """Normalised VGG-19 to relu4_1: RGB in [0, 1] -> {'relu1_1', ..., 'relu4_1'} (NHWC).

  Attributes:
    width: channel multiplier (1.0 = the real network whose weights can be imported).
    dtype: compute dtype; parameters stay float32, outputs are float32.
    padding: 'reflect' (vgg_normalised.pth: reflection padding, ceil_mode pools) or
      'zeros' (torchvision VGG-19: zero padding, floor pools), the layout the imported
      weights were trained with.
  """

  width: float = 1.0
  dtype: Any = jnp.float32
  padding: str = "reflect"

  def __post_init__(self):
    if self.padding not in _ENCODER_LAYOUTS:
      raise ValueError(f"Unknown VGG padding {self.padding!r}; use one of "
                       f"{sorted(_ENCODER_LAYOUTS)} (method.style.vgg_padding).")
    super().__post_init__()

  @nn.compact
  def __call__(self, x):
    pad, pool = _ENCODER_LAYOUTS[self.padding]
    x = _conv(3, 3, 1, self.dtype, "conv0")(x.astype(self.dtype))
    outputs, channels = {}, 3
    for layer in _ENCODER:
      if layer == "pool":
        x = pool(x)
        continue
      name, features = layer
      features = _width(features, self.width)
      x = nn.relu(_conv(features, channels, 3, self.dtype, name)(pad(x)))
      channels = features
      tap = name.replace("conv", "relu")
      if tap in _TAPS:
        outputs[tap] = x.astype(jnp.float32)
    return outputs


class Decoder(nn.Module):
  """The AdaIN decoder: relu4_1-sized features -> an RGB image (about [0, 1], unclamped)."""

  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.astype(self.dtype)
    channels = x.shape[-1]
    last = _DECODER[-1][0]
    for layer in _DECODER:
      if layer == "up":
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest, scale 2
        continue
      name, features = layer
      features = _width(features, self.width)
      x = _conv(features, channels, 3, self.dtype, name)(reflect_pad(x))
      if name != last:
        x = nn.relu(x)
      channels = features
    return x.astype(jnp.float32)


def random_encoder_params(encoder, key, x):
  """A random stand-in for the VGG weights (toy runs only): He-normal kernels, zero biases.

  The encoder's own initialiser is PyTorch's default, built to be overwritten by the
  imported weights: with it, each ReLU layer shrinks the signal and the biases take
  over, so at relu4_1 the spatial variation is ~1e-4 of the channel means and the
  decoder learns a constant image. N(0, 2 / fan_in) kernels without biases keep the
  features' scale through depth (random-feature AdaIN, not the reference).
  """
  shapes = jax.eval_shape(encoder.init, key, x)["params"]  # shapes only: no forward pass

  @jax.jit
  def draw(key):
    keys = dict(zip(sorted(shapes), jax.random.split(jax.random.fold_in(key, 1), len(shapes))))
    out = {}
    for name, layer in shapes.items():
      kernel, bias = layer["kernel"], layer["bias"]
      fan_in = int(np.prod(kernel.shape[:-1]))
      out[name] = {"kernel": jax.random.normal(keys[name], kernel.shape, kernel.dtype)
                   * np.sqrt(2.0 / fan_in), "bias": jnp.zeros(bias.shape, bias.dtype)}
    return out

  return draw(key)


def mean_std(features, eps=1e-5):
  """Per-sample, per-channel mean and sqrt(unbiased var + eps) over H, W: [B, 1, 1, C]."""
  f = features.astype(jnp.float32)
  n = f.shape[1] * f.shape[2]
  mean = jnp.mean(f, axis=(1, 2), keepdims=True)
  var = jnp.sum(jnp.square(f - mean), axis=(1, 2), keepdims=True) / max(n - 1, 1)
  return mean, jnp.sqrt(var + eps)


def adain(content, style):
  """Adaptive instance normalisation: content statistics replaced by the style's."""
  c_mean, c_std = mean_std(content)
  s_mean, s_std = mean_std(style)
  return (content.astype(jnp.float32) - c_mean) / c_std * s_std + s_mean


def content_loss(decoded_feature, target):
  """nn.MSELoss (mean) between relu4_1 of the decoded image and the AdaIN target."""
  return jnp.mean(jnp.square(decoded_feature - jax.lax.stop_gradient(target)))


def style_loss(decoded_features, style_features):
  """Sum over relu1_1..relu4_1 of MSE(means) + MSE(stds) (pytorch-AdaIN `calc_style_loss`)."""
  total = 0.0
  for tap in _TAPS:
    g_mean, g_std = mean_std(decoded_features[tap])
    s_mean, s_std = mean_std(jax.lax.stop_gradient(style_features[tap]))
    total = total + jnp.mean(jnp.square(g_mean - s_mean)) + jnp.mean(jnp.square(g_std - s_std))
  return total


def training_losses(encoder, decoder, enc_params, dec_params, content, style, alpha=1.0):
  """(content loss, style loss) of one AdaIN decoder step; images RGB in [0, 1].

  As pytorch-AdaIN's `Net.forward`: t = alpha AdaIN(f(c), f(s)) + (1 - alpha) f(c),
  g = decoder(t), losses on f(g) against t and against f(s)'s statistics.
  """
  style_feats = encoder.apply({"params": enc_params}, style)
  content_feat = encoder.apply({"params": enc_params}, content)["relu4_1"]
  t = adain(content_feat, style_feats["relu4_1"])
  t = jax.lax.stop_gradient(alpha * t + (1.0 - alpha) * content_feat)
  decoded = decoder.apply({"params": dec_params}, t)
  decoded_feats = encoder.apply({"params": enc_params}, decoded)
  return (content_loss(decoded_feats["relu4_1"], t),
          style_loss(decoded_feats, style_feats))


def stylize(encoder, decoder, enc_params, dec_params, content, styles, weights=None,
            alpha=1.0):
  """One content image in the interpolated style of several style images.

  The CFContra pre-generation script's mode (pytorch-AdaIN `style_transfer` with
  interpolation weights): AdaIN of the content features against each style's
  features, the results mixed by `weights` (equal by default), then
  alpha * mix + (1 - alpha) * content features, decoded.

  Args:
    content: [1, H, W, 3] RGB in [0, 1].
    styles: [S, H', W', 3] RGB in [0, 1] (one size for all styles).
    weights: [S] interpolation weights summing to 1 (None: 1/S each).
    alpha: style strength in [0, 1] (1 in CFContra).

  Returns:
    [1, ~H, ~W, 3] decoded image (unclamped; H, W rounded to the encoder's stride 8).
  """
  num = styles.shape[0]
  weights = jnp.full((num,), 1.0 / num) if weights is None else jnp.asarray(weights)
  content_feat = encoder.apply({"params": enc_params}, content)["relu4_1"]
  style_feat = encoder.apply({"params": enc_params}, styles)["relu4_1"]
  mixed = adain(jnp.broadcast_to(content_feat, (num, *content_feat.shape[1:])), style_feat)
  mixed = jnp.einsum("s,shwc->hwc", weights.astype(jnp.float32), mixed)[None]
  return decoder.apply({"params": dec_params}, alpha * mixed + (1.0 - alpha) * content_feat)


def _convert(state_dict: Mapping[str, np.ndarray], keys, what):
  """torch Conv2d weight (O, I, kh, kw) / bias under Sequential keys -> flax conv params
  (float32 numpy arrays; a 'module.' prefix is dropped)."""
  state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
  missing = [f"{i}.{p}" for i in keys for p in ("weight", "bias")
             if f"{i}.{p}" not in state_dict]
  if missing:
    raise WeightsError(f"{what}: the state dict lacks {missing[:6]}; expected the torch "
                       f"nn.Sequential keys of {what} ({sorted(keys, key=int)}.weight/.bias).")
  params = {}
  for index, name in keys.items():
    weight = np.asarray(state_dict[f"{index}.weight"], np.float32)
    params[name] = {"kernel": np.ascontiguousarray(weight.transpose(2, 3, 1, 0)),
                    "bias": np.asarray(state_dict[f"{index}.bias"], np.float32)}
  return params


def convert_vgg_normalised(state_dict):
  """`vgg_normalised.pth` (all 53 modules) -> `VGGEncoder` params; layers past relu4_1
  are dropped, as pytorch-AdaIN keeps only the first 31 modules."""
  return _convert(state_dict, VGG_TORCH_KEYS, "vgg_normalised.pth")


def convert_vgg(state_dict, padding="reflect"):
  """Encoder params from either layout (torchvision's `features.N.*` or vgg_normalised's
  `N.*`); torchvision weights are refused unless the encoder pads with zeros."""
  if not any(k.startswith(("features.", "module.features.")) for k in state_dict):
    return convert_vgg_normalised(state_dict)
  if padding != "zeros":
    raise WeightsError("torchvision VGG-19 weights need the encoder's zero padding and floor "
                       "pooling: set method.style.vgg_padding=zeros (--vgg_padding=zeros).")
  return convert_vgg_torchvision(state_dict)


def convert_vgg_torchvision(state_dict):
  """torchvision `vgg19` (features.N.*; classifier.* dropped) -> `VGGEncoder` params.

  torchvision's VGG expects (RGB in [0, 1] - ImageNet mean) / std, and the encoder is
  given RGB in [0, 1], so conv0 is that normalisation as a 1x1 convolution: kernel
  diag(1 / std), bias -mean / std. Its features are reproduced only with
  VGGEncoder(padding="zeros"), torchvision's zero padding and floor pooling.
  """
  if any(k.endswith("running_mean") for k in state_dict):
    raise WeightsError("This VGG has batch normalisation (vgg19_bn), whose layout the "
                       "encoder does not have; use torchvision's plain vgg19 weights.")
  features = {}  # 'features.N.weight' -> 'N.weight'; classifier.* is dropped
  for key, value in state_dict.items():
    key = key.removeprefix("module.")
    if key.startswith("features."):
      features[key[len("features."):]] = value
  params = _convert(features, VGG_TORCHVISION_KEYS, "torchvision VGG-19 (features.N)")
  std = np.asarray(IMAGENET_STD, np.float32) / 255.0  # the encoder's input is in [0, 1]
  mean = np.asarray(IMAGENET_MEAN, np.float32) / 255.0
  params["conv0"] = {"kernel": np.diag(1.0 / std).astype(np.float32)[None, None],
                     "bias": (-mean / std).astype(np.float32)}
  return params


def convert_decoder(state_dict):
  """pytorch-AdaIN `decoder.pth` (or a decoder_iter_N.pth.tar state dict) -> `Decoder`."""
  return _convert(state_dict, DECODER_TORCH_KEYS, "the AdaIN decoder.pth")
