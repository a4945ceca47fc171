"""Shared config pieces: the argument parser and the base config every run starts from.

The base holds the reference code's numbers (docs/reference_code.md §1, §6, §7); a
config file changes only what differs for its setting.
"""

import ml_collections


def parse_arg(arg, **defaults):
  """Parses 'k1=v1,k2=v2' (the part after ':' in --config=file.py:ARG) over typed defaults.

  Unknown keys are an error naming the key and the allowed ones.
  """
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, raw = item.partition("=")
    key = key.strip()
    if key not in defaults:
      allowed = f"allowed: {sorted(defaults)}" if defaults else "this config takes none"
      raise ValueError(f"Unknown config argument {key!r}; {allowed}")
    kind = type(defaults[key])
    values[key] = kind(raw) if kind is not bool else raw.lower() in ("1", "true", "yes")
  return ml_collections.ConfigDict(values)


def base_config():
  """Every key a training config has, with the reference values."""
  c = ml_collections.ConfigDict()
  c.seed = 114  # docs/reference_code.md §6
  c.num_classes = 19
  c.class_set = "cityscapes19"

  c.method = method_config("source_only")

  c.model = ml_collections.ConfigDict(dict(
      backbone="resnet101", width=1.0, dtype="float32", aspp_dilations=(6, 12, 18, 24),
      remat="",  # backbone stages recomputed in backward: '', 'all' or e.g. 'layer3,layer4'
      stem="deep",  # 'deep' (ResNet-V1c, reference) | '7x7' (torchvision/timm resnetNN weights)
      # backbone 'mit_b0'..'mit_b5' builds DAFormer (MiT encoder + this decoder) instead of
      # DeepLabV2: 'daformer' (context-aware fusion) | 'segformer' (all-MLP head).
      decoder="daformer",
  ))
  # Weights (confeti_jax/weights.py; convert .pth once with scripts/convert_weights.py):
  # `pretrained` = ImageNet backbone (.npz/.safetensors; the reference loads
  # open-mmlab resnet101_v1c), `init_from` = a whole segmentor, e.g. a released model.
  c.model.pretrained = ""
  c.model.init_from = ""

  c.data = ml_collections.ConfigDict()
  # format 'folder' reads the dataset's own layout at `root`; 'tfds' reads the ArrayRecord
  # copy under `tfds_dir` (scripts/prepare_data.py --tfds_dir).
  # keep_ratio=False squashes each training image into `scale` (CFContra's 1280x640 GTA5).
  c.data.source = ml_collections.ConfigDict(dict(
      kind="gta5", root="", scale=(1280, 720), keep_ratio=True, format="folder", tfds_dir=""))
  c.data.target = ml_collections.ConfigDict(dict(
      kind="cityscapes", root="", scale=(1280, 640), keep_ratio=True, format="folder",
      tfds_dir=""))
  c.data.check_sizes = True  # read every PNG header at start-up (image/label sizes agree)
  # Rare-class sampling (docs/reference_code.md §2.4); statistics from
  # scripts/prepare_data.py, read from `stats_dir` (default: the source root).
  c.data.rcs = ml_collections.ConfigDict(dict(
      enabled=False, temperature=0.01, min_pixels=3000, min_crop_ratio=0.5, stats_dir=""))
  c.data.crop_size = (512, 512)
  c.data.cat_max_ratio = 0.75  # source only; targets are never label-checked
  c.data.flip_prob = 0.5
  c.data.num_workers = 2
  c.data.toy = ml_collections.ConfigDict(dict(
      enabled=False, cache_dir="", seed=0, shift=0.5,
      num_source=300, num_source_val=60, num_target=300, num_val=60,
      classes=(),  # trainIds the scenes may hold; () = all (a partial-class benchmark)
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=80_000, batch_size=2, log_every_steps=50,
      checkpoint_every_steps=4000, keep_checkpoints=2,
      stop_at_step=0,  # >0: save and stop cleanly after this step (time-limited jobs)
      # >0: restart from this kept step; newer ones move to checkpoints_set_aside/
      restore_step=0,
      # TensorBoard image panel of what the step sees (confeti_jax/panels.py) every N
      # steps, DAFormer's debug-image interval; 0 = off (compiled out).
      image_every_steps=100,
  ))

  # AdamW 6e-5, heads x10, wd 0.01 on all params, poly(1.0) with linear warm-up 1500.
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=6e-5, head_lr_mult=10.0, weight_decay=0.01,
      b1=0.9, b2=0.999, eps=1e-8, poly_power=1.0, min_lr=0.0,
      warmup_steps=1500, warmup_ratio=1e-6,
      norm_decay=True,  # False: no weight decay on LayerNorms (DAFormer's paramwise cfg)
  ))

  c.eval = ml_collections.ConfigDict(dict(
      every_steps=4000, dataset="target", mode="whole", resize=False, scale=(2048, 1024),
      crop_size=(512, 512), stride=(341, 341), batch_size=1,
  ))
  return c


