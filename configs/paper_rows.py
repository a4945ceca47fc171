"""Every row of the CONFETI and CFContra papers that this project can train, as data.

`scripts/paper_tables.py` lists, runs and tabulates them. A row is a setting (which
config file), a method, config arguments and `--config.` overrides; the same row runs in
miniature on the embedded toy (`toy_command`), where the real data and sizes are
replaced by the toy's and everything that makes the row what it is stays. Paper
figures are the published mIoU (CFContra Table 4: CE loss, entropy, pseudo-label
accuracy change). Rows of other papers' methods in the comparison tables (CyCADA,
ProDA, HRDA, ...) are not here: they are other code bases.

Rows marked `needs='adain_source'` train on GTA5 stylised offline by the AdaIN decoder
(configs/adain_gta2cs.py, then scripts/stylize_adain.py); the runner takes that folder
as `--adain_source` and refuses those rows without it. In CONFETI's Table 4 the AdaIN
column replaces CUT by AdaIN inside the pipeline; here it is the offline form (CONFETI
without a style module, on the stylised source), an approximation: the paper does not
say whether its AdaIN was re-drawn per step.
"""

import dataclasses

CITYSCAPES_VAL = "Cityscapes val"


@dataclasses.dataclass(frozen=True)
class Table:
  title: str
  per_class: bool = False         # per-class IoU columns, as the paper's table
  metrics: tuple = ("miou",)      # eval/latest.json keys; 'train:KEY' = metrics.jsonl


@dataclasses.dataclass(frozen=True)
class Row:
  id: str                         # '<paper>.t<table>.<row>', e.g. 'confeti.t3.A'
  label: str
  setting: str                    # 'gta2cs' | 'synthia2cs' | 'advent' (minent/cfcontra files)
  method: str
  args: tuple = ()                # (('model', 'A'), ...) -> ':method=M,model=A'
  overrides: tuple = ()           # 'key=value' after --config.
  paper: tuple = ()               # the paper's figures, in the table's metric order
  needs: str = ""                 # 'adain_source': an AdaIN-stylised GTA5 folder
  toy_overrides: tuple = ()       # extra overrides of the miniature only

  @property
  def table(self):
    return ".".join(self.id.split(".")[:2])


TABLES = {
    "confeti.t1": Table("CONFETI Table 1: GTA5 -> Cityscapes (mIoU, %)", per_class=True),
    "confeti.t2": Table("CONFETI Table 2: SYNTHIA -> Cityscapes (mIoU16 / mIoU13, %)",
                        per_class=True, metrics=("miou16", "miou13")),
    "confeti.t3": Table("CONFETI Table 3: ablation of the pipeline, GTA5 -> Cityscapes"),
    "confeti.t4": Table("CONFETI Table 4: style transfer and semantic consistency losses"),
    "confeti.t5": Table("CONFETI Table 5: prototype estimation"),
    "cfcontra.t2": Table("CFContra Table 2: GTA5 -> Cityscapes (mIoU, %)", per_class=True),
    "cfcontra.t3": Table("CFContra Table 3: ablation (entropy, style transfer, contrast)"),
    "cfcontra.t4": Table("CFContra Table 4: losses and pseudo-label accuracy (last 10% of "
                         "logged steps)", metrics=("train:loss_src_seg", "train:loss_ent",
                                                   "train:pseudo_acc")),
    "cfcontra.t5": Table("CFContra Table 5: parameter sensitivity (class-wise alignment only)"),
    "cfcontra.t6": Table("CFContra Table 6: projection heads (class-wise alignment only)"),
}

_FULL = (("res", "full"),)
# The miniature of full resolution: the toy's whole target height as the crop.
_TOY_FULL = ("data.crop_size=(160,160)", "method.stage2_crop=(160,160)")
_NO_ENTROPY = ("method.ent_weight=0", "method.ent_weight_aux=0")
_NO_CONTRAST = ("method.contrast.enabled=False",)


def _confeti(id_, label, paper, *overrides, args=(), needs="", toy=()):
  return Row(id_, label, "gta2cs", "confeti", args, tuple(overrides), paper, needs, toy)


