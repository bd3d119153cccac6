"""Pictures of a frontier table (``orchestrator.results.frontier.frontier_table``): a PNG and one HTML page.

Both show one panel per cost metric (x) against accuracy (y, the primary metric `val_top1` unless
told otherwise): every eligible trial in grey, the
frontier trials highlighted, and a step line through the frontier points giving the best y reachable
at each x. The HTML page is self-contained (inline SVG, inline CSS and a few lines of inline JS, no
network) so it opens from MLflow's artifact view; its tooltips are SVG ``<title>`` elements, which
work even where the viewer's sandbox disables scripts. Every point links to its trial's MLflow run, opened
in a new tab (see `_SCRIPT` for what MLflow's viewer lets a click do).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from orchestrator.results.frontier import table_to_json
from pxd.metrics import Mode, hardware_metric, primary_metric

__all__ = ["plot_png", "plot_html", "plot_comparison_png"]

_FRONT_COLOUR = "#d62728"
_OTHER_COLOUR = "#9a9a9a"
_GAIN = "gain_vs_ce"  # pxd.metrics: val_top1 minus the trial's CE control's (search.ce_control)


@dataclass
class _Panel:
    x_metric: str
    y_metric: str
    points: list[tuple[float, float, int]]  # (x, y, index into table["rows"]), finite only
    steps: list[tuple[float, float]]  # frontier envelope, drawn as steps-post


def _mode(table: Mapping[str, Any], metric: str, default: Mode) -> Mode:
    # A metric that is not an objective is drawn as if x were a cost and y an accuracy.
    for objective in table["objectives"]:
        if objective["name"] == metric:
            return Mode(objective["mode"])
    return default


def _envelope(front: list[tuple[float, float]], x_mode: Mode, y_mode: Mode) -> list[tuple[float, float]]:
    """Frontier points where y improves, walking x from best to worst: the 2-D attainment steps."""
    sign_x, sign_y = x_mode.sign, y_mode.sign
    steps: list[tuple[float, float]] = []
    best = math.inf
    for x, y in sorted(front, key=lambda p: (sign_x * p[0], sign_y * p[1])):
        if sign_y * y < best:
            best = sign_y * y
            steps.append((x, y))
    return steps


def _panels(table: Mapping[str, Any], x_metrics: Sequence[str], y_metric: str) -> list[_Panel]:
    rows = table["rows"]
    present = {key for row in rows for key in row["metrics"]}
    if rows and y_metric not in present:
        raise ValueError(f"y_metric: {y_metric!r} is not a metric of any trial; pick one of {sorted(present)}")
    panels = []
    for x_metric in x_metrics:
        if rows and x_metric not in present:
            continue  # e.g. latency_ms before any hardware was measured: skip the panel
        points = []
        for index, row in enumerate(rows):
            x = row["metrics"].get(x_metric, math.nan)
            y = row["metrics"].get(y_metric, math.nan)
            if math.isfinite(x) and math.isfinite(y):
                points.append((float(x), float(y), index))
        front = [(x, y) for x, y, index in points if rows[index]["on_frontier"]]
        x_mode = _mode(table, x_metric, Mode.MIN)
        y_mode = _mode(table, y_metric, Mode.MAX)
        steps = _envelope(front, x_mode, y_mode)
        panels.append(_Panel(x_metric, y_metric, points, steps))
    if not panels:
        raise ValueError(f"x_metrics: none of {list(x_metrics)} is a metric of any trial; pick from {sorted(present)}")
    return panels


def plot_png(
    table: Mapping[str, Any],
    path: str | Path,
    x_metrics: Sequence[str] = ("gmacs", "pixels"),
    y_metric: str | None = None,
) -> Path:
    """Write one PNG with a scatter panel per x metric (y: the primary metric unless `y_metric`); frontier
    points highlighted and stepped."""
    panels = _panels(table, x_metrics, y_metric or primary_metric())
    # Figure + FigureCanvasAgg instead of pyplot: no global backend switch, safe in worker threads.
    figure = Figure(figsize=(5.0 * len(panels), 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    rows = table["rows"]
    for axes, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        others = [(x, y) for x, y, i in panel.points if not rows[i]["on_frontier"]]
        front = [(x, y) for x, y, i in panel.points if rows[i]["on_frontier"]]
        if others:
            axes.scatter(*zip(*others), s=18, color=_OTHER_COLOUR, alpha=0.7,
                         label="eligible trial")
        if panel.steps:
            axes.plot(*zip(*panel.steps), drawstyle="steps-post", color=_FRONT_COLOUR,
                      linewidth=1.2)
        if front:
            axes.scatter(*zip(*front), s=36, color=_FRONT_COLOUR, edgecolors="black",
                         linewidths=0.5, zorder=3, label="frontier")
        axes.set_xlabel(panel.x_metric)
        axes.set_ylabel(panel.y_metric)
        axes.set_title(f"{panel.y_metric} vs {panel.x_metric}")
        axes.grid(True, alpha=0.3)
        if others or front:
            axes.legend(loc="best", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    raw_step = (high - low) / count
    magnitude = 10.0 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _range(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    pad = (high - low) * 0.06 or abs(low) * 0.1 or 1.0
    return low - pad, high + pad


def _gain(row: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether the row carries `gain_vs_ce` (on the row, or among its metrics), and its text ("n/a": no control)."""
    gain = row[_GAIN] if _GAIN in row else row["metrics"].get(_GAIN)
    return _GAIN in row or _GAIN in row["metrics"], "n/a" if gain is None else f"{gain:+.6g}"


