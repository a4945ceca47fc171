"""2-D convolution layer whose weight gradient XLA:CPU runs at matrix-product speed.

XLA:CPU lowers the weight gradient of `lax.conv_general_dilated` as another convolution
(the batch as input features, the output map as the window). For 1x1 kernels that runs
at a few GFLOP/s (10x slower than PyTorch's), for 3x3 kernels at about half PyTorch's
speed; forward and input gradient run as fast as PyTorch's. On CPU this layer keeps
XLA's forward and input gradient and writes the weight gradient as one matrix product
per kernel tap, dW[i, j] = G^T X_ij: G is the output gradient as (pixels, out), X_ij the
input window of tap (i, j) as (pixels, in). G^T is materialised once behind an
optimisation barrier, because XLA:CPU runs a product that contracts the leading axis of
both operands at half speed and would otherwise fold the transpose back in. 1x1
forwards are an einsum (XLA:CPU's 1x1 convolution is slower than its matrix product).

The per-tap form is slower than XLA's own where one side has few channels (the 3-channel
image convs, a 19-class head: its products are too skinny), so it is used for 1x1
kernels and where both sides have at least `MIN_TAP_CHANNELS` channels. Convolutions to
an image (a few output maps) are the opposite case: XLA:CPU's forward is the skinny
product there, so they run forward as one wide product and a shifted sum and keep XLA's
gradients (`image_output_conv`). `conv_form` says which layer takes which. On GPU and TPU
the layer is the plain `lax.conv_general_dilated` that `flax.linen.Conv` emits, so their
compilers see exactly what they did before. Same parameters (`kernel` HWIO, `bias`),
same maths; the gradients agree with XLA's to float32 rounding (tests/test_conv.py).
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# Measured on this 2-core CPU (scripts/compare_torch.py --ops and the per-layer timings in
# the commit): the per-tap weight gradient wins from 32 channels on both sides, loses with
# 3 input channels (2.5x) or 19 output channels (1.5-2x).
MIN_TAP_CHANNELS = 32
# Stride-1 convolutions to at most this many maps (images, score maps) take `conv_form`'s
# 'to_image' form.
IMAGE_CHANNELS = 4


def on_cpu():
  """Whether the CPU-only formulations of this module (and DeepLabV2's head) apply."""
  return jax.default_backend() == "cpu"


def compiler_options():
  """XLA options the CPU formulations rely on, for every `jax.jit` of a model (None off CPU).

  XLA:CPU removes optimisation barriers before fusion unless its barrier expander is
  off; `own_buffer` (residual block outputs) needs its barriers to survive fusion.
  """
  return {"xla_disable_hlo_passes": "cse_barrier_expander"} if on_cpu() else None


def own_buffer(x):
  """x, kept in its own buffer on CPU (an optimisation barrier; no value changes).

  Left to itself XLA:CPU fuses each residual block's output sum into the next block's
  and so on down a stage: the last block of ResNet-101's layer3 recomputed the
  elementwise chain of all 23 (1.4 s forward and 0.9 s backward of a 256^2 step). For
  residual block outputs; needs `compiler_options` to survive.
  """
  return lax.optimization_barrier(x) if on_cpu() else x


def _pairs(padding):
  """int p -> ((p, p), (p, p)); pairs pass through."""
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  return tuple(tuple(int(v) for v in p) for p in padding)


def plain_conv(x, kernel, stride, padding, dilation):
  """XLA's convolution, as `flax.linen.Conv` emits it (no bias)."""
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                  rhs_dilation=(dilation, dilation),
                                  dimension_numbers=_DIMENSIONS)


def _forward(x, kernel, stride, padding, dilation):
  if kernel.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)):
    return jnp.einsum("nhwc,cd->nhwd", x[:, ::stride, ::stride, :], kernel[0, 0])
  return plain_conv(x, kernel, stride, padding, dilation)


def tap_weight_grad(x, g, kernel_shape, stride, padding, dilation):
  """dL/dW of the convolution from its input `x` and output gradient `g`, tap by tap."""
  kh, kw, cin, cout = kernel_shape
  n, ho, wo, _ = g.shape
  if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)) and cin < cout:
    # Transpose the smaller side: XLA:CPU transposes slowly.
    xt = lax.optimization_barrier(x[:, ::stride, ::stride, :].reshape(-1, cin).T)
    dw = jnp.dot(xt, g.reshape(-1, cout), preferred_element_type=jnp.float32)
    return dw.reshape(kernel_shape).astype(x.dtype)
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  gt = lax.optimization_barrier(g.reshape(-1, cout).T)  # (out, pixels), laid out as such
  taps = []
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(xp, (0, i * dilation, j * dilation, 0),
                         (n, i * dilation + stride * (ho - 1) + 1,
                          j * dilation + stride * (wo - 1) + 1, cin), (1, stride, stride, 1))
      taps.append(jnp.dot(gt, window.reshape(-1, cin), preferred_element_type=jnp.float32))
  dw = jnp.stack(taps).reshape(kh, kw, cout, cin).transpose(0, 1, 3, 2)
  return dw.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _tap_conv(x, kernel, stride, padding, dilation):
  return _forward(x, kernel, stride, padding, dilation)


