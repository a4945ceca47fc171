"""ADVENT MinEnt: entropy against numpy, CE and upsampling against torch, ADVENT's SGD
against torch.optim.SGD, the multi-level head, BatchNorm modes and a 3-step run."""

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from confeti_jax import losses, methods, train
from confeti_jax import state as state_lib
from confeti_jax.methods import minent
from confeti_jax.models import DeepLabV2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import minent_gta2cs, toy  # noqa: E402


def test_entropy_matches_advent_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=4.0, size=(2, 5, 6, 19)).astype(np.float32)
  logits[0, 0, 0] = [60.0] + [-60.0] * 18  # a saturated pixel: p = 0 entries
  e = np.exp(logits - logits.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  # ADVENT utils/loss.py: -sum p log2(p + 1e-30) / (n h w log2 C)
  expected_map = -np.sum(p * np.log2(p + 1e-30), axis=-1) / np.log2(19)
  got_map = losses.entropy_map(jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(got_map), expected_map, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(losses.entropy_loss(jnp.asarray(logits))),
                             expected_map.mean(), rtol=1e-5)
  assert float(got_map.max()) <= 1.0 + 1e-6  # uniform would be exactly 1
  uniform = losses.entropy_map(jnp.zeros((1, 1, 1, 19)))
  np.testing.assert_allclose(float(uniform[0, 0, 0]), 1.0, rtol=1e-6)


def test_upsampled_valid_mean_cross_entropy_matches_torch():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 4, 5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, size=(2, 15, 18)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.4] = 255
  up = minent.upsample(jnp.asarray(logits), (15, 18))
  t_up = F.interpolate(torch.from_numpy(logits).permute(0, 3, 1, 2), size=(15, 18),
                       mode="bilinear", align_corners=True)
  np.testing.assert_allclose(np.asarray(up), t_up.permute(0, 2, 3, 1).numpy(), rtol=1e-5,
                             atol=1e-5)
  got = minent.valid_mean_cross_entropy(up, jnp.asarray(labels))
  expected = F.cross_entropy(t_up, torch.from_numpy(labels).long(), ignore_index=255)
  np.testing.assert_allclose(float(got), expected.item(), rtol=1e-5)
  all_ignored = minent.valid_mean_cross_entropy(up, jnp.full(labels.shape, 255))
  assert float(all_ignored) == 0.0


def test_sgd_matches_torch_with_frozen_bn_and_heads_x10():
  """ADVENT's optimiser: torch SGD(momentum 0.9, wd 5e-4 coupled), heads at 10x, poly 0.9
  over schedule_steps; BN scale/bias (requires_grad=False in ADVENT) never move."""
  optim = minent_gta2cs.get_config().optim
  optim.lr, optim.schedule_steps = 1e-2, 10
  rng = np.random.default_rng(2)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  params = {"backbone": {"layer1_0": {"conv1": {"kernel": f32(3, 3, 2, 4)},
                                      "bn1": {"scale": f32(4), "bias": f32(4)}},
                         "stem_bn1": {"scale": f32(4), "bias": f32(4)}},
            "aspp_0": {"kernel": f32(3, 3, 4, 5), "bias": f32(5)}}
  grads = [jax.tree.map(lambda x: f32(*x.shape), params) for _ in range(3)]
  group = state_lib.OptGroup.create(params, state_lib.segmentor_optimizer(optim, 100))
  for g in grads:
    group = group.apply_gradients(g)

  conv = torch.tensor(params["backbone"]["layer1_0"]["conv1"]["kernel"], requires_grad=True)
  hk = torch.tensor(params["aspp_0"]["kernel"], requires_grad=True)
  hb = torch.tensor(params["aspp_0"]["bias"], requires_grad=True)
  opt = torch.optim.SGD([{"params": [conv]}, {"params": [hk, hb]}], lr=1.0, momentum=0.9,
                        weight_decay=5e-4)
  for t, g in enumerate(grads):
    lr = 1e-2 * (1 - t / 10) ** 0.9  # ADVENT lr_poly
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr, 10 * lr
    conv.grad = torch.tensor(g["backbone"]["layer1_0"]["conv1"]["kernel"])
    hk.grad, hb.grad = torch.tensor(g["aspp_0"]["kernel"]), torch.tensor(g["aspp_0"]["bias"])
    opt.step()
  out = group.params
  np.testing.assert_allclose(out["backbone"]["layer1_0"]["conv1"]["kernel"],
                             conv.detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["aspp_0"]["kernel"], hk.detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["aspp_0"]["bias"], hb.detach().numpy(), rtol=1e-5, atol=1e-6)
  for bn in (("layer1_0", "bn1"), ("stem_bn1",)):
    node, ref = out["backbone"], params["backbone"]
    for name in bn:
      node, ref = node[name], ref[name]
    jax.tree.map(np.testing.assert_array_equal, node, ref)
  with pytest.raises(ValueError, match="sgd"):
    optim.name = "lamb"
    state_lib.segmentor_optimizer(optim, 100)


