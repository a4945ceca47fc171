"""Lists, trains and tabulates the rows of the CONFETI and CFContra papers' tables.

  python scripts/paper_tables.py --list                      # every row and its command
  python scripts/paper_tables.py --rows='confeti.t3.*' --seeds=0,1,2 --root=workdirs/paper \
      --override=data.source.root=/data/gta5 --override=data.target.root=/data/cityscapes \
      --override=model.pretrained=r101_v1c.npz
  python scripts/paper_tables.py --rows='confeti.t3.*' --setting=toy --seeds=0 \
      --root=workdirs/paper_toy                             # the same rows in miniature
  python scripts/paper_tables.py --rows='confeti.t3.*' --dry_run   # commands only

Rows live in configs/paper_rows.py. `--rows` takes ids or shell patterns
(`confeti.t4.*,cfcontra.t6.moco`). Runs are sequential, in `<root>/runs/<row>/seed_<s>`;
rows that are the same run (CONFETI appears in four tables) share one. Rerunning the
command reuses finished runs and resumes the interrupted one, so a table can be built
over several sessions. Each touched table is written to `<root>/<table>.md` in the paper's
layout (per-class columns where the paper has them, mean ± std over seeds, the paper's
figure last) and all of them to `<root>/tables.md`. `--override` (repeatable) applies to
every run: data roots, weights, or sizes for a miniature on real folders. Rows trained
on an AdaIN-stylised source need `--adain_source=FOLDER` (configs/adain_gta2cs.py, then
scripts/stylize_adain.py); without it they are refused before anything trains.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import result_tables  # noqa: E402  (scripts/result_tables.py: launch and table)

from configs import paper_rows  # noqa: E402

_LIST = flags.DEFINE_bool("list", False, "Print every row with its command and exit.")
_ROWS = flags.DEFINE_list("rows", [], "Row ids or shell patterns, e.g. 'confeti.t3.*'.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_ROOT = flags.DEFINE_string("root", "workdirs/paper", "Folder of the runs and the tables.")
_SETTING = flags.DEFINE_enum("setting", "real", ["real", "toy"],
                             "real: the paper configs; toy: each row in miniature.")
_TINY = flags.DEFINE_bool("tiny", False, "With --setting=toy: the test-sized toy (tiny=1).")
_ADAIN = flags.DEFINE_string("adain_source", "", "AdaIN-stylised source folder (GTA5 layout).")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "key=value for every run.")
_DRY = flags.DEFINE_bool("dry_run", False, "Print the commands; train nothing.")
_SKIP_NEEDING = flags.DEFINE_bool(
    "skip_rows_needing_inputs", False,
    "Leave out (and name) the rows that need --adain_source instead of refusing the call.")


def run_plan(row, *, setting="real", tiny=False, adain_source="", extra=()):
  """(config_arg, overrides) of one row: the paper run, or its miniature on the toy."""
  toy = setting == "toy"
  config_arg = paper_rows.toy_config_arg(row) if toy else paper_rows.config_arg(row)
  if toy and tiny:
    config_arg += ",tiny=1"
  overrides = list(extra) + paper_rows.overrides(row, toy=toy)
  if row.needs == "adain_source":
    if not adain_source:
      raise ValueError(f"Row {row.id} trains on an AdaIN-stylised source: pass "
                       "--adain_source=FOLDER (configs/adain_gta2cs.py trains the decoder, "
                       "scripts/stylize_adain.py writes the folder).")
    overrides.append(f"data.source.root={os.path.abspath(adain_source)}")
  return config_arg, overrides


def shared_run_ids(rows, **plan_kw):
  """{row id: id of the first row (in paper_rows.ROWS order) with the same run}."""
  first, out = {}, {}
  for row in paper_rows.ROWS:
    try:
      key = repr(run_plan(row, **plan_kw))
    except ValueError:
      key = row.id
    first.setdefault(key, row.id)
    out[row.id] = first[key]
  return {r.id: out[r.id] for r in rows}


def command_line(config_arg, overrides):
  return " ".join(["python -m confeti_jax.main", f"--config={config_arg}", "--workdir=W"]
                  + [f"--config.{o}" for o in overrides])


def write_tables(rows, results, root, seeds):
  """<root>/<table>.md per touched table and <root>/tables.md; returns the combined text."""
  parts = []
  for table_id in dict.fromkeys(r.table for r in rows):
    spec = paper_rows.TABLES[table_id]
    members = [r for r in rows if r.table == table_id]
    body = result_tables.table([(r.label, results[r.id]) for r in members], metrics=spec.metrics,
                           per_class=spec.per_class, paper={r.label: r.paper for r in members})
    text = f"## {spec.title}\n\nseeds {','.join(seeds)}; rows: " \
           f"{', '.join(r.id for r in members)}\n\n{body}\n"
    with open(os.path.join(root, f"{table_id}.md"), "w") as f:
      f.write(text)
    parts.append(text)
  combined = "\n".join(parts)
  with open(os.path.join(root, "tables.md"), "w") as f:
    f.write(combined)
  return combined


def main(argv):
  del argv
  plan_kw = dict(setting=_SETTING.value, tiny=_TINY.value, adain_source=_ADAIN.value,
                 extra=_OVERRIDE.value)
  if _LIST.value:
    for row in paper_rows.ROWS:
      config_arg = paper_rows.config_arg(row)
      needs = " [needs --adain_source]" if row.needs else ""
      print(f"{row.id:28s} {row.label} (paper {'/'.join(map(str, row.paper))}){needs}\n"
            f"    {command_line(config_arg, paper_rows.overrides(row))}")
    return
  if not _ROWS.value:
    raise app.UsageError("Pass --rows (e.g. 'confeti.t3.*') or --list; tables: "
                         + ", ".join(paper_rows.TABLES))
  try:
    rows = paper_rows.select(_ROWS.value)
    if _SKIP_NEEDING.value and not _ADAIN.value:
      skipped = [r.id for r in rows if r.needs]
      rows = [r for r in rows if not r.needs]
      if skipped:
        print(f"Left out (they need --adain_source): {', '.join(skipped)}")
    plans = {r.id: run_plan(r, **plan_kw) for r in rows}   # refuses missing inputs first
  except ValueError as e:
    sys.exit(f"paper_tables: {e}")
  shared = shared_run_ids(rows, **plan_kw)
  root = os.path.abspath(_ROOT.value)
  jobs = {}  # (shared run id, seed) -> the plan of a row that is that run
  for r in rows:
    for s in _SEEDS.value:
      jobs.setdefault((shared[r.id], s), plans[r.id])
  if _DRY.value:
    for (run_id, seed), plan in jobs.items():
      print(f"[{run_id} seed {seed}] {command_line(*plan)} --config.seed={seed}")
    return
  done_runs, spent, fresh = {}, 0.0, 0
  for i, ((run_id, seed), plan) in enumerate(jobs.items()):
    workdir = os.path.join(root, "runs", run_id, f"seed_{seed}")
    print(f"[{run_id} seed {seed}] {workdir}", flush=True)
    t0 = time.time()
    result = result_tables.launch(*plan, seed, workdir)
    if not result["reused"]:
      spent, fresh = spent + time.time() - t0, fresh + 1
    done_runs[(run_id, seed)] = (result, workdir)
    print(f"  mIoU {result['miou']:.2f}; {result_tables.eta_line(i + 1, len(jobs), spent, fresh)}",
          flush=True)
  results = {r.id: [done_runs[(shared[r.id], s)] for s in _SEEDS.value] for r in rows}
  print(write_tables(rows, results, root, _SEEDS.value))
  print(f"Tables written: {os.path.join(root, 'tables.md')}")


if __name__ == "__main__":
  app.run(main)
