"""The report: tables and findings on hand-made rows (failures and an empty sweep included), and the rendered page
in headless Chromium: every chart visible, no console error, a screenshot."""
import re
import os
import shutil
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.store import Store
from reports import tables
from reports.build import render
from reports.data import pareto, read_results

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=timezone.utc)


def row(model, precision, n, b, **kw):
    base = dict(cell_key=f"{model}-{precision}-{n}-{b}", sweep="hand", run_id="r1", model=model, precision=precision,
                baseline="fp16",
                precision_name=precision, precision_options="{}", new_tokens=n, batch_size=b, status="ok",
                started_at=T0.isoformat(), ended_at=(T0 + timedelta(seconds=90)).isoformat(), device="cuda",
                gpu_name="NVIDIA H100 80GB HBM3", gpu_uuid="GPU-a", host="h1", noisy_timing=False)
    return {**base, **kw}


def opt_rows():
    """fp16 vs nf4 on a 125M model: nf4 1.8x slower, weights 3.4x smaller, perplexity +5.4%."""
    out = []
    for n, scale in ((64, 1.0), (200, 1.1)):
        out.append(row("opt-125m", "fp16", n, 1, perplexity=27.65, weights_bytes=250_000_000,
                       decode_ms_per_token=10.0 * scale, ttft_ms=12.0, prefill_peak_bytes=300_000_000,
                       decode_peak_bytes=1_000_000_000, kv_cache_bytes=10_000_000, bandwidth_fraction=0.02,
                       decode_ms_floor=0.08, decode_tokens_per_s=100.0))
        out.append(row("opt-125m", "nf4", n, 1, perplexity=27.65 * 1.054, weights_bytes=250_000_000 / 3.4,
                       decode_ms_per_token=18.0 * scale, ttft_ms=20.0, prefill_peak_bytes=200_000_000,
                       decode_peak_bytes=900_000_000, kv_cache_bytes=10_000_000, bandwidth_fraction=0.005,
                       decode_ms_floor=0.03, decode_tokens_per_s=55.0, noisy_timing=True, cv_decode=0.08))
    out.append(row("opt-125m", "int8", 64, 1, status="oom", error_type="OutOfMemoryError",
                   error_message="CUDA out of memory", started_at=None, ended_at=None))
    out.append(row("llama-7b", "fp16", 64, 1, status="skipped", error_type="Unsupported",
                   error_message="bf16 needs compute capability 8.0", weights_note="synthetic weights (random)"))
    return out


@pytest.fixture
def results(tmp_path):
    out = tmp_path / "sweep"
    store = Store(out, "r1")
    for r in opt_rows():
        store.write(r)
    return out


def test_model_table_and_findings(results):
    df = read_results([results])
    d = df[df.model == "opt-125m"]
    rows, cell = tables.model_table(d, "fp16")
    assert cell == (200, 1)  # smallest batch, longest generation
    by = {r["precision"]: r for r in rows}
    assert [r["precision"] for r in rows][0] == "fp16"
    assert by["nf4"]["ppl_change"] == pytest.approx(5.4)
    assert by["nf4"]["weights_smaller"] == pytest.approx(3.4)
    assert by["nf4"]["decode_vs_base"] == pytest.approx(1.8)
    assert by["int8"]["status"] == "oom"
    f = tables.findings(d, "opt-125m", "fp16")
    assert f[0] == ("nf4 is 1.8× slower than fp16 at batch 1 on opt-125m (200 new tokens), weights 3.4× smaller, "
                    "perplexity +5.4%.")
    # the notebook's puzzle: INT4 saves little memory because weights are a small part of the peak
    assert any(s.startswith("nf4: weights are only 8% of the 900 MB peak") for s in f)
    assert any("Closest to the memory-bandwidth limit: fp16 at 2.0% of peak" in s for s in f)


