"""CUT networks (Park et al. 2020) as CONFETI vendors them (docs/reference_code.md §4.2).

* `ResnetGenerator`: 'resnet_9blocks' with InstanceNorm (affine=False), reflect padding,
  anti-aliased down-sampling (stride-1 conv, then `Downsample`) and up-sampling
  (`Upsample`, then a stride-1 conv), final tanh; every conv has a bias.
* `NLayerDiscriminator`: the 'basic' PatchGAN, 4x4 convs with zero padding 1, LeakyReLU
  0.2, InstanceNorm after all but the first and last convs, anti-aliased the same way.
* `PatchSampleMLP`: netF 'mlp_sample', per tap Linear-ReLU-Linear on sampled patches,
  then x / (|x| + 1e-7).

PatchNCE reads generator features by their index in the reference's `nn.Sequential`
(nce_layers 0,4,8,12,16), so `generator_layers` rebuilds that list once and both the
forward pass and the weight converter read it. The anti-aliasing filters are fixed
binomials, not parameters. Init is the reference's xavier_normal (gain 0.02), bias 0;
the real runs load trained weights.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from confeti_jax import losses
from confeti_jax.models.conv import Conv, own_buffer
from confeti_jax.weights import WeightsError

# torch init.xavier_normal_(gain=0.02): std = gain * sqrt(2 / (fan_in + fan_out)).
xavier_init = nn.initializers.variance_scaling(0.02**2, "fan_avg", "normal")


def binomial_filter(size):
  """The reference's `get_filter`: outer product of a binomial row, summing to 1."""
  row = np.array([[1.0], [1.0, 1.0], [1.0, 2.0, 1.0], [1.0, 3.0, 3.0, 1.0]][size - 1])
  filt = row[:, None] * row[None, :]
  return filt / filt.sum()


def _pad(x, p, mode):
  return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode=mode)


def instance_norm(x, eps=1e-5):
  """InstanceNorm2d(affine=False): per image and channel over H, W, biased variance."""
  f = x.astype(jnp.float32)
  mean = jnp.mean(f, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(f - mean), axis=(1, 2), keepdims=True)
  return ((f - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _downsample_axis(x, axis):
  """Stride-2 [1,2,1]/4 along `axis` of an already padded array (valid positions only)."""
  n_out = (x.shape[axis] - 3) // 2 + 1
  tap = lambda start: jax.lax.slice_in_dim(x, start, start + 2 * (n_out - 1) + 1, 2, axis)
  return (tap(0) + 2.0 * tap(1) + tap(2)) * 0.25


class Downsample(nn.Module):
  """Blur-pool: reflect pad 1, depthwise 3x3 binomial [1,2,1]x[1,2,1]/16, stride 2.

  Computed as two strided 1-D passes of the separable filter (the same numbers; their
  gradients avoid the dilated depthwise convolution XLA's CPU backend runs slowly).
  """

  @nn.compact
  def __call__(self, x):
    return _downsample_axis(_downsample_axis(_pad(x, 1, "reflect"), 1), 2)


def _upsample_axis(x, axis):
  """x2 along `axis` with the 1-D [1,3,3,1]/4 polyphase taps of `Upsample` (edge-replicated):
  output 2a = (x[a-1] + 3 x[a]) / 4, output 2a+1 = (3 x[a] + x[a+1]) / 4."""
  n = x.shape[axis]
  take = lambda idx: jnp.take(x, jnp.asarray(idx), axis=axis)
  prev = take(np.maximum(np.arange(n) - 1, 0))
  nxt = take(np.minimum(np.arange(n) + 1, n - 1))
  even, odd = (prev + 3.0 * x) * 0.25, (3.0 * x + nxt) * 0.25
  out = jnp.stack([even, odd], axis=axis + 1)
  return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])


class Upsample(nn.Module):
  """x2 anti-aliased up-sampling: replicate pad 1, depthwise transposed conv (stride 2,
  padding 2) with [1,3,3,1]x[1,3,3,1]/64 * 4, then the reference's crop [1:, 1:] and
  [:-1, :-1]: an H x W input gives 2H x 2W.

  The filter is fixed and separable, so the transposed convolution is computed as its
  two 1-D polyphase passes: the same numbers as torch's (tests/test_cut.py), where
  XLA's CPU backend runs the dilated depthwise convolution about 10x slower.
  """

  @nn.compact
  def __call__(self, x):
    return _upsample_axis(_upsample_axis(x, 1), 2)