def _contra(id_, label, paper, *overrides, method="cfcontra", needs=""):
  return Row(id_, label, "advent", method, (), tuple(overrides), paper, needs)


ROWS = (
    # CONFETI, Table 1 (per class) and Table 2 (SYNTHIA, 16 and 13 classes).
    Row("confeti.t1.dacs", "DACS (the self-training baseline, Sec. 3.1)", "gta2cs", "dacs",
        paper=(57.5,)),
    _confeti("confeti.t1.confeti", "CONFETI", (62.2,)),
    _confeti("confeti.t1.confeti_full", "CONFETI-dagger (full resolution, 1024 crops)",
             (63.3,), args=_FULL, toy=_TOY_FULL),
    Row("confeti.t2.dacs", "DACS", "synthia2cs", "dacs", paper=(48.3, 54.8)),
    Row("confeti.t2.confeti", "CONFETI", "synthia2cs", "confeti", paper=(58.7, 67.4)),
    # Table 3: the pipeline's parts (configs/common.py TABLE3_MODELS).
    Row("confeti.t3.baseline", "Baseline (DACS)", "gta2cs", "dacs", paper=(57.5,)),
    *(_confeti(f"confeti.t3.{m}", f"{m}: {what}", (miou,), args=(("model", m),))
      for m, what, miou in (("A", "offline CUT", 57.1), ("B", "PCL (feature align)", 60.0),
                            ("C", "offline CUT + PCL", 57.6),
                            ("D", "joint CUT (pixel align)", 59.0),
                            ("E", "joint CUT, two-stage", 59.0))),
    _confeti("confeti.t3.confeti", "CONFETI (joint, two-stage, PCL)", (62.2,)),
    # Table 4 top: other style modules with PCL; bottom: semantic consistency losses.
    _confeti("confeti.t4.fda", "FDA", (60.5,), "method.style=fda"),
    _confeti("confeti.t4.gpa", "GPA", (59.4,), "method.style=gpa"),
    _confeti("confeti.t4.adain", "AdaIN (offline, stylised source)", (59.1,),
             "method.pixel_alignment=False", needs="adain_source"),
    _confeti("confeti.t4.cut", "CUT (ours)", (62.2,)),
    _confeti("confeti.t4.sc_none", "w/o L_SC", (58.0,), "method.sc_loss=none"),
    _confeti("confeti.t4.sc_ce", "L_CE", (58.6,), "method.sc_loss=ce"),
    _confeti("confeti.t4.sc_mse", "MSE", (61.6,), "method.sc_loss=mse"),
    _confeti("confeti.t4.sc", "L_SC (ours)", (62.2,)),
    # Table 5: prototypes from the source or the mixed image, with and without CUT / CAM.
    Row("confeti.t5.none_nocut", "w/o prototype, w/o CUT (DACS)", "gta2cs", "dacs",
        paper=(57.5,)),
    _confeti("confeti.t5.none_cut", "w/o prototype, CUT (offline: model A)", (57.1,),
             args=(("model", "A"),)),
    _confeti("confeti.t5.source_nocut", "source prototype, w/o CUT", (58.6,),
             "method.pixel_alignment=False", "method.proto.source=source"),
    _confeti("confeti.t5.source_cut", "source prototype, CUT", (60.5,),
             "method.proto.source=source"),
    _confeti("confeti.t5.mixed_nocut", "mixed prototype, w/o CUT (model B)", (60.0,),
             "method.pixel_alignment=False"),
    _confeti("confeti.t5.mixed_cut", "mixed prototype, CUT (CONFETI)", (62.2,)),
    _confeti("confeti.t5.no_cam", "w/o CAM (mean of all class pixels)", (60.1,),
             "method.proto.weighting=mean"),
    # CFContra, Table 2 and Table 3.
    _contra("cfcontra.t2.baseline", "baseline (source only, ADVENT recipe)", (35.0,),
            *_NO_ENTROPY, method="minent"),
    _contra("cfcontra.t2.minent", "MinEnt", (42.3,), method="minent"),
    _contra("cfcontra.t2.cfcontra", "CFContra", (45.8,), needs="adain_source"),
    _contra("cfcontra.t3.entropy", "entropy", (42.3,), method="minent"),
    _contra("cfcontra.t3.style", "entropy + style transfer", (44.8,), *_NO_CONTRAST,
            needs="adain_source"),
    _contra("cfcontra.t3.contrast", "entropy + contrast", (45.4,)),
    _contra("cfcontra.t3.all", "entropy + style transfer + contrast", (45.8,),
            needs="adain_source"),
    # Table 4: what the contrast does to the losses and the nearest-centre pseudo-labels.
    _contra("cfcontra.t4.baseline", "baseline", (0.160, None, None), *_NO_ENTROPY,
            method="minent"),
    _contra("cfcontra.t4.minent", "MinEnt", (0.148, 0.148, None), method="minent"),
    _contra("cfcontra.t4.intra", "CONTRA(intra)", (0.128, 0.104, None),
            "method.contrast.terms=intra", "method.contrast.head=none"),
    _contra("cfcontra.t4.all", "CONTRA(all)", (0.115, 0.08, None),
            "method.contrast.head=none"),
    _contra("cfcontra.t4.moco", "CONTRA(MOCO)", (0.112, 0.09, None)),
    # Table 5: one parameter at a time around tau 0.07, alpha 0.9, t 0.05, lambda 1e-3.
    *(_contra(f"cfcontra.t5.tau_{v}", f"tau = {v}", (miou,), f"method.contrast.temperature={v}")
      for v, miou in ((0.03, 43.2), (0.05, 44.3), (0.07, 44.4), (0.14, 44.6))),
    *(_contra(f"cfcontra.t5.alpha_{v}", f"alpha = {v}", (miou,),
              f"method.contrast.momentum={v}") for v, miou in ((0.9, 44.5), (0.99, 44.4))),
    *(_contra(f"cfcontra.t5.t_{v}", f"threshold t = {v}", (miou,),
              f"method.contrast.threshold={v}") for v, miou in ((0.03, 44.5), (0.05, 44.5))),
    *(_contra(f"cfcontra.t5.lambda_{v}", f"lambda_contra = {v}", (miou,),
              *(f"method.contrast.weight_{t}={v}" for t in ("src", "tgt", "tgt2src", "src2tgt")))
      for v, miou in ((0.1, 31.6), (0.01, 41.3), (0.001, 44.5))),
    # Table 6: the head that remaps features for the contrast.
    *(_contra(f"cfcontra.t6.{h}", h, (miou,), f"method.contrast.head={h}")
      for h, miou in (("none", 44.4), ("linear", 44.0), ("simclr", 44.8), ("byol", 44.9),
                      ("moco", 45.4))),
)

