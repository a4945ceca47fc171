"""One self-contained HTML page of one or more training workdirs, opened with no server.

    python scripts/report.py --workdir=workdirs/a [--workdir=workdirs/b ...] --out=report.html

Per run: a heading (model, method, data), curves of every stage (losses, learning rates,
mIoU of eval/step_*.json, pseudo-label accuracy and weight q, gradient norm, steps/s), every
PNG in its eval/ and visualize/ folders, and its config. At the top, one per-class IoU table
over all runs and stages (best and latest evaluation) in the papers' column order. Curves
and images are base64 data URIs and the CSS is inline, so the file can be mailed or
archived alone. A multi-stage run (method=confeti) is read from its stage folders.
Needs matplotlib, as scripts/plot_metrics.py, whose readers it shares.
"""

import argparse
import base64
import dataclasses
import datetime
import hashlib
import html
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plot_metrics  # noqa: E402
import report_curves  # noqa: E402

from confeti_jax import evaluate, writer  # noqa: E402
from confeti_jax.run_config import CONFIG_FILE  # noqa: E402

# Stage folders are named by the methods' `stage_plan` (stage0, stage1, stage2, ...).
STAGE_FOLDER = re.compile(r"^stage(\d+)(.*)$")
IMAGE_FOLDERS = ("eval", "visualize", "panels")  # panels: the latest training panel
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
STEP_FILE = re.compile(r"^step_(\d+)\.json$")


@dataclasses.dataclass
class Stage:
  """One trained folder: a single-stage workdir, or one stage of a pipeline."""
  name: str  # "" for a single-stage run
  path: str
  rows: list
  config: dict
  evals: dict  # eval folder -> records of eval/step_*.json, by step
  best: dict  # eval folder -> eval/best.json
  latest: dict  # eval folder -> eval/latest.json


@dataclasses.dataclass
class Run:
  name: str
  path: str
  stages: list