class Layer(NamedTuple):
  """One entry of a reference `nn.Sequential`: kind, flax name (convs, blocks), width."""

  kind: str
  name: str = ""
  features: int = 0


def generator_layers(ngf=64, n_blocks=9):
  """The reference generator's `nn.Sequential`, index for index (NCE taps index it)."""
  layers = [Layer("pad3"), Layer("conv7", "conv_in", ngf), Layer("norm"), Layer("relu")]
  for i in range(2):
    layers += [Layer("conv3", f"down{i + 1}", ngf * 2 ** (i + 1)), Layer("norm"),
               Layer("relu"), Layer("down")]
  layers += [Layer("block", f"block_{i}", ngf * 4) for i in range(n_blocks)]
  for i in range(2):
    layers += [Layer("up"), Layer("conv3", f"up{i + 1}", ngf * 2 ** (1 - i)), Layer("norm"),
               Layer("relu")]
  return layers + [Layer("pad3"), Layer("conv7", "conv_out", 3), Layer("tanh")]


def discriminator_layers(ndf=64, n_layers=3):
  """The reference PatchGAN's `nn.Sequential`, index for index."""
  layers = [Layer("conv4", "conv_0", ndf), Layer("lrelu"), Layer("down")]
  for n in range(1, n_layers):
    layers += [Layer("conv4", f"conv_{n}", ndf * min(2**n, 8)), Layer("norm"), Layer("lrelu"),
               Layer("down")]
  layers += [Layer("conv4", f"conv_{n_layers}", ndf * min(2**n_layers, 8)), Layer("norm"),
             Layer("lrelu")]
  return layers + [Layer("conv4", f"conv_{n_layers + 1}", 1)]


def _conv(features, kernel, padding, dtype, name):
  return Conv(features, kernel, padding=padding, use_bias=True, dtype=dtype,
              kernel_init=xavier_init, name=name)


