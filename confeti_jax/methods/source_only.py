"""Source-only baseline: the student trained on labelled source crops alone.

The lower bound of every UDA table. Target batches are loaded (the trainer is
generic) but never touched here.
"""

import jax

from confeti_jax import augment, panels
from confeti_jax.methods import base


class SourceOnly(base.SegmentorMethod):
  """DeepLabV2 trained with pixel cross-entropy on the source domain."""

  name = "source_only"

  def train_step(self, state, batch, key):
    images = augment.normalize(batch["source"]["image"])
    labels = batch["source"]["label"].astype("int32")

    def loss_fn(params):
      loss, (logits, _, batch_stats) = self.segmentation_loss(
          params, state.batch_stats, images, labels, dropout_key=base.dropout_key(key, 0))
      return loss, (batch_stats, logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.seg.params)
    seg = state.seg.apply_gradients(grads)
    metrics = {"loss": loss, "loss_src_seg": loss, "grad_norm": base.global_norm(grads),
               **self.learning_rates(state.step)}
    metrics = panels.attach(metrics, self.panel_images,
                            lambda: self.source_panel(batch, images, logits))
    return state.replace(step=state.step + 1, seg=seg, batch_stats=batch_stats), metrics