def _read_json(path):
  """The JSON of `path`, or None when it is missing or unreadable (a report is best-effort)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def _read_evals(folder):
  """(records by step, best, latest) of every eval folder present in `folder`."""
  evals, best, latest = {}, {}, {}
  for prefix in report_curves.EVAL_FOLDERS:
    directory = os.path.join(folder, prefix)
    if not os.path.isdir(directory):
      continue
    names = [n for n in os.listdir(directory) if STEP_FILE.match(n)]
    records = [r for r in (_read_json(os.path.join(directory, n)) for n in names) if r]
    evals[prefix] = sorted(records, key=lambda r: int(r["step"]))
    for kind, out in (("best", best), ("latest", latest)):
      record = _read_json(os.path.join(directory, f"{kind}.json"))
      if record:
        out[prefix] = record
  return evals, best, latest


def _read_stage(name, folder):
  rows = []
  if os.path.isfile(os.path.join(folder, writer.METRICS_FILE)):
    rows = plot_metrics.read_rows(folder)
  config = _read_json(os.path.join(folder, CONFIG_FILE)) or {}
  return Stage(name, folder, rows, config, *_read_evals(folder))


def _has(folder, name):
  return os.path.isfile(os.path.join(folder, name))


def _stage_folders(workdir):
  """[(name, path)] of the stage sub-folders that have started training, in stage order."""
  found = []
  for name in os.listdir(workdir):
    match = STAGE_FOLDER.match(name)
    path = os.path.join(workdir, name)
    if match and os.path.isdir(path) and (_has(path, writer.METRICS_FILE)
                                          or _has(path, CONFIG_FILE)):
      found.append((int(match.group(1)), match.group(2), name, path))
  return [(name, path) for *_, name, path in sorted(found)]


def read_run(workdir, name):
  """The Run of `workdir`; SystemExit naming the path and the fix when it is no workdir."""
  path = os.path.abspath(workdir)
  if not os.path.isdir(path):
    raise SystemExit(f"report: {workdir} is not a folder; pass --workdir=<the folder given "
                     "to `python -m confeti_jax.main --workdir`>.")
  stages = [_read_stage(n, p) for n, p in _stage_folders(path)]
  missing = [f for f in (writer.METRICS_FILE, CONFIG_FILE) if not _has(path, f)]
  if not missing:
    stages.insert(0, _read_stage("", path))
  elif not stages:
    raise SystemExit(
        f"report: {workdir} has no {' and no '.join(missing)} (nor stage folders holding "
        "them), so it is not a training workdir. Pass --workdir=<the folder given to `python "
        "-m confeti_jax.main --workdir`> once it has logged a step, or a stage folder of it.")
  return Run(name, path, stages)


def _run_names(workdirs):
  """Folder names, or the paths as given where two runs share a folder name."""
  names = [os.path.basename(os.path.normpath(os.path.abspath(w))) for w in workdirs]
  return [n if names.count(n) == 1 else w for n, w in zip(names, workdirs)]


def _data_uri(data, mime="image/png"):
  return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _img(data, alt, mime="image/png"):
  return f'<img src="{_data_uri(data, mime)}" alt="{html.escape(alt)}">'


# ----------------------------------------------------------------------------------------
# Tables.


def _label(run, stage):
  return f"{run.name} / {stage.name}" if stage.name else run.name


def _fmt(value, digits=1):
  return "-" if value is None else f"{value:.{digits}f}"


def _model(stage):
  record = next(iter(stage.latest.values()), None)
  if record and record.get("model"):
    return record["model"]
  method = stage.config.get("method", {})
  if method.get("name") == "cut" or (method.get("name") == "confeti" and method.get("stage") == 0):
    cut = method.get("cut", {})  # CONFETI's stage 0 trains CUT alone: no segmentor
    return f"cut/resnet_{cut.get('n_blocks', '?')}blocks_ngf{cut.get('ngf', '?')}"
  return str(stage.config.get("model", {}).get("backbone", "?"))


def _dataset(stage):
  data = stage.config.get("data", {})
  kinds = [data.get(side, {}).get("kind") for side in ("source", "target")]
  text = " \u2192 ".join(k for k in kinds if k)
  if data.get("toy", {}).get("enabled"):
    text = f"toy {text}"
  return text or "?"


def _method(stage):
  return stage.config.get("method", {}).get("name", "?")


def _iou_cell(value):
  """A cell shaded by its IoU, so strong and failed classes stand out in a wide table."""
  if value is None:
    return '<td class="num">-</td>'
  alpha = max(0.0, min(1.0, value / 100.0)) * 0.55
  return f'<td class="num" style="background:rgba(46,125,50,{alpha:.2f})">{value:.1f}</td>'


def iou_table(runs):
  """HTML per-class IoU table, rows best/latest of each run, stage and eval split, columns
  the classes in trainId order with the papers' short names, then mIoU (and subsets)."""
  entries = []
  for run in runs:
    for stage in run.stages:
      for prefix, split in report_curves.EVAL_FOLDERS.items():
        for kind, records in (("best", stage.best), ("latest", stage.latest)):
          if prefix in records:
            entries.append((_label(run, stage), split, kind, records[prefix]))
  if not entries:
    return "<p>No evaluation yet (no eval/latest.json in any workdir).</p>", ""
  class_names = []
  for *_, record in entries:
    class_names += [n for n in record.get("per_class_iou", {}) if n not in class_names]
  subsets = [k for k in report_curves.SUBSET_KEYS if any(k in r for *_, r in entries)]
  head = "".join(f'<th title="{html.escape(n)}">{html.escape(evaluate._short_name(n))}</th>'
                 for n in class_names)
  head += "<th>mIoU</th>" + "".join(f"<th>{evaluate._SUBSET_TITLES[k]}</th>" for k in subsets)
  body = []
  for label, split, kind, record in entries:
    ious = record.get("per_class_iou", {})
    cells = "".join(_iou_cell(ious.get(n)) for n in class_names)
    cells += "".join(f'<td class="num miou">{_fmt(record.get(k))}</td>'
                     for k in ["miou"] + subsets)
    body.append(f'<tr><th class="row">{html.escape(label)}</th><td>{split}</td><td>{kind}</td>'
                f'<td class="num">{record.get("step", "?")}</td>{cells}</tr>')
  table = ('<div class="scroll"><table class="iou"><thead><tr><th class="row">run</th>'
           f"<th>split</th><th>eval</th><th>step</th>{head}</tr></thead><tbody>"
           + "".join(body) + "</tbody></table></div>")
  markdown = "".join(f"{label}, {split}, {kind} (step {record.get('step', '?')}):\n"
                     + evaluate.markdown_table(record, list(record.get("per_class_iou", {})))
                     + "\n" for label, split, kind, record in entries)
  return table, markdown