def test_failures_caveats_header(results):
    df = read_results([results])
    fails = tables.failures(df)
    assert {(x["model"], x["status"]) for x in fails} == {("opt-125m", "oom"), ("llama-7b", "skipped")}
    cav = tables.caveats(df)
    assert any("llama-7b: synthetic weights" in c for c in cav)
    assert any(c.startswith("2 cell(s) have noisy timing") for c in cav)
    h = tables.header(df, ["hand"])
    assert (h["ok"], h["failed"], h["skipped"], h["gpus"]) == (4, 1, 1, 1) and h["wall_s"] == 90


def test_pareto():
    pts = [(10, 30, "a"), (12, 25, "b"), (15, 26, "c"), (20, 24, "d")]
    assert pareto(pts) == ["a", "b", "d"]


def test_empty_sweep_renders(tmp_path):
    (tmp_path / "empty" / "cells").mkdir(parents=True)
    html = render([tmp_path / "empty"], tmp_path / "r.html")[0].read_text()
    assert "no cell has finished" in html


def test_merge_two_sweeps_and_self_contained(results, tmp_path):
    other = tmp_path / "other"
    s = Store(other, "r2")
    s.write(row("smollm2", "fp32", 64, 1, sweep="second", perplexity=20.0, weights_bytes=5e8, decode_ms_per_token=9.0))
    html = render([results, other], tmp_path / "merged.html")[0].read_text()
    assert "hand + second" in html and "smollm2" in html and "opt-125m" in html
    external = re.findall(r"https?://(?!www\.w3\.org/)|src=\"//|@import|url\((?!#)", html)
    assert external == []  # SVG namespaces (w3.org) are identifiers, url(#...) points inside the page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"), reason="Debian chromium not installed (.ci/run installs it)")
def test_report_in_headless_chromium(results, tmp_path):
    from playwright.sync_api import sync_playwright

    page_file, _ = render([results], tmp_path / "report.html")
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                          "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        requests = []
        page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
        page.goto(page_file.as_uri())
        charts = page.locator(".chart svg")
        assert charts.count() == 3
        for i in range(charts.count()):
            box = charts.nth(i).bounding_box()
            assert box and box["width"] > 100 and box["height"] > 100
            assert charts.nth(i).is_visible()
        # sorting by a column works
        page.locator("table.sortable").first.locator("th", has_text="decode ms/token").click()
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 20_000
    assert errors == [] and requests == []


@pytest.mark.slow
def test_large_sweep_stays_legible(tmp_path):
    """10 models x 8 precisions x 5 lengths x 3 batch sizes: one section per model, at most 4 batch facets and 8
    lines per chart, the 120-cell breakdown folded away."""
    import pyarrow.parquet as pq

    from orchestrator.store import row_table

    precisions = ["fp16", "bf16", "int8", "nf4", "fp4", "nf4-dq", "fp32", "int8(threshold=0.0)"]
    rows = []
    for m in range(10):
        for i, p in enumerate(precisions):
            for n in (64, 128, 256, 512, 1024):
                for b in (1, 8, 32):
                    rows.append(row(f"model-{m}", p, n, b, perplexity=20 + i + m, weights_bytes=1e9 / (1 + i),
                                    decode_ms_per_token=5 + i + n / 512, prefill_peak_bytes=2e9, decode_peak_bytes=3e9,
                                    kv_cache_bytes=1e8 * b, bandwidth_fraction=0.1))
    (tmp_path / "big" / "cells").mkdir(parents=True)
    pq.write_table(row_table(rows), tmp_path / "big" / "cells" / "all.parquet")
    html = render([tmp_path / "big"], tmp_path / "big.html")[0].read_text()
    assert html.count('<h2 id="model-') == 10
    assert html.count('<div class="chart">') == 30
    assert html.count("<details>") == 10
    assert len(html) < 15_000_000


