"""The reference schedule and optimiser: mmcv's poly+warm-up numbers, torch AdamW parity."""

import ml_collections
import numpy as np
import optax
import pytest
import torch

from confeti_jax import state as state_lib


def _optim_cfg(**kw):
  cfg = dict(name="adamw", lr=6e-5, head_lr_mult=10.0, weight_decay=0.01, b1=0.9, b2=0.999,
             eps=1e-8, poly_power=1.0, min_lr=0.0, warmup_steps=1500, warmup_ratio=1e-6)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


@pytest.mark.parametrize("step,expected", [
    (0, 6e-5 * 1e-6),                                             # warm-up starts at ratio
    (750, 6e-5 * (1 - 750 / 80000) * (1 - 0.5 * (1 - 1e-6))),     # half-way through warm-up
    (1499, 6e-5 * (1 - 1499 / 80000) * (1 - (1 / 1500) * (1 - 1e-6))),
    (1500, 6e-5 * (1 - 1500 / 80000)),                            # plain poly from here
    (40000, 3e-5),
    (79999, 6e-5 / 80000),
    (80000, 0.0),
])
def test_poly_warmup_matches_mmcv_hand_values(step, expected):
  fn = state_lib.poly_warmup_schedule(6e-5, total_steps=80000, power=1.0, warmup_steps=1500,
                                      warmup_ratio=1e-6)
  np.testing.assert_allclose(float(fn(step)), expected, rtol=1e-5, atol=1e-15)


def test_power_and_min_lr():
  fn = state_lib.poly_warmup_schedule(1.0, total_steps=100, power=0.9, min_lr=0.1)
  np.testing.assert_allclose(float(fn(50)), 0.9 * 0.5 ** 0.9 + 0.1, rtol=1e-6)


def test_heads_get_ten_times_the_rate():
  scheds = state_lib.segmentor_schedules(_optim_cfg(), 80000)
  np.testing.assert_allclose(float(scheds["head"](2000)), 10 * float(scheds["backbone"](2000)),
                             rtol=1e-6)


def test_labels_split_backbone_from_everything_else():
  params = {"backbone": {"conv": {"kernel": 1}}, "aspp_0": {"kernel": 1}, "cam": {"k": 1}}
  labels = state_lib.head_or_backbone(params)
  assert labels == {"backbone": {"conv": {"kernel": "backbone"}}, "aspp_0": {"kernel": "head"},
                    "cam": {"k": "head"}}


def test_adamw_groups_match_torch_adamw():
  """Three steps of our AdamW groups == torch.optim.AdamW with lr groups set per step."""
  rng = np.random.default_rng(0)
  params = {"backbone": {"w": rng.normal(size=(3, 4)).astype(np.float32)},
            "aspp_0": {"w": rng.normal(size=(5,)).astype(np.float32)}}
  grads = [{"backbone": {"w": rng.normal(size=(3, 4)).astype(np.float32)},
            "aspp_0": {"w": rng.normal(size=(5,)).astype(np.float32)}} for _ in range(3)]
  cfg = _optim_cfg(lr=1e-2, warmup_steps=2)
  tx = state_lib.segmentor_optimizer(cfg, total_steps=10)
  group = state_lib.OptGroup.create(params, tx)
  for g in grads:
    group = group.apply_gradients(g)

  tb = torch.tensor(params["backbone"]["w"], requires_grad=True)
  th = torch.tensor(params["aspp_0"]["w"], requires_grad=True)
  opt = torch.optim.AdamW([{"params": [tb]}, {"params": [th]}], lr=1.0, betas=(0.9, 0.999),
                          eps=1e-8, weight_decay=0.01)
  scheds = state_lib.segmentor_schedules(cfg, 10)
  for t, g in enumerate(grads):
    opt.param_groups[0]["lr"] = float(scheds["backbone"](t))
    opt.param_groups[1]["lr"] = float(scheds["head"](t))
    tb.grad = torch.tensor(g["backbone"]["w"])
    th.grad = torch.tensor(g["aspp_0"]["w"])
    opt.step()
  np.testing.assert_allclose(group.params["backbone"]["w"], tb.detach().numpy(), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(group.params["aspp_0"]["w"], th.detach().numpy(), rtol=1e-5,
                             atol=1e-6)


def test_unknown_optimizer_is_an_error():
  with pytest.raises(ValueError, match="optim.name"):
    state_lib.segmentor_optimizer(_optim_cfg(name="sgd_typo"), 10)


def test_optgroup_keeps_tx_static():
  tx = optax.sgd(0.1)
  group = state_lib.OptGroup.create({"w": np.ones(2, np.float32)}, tx)
  import jax
  leaves = jax.tree.leaves(group)
  assert all(hasattr(x, "shape") for x in leaves)
