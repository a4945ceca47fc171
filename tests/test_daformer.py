"""Every method family trains on MiT-B0 + DAFormer head in miniature (3 compiled steps
each, finite losses, parameters moving), MIC's mask, and the DAFormer config."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from confeti_jax import methods, mic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import daformer_gta2cs, toy  # noqa: E402


def _tiny(method, **method_keys):
  config = toy.get_config(f"method={method},tiny=1")
  config.model.backbone = "mit_b0"
  config.optim.norm_decay = False
  config.train.batch_size = 2  # 3 steps at batch 8 cost as much as compiling the step
  for dotted, value in method_keys.items():
    node = config.method
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, (h, w) = config.train.batch_size, config.data.crop_size
  return {d: {"image": jnp.asarray(rng.integers(0, 256, (b, h, w, 3)), jnp.uint8),
              "label": jnp.asarray(rng.integers(0, 19, (b, h, w)), jnp.uint8)}
          for d in ("source", "target")}


CASES = {
    # DACS with MIC is DAFormer's recipe around DACS (+ the masked target term).
    "dacs_mic": ("dacs", {"mic.enabled": True}, "loss_mic"),
    "confeti": ("confeti", {"pixel_alignment": False, "proto.cam_mix_after": 0,
                            "proto.pcl_after": 0}, "loss_mix_pcl"),
    "cfcontra": ("cfcontra", {"multi_level": False, "contrast.warmup_source_images": 8,
                              "contrast.warmup_target_images": 8}, "loss_contra"),
    # BatchNorm on running statistics; the student must still drop.
    "minent_bn_eval": ("minent", {"multi_level": False, "bn_eval": True}, "loss_ent"),
}
# Steps whose only randomness is the student's dropout / stochastic depth: a second key
# must change the loss, or they would train MiT without DAFormer's regularisation.
DROPOUT_ONLY = ("cfcontra", "minent_bn_eval")


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_trains_three_steps_on_mit_b0(case):
  name, keys, term = CASES[case]
  config = _tiny(name, **keys)
  method = methods.build(config)
  assert "daformer_mit_b0" in method.model_name
  state = jax.jit(method.init_state)(jax.random.key(0))
  step = jax.jit(method.train_step)
  first = jax.device_get(state.seg.params["backbone"]["block4_0"]["attn"]["q"]["kernel"])
  if case in DROPOUT_ONLY:
    losses = [float(step(state, _batch(config), jax.random.key(k))[1]["loss"]) for k in (7, 7, 8)]
    assert losses[0] == losses[1] and losses[0] != losses[2], losses
  for i in range(3):
    state, metrics = step(state, _batch(config, i), jax.random.key(i + 1))
    assert np.isfinite(float(metrics["loss"])), (case, i, metrics)
  assert term in metrics
  assert int(state.step) == 3
  moved = jax.device_get(state.seg.params["backbone"]["block4_0"]["attn"]["q"]["kernel"])
  assert np.abs(moved - first).max() > 0


def test_mic_block_mask_keeps_the_expected_share_in_whole_blocks():
  mask = np.asarray(mic.block_mask(jax.random.key(0), 8, (128, 96), 0.7, 32))
  assert mask.shape == (8, 128, 96, 1) and set(np.unique(mask)) <= {0.0, 1.0}
  blocks = mask[:, ::32, ::32, 0]
  np.testing.assert_array_equal(np.repeat(np.repeat(blocks, 32, 1), 32, 2), mask[..., 0])
  assert 0.15 < blocks.mean() < 0.45  # kept with probability 0.3
  target = jnp.ones((8, 128, 96, 3))
  out = mic.masked_target(jax.random.key(1), target, ratio=0.7, block=32, jitter_strength=0.2,
                          jitter_p=1.0, blur=False)   # jitter never applies at p=1
  kept = np.asarray(out[..., :1]) != 0
  assert 0.15 < kept.mean() < 0.45 and np.allclose(np.asarray(out)[kept[..., 0]], 1.0)


def test_daformer_config_is_the_papers_recipe():
  config = daformer_gta2cs.get_config()
  assert (config.model.backbone, config.model.decoder) == ("mit_b5", "daformer")
  assert (config.train.steps, config.optim.lr, config.optim.warmup_steps) == (40_000, 6e-5, 1500)
  assert not config.optim.norm_decay and config.data.rcs.enabled
  assert tuple(config.data.target.scale) == (1024, 512) and config.method.fd_lambda == 0.005
  assert daformer_gta2cs.get_config("mic=1").method.mic.enabled
  with pytest.raises(ValueError, match="multi_level"):
    methods.build(_tiny("minent"))
