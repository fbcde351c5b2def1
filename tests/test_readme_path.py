"""The README's newcomer path: its adapter snippet loads a trained adapter with AutoPeftModelForCausalLM,
offline, on the local base model the run used; its JSONL example is a valid instruction file."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from fedlora.data import read_jsonl
from fedlora.data.instructions import partition_by_field
from fedlora.models import load_model
from fedlora.simulation import simulate

from .test_outputs import tiny_cfg
from .test_simulation import TINY, synthetic_data

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(language: str, containing: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def test_the_readme_snippet_loads_the_adapter_offline_on_its_local_base(tmp_path):
    base_dir = tmp_path / "tiny-base"  # a local model folder, as a converted GGUF file in the cache is
    model, tokenizer = load_model(TINY, seed=0)
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    out = tmp_path / "run"
    simulate(tiny_cfg(out, model=str(base_dir), rounds=2), data=synthetic_data())
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve())

    snippet = readme_block("python", "AutoPeftModelForCausalLM")
    assert len(snippet.strip().splitlines()) == 5
    check = f"""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
{snippet.replace('"runs/default/adapter"', repr(str(adapter)))}
# The same model the long way: the adapter on its base by path; the logits must agree exactly.
reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dir)!r}), {str(adapter)!r})
plain = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
ids = tokenizer("ROMEO:", return_tensors="pt")["input_ids"]
with torch.no_grad():
    got, want, base = model(ids).logits, reference(ids).logits, plain(ids).logits
print("SAME", torch.equal(got, want), "MOVED", (got - base).abs().max().item() > 0)
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "no-hub"))
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "SAME True MOVED True", proc.stdout


def test_the_readme_jsonl_example_is_a_valid_instruction_file(tmp_path):
    path = tmp_path / "example.jsonl"
    path.write_text(readme_block("jsonl", '"instruction"'))
    records = read_jsonl(path)
    assert len(records) == 3 and records[1].input == "2 and 3"
    assert partition_by_field(records, "client") == {"ana": [0, 1], "ben": [2]}
    assert [r.extra["category"] for r in records] == ["geography", "math", "geography"]
