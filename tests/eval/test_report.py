"""The HTML report's rendering on hand-made eval reports: escaping, columns, plots, checkpoints named."""

from __future__ import annotations

import base64
import io
import re

from PIL import Image

from tokenline.contact_sheet import png_bytes
from tokenline.eval.report import DatasetSection, nfe_series, render_report, report_row, table_columns


def _gen_eval(fid: float, **extra) -> dict:
    return {
        "fid": fid, "kid": 0.1, "probe_r1": 0.2, "probe_r1_real": 0.8, "ms_per_image": 12.5, "nfe": 8,
        "generator": "models/a/generator", "generator_hash": "g" * 64,
        "tokenizer": "models/a/tokenizer", "tokenizer_hash": "t" * 64,
        "protocol": {"objective": "flow", "sampler": "euler", "steps": 8, "guidance": 1.0, "samples": 300},
        "sweeps": {"steps": [{"steps": 1, "fid": fid + 10, "ms_per_image": 2.0, "nfe": 1},
                             {"steps": 8, "fid": fid, "ms_per_image": 12.5, "nfe": 8}],
                   "guidance": [{"guidance": 1.0, "fid": fid}], "samplers": []},
        **extra,
    }


def _png(color: str) -> bytes:
    return png_bytes(Image.new("RGB", (8, 8), color))


def test_row_names_both_checkpoints_and_the_sampling():
    row = report_row(DatasetSection("a", _gen_eval(50.0), {"rfid": 80.0, "psnr": 20.0}))
    assert row["tokenizer"] == "models/a/tokenizer @ tttttttttttt"
    assert row["generator"] == "models/a/generator @ gggggggggggg"
    assert row["sampling"] == "euler · 8 steps · guidance 1.0"
    masked = _gen_eval(50.0)
    masked["protocol"] |= {"objective": "masked", "steps": 12, "temperature": 1.0}
    assert report_row(DatasetSection("a", masked, {}))["sampling"] == "masked decoding · 12 rounds · temperature 1.0 · guidance 1.0"
    assert (row["fid"], row["rfid"], row["samples"]) == (50.0, 80.0, 300)


def test_columns_without_any_value_are_dropped():
    rows = [report_row(DatasetSection("a", _gen_eval(50.0), {})),
            report_row(DatasetSection("b", _gen_eval(60.0, clip_score=31.0), {}))]
    keys = [key for _, key in table_columns(rows)]
    assert "clip_score" in keys and "shapes_color_acc" not in keys and "rfid" not in keys


def test_page_is_self_contained_and_escapes_prompts():
    hostile = '<script>alert("x")</script>'
    sections = [
        DatasetSection("a", _gen_eval(50.0), {"rfid": 80.0}, {"eval captions": [{"prompt": hostile, "png": _png("red")}]}),
        DatasetSection("b", _gen_eval(70.0), {}, {"everyday": [{"prompt": "a cat", "png": _png("blue")}]}),
    ]
    html = render_report(sections, "T & co", "cpu", "abc123")
    assert "<script>" not in html and "&lt;script&gt;" in html and "T &amp; co" in html
    # FID, ms/image vs steps, FID vs guidance, FID vs NFE (here the teachers' steps sweeps alone).
    assert html.count("<svg") == 4 and "no data" not in html
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 2
    decoded = Image.open(io.BytesIO(base64.b64decode(images[0])))
    assert decoded.getpixel((0, 0)) == (255, 0, 0)
    # Each dataset's table row carries its own FID.
    assert re.search(r"<td>a</td>.*?<td>50</td>", html, re.S) and re.search(r"<td>b</td>.*?<td>70</td>", html, re.S)


def test_the_metrics_come_in_two_tables_narrow_enough_for_a_laptop_window():
    """One row per dataset in each table; neither has more than ten columns (1,400 px at the page's font size)."""
    html = render_report([DatasetSection("a", _gen_eval(50.0, clip_score=31.0, shapes_color_acc=0.9), {"rfid": 80.0, "psnr": 20.0})],
                         "t", "tiny", "abc")
    tables = re.findall(r"<table>.*?</table>", html, re.S)
    assert len(tables) == 2
    assert all(table.count("<th>") <= 10 for table in tables)
    assert "FID" in tables[1] and "tokenizer PSNR" in tables[0]


def test_a_student_sits_beside_its_teacher_in_a_third_narrow_table():
    student = {"method": "reflow", "steps": 1, "nfe": 1, "teacher_nfe": 50, "speedup": 41.5, "fid": 60.0,
               "teacher_fid": 50.0, "probe_r1": 0.4, "shapes_color_acc": 0.8, "teacher_shapes_color_acc": 0.82,
               "sweep": [{"steps": 1, "nfe": 1, "fid": 60.0}, {"steps": 2, "nfe": 2, "fid": 55.0}]}
    html = render_report([DatasetSection("a", _gen_eval(50.0), {"rfid": 80.0}, student_eval=student)], "t", "tiny", "abc")
    tables = re.findall(r"<table>.*?</table>", html, re.S)
    assert len(tables) == 3 and all(table.count("<th>") <= 10 for table in tables)
    assert "reflow · 1 steps" in tables[2] and "<td>41.5</td>" in tables[2] and "<td>50</td>" in tables[2]
    series = nfe_series([DatasetSection("a", _gen_eval(50.0), {}, student_eval=student)])
    assert series["a student (reflow)"] == student["sweep"] and "a teacher" in series  # the FID vs NFE plot's lines


def test_real_images_and_reconstructions_sit_beside_the_generated_ones():
    section = DatasetSection("a", _gen_eval(50.0), {}, {"everyday": [{"prompt": "a cat", "png": _png("blue")}]},
                             reconstructions=_png("green"))
    html = render_report([section], "t", "tiny", "abc")
    assert "their reconstructions" in html
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 2


def test_a_plot_without_points_says_so():
    gen = _gen_eval(50.0)
    gen["sweeps"]["guidance"] = []
    html = render_report([DatasetSection("a", gen, {})], "t", "tiny", "abc")
    assert html.count("<svg") == 4 and html.count("no data") == 1