def _tooltip(row: Mapping[str, Any]) -> str:
    side = int(round(math.sqrt(row["metrics"]["pixels"]))) if "pixels" in row["metrics"] else None
    lines = [f"{row.get('arch') or 'student'} at {side}×{side} px" if side else str(row.get("arch") or "student"),
             f"trial {row['trial_id']}", f"run {row['run_id']}"]
    # the figures a reader compares: registry metrics and hardware latencies, not per-epoch histories
    lines += [f"{key} = {value:.6g}" for key, value in row["metrics"].items()
              if key != _GAIN and ("." not in key or key.startswith(("latency_ms.", "latency_cv.")))]
    has_gain, gain = _gain(row)
    lines += [f"{_GAIN} = {gain} (val_top1 minus its CE control's)"] if has_gain else []
    lines += [f"{key} = {value}" for key, value in row["params"].items()]
    return "\n".join(lines)


def _tag(name: str, body: str = "", **attributes: Any) -> str:
    """One SVG/HTML element; attribute values and ``body`` must already be escaped."""
    # class_ -> class, data_row -> data-row
    attrs = "".join(
        f' {key.rstrip("_").replace("_", "-")}="{value}"' for key, value in attributes.items()
    )
    return f"<{name}{attrs}>{body}</{name}>"