def summary_table(runs):
  """One line per run and stage: what was trained, how far, and its best/latest mIoU."""
  body = []
  for run in runs:
    for stage in run.stages:
      last = stage.rows[-1]["step"] if stage.rows else 0
      planned = stage.config.get("train", {}).get("steps", "?")
      best = stage.best.get("eval")
      latest = stage.latest.get("eval")
      best_text = f"{_fmt(best.get('miou'), 2)} (step {best.get('step')})" if best else "-"
      latest_text = (f"{_fmt(latest.get('miou'), 2)} (step {latest.get('step')})"
                     if latest else "-")
      anchor = _anchor(run, stage)
      body.append(
          f'<tr><th class="row"><a href="#{anchor}">{html.escape(_label(run, stage))}</a></th>'
          f"<td>{html.escape(_method(stage))}</td><td>{html.escape(_model(stage))}</td>"
          f"<td>{html.escape(_dataset(stage))}</td><td class=\"num\">{last} / {planned}</td>"
          f'<td class="num">{best_text}</td><td class="num">{latest_text}</td></tr>')
  return ('<div class="scroll"><table><thead><tr><th class="row">run</th><th>method</th>'
          "<th>model</th><th>data</th><th>steps logged / planned</th><th>best mIoU</th>"
          "<th>latest mIoU</th></tr></thead><tbody>" + "".join(body) + "</tbody></table></div>")


# ----------------------------------------------------------------------------------------
# Page.


def _anchor(run, stage=None):
  """Id of a run's section, or of a stage's curves inside it (never the same id twice)."""
  text = run.name if stage is None else f"{run.name}-{stage.name or 'curves'}"
  return "run-" + re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")


def images(run):
  """[(caption, bytes, mime)] of every image under eval/ and visualize/ of the run and its
  stages; a file identical to one already shown (the pipeline's copy of the last stage's
  eval/) is shown once."""
  found, seen = [], set()
  for folder in [run.path] + [s.path for s in run.stages if s.path != run.path]:
    for sub in IMAGE_FOLDERS:
      for root, dirs, files in os.walk(os.path.join(folder, sub)):
        dirs.sort()
        for name in sorted(files):
          mime = IMAGE_TYPES.get(os.path.splitext(name)[1].lower())
          if mime is None:
            continue
          path = os.path.join(root, name)
          with open(path, "rb") as f:
            data = f.read()
          digest = hashlib.sha1(data).hexdigest()
          if digest not in seen:
            seen.add(digest)
            found.append((os.path.relpath(path, run.path), data, mime))
  return found


