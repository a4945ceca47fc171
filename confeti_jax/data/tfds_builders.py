"""TFDS ArrayRecord copies of the dataset folders, for pods that read from a bucket.

TensorFlow is not needed (docs/datasets.md D.1): the builders below only use the
array_record writer, and reading goes through `tfds.builder_from_directory(...)
.as_data_source(split)`, which decodes the PNG features with Pillow. Each record holds
the original image PNG bytes (re-encoded only when not RGB), the label mapped to 19-class
trainIds (8-bit PNG, 255 = ignore) and the sample key; records keep the folder
source's order (shuffling disabled), so index i is the same sample in both paths.

  python scripts/prepare_data.py --dataset=gta5 --root=/data/gta --tfds_dir=gs://b/tfds

Then train with --config.data.source.format=tfds --config.data.source.tfds_dir=...
"""

import io
import os

import numpy as np
from etils import epath
from PIL import Image

from confeti_jax.data import labels as labels_lib
from confeti_jax.data import sources

VERSION = "1.0.0"
NAMES = {"gta5": "confeti_gta5", "cityscapes": "confeti_cityscapes",
         "synthia": "confeti_synthia"}
SPLITS = {"gta5": ("train",), "synthia": ("train",), "cityscapes": ("train", "val")}


def _builder_class(kind):
  """The builder class of `kind`, defined on first use so importing this module stays cheap.

  TFDS registers builders by their class-level `name`, so each kind gets a subclass.
  """
  if kind in _BUILDERS:
    return _BUILDERS[kind]
  _BUILDERS[kind] = type(f"Confeti{kind.capitalize()}", (_base_class(),),
                         {"name": NAMES[kind], "__module__": __name__})
  return _BUILDERS[kind]


def _base_class():
  if "_base" in _BUILDERS:
    return _BUILDERS["_base"]
  import tensorflow_datasets as tfds

  class _FolderSegmentation(tfds.core.GeneratorBasedBuilder):
    """One dataset folder (a `sources.build_source` kind) as ArrayRecord splits."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, kind, root, **kwargs):
      self._kind, self._root = kind, os.fspath(root)
      self._sources = {split: sources.build_source(kind, self._root, split)
                       for split in SPLITS[kind]}
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description=f"{self._kind} folder {self._root} (labels as 19-class trainIds)",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
              "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
              "key": tfds.features.Text(),
          }),
          disable_shuffling=True,
          metadata=tfds.core.MetadataDict(
              kind=self._kind, keys={s: src.keys() for s, src in self._sources.items()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(src) for split, src in self._sources.items()}

    def _generate_examples(self, source):
      for index, key in enumerate(source.keys()):
        sample = source[index]  # decoded, mapped and size-checked
        label, image_png = sample["label"], None
        with Image.open(source.image_paths[index]) as im:
          if im.mode == "RGB" and im.format == "PNG":
            with open(source.image_paths[index], "rb") as f:
              image_png = f.read()
        if image_png is None:  # grey / RGBA / non-PNG: store the RGB the reader returns
          encoded = io.BytesIO()
          Image.fromarray(sample["image"]).save(encoded, format="PNG")
          image_png = encoded.getvalue()
        buffer = io.BytesIO()
        Image.fromarray(label, mode="L").save(buffer, format="PNG")
        yield f"{index:08d}", {"image": image_png, "label": buffer.getvalue(), "key": key}

  _BUILDERS["_base"] = _FolderSegmentation
  return _FolderSegmentation


_BUILDERS = {}


def build(kind, root, tfds_dir):
  """Converts the folder of dataset `kind` at `root` into ArrayRecord under tfds_dir.

  Returns the directory of the prepared dataset (what `TfdsSource` reads).
  """
  if kind not in NAMES:
    raise sources.DatasetError(f"No TFDS builder for kind {kind!r}; allowed: {sorted(NAMES)}")
  builder = _builder_class(kind)(kind=kind, root=root, data_dir=os.fspath(tfds_dir),
                             file_format="array_record")
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


def dataset_dir(kind, tfds_dir):
  """The prepared dataset's directory inside tfds_dir (it may be a bucket path)."""
  return os.path.join(os.fspath(tfds_dir), NAMES[kind], VERSION)


class TfdsSource:
  """Random access to a prepared split, with the same items as the folder source.

  The data source is opened lazily in each process (grain workers unpickle this
  object without the open file handles).
  """

  def __init__(self, kind, tfds_dir, split="train", class_set="cityscapes19"):
    if kind not in NAMES:
      raise sources.DatasetError(f"No TFDS dataset for kind {kind!r}; allowed: {sorted(NAMES)}")
    self.kind, self.split = kind, split if split in SPLITS[kind] else "train"
    self.directory = dataset_dir(kind, tfds_dir)
    self.remap = labels_lib.class_set(class_set)[2]
    self._ds = None
    if not epath.Path(self.directory, "dataset_info.json").exists():
      raise sources.DatasetError(
          f"No prepared TFDS dataset at {self.directory!r} (missing dataset_info.json). "
          f"Convert the folder once with `python scripts/prepare_data.py --dataset={kind} "
          f"--root=/path/to/{kind} --tfds_dir={os.fspath(tfds_dir)}`, or use "
          "data.<domain>.format=folder.")
    self._keys = [str(k) for k in self._open_builder().info.metadata["keys"][self.split]]
    self.name = f"tfds:{self.directory}:{self.split}"

  def _open_builder(self):
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(self.directory)

  def _source(self):
    if self._ds is None:
      self._ds = self._open_builder().as_data_source(self.split)
    return self._ds

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_ds"} | {"_ds": None}

  def __len__(self):
    return len(self._keys)

  def keys(self):
    return list(self._keys)

  def check_sizes(self, limit=None):
    """Sizes were checked when the records were written; nothing to re-read here."""
    del limit

  def __getitem__(self, index):
    index = int(index)
    try:
      record = self._source()[index]
    except (OSError, ValueError) as e:
      raise sources.DatasetError(f"Cannot decode record {index} of {self.name} ({e}); "
                                 "rebuild the ArrayRecord copy.") from e
    label = labels_lib.map_ids(np.asarray(record["label"])[..., 0], self.remap)
    return {"image": np.asarray(record["image"], np.uint8), "label": label}

  def __repr__(self):
    return f"TfdsSource({self.name!r}, {len(self)} images)"