def _svg_panel(panel: _Panel, rows: Sequence[Mapping[str, Any]]) -> str:
    width, height, left, right, top, bottom = 440, 330, 64, 16, 28, 48
    esc = html.escape
    x_name, y_name = esc(panel.x_metric), esc(panel.y_metric)
    if not panel.points:
        message = _tag("text", f"no finite points for {x_name}", x=20, y=40)
        return _tag("svg", message, class_="panel", width=width, height=height, data_axis=panel.x_metric)
    x_low, x_high = _range([p[0] for p in panel.points])
    y_low, y_high = _range([p[1] for p in panel.points])

    def sx(x: float) -> str:
        return f"{left + (x - x_low) / (x_high - x_low) * (width - left - right):.1f}"

    def sy(y: float) -> str:
        return f"{height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom):.1f}"

    parts = [_tag("text", f"{y_name} vs {x_name}", x=width / 2, y=18, class_="title")]
    for tick in _ticks(x_low, x_high):
        x_at = sx(tick)
        parts.append(_tag("line", class_="grid", x1=x_at, x2=x_at, y1=top, y2=height - bottom))
        parts.append(_tag("text", f"{tick:.4g}", class_="tick", x=x_at, y=height - bottom + 14))
    for tick in _ticks(y_low, y_high):
        y_at = sy(tick)
        parts.append(_tag("line", class_="grid", x1=left, x2=width - right, y1=y_at, y2=y_at))
        y_text = f"{float(y_at) + 4:.1f}"
        parts.append(_tag("text", f"{tick:.4g}", class_="tick ytick", x=left - 4, y=y_text))
    parts.append(_tag("text", x_name, class_="label", x=(left + width - right) / 2, y=height - 10))
    y_label_at = f"translate(14 {(top + height - bottom) / 2}) rotate(-90)"
    parts.append(_tag("text", y_name, class_="label", transform=y_label_at))
    if panel.steps:
        corners = [panel.steps[0]]
        for (_, y_previous), (x, y) in zip(panel.steps, panel.steps[1:]):
            corners += [(x, y_previous), (x, y)]  # steps-post: across first, then up
        line = " ".join(f"{sx(x)},{sy(y)}" for x, y in corners)
        parts.append(_tag("polyline", class_="steps", points=line))
    # Grey points first so the frontier is drawn on top.
    for x, y, index in sorted(panel.points, key=lambda p: rows[p[2]]["on_frontier"]):
        front = rows[index]["on_frontier"]
        title = _tag("title", esc(_tooltip(rows[index])))
        point = _tag("circle", title, class_="pt front" if front else "pt other",
                     data_row=index, cx=sx(x), cy=sy(y), r=5 if front else 3.5)
        parts.append(_tag("a", point, class_="run-link", data_run=index, target="_blank", rel="noopener"))
    viewbox = f"0 0 {width} {height}"
    body = "\n".join(parts)
    return _tag("svg", body, class_="panel", width=width, height=height, viewBox=viewbox, data_axis=panel.x_metric)


def _html_frontier_table(table: Mapping[str, Any]) -> str:
    rows = table["rows"]
    metrics = [o["name"] for o in table["objectives"]]
    gains = [_GAIN] if any(_gain(r)[0] for r in rows) else []  # beside the objectives: "did distillation pay?"
    metrics += sorted({k for r in rows for k in r["metrics"]} - {*metrics, _GAIN})
    params = sorted({k for r in rows for k in r["params"]})
    columns = ["trial_id", "run_id", "model_uri", *gains, *metrics, *params]
    head = "".join(_tag("th", html.escape(column)) for column in columns)
    body = []
    for index, row in enumerate(rows):
        if not row["on_frontier"]:
            continue
        cells = [row["trial_id"], row["run_id"], row["model_uri"], *(_gain(row)[1] for _ in gains)]
        cells += [f"{row['metrics'][m]:.6g}" if m in row["metrics"] else "" for m in metrics]
        cells += [row["params"].get(p, "") for p in params]
        tds = "".join(_tag("td", html.escape("" if c is None else str(c)), **({"class_": "run"} if i == 1 else {}))
                      for i, c in enumerate(cells))
        body.append(_tag("tr", tds, data_row=index))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_STYLE = """body{font-family:system-ui,sans-serif;margin:16px;color:#222}
.panels{display:flex;flex-wrap:wrap;gap:12px}.panel{border:1px solid #ddd;background:#fff}
.grid{stroke:#eee}.tick{font-size:10px;text-anchor:middle;fill:#555}.ytick{text-anchor:end}
.label,.title{font-size:12px;text-anchor:middle}.steps{fill:none;stroke:%s;stroke-width:1.5}
.pt.other{fill:%s;opacity:.7}.pt.front{fill:%s;stroke:#000;stroke-width:.6}
.pt.hit{stroke:#1f77b4;stroke-width:3}tr.hit{background:#dbeafe}.pt{cursor:pointer}
table{border-collapse:collapse;font-size:12px;margin-top:8px}
td,th{border:1px solid #ccc;padding:2px 6px}
""" % (_FRONT_COLOUR, _OTHER_COLOUR, _FRONT_COLOUR)

