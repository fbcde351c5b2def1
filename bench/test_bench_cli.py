"""Start-up time of the `fedlora` command line: how long `fedlora --help` takes to answer.

Each variant is one fresh interpreter process, timed from spawn to exit:

  python_startup  floor      `python -c pass`: the interpreter alone
  fedlora_help    candidate  `python -m fedlora.cli --help`: the top-level help (imports nothing heavy)
  import_torch    baseline   `python -c "import torch"`: what the help cost when `import fedlora`
                             imported torch eagerly (fedlora's ops) before it could answer

Report the ratios (speedup = import_torch / fedlora_help, x floor = fedlora_help / python_startup)
from one run on one machine, never the seconds alone: on a shared 2-core box they vary run to run.
Before timing, the candidate is checked to print the help and to import no torch.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import device_name

VARIANTS = {
    "python_startup": ("floor", [sys.executable, "-c", "pass"]),
    "fedlora_help": ("candidate", [sys.executable, "-m", "fedlora.cli", "--help"]),
    "import_torch": ("baseline", [sys.executable, "-c", "import torch"]),
}


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cli_startup(benchmark, variant):
    role, cmd = VARIANTS[variant]
    if variant == "fedlora_help":
        probe = subprocess.run([sys.executable, "-c", "import runpy, sys\n"
                                "sys.argv = ['fedlora', '--help']\n"
                                "try:\n    runpy.run_module('fedlora.cli', run_name='__main__')\n"
                                "except SystemExit:\n    pass\n"
                                "print('torch imported' if 'torch' in sys.modules else 'no torch')"],
                               capture_output=True, text=True, check=True)
        assert "simulate" in probe.stdout and probe.stdout.strip().endswith("no torch"), probe.stdout
    benchmark.group = "cli startup (one process)"
    benchmark.extra_info.update({"variant": variant, "role": role, "command": " ".join(cmd[1:]),
                                 "device": device_name()})
    benchmark.pedantic(_run, args=(cmd,), rounds=5, iterations=1, warmup_rounds=1)
