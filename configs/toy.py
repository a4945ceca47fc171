"""Embedded toy benchmark: procedural 'game' source -> 'camera' target, no download.

The scenes are rendered once into `data.toy.cache_dir` in the GTA5 and Cityscapes
folder layouts, so training reads them through the same loaders as real data.
Sizes are small enough for a 2-core CPU; every one of them can be overridden.

  python -m confeti_jax.main --config=configs/toy.py --workdir=workdirs/toy
  python -m confeti_jax.main --config=configs/toy.py:method=source_only --workdir=...
  python -m confeti_jax.main --config=configs/toy.py --workdir=workdirs/toy --mode=eval
  python -m confeti_jax.main --config=configs/toy.py --workdir=workdirs/toy --mode=eval \
      --config.eval.dataset=source   # source-val mIoU, to measure the domain gap

Arguments (`:key=value,...`): method (default source_only), tiny (1 = test-sized run),
model (A-E with method=confeti: CONFETI's Table 3 rows, as gta2cs.py), class_set
(cityscapes19 | synthia19 | synthia16: the SYNTHIA rows' evaluation, mIoU16 / mIoU13, and
the 16-class head). method=cut trains CUT alone
(CONFETI's stage 0) with a narrow generator. Every row of scripts/paper_tables.py has a
miniature here (`--setting=toy`).
"""

from confeti_jax.data import labels
from configs import common, synthia2cs


def get_config(arg=None):
  args = common.parse_arg(arg, method="source_only", tiny=0, model="", class_set="cityscapes19")
  config = common.base_config()
  config.seed = 0
  config.method = common.method_config(args.method)
  config.class_set = args.class_set
  config.num_classes = len(labels.class_set(args.class_set)[0])
  synthia2cs.remap_thing_classes(config)

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

  if args.method == "confeti":
    # Sizes only: the reference's step gates (CAM on mixed images after 2000, PCL and
    # CAM-weighted prototypes after 3000, of 80k steps) shrink by the factor the LR
    # warm-up shrinks (1500 -> 100), and the projection by the backbone width.
    config.method.proto.cam_mix_after = 133
    config.method.proto.pcl_after = 200
    config.method.proto.dim = 128
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
    config.train.image_every_steps = 0
    config.optim.warmup_steps = 2
    config.eval.every_steps = 3
    config.eval.batch_size = 8
  if args.method in ("cut", "confeti"):
    # CUT in miniature: a narrow generator and discriminator (the real ones have
    # ngf = ndf = 64, 9 blocks); 5 blocks keep the reference NCE taps 0,4,8,12,16
    # (16 = the 5th block). ngf 8 keeps CUT's share of a joint step near the
    # reference's (CUT ~1.7x the R101 segmentor side; at ngf 16 the toy's was ~6x).
    config.method.cut.ngf = 4 if args.tiny else 8
    config.method.cut.ndf = 4 if args.tiny else 8
    config.method.cut.n_blocks = 5
    config.method.cut.num_patches = 32 if args.tiny else 64
  if args.method == "cut":
    config.eval.every_steps = 0  # stage 0 alone: no segmentor, nothing to evaluate
  if args.method == "confeti":
    # Stage 2 crops 640/512 = 1.25 x stage 1's; stage 0 a third of a segmentor stage.
    config.method.stage0_steps = 3 if args.tiny else 400
    config.method.stage2_crop = (80, 80) if args.tiny else (160, 160)
  return common.apply_table3_model(config, args.model)
