"""Writes an AdaIN-stylised copy of a GTA5 or Cityscapes set (CFContra's offline style step).

The official pre-generation script stylises every GTA5 image with 4 style images
drawn at random and interpolated with equal weights, alpha 1, content and styles
resized to 1024x2048 (docs/peers.md §5). This does the same with the JAX AdaIN: the
encoder and decoder come from an AdaIN stage run (`--adain_workdir`, its latest
checkpoint) or from converted PyTorch files (`--vgg`, `--decoder`, .npz written by
scripts/convert_weights.py). Each output is resized back to its image's original
size and saved at its path relative to the content root (images/<name>.png for GTA5,
leftImg8bit/<split>/<city>/<name> for Cityscapes); labels are linked (or copied), so
the result is a folder of the same layout, to pass as --config.data.source.root (or
.target.root for stylised Cityscapes: the paper's Figure 2 stylises target images too).

  python scripts/stylize_adain.py --adain_workdir=workdirs/adain \
      --content_root=/data/gta5 --style_dir=/data/cityscapes/leftImg8bit/train \
      --out_root=/data/gta5_adain [--shard_index=0 --shard_count=4]
  python scripts/stylize_adain.py --adain_workdir=workdirs/adain --layout=cityscapes \
      --content_root=/data/cityscapes --style_dir=/data/gta5/images \
      --out_root=/data/cityscapes_adain      # the train split; --split=val for val

Style draws are keyed by (seed, image index), so shards and reruns agree; existing
outputs are skipped, so an interrupted run resumes.
"""

import functools
import os
import sys

import numpy as np
from absl import app, flags, logging
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIR = flags.DEFINE_string("adain_workdir", None, "Workdir of an AdaIN stage run.")
_VGG = flags.DEFINE_string("vgg", None, ".npz of vgg_normalised.pth (with --decoder).")
_DECODER = flags.DEFINE_string("decoder", None, ".npz of a pytorch-AdaIN decoder.pth.")
_VGG_PADDING = flags.DEFINE_enum("vgg_padding", "reflect", ["reflect", "zeros"],
                                 "Encoder layout: 'zeros' for torchvision VGG-19 weights.")
_CONTENT = flags.DEFINE_string("content_root", None, "Folder of the --layout to stylise.")
_LAYOUT = flags.DEFINE_enum("layout", "gta5", ["gta5", "cityscapes"],
                            "Layout of --content_root: gta5 (images/, labels/) or cityscapes "
                            "(leftImg8bit/<split>/, gtFine/<split>/).")
_SPLIT = flags.DEFINE_string("split", "train", "Cityscapes split to stylise (layout=cityscapes).")
_STYLES = flags.DEFINE_string("style_dir", None, "Folder searched for .png/.jpg style images.")
_OUT = flags.DEFINE_string("out_root", None, "Output folder (the same layout).")
_NUM_STYLES = flags.DEFINE_integer("num_styles", 4, "Style images interpolated per image.")
_ALPHA = flags.DEFINE_float("alpha", 1.0, "Style strength in [0, 1].")
_SIZE = flags.DEFINE_list("content_size", ["1024", "2048"], "H,W the images are stylised at.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the style draws.")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This process's shard.")
_SHARD_COUNT = flags.DEFINE_integer("shard_count", 1, "Number of parallel processes.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Stylise only the first N images (0 = all).")

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def load_networks(adain_workdir=None, vgg=None, decoder=None, vgg_padding="reflect"):
  """(encoder module, decoder module, encoder params, decoder params)."""
  from confeti_jax import checkpoint, weights
  from confeti_jax.models import adain

  if adain_workdir:
    import orbax.checkpoint as ocp

    directory = os.path.join(os.path.abspath(adain_workdir), "checkpoints")
    step = checkpoint.Checkpointer(directory).latest_step() if os.path.isdir(directory) else None
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {directory}; train the AdaIN stage first "
                              "(configs/adain_gta2cs.py) or pass --vgg and --decoder.")
    saved = ocp.PyTreeCheckpointer().restore(os.path.join(directory, str(step), "state"))
    enc_params, dec_params = saved["imnet"], saved["gen"]["params"]
  elif vgg and decoder:
    enc_params = adain.convert_vgg(weights.load_state_dict(vgg), vgg_padding)
    dec_params = adain.convert_decoder(weights.load_state_dict(decoder))
  else:
    raise ValueError("Pass --adain_workdir, or both --vgg and --decoder.")
  width = enc_params["conv1_1"]["kernel"].shape[-1] / 64.0
  return (adain.VGGEncoder(width=width, padding=vgg_padding), adain.Decoder(width=width),
          enc_params, dec_params)


