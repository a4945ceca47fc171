"""Stage 0 of CONFETI: stand-alone CUT from source (A) to target (B) crops, no segmentor.

CONFETI's stage 1 starts from a pre-trained CUT (`checkpoints/gta2cs_1080_512/
latest_net_{G,D,F}.pth`, docs/reference_code.md §5); the script that trained it is not in the
repository. This method trains it with the CUT defaults CONFETI runs
(docs/reference_code.md §4.2, the `method.cut` sub-dict): resnet_9blocks G, PatchGAN D,
patch MLPs, LSGAN + PatchNCE with identity NCE, Adam 2e-4 (0.5, 0.999) at a constant
rate, one D then one G + F step per iteration on batch_size source + batch_size target
crops. There is nothing to evaluate
(configs set eval.every_steps=0); G, D and F are in the checkpoint as `state.gen`,
`state.disc`, `state.patch_mlp`.
"""

import jax
import jax.numpy as jnp

from confeti_jax import panels, style
from confeti_jax import state as state_lib

STREAM_PATCHES = 1  # the NCE patch ids, folded into the step key


class CUTTraining:
  """Trains CUT's G, D and F; `inference_*` raise (there is no segmentor)."""

  name = "cut"

  def __init__(self, config):
    cut_cfg = config.method.cut
    self.num_classes = int(config.num_classes)
    # Compute dtype: method.cut.dtype, else model.dtype; method.cut.remat recomputes G's
    # ResNet blocks in the backward pass.
    self.model = style.build_cut(cut_cfg, dtype=str(config.model.dtype))
    self.model_name = f"cut/resnet_{int(cut_cfg.n_blocks)}blocks_ngf{int(cut_cfg.ngf)}"
    self.lr = float(cut_cfg.lr)
    self.panel_images = int(config.train.get("image_every_steps", 0)) > 0

  def init_state(self, key):
    gen, disc, patch_mlp = style.init_cut(key, self.model)
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), seg=None, batch_stats=None,
                                gen=gen, disc=disc, patch_mlp=patch_mlp)

  def train_step(self, state, batch, key):
    xs = style.pixels_to_cut(batch["source"]["image"])
    xt = style.pixels_to_cut(batch["target"]["image"])
    gen, disc, patch_mlp, out = style.cut_update(
        self.model, state.gen, state.disc, state.patch_mlp, xs, xt,
        jax.random.fold_in(key, STREAM_PATCHES))
    metrics = dict(out["metrics"], lr_cut=jnp.asarray(self.lr, jnp.float32))
    metrics = panels.attach(metrics, self.panel_images, lambda: {
        "source": panels.raw(batch["source"]["image"]),
        "G(source)": panels.image(style.cut_to_seg(out["fake"])),
        "target": panels.raw(batch["target"]["image"])})
    new_state = state.replace(step=state.step + 1, gen=gen, disc=disc, patch_mlp=patch_mlp)
    return new_state, metrics

  def _no_segmentor(self, *args):
    raise ValueError("method.name='cut' trains the CUT generator and has no segmentor to "
                     "evaluate; set --config.eval.every_steps=0.")

  inference_variables = inference_subtree = variables_from_subtree = _no_segmentor
  apply_eval = _no_segmentor
