"""The speed harness runs end to end in CI-sized form (a smoke test: nothing is asserted about time)."""

from __future__ import annotations

import json

from atomtune.benchmark import main


def test_speed_harness_smoke(tmp_path, capsys):
    main(
        ["--preset", "cpu-tiny", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)]
    )
    report = json.loads((tmp_path / "speed.json").read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert list(rows) == ["bare", "atoms", "atoms_separate", "lora", "dora", "oft"]
    assert rows["bare"]["trainable_params"] == 0 and "train_step_ms" not in rows["bare"]
    # atoms: W_s (C x M) + D (M x C) + λ (M) per attention module, 2 modules per block, 2 blocks
    width, m = 32, 256
    assert rows["atoms"]["trainable_params"] == 4 * (2 * width * m + m)
    assert rows["atoms_separate"]["trainable_params"] == rows["atoms"]["trainable_params"]
    # LoRA r=16 on q, k, v, out: (C·r + r·C) per linear
    assert rows["lora"]["trainable_params"] == 4 * 4 * (2 * width * 16)
    assert rows["dora"]["trainable_params"] > rows["lora"]["trainable_params"]
    for r in rows.values():
        assert r["inference_ms"] > 0
    assert rows["atoms"]["inference_pruned_ms"] > 0 and rows["atoms"]["adapter_mb"] > 0
    table = (tmp_path / "speed.md").read_text()
    assert table.count("\n| ") == 7 and "| atoms |" in table
    assert "| oft |" in capsys.readouterr().out