# Hovering a point (or a table line) outlines the same trial in every panel and in the table,
# and prints it under the panels. textContent only: no string from the data becomes markup.
_SCRIPT = r"""(function(){
var data=JSON.parse(document.getElementById('pxd-frontier-data').textContent);
var selected=document.getElementById('pxd-selected');
function mark(i,on){
 document.querySelectorAll('[data-row="'+i+'"]').forEach(function(e){
  e.classList.toggle('hit',on);
 });
 var r=data.rows[i];
 selected.textContent=!on||!r?'':
  'trial '+r.trial_id+'  run '+r.run_id+'  '+JSON.stringify(r.metrics);
}
// The MLflow UI's address. Inside MLflow's artifact viewer this page is a blob: URL whose text holds
// the UI's origin (relative links do not work in a blob); opened from the server it is ours; opened as a
// file, the tracking URI recorded when the page was written.
function base(){
 try{var h=location.href;
  if(h.indexOf('blob:')===0)return new URL(h.slice(5)).origin;
  if(location.protocol==='http:'||location.protocol==='https:')return location.origin;}catch(e){}
 var t=data.links&&data.links.tracking_uri;return t&&/^https?:/.test(t)?t.replace(/\/$/,''):null;
}
function runUrl(i){
 var r=data.rows[i],b=base();
 if(!r||!b||!data.links||!data.links.experiment_id)return null;
 return b+'/#/experiments/'+encodeURIComponent(data.links.experiment_id)+'/runs/'+encodeURIComponent(r.run_id);
}
document.querySelectorAll('[data-row]').forEach(function(e){
 var i=e.getAttribute('data-row');
 e.addEventListener('mouseenter',function(){mark(i,true);});
 e.addEventListener('mouseleave',function(){mark(i,false);});
});
document.querySelectorAll('tr[data-row] td.run').forEach(function(td){
 var a=document.createElement('a');a.setAttribute('data-run',td.parentNode.getAttribute('data-row'));
 a.target='_blank';a.rel='noopener';a.textContent=td.textContent;td.textContent='';td.appendChild(a);
});
// Every point and run id is a link to the run, opened in a new tab. MLflow's artifact viewer (3.x) shows
// this page in an iframe sandboxed to "allow-scripts": no popups, no top-level navigation, and the UI cannot
// run inside the frame (a blank frame). A new-tab click (Ctrl/Cmd- or middle-click) on a link is the
// browser's own and still opens the run; a plain click tries a new tab and, where that is blocked, says so.
var notice=document.getElementById('pxd-open');
function explain(i,u){
 notice.textContent="MLflow's artifact viewer does not let this page open tabs: Ctrl-click (Cmd-click on a Mac) "+
  'or middle-click the point, or this link, to open run '+data.rows[i].run_id+' in a new tab: ';
 var a=document.createElement('a');a.href=u;a.target='_blank';a.rel='noopener';a.textContent=u;notice.appendChild(a);
}
document.querySelectorAll('a[data-run]').forEach(function(a){
 var i=a.getAttribute('data-run'),u=runUrl(i);if(!u)return;
 a.setAttribute('href',u);
 a.addEventListener('click',function(e){
  if(e.ctrlKey||e.metaKey||e.shiftKey||e.button!==0)return;  // the browser opens it in a tab or window
  e.preventDefault();var w=window.open(u,'_blank');
  if(w)w.opener=null;else explain(i,u);
 });
});
// one cost axis at a time; without scripts every panel shows
var axis=document.getElementById('pxd-axis');
function show(){document.querySelectorAll('svg[data-axis]').forEach(function(p){
 p.style.display=p.getAttribute('data-axis')===axis.value?'':'none';});}
if(axis){axis.hidden=false;axis.addEventListener('change',show);show();}
})();"""