class ResnetBlock(nn.Module):
  """x + [reflpad1 - conv3x3 - IN - ReLU - reflpad1 - conv3x3 - IN](x)."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = _conv(self.features, 3, 0, self.dtype, "conv1")(_pad(x, 1, "reflect"))
    y = nn.relu(instance_norm(y))
    y = _conv(self.features, 3, 0, self.dtype, "conv2")(_pad(y, 1, "reflect"))
    return own_buffer(x + instance_norm(y))


_REMAT_BLOCK = nn.remat(ResnetBlock)


def check_nce_layers(nce_layers, num_layers):
  layers = tuple(int(i) for i in nce_layers)
  if list(layers) != sorted(set(layers)) or any(not 0 <= i < num_layers for i in layers):
    raise ValueError(f"nce_layers={layers} must be increasing indices of the generator's "
                     f"{num_layers} layers (reference: 0,4,8,12,16 for 9 blocks).")
  return layers


class ResnetGenerator(nn.Module):
  """The CUT generator: [-1, 1] NHWC image -> (translated image, taps).

  Attributes:
    ngf: width of the first conv (64; small for toys); n_blocks: ResNet blocks (9).
    dtype: compute dtype; parameters, normalisation statistics and the image are float32.
    remat: recompute each ResNet block in the backward pass (less activation memory).
  """

  ngf: int = 64
  n_blocks: int = 9
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, nce_layers=(), encode_only=False):
    """Returns (image or None with encode_only, tuple of the features at nce_layers).

    Taps are the outputs of the reference `nn.Sequential` entries: 0 = reflect-padded
    input, 4 = first down conv (pre-norm), 8 = second, 12 = first ResBlock, 16 = fifth.
    With encode_only the pass stops after the last tap, as the reference does.
    """
    layers = generator_layers(self.ngf, self.n_blocks)
    wanted = check_nce_layers(nce_layers, len(layers))
    stop = wanted[-1] if (encode_only and wanted) else len(layers) - 1
    block_cls = _REMAT_BLOCK if self.remat else ResnetBlock
    x = x.astype(self.dtype)
    taps = []
    for index, layer in enumerate(layers[:stop + 1]):
      if layer.kind == "pad3":
        x = _pad(x, 3, "reflect")
      elif layer.kind in ("conv7", "conv3"):
        kernel, padding = (7, 0) if layer.kind == "conv7" else (3, 1)
        x = _conv(layer.features, kernel, padding, self.dtype, layer.name)(x)
      elif layer.kind == "norm":
        x = instance_norm(x)
      elif layer.kind == "relu":
        x = nn.relu(x)
      elif layer.kind == "down":
        x = Downsample()(x)
      elif layer.kind == "up":
        x = Upsample()(x)
      elif layer.kind == "block":
        x = block_cls(layer.features, self.dtype, name=layer.name)(x)
      elif layer.kind == "tanh":
        x = jnp.tanh(x.astype(jnp.float32))
      if index in wanted:
        taps.append(x)
    return (None if encode_only else x.astype(jnp.float32)), tuple(taps)


class NLayerDiscriminator(nn.Module):
  """PatchGAN (n_layers 3, ndf 64): [-1, 1] image -> [B, h, w, 1] real/fake scores."""

  ndf: int = 64
  n_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.astype(self.dtype)
    for layer in discriminator_layers(self.ndf, self.n_layers):
      if layer.kind == "conv4":
        x = _conv(layer.features, 4, 1, self.dtype, layer.name)(x)
      elif layer.kind == "norm":
        x = instance_norm(x)
      elif layer.kind == "lrelu":
        x = nn.leaky_relu(x, 0.2)
      elif layer.kind == "down":
        x = Downsample()(x)
    return x.astype(jnp.float32)


def sample_patch_ids(key, taps, num_patches):
  """Per tap, min(num_patches, H*W) distinct positions in random order.

  The reference takes np.random.permutation(H*W)[:num_patches]; the n positions with
  the largest of H*W random 32-bit numbers are a draw from the same distribution
  (ties, which would favour lower indices, are rare), from one key and in fixed shapes.
  One draw serves every image of the batch.
  """
  sizes = [t.shape[1] * t.shape[2] for t in taps]
  bits = jax.random.bits(key, (sum(sizes),), jnp.uint32)
  ids, offset = [], 0
  for size in sizes:
    # top_k orders by signed value; flipping the top bit makes that the unsigned order.
    keys = jax.lax.bitcast_convert_type(bits[offset:offset + size] ^ np.uint32(2**31),
                                        jnp.int32)
    ids.append(jax.lax.top_k(keys, min(num_patches, size))[1])
    offset += size
  return tuple(ids)


def xavier_params(key, shapes):
  """Parameters of the given abstract tree: every 'kernel' xavier_normal (gain 0.02), the
  rest 0. All kernels come from one normal draw: one random-number kernel to compile
  instead of one per layer (seconds each on a small CPU)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  is_kernel = [str(getattr(path[-1], "key", path[-1])) == "kernel" for path, _ in leaves]
  total = sum(int(np.prod(s.shape)) for (_, s), k in zip(leaves, is_kernel) if k)
  noise = jax.random.normal(key, (max(total, 1),), jnp.float32)
  out, offset = [], 0
  for (_, s), kernel in zip(leaves, is_kernel):
    if not kernel:
      out.append(jnp.zeros(s.shape, s.dtype))
      continue
    size = int(np.prod(s.shape))
    receptive = int(np.prod(s.shape[:-2]))
    fan_in, fan_out = receptive * s.shape[-2], receptive * s.shape[-1]
    std = 0.02 * np.sqrt(2.0 / (fan_in + fan_out))
    out.append((noise[offset:offset + size] * std).reshape(s.shape).astype(s.dtype))
    offset += size
  return jax.tree_util.tree_unflatten(treedef, out)


class PatchSampleMLP(nn.Module):
  """netF 'mlp_sample': taps + patch ids -> per tap [B * n, features] unit vectors.

  Row order is image-major (image b's n patches, then image b + 1's), as the reference's
  `feat[:, ids].flatten(0, 1)`, which PatchNCE's per-image reshape relies on.
  """

  features: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, taps, patch_ids):
    out = []
    for i, (feat, ids) in enumerate(zip(taps, patch_ids)):
      b, h, w, c = feat.shape
      x = feat.reshape(b, h * w, c)[:, ids].reshape(-1, c)
      dense = lambda name: nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32,
                                    kernel_init=xavier_init, bias_init=nn.initializers.zeros,
                                    name=f"mlp_{i}_{name}")
      x = dense("fc2")(nn.relu(dense("fc1")(x))).astype(jnp.float32)
      out.append(x / (losses.safe_norm(x) + 1e-7))
    return tuple(out)


# ----------------------------------------------------------------------------------------
# Weight import: CUT's latest_net_{G,D,F}.pth state dicts -> params.