def method_config(name):
  """The `method` sub-config for `name`: its switches with the reference defaults.

  Each method adds its own builder to `_METHOD_DEFAULTS`; a config selects one with
  `config.method = common.method_config(args.method)`.
  """
  if name not in _METHOD_DEFAULTS:
    raise ValueError(f"Unknown method {name!r}; available: {sorted(_METHOD_DEFAULTS)}")
  return ml_collections.ConfigDict(dict(name=name, **_METHOD_DEFAULTS[name]()))


def _source_only():
  return {}


def _dacs():
  """Mean-teacher self-training (DAFormer's DACS as CONFETI runs it),
  docs/reference_code.md §2.1."""
  return dict(
      alpha=0.999,                 # EMA: alpha_t = min(1 - 1/(t+1), alpha), parameters only
      teacher_bn="batch",          # 'batch' (reference: train-mode teacher) | 'running'
      pseudo_threshold=0.968,      # q = fraction of target pixels with max prob >= this
      # Rows of the target weight map zeroed (top / bottom), given at psweight_ref_height
      # and scaled to the crop height (0 = use the numbers as they are).
      psweight_ignore_top=15,
      psweight_ignore_bottom=120,
      psweight_ref_height=512,
      color_jitter_strength=0.2,   # kornia 0.6.7 ColorJitter(b=c=s=h=0.2)
      color_jitter_p=0.2,          # jitter applied when U(0, 1) > p
      blur=True,                   # Gaussian blur applied when U(0, 1) > 0.5
      fd_lambda=0.005,             # ImageNet feature distance weight (0 = off)
      fd_classes=(6, 7, 11, 12, 13, 14, 15, 16, 17, 18),  # thing classes
      fd_scale_min_ratio=0.75,
      # MIC (Hoyer et al. 2023): masked target consistency; block 32 at 512 crops, 64 HR.
      mic=dict(enabled=False, mask_ratio=0.7, block_size=32, weight=1.0),
  )


def _confeti():
  """CONFETI (docs/reference_code.md §3, §4, §5): DACS + prototypes/PCL [+ joint CUT, L_SC]."""
  return dict(
      _dacs(),
      # The pipeline (docs/reference_code.md §5): 0 = CUT alone (the reference starts stage 1
      # from a pre-trained CUT), 1 = joint stage, 2 = fresh segmentor, frozen G.
      stages="0,1,2",          # which stages a run trains, in order ('1' = one stage)
      stage=1,                 # the stage this config's step runs (set by the plan)
      stage0_steps=20000,      # not in the reference ("a few epochs" of CUT, issue #4)
      stage2_crop=(640, 640),  # stage 1 uses data.crop_size (512)
      cut_from="",             # workdir whose checkpoint gives G (and D, F); set by the plan
      pixel_alignment=True,    # style module (+ L_SC when joint); False = model B
      style="cut",             # 'cut' (reference) | 'fda' / 'gpa' (Table 4, training-free)
      style_training="joint",  # 'joint' (reference) | 'frozen' (offline; Table 3 A, C)
      sc_loss="prototype",     # 'prototype' (reference L_SC) | 'mse' | 'ce' | 'none' (Table 4)
      sc_weight=0.1,
      fda_beta=0.01,           # FDA's L (band = floor(min(H, W) beta)) when style='fda'
      cut=cut_config(),
      proto=dict(
          enabled=True,        # CAM + projection heads, prototypes, PCL and regulariser
          dim=512,             # projection width (conv_proj 2048 -> 512, no bias)
          momentum=0.999,      # prototype EMA (a = 0.001 after a class's first update)
          top_n=32,            # pixels per class by CAM weight (hard-coded in the code)
          source="mixed",      # 'mixed' (reference) | 'source' (Table 5 source prototypes)
          weighting="cam",     # 'cam' (reference) | 'uniform' (Table 5 w/o CAM)
          pcl=True,            # PCL + regulariser terms (False: Table 5 w/o prototype)
          cam_weight=1.0,      # CAM BCE, source every step, mixed after cam_mix_after
          cam_mix_after=2000,
          pcl_after=3000,      # PCL src > / mix >= / tgt >; CAM weights and all pixels >
          temperature=0.1,
          num_samples=4096,    # random valid pixels per PCL term
          pcl_weight=0.5,
          reg_weight=2.0,      # x sum(log p) / (K ln K)
          reg_variant="code",  # 'code' (reference sign) | 'diversity' (paper's intent)
          target_pcl="joint",  # 'joint' (reference: while CUT trains) | 'always' | 'never'
      ),
  )


# CONFETI's Table 3 rows (paper §4.3): the baseline is method=dacs; A-E are CONFETI with
# parts removed. "Offline" = CUT trained alone (stage 0), then frozen while the segmentor
# trains (one stage); "joint" = CUT trained with the segmentor (stage 1); "two-stage" adds
# the fresh segmentor on the frozen generator (stage 2). Without PCL the prototypes are
# still estimated (CAM head + projection), since L_SC reads them.
TABLE3_MODELS = {
    "A": dict(stages="0,1", style_training="frozen", proto_enabled=False, pcl=False),
    "B": dict(pixel_alignment=False, pcl=True),
    "C": dict(stages="0,1", style_training="frozen", pcl=True),
    "D": dict(stages="0,1", pcl=False),
    "E": dict(stages="0,1,2", pcl=False),
}


