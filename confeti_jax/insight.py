"""What a run's features show, for --mode=visualize (`visualize.py` draws the grid).

* `write_cam`: CONFETI's CAM of a class and the cosine similarity of the projected
  features to that class's prototype, as heat maps over the image (CONFETI Fig. 2).
  Each map is stretched from its minimum to its maximum (written in its header): a
  fixed scale shows a young run's near-uniform similarities as one flat colour.
* `write_embedding`: t-SNE of the backbone's last-stage features ('layer4') of source and
  target val images, a bounded sample of feature-grid cells per class labelled by the
  nearest-downsampled ground truth (CFContra Fig. 1).

Both read eval-mode (BN running statistics) features of the restored student from one
jitted forward per method; it compiles once per image size.
"""

import functools

import jax
import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from confeti_jax import augment, panels, stages, visualize
from confeti_jax import prototypes as protos_lib
from confeti_jax.data import labels as labels_lib
from confeti_jax.data import pipeline
from confeti_jax.models.conv import compiler_options

FEATURES = ("layer4", "cam", "proj")
CAM_IMAGES, CAM_CLASSES, CAM_SCAN = 2, 4, 8  # images, classes per image, images looked at
EMBED_IMAGES, PER_CLASS = 8, 60  # images per domain, feature cells per class and domain
SEED = 0


@functools.lru_cache(maxsize=8)
def features_fn(method):
  """Jitted (variables, uint8 images) -> the eval-mode features of FEATURES the model has."""

  def features(variables, images):
    _, feats = method.model.apply(variables, augment.normalize(images), train=False)
    return {k: v.astype(np.float32) for k, v in feats.items() if k in FEATURES}

  return jax.jit(features, compiler_options=compiler_options())


def heat(values, image, size):
  """`values` (h x w in [0, 1]) upsampled bilinearly to `size`, in the training panels'
  heat ramp (black-red-yellow-white) blended over `image`."""
  up = Image.fromarray(np.asarray(values, np.float32)).resize(size[::-1], Image.BILINEAR)
  rgb = panels.heat_colours(np.asarray(up)).astype(np.float32)
  return (0.5 * rgb + 0.5 * image.astype(np.float32)).astype(np.uint8)


# -- CONFETI: CAM and prototype similarity ---------------------------------------------------
def restore_protos(run):
  """The class prototypes [K, D] (unit or zero rows) of a CONFETI run's checkpoint."""
  method = run.method
  abstract = jax.eval_shape(
      lambda: protos_lib.Prototypes.zeros(method.num_classes, method.proto_dim))
  restored = stages.restore_params(run.workdir, {"protos": abstract}, "visualize (prototypes)")
  return np.asarray(restored["protos"].protos, np.float32)


def has_cam(run):
  """True for a CONFETI student with its CAM and projection heads (method.proto.enabled)."""
  return run.config.method.name == "confeti" and bool(getattr(run.method, "proto_enabled", 0))


def pick_images(config, count=CAM_IMAGES, scan=CAM_SCAN):
  """The `count` of the first `scan` target val images with the most classes in their gt."""
  batches, _ = pipeline.make_eval_batches(config, dataset="target", batch_size=1)
  seen = []
  for _, batch in zip(range(scan), batches):
    label = np.asarray(batch["label"][0])
    present = np.unique(label[label != labels_lib.IGNORE_INDEX])
    seen.append((-len(present), len(seen), batch["image"], label))
  return [(image, label) for _, _, image, label in sorted(seen, key=lambda s: s[:2])[:count]]


def cam_panels(config, run):
  """Two rows per chosen image, as [(headers, tiles)]: the image and per class its CAM,
  then the ground truth and per class the prototype similarity (the classes present,
  largest first). Each map is stretched to its own range, which its header states."""
  names = labels_lib.class_set(config.class_set)[0]
  table = labels_lib.colour_table(names)
  protos = restore_protos(run)
  feats_fn = features_fn(run.method)
  rows = []
  for images, label in pick_images(config):
    size = visualize.tile_size(*label.shape)
    image = visualize.fit(images[0], size, nearest=False)
    feats = jax.device_get(feats_fn(run.variables, images))
    cam, proj = feats["cam"][0], feats["proj"][0]
    proj = proj / np.maximum(np.linalg.norm(proj, axis=-1, keepdims=True), 1e-12)
    ids, counts = np.unique(label[label != labels_lib.IGNORE_INDEX], return_counts=True)
    classes = [int(c) for c in ids[np.argsort(-counts, kind="stable")][:CAM_CLASSES]]
    cams = (["image"], [image])
    sims = (["ground truth"], [visualize.fit(table[label], size, nearest=True)])
    for c in classes:
      for (headers, tiles), what, values in ((cams, "CAM", cam[..., c]),
                                             (sims, "cos", proj @ protos[c])):
        low, high = float(values.min()), float(values.max())
        unset = " (no proto)" if what == "cos" and not np.any(protos[c]) else ""
        headers.append(f"{what} {names[c]}: {low:.2f}..{high:.2f}{unset}")
        tiles.append(heat((values - low) / max(high - low, 1e-12), image, size))
    rows += [cams, sims]
  return rows


