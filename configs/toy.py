"""Embedded toy benchmark: procedural 'game' source -> 'camera' target, no download.

The scenes are rendered once into `data.toy.cache_dir` in the GTA5 and Cityscapes
folder layouts, so training reads them through the same loaders as real data.
Sizes are small enough for a 2-core CPU; every one of them can be overridden.

  python -m confeti_jax.main --config=configs/toy.py --workdir=workdirs/toy
  python -m confeti_jax.main --config=configs/toy.py:method=source_only --workdir=...
  python -m confeti_jax.main --config=configs/toy.py --workdir=workdirs/toy --mode=eval
  python -m confeti_jax.main --config=configs/toy.py --workdir=workdirs/toy --mode=eval \
      --config.eval.dataset=source   # source-val mIoU, to measure the domain gap

Arguments (`:key=value,...`): method (default source_only), tiny (1 = test-sized run).
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, method="source_only", tiny=0)
  config = common.base_config()
  config.seed = 0
  config.method = common.method_config(args.method)

  config.model.backbone = "resnet18"
  config.model.width = 0.25

  config.data.toy.enabled = True
  config.data.source.kind = "gta5"
  config.data.source.scale = (320, 176)
  config.data.target.kind = "cityscapes"
  config.data.target.scale = (320, 160)
  config.data.crop_size = (128, 128)
  config.data.num_workers = 0

  config.train.steps = 1200
  config.train.batch_size = 4
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 400

  # The reference schedule (AdamW 6e-5, heads x10, warm-up 1500, poly to 80k)
  # scaled to the toy run's length; the toy backbone trains from scratch, so a
  # larger base rate than the ImageNet-initialised reference.
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 100

  config.eval.every_steps = 400
  config.eval.batch_size = 8

  if args.tiny:
    config.data.toy.num_source = 8
    config.data.toy.num_source_val = 4
    config.data.toy.num_target = 8
    config.data.toy.num_val = 4
    config.data.toy.cache_dir = ""
    config.data.crop_size = (64, 64)
    config.model.width = 0.125
    config.train.steps = 3
    config.train.batch_size = 8
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 2
    config.optim.warmup_steps = 2
    config.eval.every_steps = 3
    config.eval.batch_size = 8
  return config