def _script_json(table: Mapping[str, Any]) -> str:
    # Inside <script>, "</script>" or "<!--" in any string would end or break the element;
    # \\u003c is the same character to JSON.parse and cannot close a tag.
    text = table_to_json(table)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def plot_html(
    table: Mapping[str, Any],
    path: str | Path,
    x_metrics: Sequence[str] = ("gmacs", "pixels"),
    y_metric: str | None = None,
    *,
    experiment_id: str | None = None,
    tracking_uri: str | None = None,
) -> Path:
    """Write one self-contained interactive HTML page: a chooser of the cost axis, scatter panels (y: the
    primary metric unless `y_metric`) whose points show the trial on hover and link to its MLflow run
    (`experiment_id`), opened in a new tab, the frontier table (with `gain_vs_ce` where the rows carry it)."""
    panels = _panels(table, x_metrics, y_metric or primary_metric())
    table = {**table, "links": {"experiment_id": experiment_id, "tracking_uri": tracking_uri}}
    options = "".join(_tag("option", html.escape(p.x_metric), value=p.x_metric) for p in panels)
    chooser = f'<label>cost axis <select id="pxd-axis" hidden>{options}</select></label>' if panels else ""
    esc = html.escape
    objectives = ", ".join(f"{o['name']} ({o['mode']})" for o in table["objectives"])
    volume = table.get("hypervolume")
    volume_text = "n/a (no reference point)" if volume is None else f"{volume:.6g}"
    if table.get("hypervolume_normalised") is not None:
        volume_text = f"{table['hypervolume_normalised']:.4f} of the reference-to-ideal box ({volume_text} in the objectives' units)"
    reference = json.dumps(table.get("reference_point"), default=str)
    summary = (
        f"{table['n_frontier']} of {table['n_eligible']} eligible trials on the frontier. "
        f"Objectives: {objectives}. Hypervolume: {volume_text} (reference point {reference})."
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pxd Pareto frontier</title>
<style>{_STYLE}</style></head><body>
<h1>Pareto frontier</h1>
<p>{esc(summary)}</p>
<p>{chooser} · hover a point for its trial; click it to open its MLflow run in a new tab (in MLflow's artifact
viewer: Ctrl-click, Cmd-click on a Mac, or middle-click)</p>
<div class="panels">{"".join(_svg_panel(panel, table["rows"]) for panel in panels)}</div>
<p id="pxd-selected"></p>
<p id="pxd-open" role="status"></p>
<h2>Frontier trials</h2>
{_html_frontier_table(table)}
<script type="application/json" id="pxd-frontier-data">{_script_json(table)}</script>
<script>{_SCRIPT}</script>
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def plot_comparison_png(first: Mapping[str, Any], second: Mapping[str, Any], path: str | Path) -> Path:
    """Two hardware frontiers side by side (accuracy against each label's latency): the models that stay
    on the frontier, leave it or join it between the two labels are coloured apart."""
    path = Path(path)
    y_metric = primary_metric()
    fronts = [{r["run_id"] for r in t["rows"] if r["on_frontier"]} for t in (first, second)]
    colours = {"stay": "#1f77b4", "leave": _FRONT_COLOUR, "join": "#2ca02c", "neither": _OTHER_COLOUR}
    figure = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(figure)
    for index, table in enumerate((first, second)):
        axis = figure.add_subplot(1, 2, index + 1)
        metric = hardware_metric(table["hardware"]).name
        for row in table["rows"]:
            run = row["run_id"]
            status = ("stay" if run in fronts[0] and run in fronts[1] else "leave" if run in fronts[0]
                      else "join" if run in fronts[1] else "neither")
            axis.scatter(row["metrics"].get(metric, math.nan), row["metrics"].get(y_metric, math.nan),
                         color=colours[status], s=36, zorder=3 if status != "neither" else 2)
        axis.set_xlabel(f"{metric} (ms)")
        axis.set_ylabel(y_metric)
        axis.set_title(f"hardware {table['hardware']}")
        axis.grid(alpha=0.3)
    handles = [figure.axes[0].scatter([], [], color=c, label=k) for k, c in colours.items()]
    figure.legend(handles=handles, loc="upper center", ncol=4, frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.92))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
