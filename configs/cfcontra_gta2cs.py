"""CFContra, GTA5 -> Cityscapes (paper 45.8 mIoU; docs/peers.md §5): MinEnt + AdaIN + contrast.

Everything of configs/minent_gta2cs.py (ADVENT's SGD recipe at 1280x640, batch 1 + 1)
plus the class-centre contrast: MoCo head (never trained, as in the code), source and
target banks of 19 centres, tau 0.07, momentum 0.9, margin 0.05, four terms of weight
1e-3, cross-domain bank updates. The style part is offline, as in the official code:

  # 1. train the AdaIN decoder (configs/adain_gta2cs.py), then stylise GTA5 with it
  python scripts/stylize_adain.py --adain_workdir=workdirs/adain \
      --content_root=/data/gta5 --style_dir=/data/cityscapes/leftImg8bit/train \
      --out_root=/data/gta5_adain
  # 2. train the segmentor on the stylised source
  python -m confeti_jax.main --config=configs/cfcontra_gta2cs.py --workdir=workdirs/cfcontra \
      --config.data.source.root=/data/gta5_adain --config.data.target.root=/data/cityscapes \
      --config.model.pretrained=r101_v1c.npz

Ablations (paper Tables 3, 4, 6): MinEnt + AdaIN = `--config.method.contrast.enabled=False`
on the stylised source; MinEnt + contrast = this config on the original GTA5 folder;
`--config.method.contrast.terms=intra`; `--config.method.contrast.head=none|linear|byol|
simclr`; the paper's per-domain bank update `--config.method.contrast.bank_update=domain`.

Where the paper reads differently from the code (defaults: the code):
  --config.method.contrast.bank_gradients=start   # all four terms' gradients against the
                                                   # start-of-step banks (code: in place)
  --config.method.contrast.source_centres=labelled  # Eq. 9: all labelled source pixels
                                                   # (code: labelled and predicted c)
GTA5 is squashed to 1280x640 as in the code and the paper (inherited from
minent_gta2cs); `--config.data.source.keep_ratio=True --config.data.source.scale='(1280,720)'`
keeps the aspect (1280x704, a 640-row window).
Every evaluation (each 2000 steps) that beats the best so far keeps its weights in
<workdir>/best/<step> and its report in eval/best.json: the papers report the best
snapshot (confeti_jax/best_snapshot.py).
"""

from configs import common, minent_gta2cs


def get_config(arg=None):
  config = minent_gta2cs.get_config(arg)
  config.method = common.method_config("cfcontra")
  return config