def _strip(state_dict):
  return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _check_filters(state_dict, layers, what):
  """The anti-aliasing buffers ('model.N.filt') must be the fixed binomials used here."""
  for index, layer in enumerate(layers):
    key = f"model.{index}.filt"
    if layer.kind in ("down", "up") and key in state_dict:
      filt = binomial_filter(3) if layer.kind == "down" else binomial_filter(4) * 4.0
      if not np.allclose(np.asarray(state_dict[key])[:, 0], filt[None], atol=1e-6):
        raise WeightsError(f"{what}: buffer {key} is not the reference anti-aliasing filter.")


def _conv_params(state_dict, prefix, used):
  weight, bias = f"{prefix}.weight", f"{prefix}.bias"
  used.update((weight, bias))
  return {"kernel": np.ascontiguousarray(
              np.asarray(state_dict[weight], np.float32).transpose(2, 3, 1, 0)),
          "bias": np.asarray(state_dict[bias], np.float32)}


def _convert_sequential(state_dict, layers, what):
  """Conv / ResnetBlock params of a reference nn.Sequential under keys 'model.N...'."""
  _check_filters(state_dict, layers, what)
  wanted = []
  for index, layer in enumerate(layers):
    if layer.kind == "block":
      wanted += [f"model.{index}.conv_block.{j}.{p}" for j in (1, 5) for p in ("weight", "bias")]
    elif layer.kind.startswith("conv"):
      wanted += [f"model.{index}.{p}" for p in ("weight", "bias")]
  missing = [k for k in wanted if k not in state_dict]
  if missing:
    raise WeightsError(f"{what}: the state dict lacks {missing[:6]} (expected the CUT "
                       f"nn.Sequential keys, e.g. {wanted[:2]}).")
  params, used = {}, set()
  for index, layer in enumerate(layers):
    if layer.kind == "block":
      params[layer.name] = {f"conv{n}": _conv_params(state_dict, f"model.{index}.conv_block.{j}",
                                                     used) for n, j in ((1, 1), (2, 5))}
    elif layer.kind.startswith("conv"):
      params[layer.name] = _conv_params(state_dict, f"model.{index}", used)
  unexpected = [k for k in state_dict if k not in used and not k.endswith(".filt")]
  if unexpected:
    raise WeightsError(f"{what}: {len(unexpected)} keys do not belong to this network, e.g. "
                       f"{unexpected[:6]}.")
  return params


def convert_generator(state_dict: Mapping[str, np.ndarray]):
  """latest_net_G.pth (ResnetGenerator, any ngf / number of blocks) -> generator params."""
  sd = _strip(state_dict)
  if "model.1.weight" not in sd:
    raise WeightsError("CUT generator: no 'model.1.weight' (the 7x7 input conv); is this "
                       "a CUT latest_net_G.pth?")
  ngf = int(np.asarray(sd["model.1.weight"]).shape[0])
  n_blocks = len({k.split(".")[1] for k in sd if ".conv_block." in k})
  return _convert_sequential(sd, generator_layers(ngf, n_blocks), "CUT latest_net_G.pth")


def convert_discriminator(state_dict: Mapping[str, np.ndarray]):
  """latest_net_D.pth (NLayerDiscriminator, any ndf / n_layers) -> discriminator params."""
  sd = _strip(state_dict)
  if "model.0.weight" not in sd:
    raise WeightsError("CUT discriminator: no 'model.0.weight'; is this latest_net_D.pth?")
  ndf = int(np.asarray(sd["model.0.weight"]).shape[0])
  n_convs = len({k.split(".")[1] for k in sd if k.endswith(".weight")})
  return _convert_sequential(sd, discriminator_layers(ndf, n_convs - 2), "CUT latest_net_D.pth")


def convert_patch_mlp(state_dict: Mapping[str, np.ndarray]):
  """latest_net_F.pth (PatchSampleF, keys mlp_I.0 / mlp_I.2) -> PatchSampleMLP params."""
  sd, params = _strip(state_dict), {}
  for key, value in sd.items():
    parts = key.split(".")
    if len(parts) != 3 or not parts[0].startswith("mlp_") or parts[1] not in ("0", "2"):
      raise WeightsError(f"CUT latest_net_F.pth: unexpected key {key!r} (expected "
                         "mlp_I.0.weight/bias and mlp_I.2.weight/bias).")
    value = np.asarray(value, np.float32)
    leaf = {"weight": ("kernel", np.ascontiguousarray(value.T)), "bias": ("bias", value)}
    name, array = leaf[parts[2]]
    fc = "fc1" if parts[1] == "0" else "fc2"
    params.setdefault(f"{parts[0]}_{fc}", {})[name] = array
  if not params:
    raise WeightsError("CUT latest_net_F.pth: no mlp_I.* keys found.")
  return params