def _tap_conv_fwd(x, kernel, stride, padding, dilation):
  return _forward(x, kernel, stride, padding, dilation), (x, kernel)


def _tap_conv_bwd(stride, padding, dilation, residuals, g):
  x, kernel = residuals
  dx = jax.vjp(lambda x: _forward(x, kernel, stride, padding, dilation), x)[1](g)[0]
  dw = tap_weight_grad(x, g, kernel.shape, stride, padding, dilation)
  return dx, dw.astype(kernel.dtype)


_tap_conv.defvjp(_tap_conv_fwd, _tap_conv_bwd)


def conv_form(kernel_size, in_channels, out_channels, stride=1, backend=None):
  """How `conv2d` computes a convolution: 'xla', 'tap' or 'to_image'.

  Off CPU always 'xla'. On CPU: 1x1 kernels and convolutions with `MIN_TAP_CHANNELS` on
  both sides take the per-tap weight gradient ('tap'); stride-1 convolutions to at most
  `IMAGE_CHANNELS` maps (CUT's 7x7 output conv, PatchGAN's score conv, AdaIN's decoder
  output) take `image_output_conv`'s forward ('to_image'); the rest, the image-input
  stems among them (XLA:CPU runs those at matrix-product speed), take 'xla'.
  """
  if (backend or jax.default_backend()) != "cpu":
    return "xla"
  if kernel_size > 1 and out_channels <= IMAGE_CHANNELS and stride == 1:
    return "to_image"
  if kernel_size == 1 or min(in_channels, out_channels) >= MIN_TAP_CHANNELS:
    return "tap"
  return "xla"


def conv2d(x, kernel, *, stride=1, padding=0, dilation=1, form=None):
  """NHWC x HWIO convolution; `form=None` picks the formulation by `conv_form`."""
  padding = _pairs(padding)
  kh, _, cin, cout = kernel.shape
  form = form or conv_form(kh, cin, cout, stride)
  if form == "tap":
    return _tap_conv(x, kernel, stride, padding, dilation)
  if form == "to_image":
    if stride != 1:
      raise ValueError("the to_image form is for stride-1 convolutions")
    return image_output_conv(x, kernel, padding, dilation)
  if form != "xla":
    raise ValueError(f"unknown convolution form {form!r}")
  return plain_conv(x, kernel, stride, padding, dilation)


def _shift_last_two(x, dy, dx, h, w):
  """x[..., i + dy, j + dx] for i < h, j < w, zero outside x: one lax.pad, whose
  negative padding crops."""
  config = [(0, 0, 0)] * (x.ndim - 2) + [(-dy, h - x.shape[-2] + dy, 0),
                                         (-dx, w - x.shape[-1] + dx, 0)]
  return lax.pad(x, jnp.zeros((), x.dtype), config)


def _image_output_forward(x, kernel, padding, dilation):
  """One product of x with every tap's outputs, laid out channels-major (tap, out, n, h,
  w), then the taps' maps shifted along their wide minor axes and summed in float32."""
  k, _, cin, cout = kernel.shape
  n, h, w, _ = x.shape
  ho = h + sum(padding[0]) - dilation * (k - 1)
  wo = w + sum(padding[1]) - dilation * (k - 1)
  per_tap = jnp.einsum("tc,nhwc->tnhw", kernel.transpose(0, 1, 3, 2).reshape(-1, cin), x)
  per_tap = per_tap.reshape(k * k, cout, n, h, w)
  out = sum(_shift_last_two(per_tap[i * k + j].astype(jnp.float32),
                            i * dilation - padding[0][0], j * dilation - padding[1][0], ho, wo)
            for i in range(k) for j in range(k))
  return out.transpose(1, 2, 3, 0).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def image_output_conv(x, kernel, padding, dilation):
  """A stride-1 convolution to a few maps, whose forward XLA:CPU runs as a skinny
  product (CUT's 64 -> 3 7x7 at 1.8 GFLOP/s); this forward is 20x faster there. The
  gradients are XLA's own, which run at full speed. Same maths, another summation order.
  """
  return _image_output_forward(x, kernel, padding, dilation)


