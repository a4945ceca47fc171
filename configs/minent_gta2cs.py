"""ADVENT MinEnt, GTA5 -> Cityscapes, as the CFContra code trains it (docs/peers.md §3.1, §5).

DeepLabV2 (ResNet-101, multi-level head on layer3) with SGD 2.5e-4, momentum 0.9,
weight decay 5e-4 (coupled, as torch SGD), heads x10, poly 0.9 over ADVENT's
MAX_ITERS=250k but stopped at 120k, batch 1 + 1, BatchNorm scale/bias frozen, no
crop and no flip at CFContra's 1280x640 inputs for both domains; evaluation on
Cityscapes val at 1024x512, predictions upsampled to 2048x1024.

  python scripts/convert_weights.py resnet101_v1c-e67eebb6.pth r101_v1c.npz   # once
  python -m confeti_jax.main --config=configs/minent_gta2cs.py --workdir=workdirs/minent \
      --config.data.source.root=/data/gta5 --config.data.target.root=/data/cityscapes \
      --config.model.pretrained=r101_v1c.npz
  # in miniature (any size can be overridden):
  python -m confeti_jax.main --config=configs/minent_gta2cs.py --workdir=/tmp/m ... \
      --config.model.backbone=resnet18 --config.model.width=0.125 \
      --config.data.source.scale='(128,72)' --config.data.target.scale='(128,64)' \
      --config.data.crop_size='(64,128)' --config.eval.scale='(128,64)' \
      --config.train.steps=10 --config.optim.schedule_steps=0

Network: the project's DeepLabV2 on ResNet-101 V1c (deep stem, ImageNet weights from
open-mmlab) with ADVENT's layer3 head; ADVENT itself uses a torchvision-style 7x7-stem
ResNet-101 with Caffe preprocessing (BGR, mean only), which these weights do not fit.

Resolution: as the code, GTA5's 1914x1052 frames are squashed to 1280x640 (16:9 -> 2:1,
`data.source.keep_ratio=False`) and Cityscapes goes to 1280x640; the whole image is the
crop. `--config.data.source.keep_ratio=True --config.data.source.scale='(1280,720)'`
keeps GTA5's aspect instead (1280x704, a random 640x1280 window).
"""

from configs import common


def get_config(arg=None):
  common.parse_arg(arg)  # takes no arguments: an appended ':key=value' is an error
  config = common.base_config()
  config.seed = 1234  # ADVENT / CFContra RANDOM_SEED
  config.method = common.method_config("minent")

  config.data.source.scale = (1280, 640)
  config.data.source.keep_ratio = False  # the code resizes to a fixed size
  config.data.target.scale = (1280, 640)
  config.data.crop_size = (640, 1280)
  config.data.cat_max_ratio = 1.0  # no class-balance check: the code takes no crops
  config.data.flip_prob = 0.0

  config.train.steps = 120_000  # EARLY_STOP
  config.train.batch_size = 1
  config.train.log_every_steps = 100
  config.train.checkpoint_every_steps = 2000  # SAVE_PRED_EVERY

  config.optim = common.ml_collections.ConfigDict(dict(
      name="sgd", lr=2.5e-4, momentum=0.9, weight_decay=5e-4, head_lr_mult=10.0,
      poly_power=0.9, min_lr=0.0, warmup_steps=0, warmup_ratio=1.0,
      schedule_steps=250_000,  # MAX_ITERS: the poly decay is computed over 250k
      freeze_bn=True,  # BatchNorm scale/bias have requires_grad=False in ADVENT
      b1=0.9, b2=0.999, eps=1e-8,  # unused by SGD; kept so 'adamw' can be switched on
  ))

  # ADVENT tests at 1024x512 and upsamples to the 2048x1024 labels; it keeps the best of
  # the snapshots taken every 2000 iterations, so evaluate as often.
  config.eval.every_steps = 2000
  config.eval.resize = True
  config.eval.scale = (1024, 512)
  config.eval.mode = "whole"
  return config