def test_decode_chart_facets_at_most_four_batch_sizes(monkeypatch):
    import pandas as pd

    from reports import charts

    df = pd.DataFrame([row("m", p, n, b, decode_ms_per_token=1.0 + n / 100) for p in ("fp16", "nf4")
                       for n in (64, 128) for b in (1, 2, 4, 8, 16, 32)])
    seen = {}
    monkeypatch.setattr(charts, "_svg", lambda fig: seen.setdefault("axes", fig.axes) and "<svg/>")
    assert charts.decode_vs_length(df, "fp16") == "<svg/>"
    axes = seen["axes"]
    assert [a.get_title() for a in axes] == ["batch 1", "batch 4", "batch 8", "batch 32"]  # ends and evenly between
    assert all(len(a.get_lines()) == 2 for a in axes)  # one line per precision


def test_precisions_grouped_by_method():
    import pandas as pd

    from reports.tables import method_group, model_table

    def rows(p, scheme, bits, lib):
        return {"model": "m", "precision": p, "precision_name": p.split("(")[0], "quant_scheme": scheme,
                "weight_bits_nominal": bits, "quant_library": lib, "status": "ok", "new_tokens": 8, "batch_size": 1,
                "weights_bytes": 100.0 * bits, "decode_ms_per_token": 1.0}

    df = pd.DataFrame([rows("quanto-int2", "weight-only", 2, "quanto"), rows("torchao-int8dq", "weight+activation", 8,
                       "torchao"), rows("fp16", "none", 16, "torch"), rows("hqq(bits=3)", "weight-only", 3, "hqq"),
                       rows("torchao-int8wo", "weight-only", 8, "torchao"), rows("nf4", "weight-only", 4, "bitsandbytes")])
    table, _ = model_table(df, "fp16")
    assert [r["precision"] for r in table] == ["fp16", "torchao-int8wo", "nf4", "hqq(bits=3)", "quanto-int2",
                                              "torchao-int8dq"]
    assert [r["method"] for r in table][:3] == ["unquantized", "weight-only 8-bit", "weight-only 4-bit"]
    assert table[-1]["method"] == "weight+activation 8-bit" and table[-1]["library"] == "torchao"
    # rows from before these columns existed still group
    assert method_group(pd.DataFrame([{"precision_name": "nf4"}])) == "weight-only 4-bit"


def test_compiled_against_eager_and_top_kernels(tmp_path):
    k = [{"name": "aten::mm", "calls": 30, "time_us": 900.0}, {"name": "void gemv_kernel<half>", "calls": 30,
                                                               "time_us": 400.0}]
    rows = []
    for p, eager, comp in (("fp16", 20.0, 4.0), ("nf4", 38.0, 9.5)):
        for d, ms in (("eager", eager), ("compiled", comp)):
            rows.append(row("m", p, 64, 1, cell_key=f"{p}-{d}", decode=d, decode_ms_per_token=ms, decode_ms_floor=0.1,
                            compile_s=41.0 if d == "compiled" else None, top_kernels=k))
    rows.append(row("m", "int8", 64, 1, cell_key="int8-c", decode="compiled", status="skipped",
                    error_message="decode: compiled is not available for int8: its kernels break the graph"))
    rows.append(row("m", "int8", 64, 1, cell_key="int8-e", decode="eager", decode_ms_per_token=55.0))
    store = Store(tmp_path, "r1")
    for r in rows:
        store.write(r)
    html = render([tmp_path], tmp_path / "report.html")[0].read_text()
    section = html[html.index("Eager against compiled"):html.index("</table>", html.index("Eager against compiled"))]
    assert "5.00×" in section and "4.00×" in section                      # 20/4 and 38/9.5
    assert "41.0" in section and "its kernels break the graph" in section
    # the per-precision table stays on the eager path
    table = html[html.index("Per precision"):html.index("</table>", html.index("Per precision"))]
    assert ">20.00<" in table and ">4.00<" not in table and ">38.00<" in table
    assert "void gemv_kernel&lt;half&gt; ×30: 400 µs" in html
