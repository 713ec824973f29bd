"""The cross-dataset HTML report: one self-contained file (images and plots inline) from gen_eval's outputs.

`report_rows` turns each dataset's gen_eval and recon_eval metrics into one table row that names the
checkpoints the numbers came from; `sweep_plot_svg` draws a sweep (one line per dataset) as inline SVG;
`render_report` fills the page template.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

# (column title, key in the row) of the two metrics tables, in order; a column with no value anywhere is
# dropped. Two narrow tables rather than one wide one: both fit a 1,400-pixel window without scrolling.
LINEAGE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("dataset", "dataset"),
    ("tokenizer", "tokenizer"),
    ("generator", "generator"),
    ("objective", "objective"),
    ("sampling", "sampling"),
    ("samples", "samples"),
    ("tokenizer rFID", "rfid"),
    ("tokenizer PSNR", "psnr"),
    ("ms / image", "ms_per_image"),
    ("NFE", "nfe"),
)
QUALITY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("dataset", "dataset"),
    ("FID ↓", "fid"),
    ("KID ↓", "kid"),
    ("probe R@1 gen", "probe_r1"),
    ("probe R@1 real", "probe_r1_real"),
    ("probe score gen", "probe_score"),
    ("probe score real", "probe_score_real"),
    ("CLIP score", "clip_score"),
    ("shapes color", "shapes_color_acc"),
    ("shapes shape", "shapes_shape_acc"),
    ("shapes count", "shapes_count_acc"),
    ("shapes position", "shapes_position_acc"),
)
COLUMNS = LINEAGE_COLUMNS + QUALITY_COLUMNS[1:]  # every key of a row, in table order
# The distilled student beside its teacher (student_eval's figures), one row per dataset.
STUDENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("dataset", "dataset"),
    ("student", "student"),
    ("NFE", "nfe"),
    ("teacher NFE", "teacher_nfe"),
    ("speedup", "speedup"),
    ("FID ↓", "fid"),
    ("teacher FID", "teacher_fid"),
    ("probe R@1", "probe_r1"),
    ("shapes color", "shapes_color_acc"),
    ("teacher shapes color", "teacher_shapes_color_acc"),
)

# (title, sweep in gen_eval's report, x field, y field) of each plot.
PLOTS: tuple[tuple[str, str, str, str], ...] = (
    ("FID vs sampling steps", "steps", "steps", "fid"),
    ("FID vs guidance scale", "guidance", "guidance", "fid"),
    ("milliseconds per image vs sampling steps", "steps", "steps", "ms_per_image"),
)

HASH_CHARS = 12  # content-hash characters shown beside a checkpoint path


@dataclass
class DatasetSection:
    """One dataset's part of the report: its gen_eval and recon_eval reports and its prompt-set images."""

    name: str
    gen_eval: dict
    recon_eval: dict
    prompt_sets: dict[str, list[dict]] = field(default_factory=dict)  # set -> [{prompt, png (bytes)}]
    reconstructions: bytes | None = None  # recon_eval's grid: real val images above their reconstructions (PNG)
    student_eval: dict | None = None  # the distilled student's figures beside its teacher's


def student_row(section: DatasetSection) -> dict:
    """The students-table row of one dataset (empty without a student)."""
    figures = section.student_eval or {}
    row = {key: figures[key] for _, key in STUDENT_COLUMNS if key in figures}
    if not row:
        return {}
    return {**row, "dataset": section.name, "student": f"{figures.get('method')} · {figures.get('steps')} steps"}


def nfe_series(sections: list[DatasetSection]) -> dict[str, list[dict]]:
    """FID against network evaluations: each teacher's steps sweep and each student's, one line each."""
    series = {}
    for section in sections:
        series[f"{section.name} teacher"] = section.gen_eval.get("sweeps", {}).get("steps", [])
        if section.student_eval:
            series[f"{section.name} student ({section.student_eval.get('method')})"] = section.student_eval.get("sweep", [])
    return series


def _checkpoint(path: str, content_hash: str) -> str:
    return f"{path} @ {content_hash[:HASH_CHARS]}"


def report_row(section: DatasetSection) -> dict:
    """The metrics-table row of one dataset, naming the tokenizer and generator checkpoints."""
    gen, recon = section.gen_eval, section.recon_eval
    protocol = gen.get("protocol", {})
    row = {key: gen[key] for _, key in COLUMNS if key in gen}
    row |= {
        "dataset": section.name,
        "tokenizer": _checkpoint(gen["tokenizer"], gen["tokenizer_hash"]),
        "generator": _checkpoint(gen["generator"], gen["generator_hash"]),
        "objective": protocol.get("objective", ""),
        "sampling": sampling_text(protocol),
        "samples": protocol.get("samples", gen.get("samples", "")),
        "rfid": recon.get("rfid"),
        "psnr": recon.get("psnr"),
    }
    return {key: value for key, value in row.items() if value is not None}


def sampling_text(protocol: dict) -> str:
    """How the samples were drawn, in the generator's own terms: decoding rounds for a masked generator, sampler steps for flow."""
    guidance = f"guidance {protocol.get('guidance', '')}"
    if protocol.get("objective") == "masked":
        return f"masked decoding · {protocol.get('steps', '')} rounds · temperature {protocol.get('temperature', '')} · {guidance}"
    return f"{protocol.get('sampler', '')} · {protocol.get('steps', '')} steps · {guidance}"


