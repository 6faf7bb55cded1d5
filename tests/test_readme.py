"""README's promises: the API example runs as written; CI runs README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_api_example_runs_as_written(tmp_path, monkeypatch):
    section = README.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert namespace["bare"].shape == (*namespace["inputs"]["hidden_states"].shape[:1], 8, 8, 8)


def test_readme_reads_in_five_minutes():
    assert len(README.splitlines()) <= 250
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", README))
    assert linked and all((ROOT / page).is_file() for page in linked), linked


def test_ci_runs_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    assert len(blocks) == 2, "README keeps exactly two set-up commands"
    ci = (ROOT / ".ci" / "run").read_text()
    assert blocks[1] in ci
    assert "pytest" in blocks[1] and "atomtune demo" in blocks[0]
