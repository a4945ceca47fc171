"""Runs variants x seeds of a config and writes a markdown table of target mIoU.

  python scripts/ablations.py --config=configs/toy.py --variant=source_only --variant=dacs \
      --seeds=0,1,2 --root=workdirs/ablations
  python scripts/ablations.py --config=configs/toy.py \
      --variant='joint=confeti;method.stages=0,1' --seeds=0

A `--variant` (repeat the flag, one variant each; commas inside are kept) is a method
name, or `label=method[;key=value;...]` with config overrides, e.g.
`dacs_nofd=dacs;method.fd_lambda=0`. Each run is `python -m confeti_jax.main` in
`<root>/<label>/seed_<s>`, its output in `run.log` there. A finished run is reused
(`table_run.json` records its command), an interrupted one resumes. The table gives the
mean and population standard deviation over seeds of the final target mIoU (and mIoU16 /
mIoU13 where the evaluation reports them) with per-class means, in the papers' column
order. Also written: `<root>/results.md` and `results.json`. scripts/paper_tables.py runs
the papers' rows through the same functions.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from result_tables import eta_line, launch, table  # noqa: E402


def parse_variant(spec):
  label, _, rest = spec.partition("=")
  if not rest:
    return label, label, []
  method, *overrides = rest.split(";")
  return label, method, overrides


_CONFIG = flags.DEFINE_string("config", "configs/toy.py", "Config file (without :arg).")
_VARIANT = flags.DEFINE_multi_string("variant", ["source_only"], "One variant (see above).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_OUT = flags.DEFINE_string("root", "workdirs/ablations", "Folder of the runs and the table.")
_EXTRA = flags.DEFINE_multi_string("override", [], "Overrides for every run: key=value.")


def main(argv):
  del argv
  rows, raw = [], {}
  total, done, spent, fresh = len(_VARIANT.value) * len(_SEEDS.value), 0, 0.0, 0
  for spec in _VARIANT.value:
    label, method, overrides = parse_variant(spec)
    runs = []
    for seed in _SEEDS.value:
      workdir = os.path.abspath(os.path.join(_OUT.value, label, f"seed_{seed}"))
      print(f"[{label} seed {seed}] {workdir}", flush=True)
      result = launch(f"{_CONFIG.value}:method={method}", list(_EXTRA.value) + overrides,
                      seed, workdir)
      done += 1
      if not result["reused"]:
        spent, fresh = spent + result["wall_s"], fresh + 1
      runs.append((result, workdir))
      print(f"  mIoU {result['miou']:.2f} ({result['wall_s']:.0f} s); "
            f"{eta_line(done, total, spent, fresh)}", flush=True)
    rows.append((label, runs))
    raw[label] = [{"seed": s, "miou": r["miou"], "step": r["step"], "wall_s": r["wall_s"]}
                  for s, (r, _) in zip(_SEEDS.value, runs)]
  text = table(rows)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "results.md"), "w") as f:
    f.write(f"Target val mIoU, {_CONFIG.value}, seeds {','.join(_SEEDS.value)}\n\n{text}\n")
  with open(os.path.join(_OUT.value, "results.json"), "w") as f:
    json.dump(raw, f, indent=2)
  print(text)
  print(f"Table: {os.path.abspath(os.path.join(_OUT.value, 'results.md'))}")


if __name__ == "__main__":
  app.run(main)