ROWS_BY_ID = {row.id: row for row in ROWS}
assert len(ROWS_BY_ID) == len(ROWS), "duplicate row id"

_ADVENT_FILES = {"minent": "configs/minent_gta2cs.py", "cfcontra": "configs/cfcontra_gta2cs.py"}


def config_arg(row):
  """'configs/FILE.py[:ARGS]' of the real run."""
  if row.setting == "advent":
    return _ADVENT_FILES[row.method]
  args = ",".join([f"method={row.method}"] + [f"{k}={v}" for k, v in row.args])
  return f"configs/{row.setting}.py:{args}"


def toy_config_arg(row):
  """'configs/toy.py:ARGS' of the miniature: the row's method and arguments; the SYNTHIA
  rows keep their 16/13-class evaluation through the class set."""
  args = [f"method={row.method}"] + [f"{k}={v}" for k, v in row.args if k != "res"]
  if row.setting == "synthia2cs":
    args.append("class_set=synthia19")
  return "configs/toy.py:" + ",".join(args)


def overrides(row, toy=False):
  """The row's `--config.` overrides ('key=value'), the miniature's extras included."""
  return list(row.overrides) + (list(row.toy_overrides) if toy else [])


def select(patterns):
  """Rows whose id matches any of the shell-style `patterns` ('confeti.t3.*'), in order."""
  import fnmatch

  chosen = [r for r in ROWS if any(fnmatch.fnmatchcase(r.id, p) for p in patterns)]
  unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(r.id, p) for r in ROWS)]
  if unknown:
    raise ValueError(f"No paper row matches {unknown}; `scripts/paper_tables.py --list` "
                     "names them all.")
  return chosen
