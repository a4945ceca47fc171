"""GTA5 -> Cityscapes with the reference data protocol
(docs/reference_code.md §2.4-2.5, §5, §7, §8).

GTA5 resized keep-ratio into 1280x720 (1914x1052 -> 1280x704), Cityscapes train into
1280x640, random crops (512 stage 1, 640 stage 2) with cat_max_ratio 0.75 on the
source only, flip 0.5, rare-class sampling (T 0.01, 3000 px, crop ratio 0.5), batch
2 + 2, DeepLabV2 / ResNet-101 V1c. Evaluation on Cityscapes val at the full
2048x1024 (the official code) or, with `eval=1280`, at 1280x640 (DAFormer / CONFETII).

The default method is CONFETI's whole pipeline (docs/reference_code.md §5): stage 0 trains CUT
alone, stage 1 the segmentor jointly with CUT (512 crops), stage 2 a fresh segmentor
with the generator frozen (640 crops), in WORKDIR/stage{0,1,2}; rerunning the command
resumes whichever stage was interrupted. `:stage=N` runs one stage (its predecessor's
workdir must hold a finished run, or give the weights, e.g. the released CUT G).

  python scripts/prepare_data.py --dataset=gta5 --root=/data/gta       # RCS stats, once
  python scripts/convert_weights.py resnet101_v1c-e67eebb6.pth r101_v1c.npz   # once
  python -m confeti_jax.main --config=configs/gta2cs.py --workdir=workdirs/gta2cs \
      --config.data.source.root=/data/gta --config.data.target.root=/data/cityscapes \
      --config.model.pretrained=r101_v1c.npz
  # the second stage alone from the released stage-1 generator (latest_net_G.pth -> .npz):
  python -m confeti_jax.main --config=configs/gta2cs.py:stage=2 --workdir=workdirs/gta2cs \
      ... --config.method.cut.gen_weights=latest_net_G.npz
  # baselines: :method=source_only or :method=dacs (one stage, 512 crops)
  # evaluate a released CONFETI / DAFormer checkpoint (converted to .npz):
  python -m confeti_jax.main --config=configs/gta2cs.py:method=dacs --workdir=workdirs/rel \
      --mode=eval --config.data.target.root=/data/cityscapes \
      --config.model.init_from=released.npz
  # miniature run on a CPU against small folders in the same layouts:
  python -m confeti_jax.main --config=configs/gta2cs.py:method=dacs --workdir=/tmp/mini ... \
      --config.model.backbone=resnet18 --config.model.width=0.125 \
      --config.data.source.scale='(160,90)' --config.data.target.scale='(160,80)' \
      --config.data.crop_size='(64,64)' --config.data.rcs.min_pixels=50 \
      --config.train.steps=4 --config.eval.resize=True --config.eval.scale='(160,80)'

Arguments (`:key=value,...`): method (default confeti), model (A-E: CONFETI's Table 3
rows, configs/common.py TABLE3_MODELS; the baseline is method=dacs), stage (all | 0 | 1 |
2, CONFETI), res (low | full: CONFETI-dagger, 1024 crops on native-size inputs), crop
(512 | 640), eval (full | 1280), rcs (1 | 0).
"""

from configs import common

# CONFETI-dagger (Table 1, 63.3): full resolution with 1024 crops, for the comparison
# with HRDA, whose data protocol it takes: GTA5 into 2560x1440 and SYNTHIA into
# 2560x1520 (keep-ratio, i.e. upscaled), Cityscapes at its native 2048x1024, evaluation
# on the full image by 1024 sliding windows with stride 512. Both segmentor stages crop
# 1024. Memory (scripts/benchmark.py --compile_only, README "Full resolution"): the
# joint stage at batch 2 + 2 needs bf16 and remat on a 24 GB device.
FULL_RES_SOURCE_SCALE = {"gta5": (2560, 1440), "synthia": (2560, 1520)}
FULL_RES_CROP = 1024


def apply_protocol(config, args):
  """The settings gta2cs and synthia2cs share: crops, RCS, evaluation resolution."""
  if args.res == "full":
    return _apply_full_resolution(config, args)
  if args.res != "low":
    raise ValueError(f"res must be 'low' (1280 inputs, the default) or 'full' (CONFETI-dagger:"
                     f" native inputs, 1024 crops), got {args.res!r}.")
  if args.crop not in (512, 640):
    raise ValueError(f"crop must be 512 (stage 1) or 640 (stage 2), got {args.crop}.")
  config.data.crop_size = (args.crop, args.crop)
  config.data.rcs.enabled = bool(args.rcs)
  if args.eval == "full":  # the official code: no test-time resize
    config.eval.resize = False
    config.eval.scale = (2048, 1024)
  elif args.eval == "1280":  # DAFormer / CONFETII keep the test Resize
    config.eval.resize = True
    config.eval.scale = (1280, 640)
  else:
    raise ValueError(f"eval must be 'full' (2048x1024) or '1280' (1280x640), got {args.eval!r}")
  return config


def _apply_full_resolution(config, args):
  if args.crop != 512 or args.eval != "full":
    raise ValueError("res=full fixes the crops (1024) and the evaluation (full image, "
                     "sliding windows); leave crop and eval unset.")
  config.data.source.scale = FULL_RES_SOURCE_SCALE[config.data.source.kind]
  config.data.target.scale = (2048, 1024)
  config.data.crop_size = (FULL_RES_CROP, FULL_RES_CROP)
  config.data.rcs.enabled = bool(args.rcs)
  if "stage2_crop" in config.method:
    config.method.stage2_crop = (FULL_RES_CROP, FULL_RES_CROP)
  config.eval.resize = False
  config.eval.scale = (2048, 1024)
  config.eval.mode = "slide"
  config.eval.crop_size = (FULL_RES_CROP, FULL_RES_CROP)
  config.eval.stride = (FULL_RES_CROP // 2, FULL_RES_CROP // 2)
  return config


def apply_method(config, args):
  """The method sub-config; self-training keeps the reference's fixed 15 / 120 ignored rows
  at both crop sizes, and CONFETI runs the stages `args.stage` names."""
  config.method = common.method_config(args.method)
  if "psweight_ref_height" in config.method:
    config.method.psweight_ref_height = 0
  if args.method == "confeti":
    config.method.stages = "0,1,2" if args.stage == "all" else args.stage
  elif args.stage != "all":
    raise ValueError(f"stage={args.stage!r} applies to method=confeti only.")
  return common.apply_table3_model(config, args.model, args.stage)


def get_config(arg=None):
  args = common.parse_arg(arg, method="confeti", model="", stage="all", res="low", crop=512,
                          eval="full", rcs=1)
  config = common.base_config()
  apply_method(config, args)
  config.data.source.kind = "gta5"
  config.data.source.scale = (1280, 720)
  config.data.target.kind = "cityscapes"
  config.data.target.scale = (1280, 640)
  return apply_protocol(config, args)
