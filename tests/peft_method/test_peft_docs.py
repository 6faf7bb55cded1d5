"""README's "Through PEFT" promises: its example runs as written, trains the atoms and reloads them exactly."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def test_peft_example_runs_as_written(tmp_path, monkeypatch):
    text = README.read_text().split("### Through PEFT", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    assert len(blocks[0].splitlines()) <= 22  # the short example the issue asks for
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    model, loaded, inputs = namespace["model"], namespace["loaded"], namespace["inputs"]
    assert (tmp_path / "atoms-peft" / "adapter_model.safetensors").is_file()
    with torch.no_grad():
        trained = model(**inputs).sample
        assert torch.equal(loaded(**inputs).sample, trained)
    assert (trained - namespace["bare"]).abs().max() > 0  # the 20 steps moved the atoms
    assert re.search(r"PEFT \d+\.\d+\.\d+", text)  # the version tested
    assert "LoraConfig" in text and "docs/peft.md" in text  # the DreamBooth script's change
