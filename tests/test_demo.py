"""examples/demo.py: one PASS/FAIL line per check against float64, and an exit status that says if any failed."""
from __future__ import annotations

import importlib.util
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("fedlora_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("PASS", "FAIL"))]


def test_every_check_prints_pass(capsys):
    demo = load_demo()
    assert demo.main(["--dim", "256", "--tokens", "256", "--clients", "4"]) == 0
    out = capsys.readouterr().out
    lines = check_lines(out)
    assert len(lines) == 5 and all(line.startswith("PASS") for line in lines), out
    assert "5 of 5 checks passed" in out


def test_a_wrong_result_prints_fail_and_exits_1(capsys, monkeypatch):
    demo = load_demo()
    real = demo.segmented_lora
    monkeypatch.setattr(demo, "segmented_lora", lambda x, bank, seg_lens: real(x, bank, seg_lens) * (1 + 1e-3))
    assert demo.main(["--dim", "256", "--tokens", "256", "--clients", "4"]) == 1
    out = capsys.readouterr().out
    lines = check_lines(out)
    assert [line.split()[0] for line in lines] == ["FAIL", "FAIL", "PASS", "PASS", "PASS"], out
    assert "2 of 5 checks FAILED" in out
