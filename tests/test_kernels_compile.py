"""The compile gate: every Triton kernel builds for sm_80/sm_90/sm_100 without spills or fp32 tensor cores.

The gate itself (bench/kernels.py) runs in a subprocess: this test process imports Triton
under TRITON_INTERPRET=1 (tests/conftest.py), where @triton.jit objects cannot be compiled.
With the committed bench/results/kernels-compile.json it only re-derives every
specialisation from the launchers and compiles what changed (seconds); a kernel edited
without refreshing the table fails here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from bench import kernels as gate

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_without_spills_and_with_16_bit_tensor_cores(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = tmp_path / "gate.json"
    proc = subprocess.run([sys.executable, "-m", "bench.kernels", "--check", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    kernels = {r["kernel"] for r in report["records"]}
    # Every kernel the package defines is in the report, on every target.
    assert kernels == set(gate.discover_names())
    for name in kernels:
        assert {r["cc"] for r in report["records"] if r["kernel"] == name} == set(gate.TARGETS)
    assert report["summary"]["errors"] == 0 and report["summary"]["spilling_sm80_sm90"] == 0


# ------------------------------------------------------------ the gate's own rules
def _record(**kw):
    base = {"status": "ok", "error": None, "cc": 90, "registers": 128, "stack_bytes": 0, "local_bytes": 0,
            "shared_bytes": 0, "sixteen_bit": True,
            "tensor_core": ["wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16"]}
    return {**base, **kw}


def test_rules_flag_spills_errors_and_fp32_tensor_cores_on_16_bit_data():
    assert gate.problems(_record(), uses_dot=True) == []
    assert "spills" in gate.problems(_record(stack_bytes=16), uses_dot=True)[0]
    assert "spills" in gate.problems(_record(cc=80, local_bytes=8), uses_dot=True)[0]
    assert gate.problems(_record(cc=100, stack_bytes=16), uses_dot=True) == []  # recorded, not gated
    tf32 = _record(tensor_core=["mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"])
    assert "no 16-bit tensor-core" in gate.problems(tf32, uses_dot=True)[0]
    assert gate.problems(_record(tensor_core=[]), uses_dot=False) == []  # no dot, nothing to require
    assert gate.problems(_record(sixteen_bit=False, tensor_core=[]), uses_dot=True) == []  # fp32 data
    broken = _record(status="error", error="CompilationError: out of resource\nshared memory")
    assert "does not compile" in gate.problems(broken, uses_dot=True)[0]


def test_tensor_core_instructions_are_classified_by_operand_type():
    assert gate.sixteen_bit_mma(["mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"])
    assert gate.sixteen_bit_mma(["mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"])
    assert gate.sixteen_bit_mma(["wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16"])
    assert gate.sixteen_bit_mma(["tcgen05.mma.cta_group::1.kind::f16"])
    assert not gate.sixteen_bit_mma(["tcgen05.mma.cta_group::1.kind::tf32"])
    assert not gate.sixteen_bit_mma(["wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32"])
    assert not gate.sixteen_bit_mma([])
