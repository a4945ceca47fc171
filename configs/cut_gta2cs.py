"""CONFETI stage 0: CUT alone, GTA5 -> Cityscapes (the pre-trained CUT stage 1 starts from).

The CONFETI repository does not contain this stage; its checkpoint folder
`gta2cs_1080_512` suggests CUT's `scale_width_and_crop` at load size 1080 and crop 512,
with CONFETI's batch size 2. CUT's own defaults otherwise (docs/reference_code.md §4.2,
`method.cut`): resnet_9blocks, PatchGAN, LSGAN + PatchNCE (layers 0,4,8,12,16, 256
patches, T 0.07, identity NCE), Adam 2e-4 (0.5, 0.999), horizontal flips. Images are
resized keeping the aspect ratio to width 1080 (GTA5 1080x594, Cityscapes 1080x540).
The length is our choice (the author: "train solely with CUT ... for a few epochs";
80k iterations of 2 images are about 6 GTA5 epochs); the rate stays constant as in
CONFETI's joint stage. Nothing is evaluated.

  python -m confeti_jax.main --config=configs/cut_gta2cs.py --workdir=workdirs/cut_gta2cs \
      --config.data.source.root=/data/gta5 --config.data.target.root=/data/cityscapes

Continue from released weights (converted once with scripts/convert_weights.py):
  --config.method.cut.gen_weights=cut_G.npz --config.method.cut.disc_weights=cut_D.npz
"""

from configs import common


def get_config(arg=None):
  del arg
  config = common.base_config()
  config.method = common.method_config("cut")

  config.data.source.scale = (1080, 1080)  # keep-ratio: the long side becomes 1080
  config.data.target.scale = (1080, 1080)
  config.data.crop_size = (512, 512)
  config.data.cat_max_ratio = 1.0  # CUT never reads labels
  config.data.flip_prob = 0.5

  config.train.steps = 80_000
  config.train.batch_size = 2
  config.train.log_every_steps = 100
  config.train.checkpoint_every_steps = 4000
  config.eval.every_steps = 0  # there is no segmentor to evaluate
  return config
