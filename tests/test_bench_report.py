"""bench/report.py on a small synthetic pytest-benchmark JSON: the ratios in its tables."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# columns of a group table: variant | role | <stat> | min | IQR | rounds | speedup | x floor
TIME, MIN, SPEEDUP, FLOOR = 2, 3, 6, 7


def _bench(group, variant, median, role=None, rounds=7):
    extra = {"variant": variant}
    if role:
        extra["role"] = role
    return {
        "group": group,
        "name": f"test_x[{group}-{variant}]",
        "param": f"{group}-{variant}",
        "extra_info": extra,
        "stats": {"median": median, "min": median * 0.9, "mean": median * 1.1, "iqr": median / 10, "rounds": rounds},
    }


SYNTHETIC = {
    "machine_info": {"machine": "x86_64"},
    "commit_info": {"id": "0123456789abcdef", "dirty": False},
    "datetime": "2025-01-01T00:00:00",
    "fedlora_bench": {"command": "python -m pytest bench/x.py", "device": "cpu", "device_name": "test cpu",
                      "torch": "2.x", "triton": "3.x"},
    "benchmarks": [
        # roles from extra_info
        _bench("g1", "loop", 10e-3, role="baseline"),
        _bench("g1", "fast", 2e-3),
        _bench("g1", "slow", 40e-3),
        _bench("g1", "gemm", 4e-3, role="floor"),
        # no roles: a baseline only when --baseline-variant names one of its variants
        _bench("g2", "loop", 3e-6),
        _bench("g2", "fast", 1.5e-6),
    ],
}


def _tables(markdown: str) -> dict[str, dict[str, list[str]]]:
    """{group: {variant: [cells...]}} from the report's per-group tables."""
    tables, group = {}, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            group = line[3:].strip()
            tables[group] = {}
        elif group and line.startswith("| ") and not line.startswith("| variant"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            tables[group][cells[0]] = cells
    return tables


def _num(cell: str) -> float | None:
    return None if cell == "-" else float(cell.rstrip("x"))


@pytest.fixture
def report(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is a folder of the checkout, not an installed package
    import bench.report

    return bench.report


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(SYNTHETIC))
    return path


def test_ratios_from_roles(report, results, tmp_path):
    out_md = tmp_path / "r.md"
    assert report.main([str(results), "--out-md", str(out_md)]) == 0
    t = _tables(out_md.read_text())
    g1 = t["g1"]
    # speedup = baseline / variant: loop 10 ms is the baseline
    assert _num(g1["loop"][SPEEDUP]) == pytest.approx(1.0)
    assert _num(g1["fast"][SPEEDUP]) == pytest.approx(5.0)
    assert _num(g1["slow"][SPEEDUP]) == pytest.approx(0.25)
    assert _num(g1["gemm"][SPEEDUP]) == pytest.approx(2.5)
    # x floor = variant / floor (4 ms)
    assert _num(g1["loop"][FLOOR]) == pytest.approx(2.5)
    assert _num(g1["fast"][FLOOR]) == pytest.approx(0.5)
    assert _num(g1["slow"][FLOOR]) == pytest.approx(10.0)
    assert _num(g1["gemm"][FLOOR]) == pytest.approx(1.0)
    assert g1["fast"][TIME] == "2.00 ms" and g1["fast"][MIN] == "1.80 ms"
    # g2 has no roles and no --baseline-variant: no ratios at all
    assert [c[SPEEDUP] for c in t["g2"].values()] == ["-", "-"]
    assert [c[FLOOR] for c in t["g2"].values()] == ["-", "-"]


def test_baseline_variant_overrides_roles(report, results, tmp_path):
    out_md = tmp_path / "r.md"
    report.main([str(results), "--out-md", str(out_md), "--baseline-variant", "fast"])
    t = _tables(out_md.read_text())
    assert _num(t["g1"]["loop"][SPEEDUP]) == pytest.approx(0.2)
    assert _num(t["g1"]["slow"][SPEEDUP]) == pytest.approx(0.05)
    assert _num(t["g2"]["loop"][SPEEDUP]) == pytest.approx(0.5)
    assert t["g2"]["fast"][TIME] == "1.50 us"


def test_stat_choice_and_summary_objects(report, results):
    groups = report.summarize(json.loads(results.read_text()), stat="min")
    g1 = {r.variant: r for r in groups[0].rows}
    assert groups[0].baseline == "loop" and groups[0].floor == "gemm"
    assert g1["fast"].time == pytest.approx(1.8e-3)
    assert g1["slow"].speedup == pytest.approx(0.25)


def test_ambiguous_roles_are_an_error(report):
    data = {"benchmarks": [_bench("g", "a", 1.0, role="baseline"), _bench("g", "b", 2.0, role="baseline")]}
    with pytest.raises(ValueError, match="several baseline"):
        report.summarize(data)
    report.summarize(data, baseline_variant="b")  # an explicit choice settles it


def test_cli_writes_markdown_and_png(results, tmp_path):
    out_md, out_png = tmp_path / "r.md", tmp_path / "r.png"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.report", str(results), "--out-md", str(out_md), "--out-png", str(out_png)],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    text = out_md.read_text()
    assert "python -m pytest bench/x.py" in text and "test cpu" in text
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