def run_section(run):
  last_stage = run.stages[-1]  # the one a pipeline reports (its eval/ is published)
  parts = [f'<section id="{_anchor(run)}"><h2>{html.escape(run.name)}</h2>',
           f'<p class="meta">{html.escape(_model(last_stage))} &middot; '
           f"method {html.escape(_method(last_stage))} &middot; {html.escape(_dataset(last_stage))}"
           f" &middot; <code>{html.escape(run.path)}</code></p>"]
  for stage in run.stages:
    heading = stage.name or "curves"
    parts.append(f'<h3 id="{_anchor(run, stage)}">{html.escape(heading)}</h3>')
    if stage.name:
      parts.append(f'<p class="meta">{html.escape(_model(stage))} &middot; '
                   f"<code>{html.escape(stage.path)}</code></p>")
    panels = report_curves.panels_of(stage)
    if panels:
      figure = _img(report_curves.figure_png(panels), heading)
      parts.append(f'<figure class="curves">{figure}</figure>')
    else:
      parts.append("<p>Nothing logged yet (metrics.jsonl is empty or missing).</p>")
    logged = set(report_curves.keys_of(stage.rows, lambda k: True))
    others = sorted(logged - report_curves.plotted_keys(panels) - {"eta_seconds"})
    if others:
      parts.append(f'<p class="meta">Also logged (plot with scripts/plot_metrics.py): '
                   f"{html.escape(', '.join(others))}</p>")
    config = json.dumps(stage.config, indent=2, sort_keys=True)
    parts.append(f"<details><summary>config.json{' of ' + stage.name if stage.name else ''}"
                 f"</summary><pre>{html.escape(config)}</pre></details>")
  found = images(run)
  if found:
    parts.append("<h3>images</h3><div class=\"images\">")
    for caption, data, mime in found:
      parts.append(f"<figure>{_img(data, caption, mime)}"
                   f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</div>")
  parts.append("</section>")
  return "\n".join(parts)


def overview(runs):
  """Loss and mIoU of every run and stage on shared axes; only with more than one."""
  stages = [(_label(r, s), s) for r in runs for s in r.stages]
  if len(stages) < 2:
    return ""
  panels = []
  loss = [(label, s.rows, "loss") for label, s in stages if any("loss" in r for r in s.rows)]
  if loss:
    panels.append(("loss", loss, False, False))
  miou = [(label, s.evals["eval"], "miou") for label, s in stages if s.evals.get("eval")]
  if miou:
    panels.append(("mIoU, target val (%)", miou, False, True))
  if not panels:
    return ""
  return f'<figure class="curves">{_img(report_curves.figure_png(panels), "overview")}</figure>'


CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#222;
background:#fafafa}
main{max-width:1280px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0}h2{font-size:19px;border-bottom:2px solid #ccc;
padding-bottom:4px;margin-top:36px}h3{font-size:15px;margin:20px 0 6px}
.meta{color:#555;font-size:13px;margin:4px 0}code{font-size:12px;word-break:break-all}
.scroll{overflow-x:auto;margin:8px 0}
table{border-collapse:collapse;font-size:12px;background:#fff}
th,td{border:1px solid #ddd;padding:3px 6px;white-space:nowrap}
thead th{background:#eee;position:sticky;top:0}
th.row{text-align:left;position:sticky;left:0;background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.miou{font-weight:bold}
figure{margin:8px 0}figure.curves img{max-width:100%;height:auto;background:#fff;
border:1px solid #ddd}
.images{display:flex;flex-wrap:wrap;gap:12px}
.images figure{margin:0;max-width:100%;background:#fff;border:1px solid #ddd;padding:6px}
.images img{max-width:100%;height:auto;display:block}
figcaption{font-size:12px;color:#444;margin-top:4px;word-break:break-all}
details{margin:6px 0}summary{cursor:pointer;font-size:13px;color:#333}
pre{background:#fff;border:1px solid #ddd;padding:8px;font-size:11px;overflow:auto;
max-height:480px}
nav a{margin-right:12px;font-size:13px}
"""


def page(runs):
  """The whole HTML document of `runs`."""
  table, markdown = iou_table(runs)
  created = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  nav = "".join(f'<a href="#{_anchor(r)}">{html.escape(r.name)}</a>' for r in runs)
  title = "Report: " + ", ".join(r.name for r in runs)
  markdown_block = (f"<details><summary>as markdown (the papers' columns, "
                    f"evaluate.markdown_table)</summary><pre>{html.escape(markdown)}</pre>"
                    "</details>" if markdown else "")
  return "\n".join([
      "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
      f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>",
      f"<h1>{html.escape(title)}</h1>",
      f'<p class="meta">written {created} by scripts/report.py</p><nav>{nav}</nav>',
      "<h2>summary</h2>", summary_table(runs), overview(runs),
      "<h3>per-class IoU (%)</h3>", table, markdown_block,
      *[run_section(r) for r in runs],
      "</main></body></html>", ""])


def write_report(workdirs, out):
  """Reads `workdirs`, writes the page to `out` atomically and returns its path."""
  runs = [read_run(w, n) for w, n in zip(workdirs, _run_names(workdirs))]
  text = page(runs)
  out = os.path.abspath(out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  evaluate._write_atomic(out, text)  # a failed run leaves the previous report, if any
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", action="append", required=True,
                      help="training workdir (repeat for several runs)")
  parser.add_argument("--out", default="", help="HTML file (default <first workdir>/report.html)")
  args = parser.parse_args(argv)
  out = args.out or os.path.join(args.workdir[0], "report.html")
  print(f"wrote {write_report(args.workdir, out)}")


if __name__ == "__main__":
  sys.exit(main())