def apply_table3_model(config, model, stage="all"):
  """Turns a CONFETI config into Table 3's model A-E ('' = CONFETI itself).

  `stage` other than 'all' keeps a single stage of that model's plan (e.g. to rerun it).
  """
  if not model:
    return config
  if model not in TABLE3_MODELS:
    raise ValueError(f"model must be one of {sorted(TABLE3_MODELS)} (Table 3) or empty, got "
                     f"{model!r}; the baseline is method=dacs.")
  if config.method.name != "confeti":
    raise ValueError(f"model={model} is a CONFETI variant; it needs method=confeti.")
  row = dict(TABLE3_MODELS[model])
  m = config.method
  m.proto.enabled = row.pop("proto_enabled", True)
  m.proto.pcl = row.pop("pcl")
  stages = row.pop("stages", m.stages)
  if stage != "all" and str(stage) not in stages.split(","):
    raise ValueError(f"model {model} trains stages {stages}; stage={stage} is not one of them.")
  m.stages = stages if stage == "all" else str(stage)
  for key, value in row.items():
    m[key] = value
  return config


def _minent():
  """ADVENT MinEnt (docs/peers.md §3.1): entropy weights and the multi-level head."""
  return dict(
      ent_weight=1e-3,       # LAMBDA_ENT_MAIN
      ent_weight_aux=2e-4,   # LAMBDA_ENT_AUX (multi-level head only)
      seg_weight_aux=0.1,    # LAMBDA_SEG_AUX
      multi_level=True,      # ADVENT's layer3 classifier (MULTI_LEVEL: True)
      bn_eval=False,         # False: train-mode BN as ADVENT; True: running statistics
  )


def _cfcontra():
  """CFContra (docs/peers.md §5, paper §3-4): MinEnt + memory-bank contrast; AdaIN stage."""
  return dict(
      _minent(),
      stage="segment",       # 'segment' | 'style' (trains the AdaIN decoder)
      contrast=dict(
          enabled=True,
          head="moco",               # none | linear | moco | byol | simclr (Table 1)
          proj_dim=0,                # head output width; 0 = the layer4 width
          train_head=False,          # the code never optimises its head; True = paper
          temperature=0.07,
          momentum=0.9,
          threshold=0.05,            # pseudo-label margin t
          weight_src=1e-3, weight_tgt=1e-3, weight_tgt2src=1e-3, weight_src2tgt=1e-3,
          terms="all",               # 'all' (four terms) | 'intra' (Table 4)
          bank_update="cross",       # 'cross' (code) | 'domain' (paper Eq. 16-17)
          # Bank each term's feature gradient sees: 'in_place' (code: as moved by the
          # terms whose backward ran first) | 'start' (paper: the start-of-step banks).
          bank_gradients="in_place",
          # Warm-up source centres over 'correct' pixels (code: labelled and predicted
          # c) | 'labelled' (paper Eq. 9: every pixel labelled c).
          source_centres="correct",
          warmup_source_images=301,  # the code's centre pass: 301 source images,
          warmup_target_images=1601,  # then 1601 target images
      ),
      style=dict(
          vgg_weights="",            # .npz of vgg_normalised.pth (stage 'style')
          random_encoder=False,      # toy only: a random VGG instead of the weights
          vgg_width=1.0,
          vgg_padding="reflect",     # 'reflect' (vgg_normalised) | 'zeros' (torchvision VGG-19)
          content_weight=1.0, style_weight=10.0, alpha=1.0,
          lr=1e-4, lr_decay=5e-5,    # Adam, lr_t = lr / (1 + lr_decay * t)
      ),
  )


def cut_config():
  """The `method.cut` sub-dict: CUT as CONFETI runs it (docs/reference_code.md §4.2), shared by
  stage 0 (method 'cut') and CONFETI's joint stage."""
  return dict(
      ngf=64, n_blocks=9,             # resnet_9blocks generator
      ndf=64, n_layers_d=3,           # 'basic' PatchGAN
      netf_nc=256,                    # patch MLP width
      nce_layers=(0, 4, 8, 12, 16),   # indices of the generator's nn.Sequential
      num_patches=256, nce_t=0.07,
      lambda_gan=1.0, lambda_nce=1.0,
      nce_idt=True,                   # identity NCE on G(x_t) (CUT mode)
      lr=2e-4, b1=0.5, b2=0.999,      # Adam for G, D and F; constant (never decayed)
      dtype="",                       # compute dtype; '' = model.dtype
      remat=False,                    # recompute G's ResNet blocks in the backward pass
      # .npz (or .pth with torch) of latest_net_G / _D / _F.pth; '' = xavier init.
      gen_weights="", disc_weights="", mlp_weights="",
  )


def _cut():
  """Stage 0: stand-alone CUT (source -> target), no segmentor."""
  return dict(cut=cut_config())


_METHOD_DEFAULTS = {
    "source_only": _source_only,
    "minent": _minent,
    "cfcontra": _cfcontra,
    "dacs": _dacs,
    "cut": _cut,
    "confeti": _confeti,
}
