"""What every method built on one DeepLabV2 student shares: model, optimiser, state, inference.

A method subclasses `SegmentorMethod`, adds what it needs to the state in
`init_state`, and implements the pure `train_step(state, batch, key)`. Only
static values are read from the config here, so the ConfigDict never reaches jit.
"""

import jax
import jax.numpy as jnp

from confeti_jax import augment, losses, models, panels
from confeti_jax import state as state_lib


class SegmentorMethod:
  """Base of the methods: the student segmentor and its AdamW groups."""

  name = "base"

  def __init__(self, config):
    self.num_classes = int(config.num_classes)
    self.crop_size = tuple(int(s) for s in config.data.crop_size)
    self.total_steps = int(config.train.steps)
    self.model = models.build_segmentor(config.model, self.num_classes)
    self.tx = state_lib.segmentor_optimizer(config.optim, self.total_steps)
    self.schedules = state_lib.segmentor_schedules(config.optim, self.total_steps)
    arch = "daformer" if models.is_transformer(config.model.backbone) else "deeplabv2"
    self.model_name = f"{config.method.name}/{arch}_{config.model.backbone}"
    # Weights files (confeti_jax/weights.py): ImageNet backbone, or a whole segmentor.
    self.pretrained = str(config.model.get("pretrained", "") or "")
    self.init_from = str(config.model.get("init_from", "") or "")
    # Image panels (confeti_jax/panels.py) in the step's outputs: static, off in tests.
    self.panel_images = int(config.train.get("image_every_steps", 0)) > 0

  # -- state ---------------------------------------------------------------------
  def init_segmentor(self, key):
    """Student variables at the crop size (float32 params), with pretrained weights loaded.

    model.pretrained replaces the backbone (the reference's ImageNet init), then
    model.init_from the backbone and head (e.g. a released checkpoint for --mode=eval).
    Files are read once per method; under jit the weights enter as constants.
    """
    from confeti_jax import weights  # numpy-only; keeps torch optional

    x = jnp.zeros((1, *self.crop_size, 3), jnp.float32)
    variables = self.model.init(key, x, train=False)
    for path, what in ((self.pretrained, "backbone"), (self.init_from, "segmentor")):
      if path:
        variables = weights.load_into(variables, path, what=what)
    return variables

  def init_state(self, key):
    variables = self.init_segmentor(key)
    return state_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        seg=state_lib.OptGroup.create(variables["params"], self.tx),
        batch_stats=variables["batch_stats"])

  # -- forward passes --------------------------------------------------------------
  def forward_train(self, params, batch_stats, images, dropout_key=None):
    """Forward in train mode: (logits, aux features, new BN stats).

    `dropout_key` enables the segmentor's dropout and stochastic depth (MiT / DAFormer
    head; DeepLabV2 has none): the student's forwards pass one, the teacher's never.
    """
    (logits, aux), updates = self.model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs=dropout_rngs(dropout_key))
    return logits, aux, updates["batch_stats"]

  def segmentation_loss(self, params, batch_stats, images, labels, weight=None,
                        dropout_key=None):
    """Pixel CE of the upsampled logits (mmseg mean over all pixels)."""
    logits, aux, batch_stats = self.forward_train(params, batch_stats, images, dropout_key)
    logits = augment.resize_bilinear(logits, labels.shape[1:3])
    loss = losses.cross_entropy(logits, labels, weight=weight)
    return loss, (logits, aux, batch_stats)

  def source_panel(self, batch, images, source_logits=None):
    """Panel tiles of the source side: image, ground truth and the student's prediction."""
    tiles = {"source": panels.image(images), "source GT": panels.label(batch["source"]["label"])}
    if source_logits is not None:
      tiles["source prediction"] = panels.prediction(source_logits, images.shape[1:3])
    return tiles

  def learning_rates(self, step):
    return {f"lr_{group}": fn(step) for group, fn in self.schedules.items()}

  # -- inference -----------------------------------------------------------------
  def inference_variables(self, state):
    """What evaluation needs: the student (the reference evaluates the student)."""
    return {"params": state.seg.params, "batch_stats": state.batch_stats}

  def inference_subtree(self, abstract_state):
    """The part of the saved state that `inference_variables` reads, for partial restore."""
    return {"seg": {"params": abstract_state.seg.params},
            "batch_stats": abstract_state.batch_stats}

  def variables_from_subtree(self, subtree):
    return {"params": subtree["seg"]["params"], "batch_stats": subtree["batch_stats"]}

  def apply_eval(self, variables, images):
    """Eval-mode logits (BN running statistics) of normalised images."""
    logits, _ = self.model.apply(variables, images, train=False)
    return logits

  def train_step(self, state, batch, key):
    raise NotImplementedError("abstract: each method implements its own train_step")


STREAM_DROPOUT = 20


def dropout_rngs(key):
  """The `rngs` of a forward: dropout and stochastic depth run exactly when given a key."""
  return {"dropout": key} if key is not None else None


def dropout_key(key, index):
  """The student's dropout / stochastic-depth key of its `index`-th forward in a step."""
  return jax.random.fold_in(jax.random.fold_in(key, STREAM_DROPOUT), index)


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree.leaves(tree)))