def write_cam(config, workdir, run):
  """DIR/visualize/cam.png for a CONFETI run; None (and a logged note) for other runs."""
  if not has_cam(run):
    logging.info("visualize: %s has no CAM / prototypes (method=%s); no cam.png.", run.name,
                 run.config.method.name)
    return None
  rows = cam_panels(config, run)
  canvases = [visualize.tile_canvas([tiles], headers, tiles[0].shape[:2])
              for headers, tiles in rows]
  note = ("Top rows: the class's CAM; bottom rows: cosine similarity of the projected "
          "features to the class prototype; each map from its minimum (dark) to its maximum "
          "(white), as its header says.")
  width = max(c.width for c in canvases)
  out = Image.new("RGB", (width, sum(c.height + visualize.GAP for c in canvases)
                          + visualize.TEXT_HEIGHT), visualize.WHITE)
  top = 0
  for canvas in canvases:
    out.paste(canvas, (0, top))
    top += canvas.height + visualize.GAP
  draw = ImageDraw.Draw(out)
  fnt = visualize.font()
  draw.text((3, top + 3), visualize.fit_text(draw, note, width - 6, fnt), fill=(0, 0, 0),
            font=fnt)
  path = visualize.save(out, workdir, "cam.png")
  logging.info("Wrote the CAM / prototype maps of %d images to %s", len(rows) // 2, path)
  return path


# -- feature embedding -----------------------------------------------------------------------
def domain_batches(config, domain):
  """Eval batches (batch 1) of the source or target val split.

  Outside the toy benchmark there is no source val split: the first source training
  images stand in (resized to data.source.scale, as training reads them).
  """
  try:
    return pipeline.make_eval_batches(config, dataset=domain, batch_size=1)[0]
  except pipeline.DatasetError:
    if domain != "source":
      raise
    logging.info("visualize: no source val split; embedding source training images.")
    data = config.data
    root = pipeline.resolve_roots(data, ("source",))["source"]
    source = pipeline.build_domain_source(data, "source", root, "train", config.class_set)
    scale = tuple(data.source.scale) if data.source.scale else None
    return pipeline.EvalBatches(source, scale_or_none=scale, batch_size=1, shard_index=0,
                                shard_count=1)


def embedding_sample(config, run, images=EMBED_IMAGES, per_class=PER_CLASS):
  """(features [N, C], class ids [N], domain [N]: 0 source, 1 target), a bounded sample."""
  feats_fn = features_fn(run.method)
  rng = np.random.default_rng(SEED)
  features, classes, domains = [], [], []
  for d, domain in enumerate(("source", "target")):
    cells, cell_labels = [], []
    for _, batch in zip(range(images), domain_batches(config, domain)):
      layer4 = np.asarray(jax.device_get(feats_fn(run.variables, batch["image"])["layer4"]))
      small = np.asarray(augment.resize_nearest(batch["label"], layer4.shape[1:3]))
      cells.append(layer4.reshape(-1, layer4.shape[-1]))
      cell_labels.append(small.reshape(-1))
    cells, cell_labels = np.concatenate(cells), np.concatenate(cell_labels)
    for c in range(run.method.num_classes):
      index = np.flatnonzero(cell_labels == c)
      index = rng.choice(index, min(per_class, len(index)), replace=False) if len(index) else []
      features.append(cells[index])
      classes.append(np.full(len(index), c, np.int32))
      domains.append(np.full(len(index), d, np.int32))
  return np.concatenate(features), np.concatenate(classes), np.concatenate(domains)


def tsne(features):
  """2-D t-SNE of `features` (PCA init, fixed random_state)."""
  from sklearn.manifold import TSNE

  perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
  # 500 iterations, not 1000: about half the time (10-20 s for 1400 toy cells on 2 cores).
  return TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500,
              random_state=SEED).fit_transform(features.astype(np.float64))


def plot_embedding(xy, classes, domains, class_names, title):
  """The scatter (colour = class, o = source, x = target) as an RGB PIL image."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.lines import Line2D

  table = labels_lib.colour_table(class_names)
  fig = Figure(figsize=(9, 6.5), dpi=110)
  canvas = FigureCanvasAgg(fig)
  ax = fig.add_axes((0.06, 0.06, 0.66, 0.86))
  for d, marker in ((0, "o"), (1, "x")):
    for c in np.unique(classes):
      keep = (classes == c) & (domains == d)
      face = table[c] / 255.0
      style = {"facecolors": "none", "edgecolors": [face]} if marker == "o" else {"c": [face]}
      ax.scatter(xy[keep, 0], xy[keep, 1], s=22, marker=marker, linewidths=1.1, **style)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title, fontsize=10)
  handles = [Line2D([], [], ls="", marker="s", ms=8, color=table[c] / 255.0,
                    label=class_names[c]) for c in np.unique(classes)]
  handles += [Line2D([], [], ls="", marker="o", mfc="none", mec="k", label="source"),
              Line2D([], [], ls="", marker="x", color="k", label="target")]
  fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.73, 0.5), fontsize=9,
             frameon=False)
  canvas.draw()
  return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def write_embedding(config, workdir, run):
  """DIR/visualize/embedding.png; None (and a logged note) when too few cells are labelled
  or the plotting extras are not installed (training never needs them)."""
  try:
    import matplotlib  # noqa: F401
    import sklearn  # noqa: F401
  except ImportError as error:
    logging.warning("visualize: no embedding.png (%s); `pip install matplotlib scikit-learn` "
                    "adds it.", error)
    return None
  features, classes, domains = embedding_sample(config, run)
  if len(features) < 5:
    logging.info("visualize: only %d labelled feature cells; no embedding.png.", len(features))
    return None
  xy = tsne(features)
  names = labels_lib.class_set(config.class_set)[0]
  title = (f"{run.name}, step {run.step}: t-SNE of layer4 features, {int(np.sum(domains == 0))} "
           f"source (o) and {int(np.sum(domains == 1))} target (x) cells")
  path = visualize.save(plot_embedding(xy, classes, domains, names, title), workdir,
                        "embedding.png")
  logging.info("Wrote the feature embedding (%d cells) to %s", len(features), path)
  return path
