"""Shared set-up for the fedlora benchmarks.

Device, dtype and shape set are chosen once, at import, because benchmark
parametrization depends on them:

    FEDLORA_BENCH_DEVICE  cuda | cpu            (default: cuda when available)
    FEDLORA_BENCH_DTYPE   bfloat16 | float16 | float32   (default: bf16 on CUDA, fp32 on CPU)
    FEDLORA_BENCH_SHAPES  gpu | cpu             (default: follows the device)
    FEDLORA_BENCH_THREADS torch CPU threads     (default on the CPU: 1, see below)

On the CPU the fedlora ops run their torch twins; TRITON_INTERPRET is left
alone on purpose (the interpreter is a correctness tool, timing it means nothing).

Every results JSON gets the device name, library versions and the exact
command line (machine_info and a top-level "fedlora_bench" entry), so a table
made from it later says what produced it.
"""
from __future__ import annotations

import os
import platform
import shlex
import sys

import pytest
import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _choose_device() -> torch.device:
    name = os.environ.get("FEDLORA_BENCH_DEVICE", "").strip().lower()
    if not name:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"FEDLORA_BENCH_DEVICE={name} but torch sees no CUDA device")
    return torch.device(name)


DEVICE = _choose_device()
ON_CUDA = DEVICE.type == "cuda"
_dtype_name = os.environ.get("FEDLORA_BENCH_DTYPE", "bfloat16" if ON_CUDA else "float32")
if _dtype_name not in _DTYPES:
    raise RuntimeError(f"FEDLORA_BENCH_DTYPE={_dtype_name!r} is not one of {sorted(_DTYPES)}")
DTYPE = _DTYPES[_dtype_name]
SHAPE_SET = os.environ.get("FEDLORA_BENCH_SHAPES", "gpu" if ON_CUDA else "cpu")
if SHAPE_SET not in ("gpu", "cpu"):
    raise RuntimeError(f"FEDLORA_BENCH_SHAPES={SHAPE_SET!r} must be 'gpu' or 'cpu'")
# On a small shared CPU box, an intra-op thread that gets descheduled stalls every
# GEMM at its barrier and medians swing 10x between runs; one thread times the
# work itself, the same for every variant. On CUDA torch's default is kept.
_threads = os.environ.get("FEDLORA_BENCH_THREADS", "" if ON_CUDA else "1")
if _threads:
    torch.set_num_threads(int(_threads))


def device_name(device: torch.device = DEVICE) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # platform.processor() is empty on most Linux boxes
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def sync(device: torch.device = DEVICE) -> None:
    """Wait for queued kernels: CUDA launches return at once, so a host timer
    around an unsynchronized call would time the launch, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def bench_dtype() -> torch.dtype:
    return DTYPE


@pytest.fixture(name="sync", scope="session")
def sync_fixture():
    return sync


# ------------------------------------------------------ provenance in the JSON
def _versions() -> dict:
    import triton

    import fedlora

    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fedlora": fedlora.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def _command(config) -> str:
    # invocation_params.args are pytest's own arguments, whatever launched it
    # (pytest, python -m pytest, an IDE); sys.argv[0] would be a path to __main__.
    args = [str(a) for a in config.invocation_params.args]
    return shlex.join([os.path.basename(sys.executable), "-m", "pytest", *args])


def _bench_env() -> dict:
    env = {k: os.environ[k] for k in sorted(os.environ) if k.startswith(("FEDLORA_", "TRITON_INTERPRET"))}
    return {
        "device": str(DEVICE),
        "device_name": device_name(),
        "dtype": str(DTYPE).removeprefix("torch."),
        "shape_set": SHAPE_SET,
        "torch_num_threads": torch.get_num_threads(),
        "env": env,
        **_versions(),
    }


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fedlora_bench"] = _bench_env()
    if ON_CUDA:
        props = torch.cuda.get_device_properties(DEVICE)
        machine_info["gpu"] = {
            "name": props.name,
            "total_memory_gib": round(props.total_memory / 2**30, 1),
            "multi_processor_count": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
        }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fedlora_bench"] = {
        **_bench_env(),
        "command": _command(config),
        "cwd": str(config.invocation_params.dir),
    }