class _AuxOnly(DeepLabV2):
  """DeepLabV2's layer3 classifier applied to given features (no backbone to compile)."""

  @nn.compact
  def __call__(self, x, *, train):
    return self._summed_aspp(x, "aux_aspp")


def test_multi_level_head_is_a_summed_aspp_on_layer3():
  """ADVENT's layer3 classifier: four dilated 3x3 convs summed, named aux_aspp_K; the
  default model has none. Shapes by eval_shape, numbers on the head alone (cheap)."""
  model = DeepLabV2(num_classes=4, backbone="resnet18", width=0.125, aux_classifier=True)
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(1))
  assert {k for k in shapes["params"] if k.startswith("aux_")} == {
      f"aux_aspp_{k}" for k in range(4)}
  _, feats = jax.eval_shape(lambda v: model.apply(v, x, train=False), shapes)
  assert feats["logits_aux"].shape == (1, 4, 4, 4) == feats["layer3"].shape[:3] + (4,)
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32),
                        {k: v for k, v in shapes["params"].items() if k.startswith("aux_")})
  layer3 = jnp.asarray(rng.normal(size=feats["layer3"].shape), jnp.float32)
  got = _AuxOnly(num_classes=4).apply({"params": params}, layer3, train=False)
  expected = 0.0
  for k, d in enumerate((6, 12, 18, 24)):
    p = params[f"aux_aspp_{k}"]
    expected = expected + jax.lax.conv_general_dilated(
        layer3, p["kernel"], (1, 1), ((d, d), (d, d)), rhs_dilation=(d, d),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest") + p["bias"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
  plain = DeepLabV2(num_classes=4, backbone="resnet18", width=0.125)
  shapes = jax.eval_shape(lambda k: plain.init(k, x, train=False), jax.random.key(1))
  assert not any(k.startswith("aux_") for k in shapes["params"])


class _TinySegmentor(nn.Module):
  """Conv - BatchNorm with the segmentor's (logits, features) interface: cheap to compile."""

  @nn.compact
  def __call__(self, x, *, train):
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Conv(4, (3, 3))(x))
    return y, {"logits_aux": y, "layer4": y}


def test_bn_modes():
  """bn_eval=False (ADVENT: train-mode BN) updates the statistics; True keeps them and
  normalises with them, as evaluation does."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  for bn_eval in (False, True):
    config = toy.get_config("method=minent,tiny=1")
    config.method.bn_eval = bn_eval
    method = methods.build(config)
    method.model = _TinySegmentor()
    variables = method.model.init(jax.random.key(0), x, train=False)
    logits, _, stats = method.forward(variables["params"], variables["batch_stats"], x)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), stats,
                                           variables["batch_stats"]))
    assert any(changed) != bn_eval
    if bn_eval:
      reference, _ = method.model.apply(variables, x, train=False)
    else:
      (reference, _), _ = method.model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), rtol=1e-6)


def test_end_to_end_three_steps(tmp_path):
  config = toy.get_config("method=minent,tiny=1")
  config.data.toy.cache_dir = str(tmp_path / "cache")
  config.data.crop_size = (32, 32)  # compile-bound: small crops, one (final) checkpoint
  config.train.checkpoint_every_steps = 100
  workdir = str(tmp_path / "run")
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 3
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3]
  for r in rows:
    expected = (r["loss_src_seg"] + 0.1 * r["loss_src_seg_aux"] + 1e-3 * r["loss_ent"]
                + 2e-4 * r["loss_ent_aux"])
    np.testing.assert_allclose(r["loss"], expected, rtol=1e-5)
    assert 0.0 < r["loss_ent"] <= 1.0
  with open(os.path.join(workdir, "eval", "latest.json")) as f:
    result = json.load(f)
  assert result["step"] == 3 and result["model"].startswith("minent/")