def table_columns(rows: list[dict], columns: tuple[tuple[str, str], ...] = COLUMNS) -> list[tuple[str, str]]:
    """The columns (of `columns`) that have a value in at least one row."""
    return [(title, key) for title, key in columns if any(key in row for row in rows)]


def format_cell(value) -> str:
    """A table cell: floats to 4 significant digits, everything else as text."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def sweep_plot_svg(title: str, series: dict[str, list[dict]], x: str, y: str) -> str:
    """An inline SVG line plot of `y` against `x`, one line per dataset (name -> rows)."""
    from matplotlib.figure import (
        Figure,  # no pyplot: no global state, no display needed
    )

    figure = Figure(figsize=(5.0, 3.2), layout="constrained")
    axes = figure.add_subplot()
    drawn = False
    for name, rows in series.items():
        points = sorted((row[x], row[y]) for row in rows if row.get(x) is not None and row.get(y) is not None)
        if points:
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            drawn = True
    if not drawn:
        axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
    if x in ("steps", "nfe"):
        axes.set_xscale("log")  # steps sweeps span 1 to hundreds
    axes.set_title(title)
    axes.set_xlabel(x.replace("_", " "))
    axes.set_ylabel(y.replace("_", " "))
    if drawn:
        axes.legend()
    axes.grid(alpha=0.3)
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})  # no timestamp: same data, same bytes
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog: the SVG sits inside HTML


def read_grids(sets: dict[str, list[dict]], folder: Path, labels: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """Each prompt set's images read back from `folder` (as gen_eval wrote them), under its label: set -> [{prompt, png}]."""
    labels = labels or {}
    return {labels.get(name, name): [{"prompt": item["prompt"], "png": (folder / item["file"]).read_bytes()} for item in items]
            for name, items in sets.items()}


def data_uri(png: bytes) -> str:
    """A PNG as a data: URI for an <img> tag."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; max-width: 1300px; margin-bottom: 1em; }
caption { text-align: left; font-weight: bold; padding: 0.3em 0; }
td { overflow-wrap: anywhere; }
.reconstructions img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ccc; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.grid { display: flex; flex-wrap: wrap; gap: 0.5em; }
figure { margin: 0; width: 96px; font-size: 0.7em; }
figure img { width: 96px; height: 96px; image-rendering: pixelated; border: 1px solid #ccc; }
dl { font-size: 0.8em; } dt { font-weight: bold; }
</style></head><body>
<h1>{{ title }}</h1>
<p>Profile <code>{{ profile }}</code>, git commit <code>{{ commit }}</code>, datasets: {{ datasets | join(", ") }}.</p>
<h2>Metrics</h2>
{% for caption, columns, table_rows in tables %}<table><caption>{{ caption }}</caption>
<tr>{% for title, key in columns %}<th>{{ title }}</th>{% endfor %}</tr>
{% for row in table_rows %}<tr>{% for title, key in columns %}<td>{{ format_cell(row.get(key, "")) }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% endfor %}
<h2>Sweeps</h2>
<div class="plots">{% for svg in plots %}<div>{{ svg | safe }}</div>{% endfor %}</div>
{% for section in sections %}
<h2>{{ section.name }}</h2>
{% if section.reconstructions %}<h3>real images (top) and their reconstructions through the tokenizer (bottom)</h3>
<div class="reconstructions"><img src="{{ data_uri(section.reconstructions) }}" alt="real images and reconstructions"></div>
{% endif %}
{% for set_name, items in section.prompt_sets.items() %}
<h3>{{ set_name }}</h3>
<div class="grid">{% for item in items %}<figure><img src="{{ data_uri(item.png) }}" alt="{{ item.prompt }}"><figcaption>{{ item.prompt }}</figcaption></figure>{% endfor %}</div>
{% endfor %}
<h3>Protocol</h3>
<dl>{% for key, value in section.gen_eval.get("protocol", {}).items() %}<dt>{{ key }}</dt><dd>{{ value }}</dd>{% endfor %}</dl>
{% endfor %}
</body></html>
"""


def render_report(sections: list[DatasetSection], title: str, profile: str, commit: str) -> str:
    """The whole report as one HTML page."""
    rows = [report_row(section) for section in sections]
    plots = [
        sweep_plot_svg(plot_title, {s.name: s.gen_eval.get("sweeps", {}).get(sweep, []) for s in sections}, x, y)
        for plot_title, sweep, x, y in PLOTS
    ]
    plots.append(sweep_plot_svg("FID vs network evaluations (teachers and students)", nfe_series(sections), "nfe", "fid"))
    students = [row for row in (student_row(section) for section in sections) if row]
    tables = [("the lineage: checkpoints, sampling, cost", table_columns(rows, LINEAGE_COLUMNS), rows),
              ("quality and text alignment", table_columns(rows, QUALITY_COLUMNS), rows)]
    if students:
        tables.append(("distilled students beside their teachers", table_columns(students, STUDENT_COLUMNS), students))
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(TEMPLATE).render(
        title=title, profile=profile, commit=commit, datasets=[s.name for s in sections],
        tables=tables, plots=plots, sections=sections,
        format_cell=format_cell, data_uri=data_uri,
    )