def find_images(folder):
  paths = []
  for root, _, files in os.walk(folder):
    paths.extend(os.path.join(root, f) for f in files if f.lower().endswith(_IMAGE_EXTENSIONS))
  if not paths:
    raise FileNotFoundError(f"No .png/.jpg images under {folder!r} to take styles from.")
  return sorted(paths)


def read_resized(path, size):
  """RGB float32 [H, W, 3] in [0, 1] resized to size=(h, w) (torchvision Resize: bilinear)."""
  with Image.open(path) as im:
    im = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
  return np.asarray(im, np.float32) / 255.0


def content_source(content_root, layout="gta5", split="train"):
  """The paired-file source of `content_root`: validates the layout, pairs the labels."""
  from confeti_jax.data import sources

  if layout == "gta5":
    return sources.GTA5Source(content_root)
  if layout == "cityscapes":
    return sources.CityscapesSource(content_root, split)
  raise ValueError(f"layout={layout!r}; use 'gta5' or 'cityscapes'.")


def stylize_folder(networks, content_root, style_dir, out_root, *, num_styles=4, alpha=1.0,
                   size=(1024, 2048), seed=0, shard_index=0, shard_count=1, limit=0,
                   layout="gta5", split="train"):
  """Stylises this shard's images of `content_root` into `out_root`; returns how many."""
  import jax

  from confeti_jax.models import adain
  from confeti_jax.stylize import link_or_copy, save_png, to_uint8

  source = content_source(content_root, layout, split)
  styles = find_images(style_dir)
  encoder, decoder, enc_params, dec_params = networks
  run = jax.jit(functools.partial(adain.stylize, encoder, decoder, alpha=alpha))
  mirror = lambda path: os.path.join(out_root, os.path.relpath(path, content_root))
  count = len(source) if limit <= 0 else min(limit, len(source))
  written = 0
  for index in range(shard_index, count, shard_count):
    image_path, label_path = source.image_paths[index], source.label_paths[index]
    out_path = mirror(image_path)
    for path in (out_path, mirror(label_path)):
      os.makedirs(os.path.dirname(path), exist_ok=True)
    link_or_copy(label_path, mirror(label_path))
    if os.path.exists(out_path):
      continue
    rng = np.random.default_rng([seed, index])
    picks = rng.choice(len(styles), size=num_styles, replace=len(styles) < num_styles)
    with Image.open(image_path) as im:
      original = (im.height, im.width)
    content = read_resized(image_path, size)[None]
    style = np.stack([read_resized(styles[i], size) for i in picks])
    out = np.asarray(run(enc_params, dec_params, content, style))[0]
    out = Image.fromarray(to_uint8(out)).resize((original[1], original[0]), Image.BILINEAR)
    save_png(out, out_path)  # atomic: a killed run never leaves a half-written image
    written += 1
    if written % 100 == 0:
      logging.info("%d images stylised (index %d of %d)", written, index, count)
  return written


def main(argv):
  del argv
  for flag in (_CONTENT, _STYLES, _OUT):
    if not flag.value:
      raise app.UsageError(f"--{flag.name} is required.")
  networks = load_networks(_WORKDIR.value, _VGG.value, _DECODER.value, _VGG_PADDING.value)
  n = stylize_folder(networks, _CONTENT.value, _STYLES.value, _OUT.value,
                     num_styles=_NUM_STYLES.value, alpha=_ALPHA.value,
                     size=tuple(int(s) for s in _SIZE.value), seed=_SEED.value,
                     shard_index=_SHARD_INDEX.value, shard_count=_SHARD_COUNT.value,
                     limit=_LIMIT.value, layout=_LAYOUT.value, split=_SPLIT.value)
  logging.info("Wrote %d stylised images to %s", n, _OUT.value)


if __name__ == "__main__":
  app.run(main)
