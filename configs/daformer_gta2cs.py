"""DAFormer, GTA5 -> Cityscapes (Hoyer et al., CVPR 2022: 68.3 mIoU, mean of 3 seeds).

DACS self-training (EMA 0.999, threshold 0.968 quality weight, ClassMix, colour jitter
and blur, ignored top 15 / bottom 120 pseudo-label rows) with rare-class sampling (T
0.01, 3000 px, crop ratio 0.5) and the ImageNet feature distance on the thing classes
(lambda 0.005, scale ratio 0.75) on a MiT-B5 encoder with the DAFormer head (stochastic
depth 0.1, dropout 0.1). AdamW 6e-5, head x10, weight decay 0.01 but none on the
LayerNorms, poly 1.0 over 40k steps after a 1500-step linear warm-up, batch 2 + 2, 512
crops of GTA5 resized into 1280x720 and Cityscapes into 1024x512, evaluated at 1024x512
and upsampled to 2048x1024 (DAFormer's test pipeline).

  python scripts/convert_weights.py mit_b5.pth mit_b5.npz          # SegFormer ImageNet
  python -m confeti_jax.main --config=configs/daformer_gta2cs.py --workdir=workdirs/daformer \
      --config.data.source.root=/data/gta --config.data.target.root=/data/cityscapes \
      --config.model.pretrained=mit_b5.npz
  # evaluate a released DAFormer / HRDA-low-res / MIC checkpoint (converted to .npz):
  python -m confeti_jax.main --config=configs/daformer_gta2cs.py --mode=eval ... \
      --config.model.init_from=daformer_released.npz

Arguments (`:key=value,...`): method (dacs = DAFormer | confeti | source_only: the same
recipe around another method), mic (1: MIC's masked image consistency, 32x32 blocks at
ratio 0.7, MIC(DAFormer) 70.6 in the MIC paper), backbone (mit_b0 .. mit_b5).
CONFETI on this architecture attaches its CAM and projection heads to the DAFormer
head's fused 256-channel features (`models/daformer.py`); its CUT stages are as in
gta2cs.py.
"""

from configs import common, gta2cs


def get_config(arg=None):
  args = common.parse_arg(arg, method="dacs", mic=0, backbone="mit_b5")
  config = common.base_config()
  if args.method not in ("dacs", "confeti", "source_only"):
    raise ValueError(f"method must be dacs, confeti or source_only, got {args.method!r}.")
  gta2cs.apply_method(config, common.ml_collections.ConfigDict(
      dict(method=args.method, stage="all", model="")))
  config.seed = 0
  config.model.backbone = args.backbone
  config.model.decoder = "daformer"
  config.optim.norm_decay = False
  config.train.steps = 40_000
  config.data.source.scale = (1280, 720)
  config.data.target.scale = (1024, 512)
  config.data.crop_size = (512, 512)
  config.data.rcs.enabled = True
  config.eval.resize = True
  config.eval.scale = (1024, 512)
  if args.mic:
    if "mic" not in config.method:
      raise ValueError("mic=1 needs a self-training method (dacs or confeti).")
    config.method.mic.enabled = True
  return config
