"""`atomtune generate` writes the manifest that `atomtune eval` reads."""

from __future__ import annotations

from atomtune.workflows.generate import GenerateSettings, generate
from atomtune.workflows.manifest import read_manifest


def test_generate_writes_an_eval_manifest(tmp_path):
    out = tmp_path / "dog"
    generate(
        GenerateSettings(["a sks dog"], out, "tiny", num_images=2, seed=5, steps=2, device="cpu"),
        progress=False,
    )
    manifest = read_manifest(out)
    assert [(r.subject, r.prompt, r.seed, r.method, r.adapter) for r in manifest.records] == [
        ("dog", "a sks dog", 5, "base", None),
        ("dog", "a sks dog", 6, "base", None),
    ]
    assert manifest.metadata["unique_token"] == "sks"
    assert all(manifest.path(r).is_file() for r in manifest.records)
