"""Compile gate: every Triton kernel of fedlora.kernels, built for real GPUs without a GPU.

Triton compiles for a named target (``GPUTarget("cuda", cc, 32)``) with the ptxas that
ships in its wheel; ``cuobjdump --dump-resource-usage`` from the same folder reads the
registers, stack (spills) and static shared memory of the cubin. For every kernel, every
GPU autotune config, sm_80 / sm_90 / sm_100, and every argument specialisation the
launchers produce, this records: compiled or the compiler's error, registers, spilled
bytes, shared memory, and the tensor-core instructions in the PTX (``mma.sync``,
``wgmma.mma_async``, ``tcgen05.mma``, with their operand types).

Nothing here is a second table of signatures. What gets compiled comes from the code:

kernels     every ``@triton.jit`` / ``@triton.autotune`` object defined in a module of
            ``fedlora.kernels`` (a kernel no scenario launches fails the gate).
signatures  the public ops run on CPU tensors inside ``kernels.dispatch.capture_launches()``
            (no kernel executes, the launchers' grids and arguments are recorded); each
            recorded launch goes through Triton's own binder for the target, which gives
            exactly the types, constexprs, 16-byte alignment and divisibility-by-16
            attributes a real launch of those arguments would compile with.
scenarios   the public ops x input dtype (fp32 / fp16 / bf16) x layer widths that are
            multiples of 16 (real models) or odd (no vectorisation: the register worst case).

Cache: a record is keyed by a hash of the kernel's source, the specialisation, the options,
the target and the Triton version. ``bench/results/kernels-compile.json`` is committed and
doubles as the cache, so a clean clone compiles only what changed; ``--check`` fails when
a record is missing for the installed Triton version (the committed table is stale).

    python -m bench.kernels            compile what is not cached, write the json and markdown
    python -m bench.kernels --check    verify only: exit 1 on a failure or a stale table
    python -m bench.kernels --no-cache compile everything (measures the uncached time)
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
JSON_PATH = RESULTS / "kernels-compile.json"
MD_PATH = RESULTS / "kernels-compile.md"
TARGETS = (80, 90, 100)
NO_SPILL_TARGETS = (80, 90)  # sm_100 spills are recorded, not gated (no shipped tuning for it yet)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

import fedlora.kernels
from fedlora.kernels.dispatch import Launch, capture_launches, interpreting, shipped_configs

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (d_in, d_out): multiples of 16 as real models have, and odd widths where nothing vectorises.
WIDTHS = {"aligned": (256, 384), "odd": (203, 301)}


# ------------------------------------------------------------------ discovery
def kernel_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(fedlora.kernels.__path__, "fedlora.kernels."))


def _jit(obj) -> JITFunction | None:
    while not isinstance(obj, JITFunction):
        if not hasattr(obj, "fn"):
            return None
        obj = obj.fn
    return obj


def discover() -> dict[str, object]:
    """{'module:name': kernel object} for every Triton function defined in fedlora.kernels."""
    found = {}
    for module_name in kernel_modules():
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            jit = _jit(obj)
            if jit is not None and jit.fn.__module__ == module_name:
                found[f"{module_name}:{name}"] = obj
    return found


def discover_names() -> list[str]:
    """'module:name' of every Triton function in fedlora.kernels, found from the source text
    (works under the interpreter too, where the objects are stand-ins)."""
    names = []
    for module_name in kernel_modules():
        module = importlib.import_module(module_name)
        source = inspect.getsource(module)
        names += [f"{module_name}:{m}" for m in re.findall(r"^@triton\.jit[^\n]*\ndef (\w+)", source, re.M)]
    return names


def source_hash(jit: JITFunction) -> str:
    """Hash of the kernel's source and of every @triton.jit helper it names (recursively).

    Unlike Triton's own cache key it ignores the line number, so editing text above a
    kernel does not invalidate its records.
    """
    parts, todo, seen = [], [jit], set()
    while todo:
        fn = todo.pop()
        if fn.fn.__qualname__ in seen:
            continue
        seen.add(fn.fn.__qualname__)
        parts.append(fn.src)
        for name, value in fn.__globals__.items():
            dep = _jit(value)
            if dep is not None and re.search(rf"\b{re.escape(name)}\s*\(", fn.src):
                todo.append(dep)
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()


# ------------------------------------------------------------------ scenarios
@dataclass
class Scenario:
    name: str
    dtype: torch.dtype  # the data's dtype: x, the adapters and the layer output
    sixteen_bit: bool  # every tensor a dot reads is 16-bit: each dot must use 16-bit tensor cores
    run: object  # () -> None, issues the launches
    targets: tuple[int, ...] = TARGETS


def _bank(d_in, d_out, ranks, dtype, seed=0):
    from fedlora import AdapterBank

    g = torch.Generator().manual_seed(seed)
    factors = [(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)) for r in ranks]
    return AdapterBank.from_factors(factors, [0.5 + i for i in range(len(ranks))]).to(dtype=dtype)


def _segmented(d_in, d_out, dtype, ranks, seg_lens):
    from fedlora.ops import segmented_lora

    bank = _bank(d_in, d_out, ranks, dtype)
    bank.A.requires_grad_()
    bank.B.requires_grad_()
    x = torch.randn(sum(seg_lens), d_in, dtype=dtype, requires_grad=True)
    y = segmented_lora(x, bank, seg_lens)
    y.backward(torch.randn_like(y))


def _layer(d_in, d_out, base_dtype, adapter_dtype):
    from torch import nn

    import fedlora

    base = nn.Linear(d_in, d_out, bias=False, dtype=base_dtype)
    layer = fedlora.MultiLoRALinear(base, ranks=[8, 24, 5], dtype=adapter_dtype)
    x = torch.randn(6, 4, d_in, dtype=base_dtype, requires_grad=True)
    with fedlora.segments(layer, seg_lens=[2, 0, 4], adapter_ids=[2, 0, 1]):
        y = layer(x)
    y.backward(torch.randn_like(y))


def _delta(d_in, d_out, dtype):
    from fedlora.ops import lora_delta

    banks = [_bank(d_in, d_out, [4, 17], dtype), _bank(d_in, d_out, [30, 2], dtype, seed=1)]
    # The banks' own dtype, and fp32 out of 16-bit banks (lowrank_svd's dense path).
    for out_dtype in {dtype, torch.float32}:
        try:
            lora_delta(banks, weights=[0.3, 0.7], dtype=out_dtype)
        except ValueError:  # its check of the result reads an output the captured launch never wrote
            pass


def scenarios() -> list[Scenario]:
    out = []
    for wname, (d_in, d_out) in WIDTHS.items():
        # Odd widths are built for the no-spill targets only (sm_100 has no tuned configs yet).
        targets = TARGETS if wname == "aligned" else NO_SPILL_TARGETS
        for dname, dt in DTYPES.items():
            half = dt != torch.float32
            group = [
                Scenario(f"segmented_lora {dname} {wname}", dt, half,
                         lambda d_in=d_in, d_out=d_out, dt=dt:
                         _segmented(d_in, d_out, dt, [5, 16, 40, 9], [7, 0, 30, 11])),
                # One adapter over a long batch: the outer product splits its tokens.
                Scenario(f"segmented_lora single-adapter {dname} {wname}", dt, half,
                         lambda d_in=d_in, d_out=d_out, dt=dt: _segmented(d_in, d_out, dt, [16], [4096])),
                Scenario(f"MultiLoRALinear {dname} {wname}", dt, half,
                         lambda d_in=d_in, d_out=d_out, dt=dt: _layer(d_in, d_out, dt, dt)),
                Scenario(f"lora_delta {dname} {wname}", dt, half,
                         lambda d_in=d_in, d_out=d_out, dt=dt: _delta(d_in, d_out, dt)),
            ]
            if half:  # PEFT's default: fp32 adapters over a 16-bit base (the dots then run in fp32)
                group.append(Scenario(f"MultiLoRALinear {dname}-base fp32-adapters {wname}", dt, False,
                                      lambda d_in=d_in, d_out=d_out, dt=dt: _layer(d_in, d_out, dt, torch.float32)))
            for sc in group:
                sc.targets = targets
            out += group
    return out


def capture(scenario: Scenario) -> list[Launch]:
    torch.manual_seed(0)
    with capture_launches() as launches:
        scenario.run()
    return launches


# -------------------------------------------------------------- specialising
@dataclass
class Job:
    """One compile: a kernel, a specialisation, a config and a target."""

    kernel: str  # 'module:name'
    cc: int
    signature: dict
    constexprs: dict  # {(index,): value}, as Triton's binder produces them
    attrs: dict
    options: dict  # num_warps, num_stages, ...
    config: dict  # the autotune config's meta-parameters (also inside constexprs)
    variant: str  # short text of the non-config specialisation
    scenarios: set = field(default_factory=set)
    sixteen_bit: bool = False
    key: str = ""


def _describe(jit: JITFunction, signature: dict, constexprs: dict, config: dict) -> str:
    names = jit.arg_names
    ptrs = [f"{n.removesuffix('_ptr')}:{t[1:]}" for n, t in signature.items() if t.startswith("*")]
    flags = [f"{names[k[0]]}={v}" for k, v in sorted(constexprs.items())
             if names[k[0]] not in config and not names[k[0]].startswith("stride")]
    unit = [names[k[0]] for k, v in sorted(constexprs.items()) if names[k[0]].startswith("stride") and v == 1]
    return " ".join(ptrs + flags + ([f"unit:{','.join(unit)}"] if unit else []))


def jobs_for(launch: Launch, name: str, targets) -> list[Job]:
    jit = _jit(launch.kernel)
    if hasattr(launch.kernel, "gpu_configs"):  # what the autotuner may run for these arguments
        named = inspect.signature(jit.fn).bind_partial(*launch.args, **launch.kwargs).arguments
        configs = shipped_configs(launch.kernel, named)
    else:
        configs = getattr(launch.kernel, "configs", None) or [triton.Config({})]
    jobs = []
    for cc in targets:
        backend = make_backend(GPUTarget("cuda", cc, 32))
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        for config in configs:
            kwargs = {**launch.kwargs, **config.all_kwargs()}
            bound, spec, opts = binder(*launch.args, **kwargs)
            options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, spec, opts)
            option_keys = ("num_warps", "num_stages", "num_ctas", "maxnreg")
            job = Job(
                kernel=name, cc=cc, signature=dict(signature), constexprs=dict(constexprs), attrs=dict(attrs),
                options={k: getattr(options, k) for k in option_keys if getattr(options, k, None) is not None},
                config=dict(config.kwargs), variant=_describe(jit, signature, constexprs, config.kwargs),
            )
            job.key = _key(jit, job)
            jobs.append(job)
    return jobs


def _key(jit: JITFunction, job: Job) -> str:
    text = json.dumps([
        triton.__version__, source_hash(jit), job.cc, sorted(job.signature.items()),
        sorted((str(k), repr(v)) for k, v in job.constexprs.items()),
        sorted((str(k), repr(v)) for k, v in job.attrs.items()), sorted(job.options.items()),
    ])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def collect(only: str | None = None, targets=TARGETS) -> tuple[list[Job], dict[str, object]]:
    """Every distinct compile the scenarios produce, and every discovered kernel.

    ``only`` (a regular expression on scenario names) and ``targets`` narrow the run for
    development; the gate itself always runs everything.
    """
    if interpreting():  # @triton.jit objects are then interpreter stand-ins that cannot compile
        raise RuntimeError("bench.kernels compiles for real GPUs: run it without TRITON_INTERPRET=1")
    kernels = discover()
    by_obj = {id(obj): name for name, obj in kernels.items()}
    jobs: dict[str, Job] = {}
    for scenario in scenarios():
        if only and not re.search(only, scenario.name):
            continue
        for launch in capture(scenario):
            name = by_obj.get(id(launch.kernel))
            if name is None:
                raise RuntimeError(f"scenario {scenario.name!r} launched {launch.kernel!r}, "
                                   "not found in fedlora.kernels")
            for job in jobs_for(launch, name, [cc for cc in scenario.targets if cc in targets]):
                job = jobs.setdefault(job.key, job)
                job.scenarios.add(scenario.name)
                job.sixteen_bit |= scenario.sixteen_bit
    return list(jobs.values()), kernels


# ------------------------------------------------------------------ compiling
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_TC = re.compile(r"\b(mma\.sync\.aligned[\w.]*|wgmma\.mma_async[\w.]*|tcgen05\.mma(?:\.[\w:]+)*)")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def compile_job(job: Job) -> dict:
    """Compile one job (in a worker process) and read its resources."""
    module, name = job.kernel.split(":")
    jit = _jit(getattr(importlib.import_module(module), name))
    record = {"status": "ok", "error": None}
    start = time.perf_counter()
    try:
        src = ASTSource(fn=jit, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", job.cc, 32), options=dict(job.options))
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([str(_BIN / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                                   capture_output=True, text=True, check=True).stdout
        regs, stack, static_shared, local = (int(v) for v in _RES.search(usage).groups())
        record.update(
            registers=regs, stack_bytes=stack, local_bytes=local,
            shared_bytes=int(compiled.metadata.shared) + static_shared,
            tensor_core=sorted(set(_TC.findall(compiled.asm["ptx"]))),
        )
    except Exception as exc:  # the compiler's error is the result
        record.update(status="error", error=f"{type(exc).__name__}: {str(exc).strip()[-2000:]}")
    record["compile_s"] = round(time.perf_counter() - start, 2)
    return record


def _worker_init():
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)


def compile_all(jobs: list[Job], workers: int) -> list[dict]:
    if workers <= 1:
        _worker_init()
        return [compile_job(j) for j in jobs]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        return list(pool.map(compile_job, jobs, chunksize=1))


# ------------------------------------------------------------------ checking
def sixteen_bit_mma(instructions: list[str]) -> bool:
    for ins in instructions:
        if ins.startswith("tcgen05.mma"):
            if "kind::f16" in ins:
                return True
        elif re.search(r"\.(bf16|f16)\b", ins):
            return True
    return False


def problems(record: dict, uses_dot: bool) -> list[str]:
    out = []
    if record["status"] != "ok":
        return ["does not compile: " + record["error"].splitlines()[-1][:300]]
    if record["cc"] in NO_SPILL_TARGETS and (record["stack_bytes"] or record["local_bytes"]):
        out.append(f"spills (stack {record['stack_bytes']} B, local {record['local_bytes']} B, "
                   f"{record['registers']} registers)")
    if record["sixteen_bit"] and uses_dot and not sixteen_bit_mma(record["tensor_core"]):
        out.append(f"16-bit inputs but no 16-bit tensor-core instruction (found {record['tensor_core'] or 'none'})")
    return out


def run(check: bool, use_cache: bool, workers: int, out_json: Path, out_md: Path | None,
        only: str | None = None, targets=TARGETS) -> int:
    t0 = time.perf_counter()
    jobs, kernels = collect(only, targets)
    partial = bool(only) or tuple(targets) != TARGETS
    cached, committed_version = {}, None
    if use_cache and JSON_PATH.exists():
        committed = json.loads(JSON_PATH.read_text())
        committed_version = committed.get("triton")
        cached = {r["key"]: r for r in committed.get("records", [])}
    todo = [j for j in jobs if j.key not in cached]
    print(f"{len(kernels)} kernels, {len(jobs)} compiles ({len(jobs) - len(todo)} cached, {len(todo)} to build, "
          f"{workers} workers)", flush=True)
    results = dict(zip((j.key for j in todo), compile_all(todo, workers)))
    records = []
    for job in sorted(jobs, key=lambda j: (j.kernel, j.variant, j.cc, json.dumps(j.config, sort_keys=True),
                                            json.dumps(j.options, sort_keys=True))):
        base = results.get(job.key) or cached[job.key]
        keep = {k: base[k] for k in ("status", "error", "registers", "stack_bytes", "local_bytes", "shared_bytes",
                                     "tensor_core", "compile_s") if k in base}
        records.append({
            "key": job.key, "kernel": job.kernel, "cc": job.cc, "variant": job.variant, "config": job.config,
            "options": job.options, "sixteen_bit": job.sixteen_bit, "scenarios": sorted(job.scenarios), **keep,
        })
    failures = []
    launched = {r["kernel"] for r in records}
    for name, obj in kernels.items():
        jit = _jit(obj)
        called_from = [k for k in launched if re.search(rf"\b{name.split(':')[1]}\s*\(", _jit(kernels[k]).src)]
        if name not in launched and not called_from and not partial:
            failures.append(f"{name}: no scenario launches it (add one to bench/kernels.py scenarios())")
    for r in records:
        uses_dot = "tl.dot(" in _jit(kernels[r["kernel"]]).src
        failures += [f"{r['kernel']} sm_{r['cc']} {r['config']} {r['options']} [{r['variant']}]: {p}"
                     for p in problems(r, uses_dot)]
    if check and todo and use_cache and committed_version == triton.__version__:
        failures.append(f"{len(todo)} compiles are missing from bench/results/kernels-compile.json: the kernels "
                        "changed since it was written; run `python -m bench.kernels` and commit the results")
    payload = {
        "generated_by": "python -m bench.kernels",
        "triton": triton.__version__, "torch": torch.__version__,
        "targets": [f"sm_{cc}" for cc in TARGETS],
        "summary": summary(records),
        "records": records,
    }
    if out_json:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(payload, indent=1) + "\n")
    if out_md:
        out_md.write_text(markdown(payload))
    print(f"{len(records)} records, {sum(r['status'] != 'ok' for r in records)} errors, "
          f"{payload['summary']['spilling_sm80_sm90']} spilling on sm_80/sm_90; "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


def summary(records: list[dict]) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    return {
        "compiles": len(records),
        "errors": len(records) - len(ok),
        "spilling_sm80_sm90": sum(1 for r in ok if r["cc"] in NO_SPILL_TARGETS
                                  and (r["stack_bytes"] or r["local_bytes"])),
        "spilling_sm100": sum(1 for r in ok if r["cc"] == 100 and (r["stack_bytes"] or r["local_bytes"])),
        "max_registers": max((r["registers"] for r in ok), default=0),
    }


def _mma_short(instructions: list[str]) -> str:
    short = set()
    for ins in instructions:
        if ins.startswith("tcgen05"):
            kind = re.search(r"kind::(\w+)", ins)
            short.add("tcgen05 " + (kind.group(1) if kind else "?"))
        else:
            parts = ins.split(".")
            family = "wgmma" if ins.startswith("wgmma") else "mma"
            types = [p for p in parts if p in ("f16", "bf16", "tf32", "f32", "f64", "e4m3", "e5m2", "s8")]
            short.add(f"{family} {'.'.join(types)}")
    return ", ".join(sorted(short)) or "none"


def markdown(payload: dict) -> str:
    lines = [
        "# Compile gate: fedlora.kernels for sm_80 / sm_90 / sm_100",
        "",
        f"Generated by `{payload['generated_by']}` with triton {payload['triton']} "
        "(ptxas and cuobjdump from its wheel);",
        "no GPU involved. Per cell: registers / spilled bytes (stack + local) / shared memory (KiB) / tensor-core "
        "instruction (operand types; `none` = no tensor cores, e.g. fp32 IEEE dots). "
        "Specialisations come from the launchers (see bench/kernels.py).",
        "",
        f"Summary: {payload['summary']}",
        "",
    ]
    rows: dict[tuple, dict] = {}
    for r in payload["records"]:
        cfg = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in r["config"].items())
        cfg += f" w{r['options'].get('num_warps')} s{r['options'].get('num_stages')}"
        rows.setdefault((r["kernel"], r["variant"], cfg), {})[r["cc"]] = r
    kernel = None
    for (name, variant, cfg), by_cc in rows.items():
        if name != kernel:
            kernel = name
            lines += ["", f"## `{name}`", "", "| specialisation | config | " + " | ".join(payload["targets"]) + " |",
                      "|---|---|" + "---|" * len(payload["targets"])]
        cells = []
        for cc in TARGETS:
            r = by_cc.get(cc)
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append("**error**")
            else:
                spill = r["stack_bytes"] + r["local_bytes"]
                spill_txt = f"**{spill}**" if spill else "0"
                cells.append(f"{r['registers']} / {spill_txt} / {r['shared_bytes'] / 1024:.0f} / "
                             f"{_mma_short(r['tensor_core'])}")
        lines.append(f"| {variant} | {cfg} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify only; write nothing unless --out is given")
    parser.add_argument("--no-cache", action="store_true", help="ignore the committed records and compile everything")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=None,
                        help="json path (default: bench/results/kernels-compile.json)")
    parser.add_argument("--only", default=None, help="development: scenarios whose name matches this regex")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="development: e.g. 80,90")
    args = parser.parse_args(argv)
    targets = tuple(int(t) for t in args.targets.split(","))
    if (args.only or targets != TARGETS) and not args.out and not args.check:
        parser.error("--only / --targets make a partial run: give --out (the committed table is the full one)")
    out_json = args.out or (None if args.check else JSON_PATH)
    out_md = None if args.check else (out_json.with_suffix(".md") if args.out else MD_PATH)
    return run(args.check, not args.no_cache, args.workers, out_json, out_md, args.only, targets)


if __name__ == "__main__":
    sys.exit(main())