def _image_output_fwd(x, kernel, padding, dilation):
  return _image_output_forward(x, kernel, padding, dilation), (x, kernel)


def _image_output_bwd(padding, dilation, residuals, g):
  x, kernel = residuals
  return jax.vjp(lambda x, w: plain_conv(x, w, 1, padding, dilation), x, kernel)[1](g)


image_output_conv.defvjp(_image_output_fwd, _image_output_bwd)


def _shift(x, dy, dx, h, w):
  """x[:, i + dy, j + dx] for i < h, j < w, zero outside x (any integer offsets)."""
  pad_y, pad_x = max(abs(dy), 0), max(abs(dx), 0)
  xp = jnp.pad(x, ((0, 0), (pad_y, pad_y), (pad_x, pad_x), (0, 0)))
  return xp[:, pad_y + dy:pad_y + dy + h, pad_x + dx:pad_x + dx + w, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _shifted_sum(per_tap, offsets):
  """sum_t per_tap[..., t, :] shifted by offsets[t]; its gradient is the opposite shifts,
  side by side (autodiff would emit one padded copy per tap and sum them)."""
  h, w = per_tap.shape[1:3]
  return sum(_shift(per_tap[:, :, :, t, :], dy, dx, h, w)
             for t, (dy, dx) in enumerate(offsets))


def _shifted_sum_fwd(per_tap, offsets):
  return _shifted_sum(per_tap, offsets), None


def _shifted_sum_bwd(offsets, _, g):
  h, w = g.shape[1:3]
  return (jnp.stack([_shift(g, -dy, -dx, h, w) for dy, dx in offsets], axis=3),)


_shifted_sum.defvjp(_shifted_sum_fwd, _shifted_sum_bwd)


def summed_dilated_conv(x, kernels, dilations):
  """sum_b conv(x, kernels[b], dilation=dilations[b], 'same' padding): DeepLabV2's head.

  Written as one matrix product of x with every tap of every kernel side by side, then
  a shifted sum of the per-tap maps. A 2048 -> 19 convolution is too skinny a product
  for XLA:CPU (12 GFLOP/s); this one is 36x wider. Same maths, another summation order;
  the per-tap maps are summed in float32.
  """
  k, cin, cout = kernels[0].shape[0], kernels[0].shape[2], kernels[0].shape[3]
  n, h, w, _ = x.shape
  taps = len(kernels) * k * k
  stacked = jnp.stack(kernels).transpose(3, 0, 1, 2, 4).reshape(1, 1, cin, taps * cout)
  per_tap = conv2d(x, stacked, form="tap").astype(jnp.float32)
  c = (k - 1) // 2
  offsets = tuple(((i - c) * d, (j - c) * d) for d in dilations
                  for i in range(k) for j in range(k))
  return _shifted_sum(per_tap.reshape(n, h, w, taps, cout), offsets)


def conv_params(module, in_channels, features, kernel_size, use_bias, kernel_init, bias_init):
  """(kernel, bias or None) created in `module`'s scope exactly as nn.Conv creates them."""
  kernel = module.param("kernel", kernel_init,
                        (kernel_size, kernel_size, in_channels, features), jnp.float32)
  bias = module.param("bias", bias_init, (features,), jnp.float32) if use_bias else None
  return kernel, bias


class ConvParams(nn.Module):
  """A convolution's parameters alone, for layers computed together (the summed head)."""

  features: int
  kernel_size: int
  use_bias: bool = False
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, in_channels):
    return conv_params(self, in_channels, self.features, self.kernel_size, self.use_bias,
                       self.kernel_init, self.bias_init)


class Conv(nn.Module):
  """`flax.linen.Conv` for square kernels and explicit padding, with `conv2d` inside.

  Parameters are created exactly as `nn.Conv` creates them (names, shapes, float32,
  initialisers), so checkpoints and weight converters see no difference.
  """

  features: int
  kernel_size: int
  stride: int = 1
  padding: Any = 0
  dilation: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel, bias = conv_params(self, x.shape[-1], self.features, self.kernel_size,
                               self.use_bias, self.kernel_init, self.bias_init)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = conv2d(x, kernel, stride=self.stride, padding=self.padding, dilation=self.dilation)
    if bias is not None:
      y = y + jnp.reshape(bias.astype(self.dtype), (1, 1, 1, self.features))
    return y
