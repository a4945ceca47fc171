"""CFContra stage 1: the AdaIN decoder, GTA5 content and Cityscapes style (docs/peers.md §2, §5).

pytorch-AdaIN's recipe as the CFContra authors ran it: the normalised VGG-19 encoder
to relu4_1 (frozen, imported), the mirror decoder, content weight 1 and style weight
10, Adam 1e-4 with lr_t = lr / (1 + 5e-5 t), 160k iterations, images resized to
512x1024 (keeping the aspect ratio here) and cropped to 256x256, batch 8. Nothing is
evaluated; the checkpoints hold the encoder (`imnet`) and the decoder (`gen`), which
scripts/stylize_adain.py reads.

  python scripts/convert_weights.py vgg_normalised.pth /data/weights/vgg_normalised.npz
  python -m confeti_jax.main --config=configs/adain_gta2cs.py --workdir=workdirs/adain \
      --config.data.source.root=/data/gta5 --config.data.target.root=/data/cityscapes \
      --config.method.style.vgg_weights=/data/weights/vgg_normalised.npz

The official runs took their style images from an ImageNet "ambulance" folder; any
image folder in the Cityscapes layout can be given as data.target.root.
"""

from configs import common


def get_config(arg=None):
  common.parse_arg(arg)  # takes no arguments: an appended ':key=value' is an error
  config = common.base_config()
  config.seed = 1234
  config.method = common.method_config("cfcontra")
  config.method.stage = "style"

  config.data.source.scale = (1024, 512)
  config.data.target.scale = (1024, 512)
  config.data.crop_size = (256, 256)
  config.data.cat_max_ratio = 1.0
  config.data.flip_prob = 0.0

  config.train.steps = 160_000
  config.train.batch_size = 8
  config.train.log_every_steps = 100
  config.train.checkpoint_every_steps = 10_000
  config.eval.every_steps = 0  # there is no segmentor to evaluate
  return config
