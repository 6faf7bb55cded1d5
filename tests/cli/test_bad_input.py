"""Bad input, fed to the command line as a careless or hostile user would: every row must end in exit
code 2 with exactly one line on stderr (no traceback), and leave nothing half-written behind.

The rows run the CLI in-process (``atomtune.cli.main``) on the tiny in-process pipeline and on tiny
adapters and checkpoints made here. A last test kills ``atomtune train`` with SIGKILL between two
checkpoints and resumes it with ``--resume latest`` to the same losses as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from atomtune.cli import main
from diffusion_helpers import one_thread

WEIGHTS, CONFIG, SIDECAR = "adapter_model.safetensors", "adapter_config.json", "atomtune.json"
STATE, STATE_JSON = "state.safetensors", "trainer_state.json"
ATTENTION = "transformer_blocks.0.attn1"
MODULE = f"{ATTENTION}.to_q"  # atoms live on the projections by default


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


# -- what the rows are made of --------------------------------------------------------------------
def _png(path: Path, seed: int) -> Path:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _bomb(path: Path, side: int = 30_000) -> Path:
    """A valid 1-bit PNG header claiming side x side pixels, in a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Instance images, an atoms and a LoRA adapter for the tiny pipeline, a train checkpoint."""
    from atomtune.diffusion.methods import MethodConfig, apply_method
    from atomtune.diffusion.pipeline import tiny_pixart_pipeline

    root = tmp_path_factory.mktemp("made")
    images = root / "images"
    images.mkdir()
    for i in range(2):
        _png(images / f"{i}.png", i)
    torch.manual_seed(0)
    atoms = apply_method(tiny_pixart_pipeline().transformer, MethodConfig(num_atoms=4), "tiny")
    with torch.no_grad():
        for a in atoms.handle.atoms().values():
            a.D.normal_()
    atoms.save(root / "atoms")
    lora = apply_method(tiny_pixart_pipeline().transformer, MethodConfig(method="lora", rank=2), "tiny")
    lora.save(root / "lora")
    with one_thread():
        code = main([*_train_args(images, root / "run"), "--max-steps", "2", "--checkpoint-every", "1"])
    assert code == 0
    return {"root": root, "images": images, "atoms": root / "atoms", "lora": root / "lora",
            "checkpoint": root / "run" / "checkpoints" / "checkpoint-000002"}  # fmt: skip


def _train_args(images: Path, out: Path) -> list[str]:
    return ["train", "--pretrained", "tiny", "--instance-data", str(images), "--instance-prompt",
            "a sks dog", "--output-dir", str(out), "--num-atoms", "4", "--quiet"]  # fmt: skip


def _copy(src: Path, tmp: Path, name: str) -> Path:
    dst = tmp / name
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(folder: Path, file: str, change: Callable[[dict], None]) -> None:
    tensors = load_file(folder / file)
    change(tensors)
    save_file(tensors, folder / file)


@dataclass
class Replace:
    """Returned by a JSON edit: write this value instead of the (changed) document."""

    value: object


def _edit_json(folder: Path, file: str, change: Callable[[dict], object]) -> None:
    data = json.loads((folder / file).read_text())
    result = change(data)
    (folder / file).write_text(json.dumps(result.value if isinstance(result, Replace) else data))


# -- the table ------------------------------------------------------------------------------------
@dataclass
class Row:
    kind: str  # the class of bad input
    name: str
    make: Callable[[Path, dict], tuple[list[str], str]]  # (tmp, made) -> (argv, expected in the line)
    guarded: str | None = None  # an input folder (relative to tmp) that must come out unchanged


ROWS: list[Row] = []


def row(kind: str, name: str, guarded: str | None = None):
    def register(make):
        ROWS.append(Row(kind, name, make, guarded))
        return make

    return register


def _inspect_atoms(change: Callable[[Path], None]) -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, m: dict) -> list[str]:
        folder = _copy(m["atoms"], tmp, "adapter")
        change(folder)
        return ["inspect", str(folder)]

    return make


def _generate(tmp: Path, adapter: Path, *extra: str) -> list[str]:
    return ["generate", "--pretrained", "tiny", "--device", "cpu", "--adapter", str(adapter),
            "--prompt", "a sks dog", "--steps", "1", "--out", str(tmp / "out"), "--quiet", *extra]  # fmt: skip


def tensors_row(name: str, change: Callable[[dict], None], message: str) -> None:
    row("adapter tensors", name)(
        lambda tmp, m: (_inspect_atoms(lambda f: _edit_tensors(f, WEIGHTS, change))(tmp, m), message)
    )


def config_row(name: str, change: Callable[[dict], object], message: str) -> None:
    row("adapter JSON", name)(
        lambda tmp, m: (_inspect_atoms(lambda f: _edit_json(f, CONFIG, change))(tmp, m), message)
    )


# adapter files: corrupt, truncated, NaN, wrong dtypes and shapes, extra and missing tensors
def _truncate(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


row("adapter tensors", "truncated safetensors")(
    lambda tmp, m: (_inspect_atoms(_truncate)(tmp, m), "not a readable safetensors file")
)
row("adapter tensors", "random bytes as safetensors")(
    lambda tmp, m: (
        _inspect_atoms(lambda f: (f / WEIGHTS).write_bytes(os.urandom(200)))(tmp, m),
        "not a readable safetensors file",
    )
)
row("adapter tensors", "a pickle renamed .safetensors")(
    lambda tmp, m: (
        _inspect_atoms(lambda f: torch.save({"x": torch.ones(2)}, f / WEIGHTS))(tmp, m),
        "not a readable safetensors file",
    )
)
row("adapter tensors", "empty safetensors file")(
    lambda tmp, m: (
        _inspect_atoms(lambda f: (f / WEIGHTS).write_bytes(b""))(tmp, m),
        "not a readable safetensors file",
    )
)
tensors_row(
    "W_s holds NaN", lambda t: t[f"{MODULE}.W_s"].__setitem__((0, 0), float("nan")), "NaN or infinite"
)
tensors_row("D holds inf", lambda t: t[f"{MODULE}.D"].__setitem__((1, 2), float("inf")), "NaN or infinite")
tensors_row("gain holds -inf", lambda t: t[f"{MODULE}.gain"].__setitem__(0, -float("inf")), "NaN or infinite")
tensors_row(
    "negative lambda with a NaN mask",
    lambda t: (t[f"{MODULE}.lam"].fill_(-1.0), t[f"{MODULE}.mask"].__setitem__(0, float("nan"))),
    f"{MODULE}.mask holds 1 NaN",
)
tensors_row(
    "W_s as int8", lambda t: t.__setitem__(f"{MODULE}.W_s", t[f"{MODULE}.W_s"].to(torch.int8)), "is int8"
)
tensors_row(
    "D as float16", lambda t: t.__setitem__(f"{MODULE}.D", t[f"{MODULE}.D"].half()), "is float16, expected"
)
tensors_row("boolean mask", lambda t: t.__setitem__(f"{MODULE}.mask", t[f"{MODULE}.mask"].bool()), "is bool")
tensors_row("mask of 0.5", lambda t: t[f"{MODULE}.mask"].fill_(0.5), "must hold 0 or 1")
tensors_row(
    "atom_ids as float",
    lambda t: t.__setitem__(f"{MODULE}.atom_ids", t[f"{MODULE}.atom_ids"].float()),
    "atom_ids is float32, expected int64",
)
tensors_row("repeated atom ids", lambda t: t[f"{MODULE}.atom_ids"].fill_(1), "distinct atom numbers")
tensors_row("an extra tensor", lambda t: t.__setitem__("extra.weight", torch.ones(2)), "extra.weight")
tensors_row("missing mask", lambda t: t.pop(f"{MODULE}.mask"), f"lacks tensor {MODULE}.mask")
tensors_row("missing D", lambda t: t.pop(f"{MODULE}.D"), f"lacks tensor {MODULE}.D")
tensors_row(
    "W_s of the wrong shape",
    lambda t: t.__setitem__(f"{MODULE}.W_s", torch.zeros(3, 4)),
    "has shape (3, 4), expected",
)
tensors_row(
    "lam of the wrong shape", lambda t: t.__setitem__(f"{MODULE}.lam", torch.zeros(5)), "has shape (5,)"
)


@row("adapter tensors", "NaN adapter given to generate")
def _(tmp, m):
    folder = _copy(m["atoms"], tmp, "adapter")
    _edit_tensors(folder, WEIGHTS, lambda t: t[f"{MODULE}.D"].fill_(float("nan")))
    return _generate(tmp, folder), "NaN or infinite"


@row("adapter tensors", "LoRA tensor holding NaN, given to generate")
def _(tmp, m):
    folder = _copy(m["lora"], tmp, "adapter")
    _edit_tensors(folder, WEIGHTS, lambda t: next(iter(t.values())).fill_(float("nan")))
    return _generate(tmp, folder), "NaN or infinite"


@row("adapter tensors", "LoRA tensor as int32, given to generate")
def _(tmp, m):
    folder = _copy(m["lora"], tmp, "adapter")
    _edit_tensors(folder, WEIGHTS, lambda t: t.__setitem__(next(iter(t)), next(iter(t.values())).int()))
    return _generate(tmp, folder), "is int32"


# adapter_config.json and atomtune.json: wrong JSON shapes and types, missing fields
config_row("config is a string", lambda d: d.__setitem__("config", "atoms"), "config must be an object")
config_row("config is null", lambda d: d.__setitem__("config", None), "config must be an object")
config_row("base_model is a list", lambda d: d.__setitem__("base_model", []), "base_model must hold")
config_row("base_model lacks class", lambda d: d["base_model"].pop("class"), "lacks field(s): class")
config_row("modules is a string", lambda d: d.__setitem__("modules", "all"), "modules must be an object")
config_row("modules is empty", lambda d: d.__setitem__("modules", {}), "modules is empty")
config_row("a module lacks num_atoms", lambda d: d["modules"][MODULE].pop("num_atoms"), "num_atoms")
config_row(
    "num_atoms as a string",
    lambda d: d["modules"][MODULE].__setitem__("num_atoms", "4"),
    "must be an integer",
)
config_row(
    "num_atoms of 0", lambda d: d["modules"][MODULE].__setitem__("num_atoms", 0), "num_atoms must be >= 1"
)
config_row("format_version as a string", lambda d: d.__setitem__("format_version", "1"), "format_version")
config_row("an unknown top-level field", lambda d: d.__setitem__("comment", 1), "unknown field(s): comment")
config_row("the whole file a JSON array", lambda d: Replace([d]), "must hold a JSON object, got list")
config_row("lambda_init NaN", lambda d: d["config"].__setitem__("lambda_init", float("nan")), "lambda_init")
config_row(
    "sparsity_weight negative", lambda d: d["config"].__setitem__("sparsity_weight", -5), "sparsity_weight"
)
config_row("fused as a string", lambda d: d["config"].__setitem__("fused", "yes"), "fused must be true")
config_row("config has an unknown field", lambda d: d["config"].update(rank=2), "rank")
row("adapter JSON", "adapter_config.json not JSON")(
    lambda tmp, m: (_inspect_atoms(lambda f: (f / CONFIG).write_text("{oops"))(tmp, m), "not valid JSON")
)
row("adapter JSON", "adapter_config.json binary")(
    lambda tmp, m: (
        _inspect_atoms(lambda f: (f / CONFIG).write_bytes(b"\xff\xfe\x00"))(tmp, m),
        "not valid JSON",
    )
)


def sidecar_row(name: str, change: Callable[[dict], object], message: str) -> None:
    @row("adapter JSON", name)
    def make(tmp, m):
        folder = _copy(m["atoms"], tmp, "adapter")
        _edit_json(folder, SIDECAR, change)
        return _generate(tmp, folder), message


sidecar_row("atomtune.json is a string", lambda d: Replace("atoms"), "must hold a JSON object, got str")
sidecar_row("atomtune.json names no known method", lambda d: d.__setitem__("method", "ia3"), "method must be")
sidecar_row("atomtune.json base_model is a string", lambda d: d.__setitem__("base_model", "x"), "base_model")
sidecar_row(
    "atomtune.json projection of strings",
    lambda d: d["base_model"]["projections"].__setitem__(f"{ATTENTION}.to_q", ["a", 3]),
    "must be [in, out]",
)


@row("adapter JSON", "merge given a folder whose adapter_config.json is a JSON array")
def _(tmp, m):
    folder = tmp / "array"
    folder.mkdir()
    (folder / CONFIG).write_text("[1, 2]")
    argv = ["merge", "--pretrained", "tiny", "--device", "cpu", str(folder), str(m["atoms"])]
    return [*argv, "--out", str(tmp / "out"), "--quiet"], "must hold a JSON object, got list"


# checkpoints on --resume
def resume_row(name: str, change: Callable[[Path], None], message: str, *extra: str) -> None:
    @row("checkpoint on --resume", name)
    def make(tmp, m):
        folder = _copy(m["checkpoint"], tmp, "checkpoint-000002")
        change(folder)
        argv = [*_train_args(m["images"], tmp / "out"), "--max-steps", "3", "--resume", str(folder), *extra]
        return argv, message


resume_row(
    "rng.cpu missing", lambda f: _edit_tensors(f, STATE, lambda t: t.pop("rng.cpu")), "rng.cpu is missing"
)
resume_row(
    "rng.cpu of the wrong size",
    lambda f: _edit_tensors(f, STATE, lambda t: t.__setitem__("rng.cpu", t["rng.cpu"][:100].clone())),
    "rng.cpu has shape (100,)",
)
resume_row(
    "loop generator of the wrong size",
    lambda f: _edit_tensors(
        f, STATE, lambda t: t.__setitem__("model.loop_generator.0", torch.zeros(7, dtype=torch.uint8))
    ),
    "loop_generator.0 has shape (7,)",
)
resume_row("step missing", lambda f: _edit_json(f, STATE_JSON, lambda d: d.pop("step")), "step and extra")
resume_row(
    "step a string",
    lambda f: _edit_json(f, STATE_JSON, lambda d: d.__setitem__("step", "2")),
    "step must be an integer",
)
resume_row(
    "step negative",
    lambda f: _edit_json(f, STATE_JSON, lambda d: d.__setitem__("step", -4)),
    "step must be >= 0",
)
resume_row(
    "an optimizer tensor missing",
    lambda f: _edit_tensors(f, STATE, lambda t: t.pop(next(k for k in t if k.startswith("optimizer.")))),
    "the optimizer's tensor",
)
resume_row(
    "an optimizer tensor NaN",
    lambda f: _edit_tensors(
        f,
        STATE,
        lambda t: t[next(k for k in t if k.startswith("optimizer.") and t[k].numel() > 1)].fill_(
            float("nan")
        ),
    ),
    "NaN or infinite",
)
resume_row(
    "resumed with another optimizer",
    lambda f: None,
    "CAME optimizer; this run uses AdamW",
    "--optimizer",
    "adamw",
)
resume_row(
    "trained tensor NaN",
    lambda f: _edit_tensors(
        f, STATE, lambda t: t[next(k for k in t if k.endswith(".D"))].fill_(float("nan"))
    ),
    "NaN or infinite",
)
resume_row("state truncated", lambda f: (f / STATE).write_bytes((f / STATE).read_bytes()[:100]), "is corrupt")
resume_row("trainer_state.json not JSON", lambda f: (f / STATE_JSON).write_text("{"), "is not a checkpoint")
resume_row(
    "extra.structure a list",
    lambda f: _edit_json(f, STATE_JSON, lambda d: d["extra"].__setitem__("structure", [])),
    "not a checkpoint",
)

resume_row(
    "step past the run's steps",
    lambda f: _edit_json(f, STATE_JSON, lambda d: d.__setitem__("step", 1000000)),
    "at step 1000000, past this run's 3 steps",
)
resume_row(
    "step beyond the checkpoint's history",
    lambda f: _edit_json(f, STATE_JSON, lambda d: d.__setitem__("step", 3)),
    "says step 3 but holds 2 steps of history",
)
resume_row(
    "resumed with the other form", lambda f: None, "made with form='projections'", "--form", "attention"
)


@row("checkpoint on --resume", "--resume names a missing folder")
def _(tmp, m):
    return [*_train_args(m["images"], tmp / "out"), "--resume", str(tmp / "nope")], "not a checkpoint folder"


# numbers: flags and settings fields
def number_row(name: str, argv: Callable[[Path, dict], list[str]], message: str) -> None:
    row("numbers", name)(lambda tmp, m: (argv(tmp, m), message))


def _train(tmp, m, *extra):
    return [*_train_args(m["images"], tmp / "out"), "--max-steps", "1", *extra]


number_row(
    "train --learning-rate nan",
    lambda t, m: _train(t, m, "--learning-rate", "nan"),
    "learning_rate must be a finite",
)
number_row("train --lr inf", lambda t, m: _train(t, m, "--lr", "inf"), "learning_rate must be a finite")
number_row("train --lr 0", lambda t, m: _train(t, m, "--lr", "0"), "learning_rate must be > 0")
number_row("train --lambda-init nan", lambda t, m: _train(t, m, "--lambda-init", "nan"), "lambda_init")
number_row(
    "train --sparsity-weight -5",
    lambda t, m: _train(t, m, "--sparsity-weight", "-5"),
    "sparsity_weight must be >= 0",
)
number_row(
    "train --seed 2**32", lambda t, m: _train(t, m, "--seed", str(2**32)), "seed must be <= 4294967295"
)
number_row("train --seed -1", lambda t, m: _train(t, m, "--seed", "-1"), "seed must be >= 0")
number_row(
    "train --resolution 0", lambda t, m: _train(t, m, "--resolution", "0"), "resolution must be a positive"
)
number_row("train --max-grad-norm inf", lambda t, m: _train(t, m, "--max-grad-norm", "inf"), "max_grad_norm")
number_row(
    "train --checkpoints-total-limit -1",
    lambda t, m: _train(t, m, "--checkpoints-total-limit", "-1"),
    "checkpoints_total_limit",
)
number_row(
    "generate --steps -3",
    lambda t, m: _generate(t, m["atoms"], "--steps", "-3"),
    "argument --steps: must be >= 1",
)
number_row(
    "generate --steps 0",
    lambda t, m: _generate(t, m["atoms"], "--steps", "0"),
    "argument --steps: must be >= 1",
)
number_row(
    "generate --seed 10**23",
    lambda t, m: _generate(t, m["atoms"], "--seed", str(10**23)),
    "argument --seed: must be <=",
)
number_row(
    "generate --seed -1",
    lambda t, m: _generate(t, m["atoms"], "--seed", "-1"),
    "argument --seed: must be >= 0",
)
number_row(
    "generate --seeds 1,-2", lambda t, m: _generate(t, m["atoms"], "--seeds", "1,-2"), "--seeds must be >= 0"
)
number_row(
    "generate --guidance-scale nan",
    lambda t, m: _generate(t, m["atoms"], "--guidance-scale", "nan"),
    "--guidance-scale: must be a finite",
)
number_row(
    "generate --guidance-scale inf",
    lambda t, m: _generate(t, m["atoms"], "--guidance-scale", "inf"),
    "--guidance-scale: must be a finite",
)
number_row(
    "generate --resolution 0",
    lambda t, m: _generate(t, m["atoms"], "--resolution", "0"),
    "--resolution: must be >= 1",
)
number_row(
    "generate --num-images 0",
    lambda t, m: _generate(t, m["atoms"], "--num-images", "0"),
    "--num-images: must be >= 1",
)
number_row(
    "generate --steps abc", lambda t, m: _generate(t, m["atoms"], "--steps", "abc"), "'abc' is not an integer"
)
number_row(
    "generate --gain 1e999",
    lambda t, m: _generate(t, m["atoms"], "--gain", f"{MODULE}:0=1e999"),
    "must be a finite number",
)
number_row(
    "generate --top-k beyond the atoms",
    lambda t, m: _generate(t, m["atoms"], "--top-k", "1000000"),
    "top-k must be in 0..4",
)
number_row(
    "generate --device bogus",
    lambda t, m: _generate(t, m["atoms"], "--device", "bogus"),
    "unknown device 'bogus'",
)
number_row(
    "selfcheck --steps 0",
    lambda t, m: ["selfcheck", "--steps", "0", "--out", str(t / "out")],
    "--steps: must be >= 1",
)
number_row(
    "edit --lr -1",
    lambda t, m: ["edit", "--image", "x.png", "--source-prompt", "a", "--lr", "-1", "--out", str(t / "out")],
    "must be > 0",
)
number_row(
    "merge --top-k 0",
    lambda t, m: ["merge", str(m["atoms"]), str(m["atoms"]), "--top-k", "0", "--out", str(t / "out")],
    "--top-k: must be >= 1",
)
number_row(
    "merge --top-k beyond the atoms",
    lambda t, m: [
        *("merge", "--pretrained", "tiny", "--device", "cpu", str(m["atoms"]), str(m["atoms"])),
        *("--top-k", "99", "--out", str(t / "out"), "--quiet"),
    ],
    "must be <= 4",
)
number_row(
    "testbed preview --holdout-digit 12",
    lambda t, m: ["testbed", "preview", "--holdout-digit", "12", "--out", str(t / "out")],
    "must be <= 9",
)
number_row(
    "benchmark-dreambooth --generate-arg steps=abc",
    lambda t, m: [
        "benchmark-dreambooth",
        "--dataset",
        str(t),
        "--out",
        str(t / "out"),
        "--pretrained",
        "tiny",
        "--generate-arg",
        "steps=abc",
    ],
    "generation option steps must be an integer",
)
number_row(
    "benchmark-dreambooth --train-arg learning_rate=NaN",
    lambda t, m: [
        "benchmark-dreambooth",
        "--dataset",
        str(t),
        "--out",
        str(t / "out"),
        "--train-arg",
        "learning_rate=NaN",
    ],
    "learning_rate must be a finite",
)


def settings_row(kind: str, name: str, text: str | bytes, message: str, suffix: str = ".yaml") -> None:
    @row(kind, name)
    def make(tmp, m):
        path = tmp / f"settings{suffix}"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        argv = ["train", "--config", str(path), "--pretrained", "tiny", "--output-dir", str(tmp / "out")]
        if "instance_data" not in str(text):
            argv += ["--instance-data", str(m["images"])]
        return [*argv, "--quiet"], message


settings_row(
    "numbers",
    "settings: atoms sparsity_weight .nan",
    "instance_prompt: a sks dog\natoms:\n  sparsity_weight: .nan\n",
    "sparsity_weight must be a finite",
)
settings_row(
    "numbers",
    "settings: epochs 1.5",
    "instance_prompt: a sks dog\nepochs: 1.5\n",
    "epochs must be a positive integer",
)
settings_row(
    "numbers", "settings: seed true", "instance_prompt: a sks dog\nseed: true\n", "seed must be an integer"
)
settings_row(
    "other inputs",
    "settings: instance_data a number",
    "instance_data: 5\ninstance_prompt: a sks dog\n",
    "instance_data must be a str",
)
settings_row(
    "other inputs",
    "settings: instance_prompt a list",
    "instance_prompt: [a, sks, dog]\n",
    "instance_prompt must be a str",
)
settings_row("other inputs", "settings: form unknown", "instance_prompt: a sks dog\nform: values\n",
             "form must be one of projections, attention")  # fmt: skip
settings_row("other inputs", "settings: form a number", "instance_prompt: a sks dog\nform: 5\n",
             "form must be a str")  # fmt: skip
settings_row("other inputs", "settings: atoms.mode instead of form",
             "instance_prompt: a sks dog\natoms:\n  mode: linear\n", "with form, not atoms.mode")  # fmt: skip
settings_row("other inputs", "settings: atoms on projections the model lacks",
             "instance_prompt: a sks dog\natoms:\n  target_modules: [to_nothing]\n",
             "no module of PixArtTransformer2DModel matches")  # fmt: skip
settings_row("other inputs", "settings file binary", b"\xff\xfe\x00\x81garbage", "not UTF-8 text")
settings_row("other inputs", "settings file a list", "- a\n- b\n", "must hold a table of settings")
settings_row("other inputs", "settings: a number as a key", "1: x\n", "must hold a table of settings")
settings_row("other inputs", "settings file bad TOML", "x = [", "not valid TOML", ".toml")


# other inputs: images, prompts files, masks, weights, paths that are files or missing
@row("other inputs", "a decompression-bomb image")
def _(tmp, m):
    images = tmp / "images"
    images.mkdir()
    _bomb(images / "bomb.png")
    return [*_train_args(images, tmp / "out"), "--max-steps", "1"], "more pixels than an image may have"


@row("other inputs", "an image larger than the pixel limit (below PIL's own error)")
def _(tmp, m):
    images = tmp / "images"
    images.mkdir()
    _bomb(images / "big.png", side=12_000)
    return [*_train_args(images, tmp / "out"), "--max-steps", "1"], "more pixels than an image may have"


@row("other inputs", "a binary prompts file")
def _(tmp, m):
    (tmp / "prompts.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    argv = _generate(tmp, m["atoms"])
    return [
        *argv[: argv.index("--prompt")],
        "--prompts-file",
        str(tmp / "prompts.txt"),
        *argv[argv.index("--steps") :],
    ], "not UTF-8 text"


@row("other inputs", "--masks JSON with strings")
def _(tmp, m):
    (tmp / "masks.json").write_text(json.dumps({MODULE: ["a", "b", "c", "d"]}))
    return _generate(tmp, m["atoms"], "--masks", str(tmp / "masks.json")), "must be a list of 0/1 per atom"


@row("other inputs", "--masks JSON a list")
def _(tmp, m):
    (tmp / "masks.json").write_text("[1, 0]")
    return _generate(tmp, m["atoms"], "--masks", str(tmp / "masks.json")), "must map module names"


@row("other inputs", "testbed bench --weights a corrupt file")
def _(tmp, m):
    (tmp / "w.safetensors").write_bytes(os.urandom(300))
    argv = ["testbed", "bench", "--out", str(tmp / "out"), "--weights", str(tmp / "w.safetensors"), "--quiet"]
    return argv, "not a readable safetensors file"


row("other inputs", "inspect a missing folder")(
    lambda tmp, m: (["inspect", str(tmp / "nope")], "adapter folder not found")
)
row("other inputs", "inspect a file")(
    lambda tmp, m: (["inspect", str(m["atoms"] / WEIGHTS)], "adapter folder not found")
)
row("other inputs", "generate --adapter a missing folder")(
    lambda tmp, m: (_generate(tmp, tmp / "nope"), "adapter folder not found")
)
row("other inputs", "train --instance-data a missing folder")(
    lambda tmp, m: (_train_args(tmp / "nope", tmp / "out"), "folder not found")
)
row("other inputs", "train --output-dir a file")(
    lambda tmp, m: ((tmp / "file").write_text("x") and _train_args(m["images"], tmp / "file"), "file")
)


# data loss: an output folder that is one of the inputs
@row("output is an input", "merge --out the concept adapter", guarded="concept")
def _(tmp, m):
    concept = _copy(m["atoms"], tmp, "concept")
    argv = [
        "merge",
        "--pretrained",
        "tiny",
        "--device",
        "cpu",
        str(concept),
        str(m["atoms"]),
        "--out",
        str(concept),
    ]
    return argv, "is one of the inputs"


@row("output is an input", "merge --out the style adapter (spelled differently)", guarded="style")
def _(tmp, m):
    style = _copy(m["atoms"], tmp, "style")
    argv = [
        "merge",
        "--pretrained",
        "tiny",
        "--device",
        "cpu",
        str(m["atoms"]),
        str(style),
        "--out",
        f"{style}/.",
    ]
    return argv, "is one of the inputs"


@row("output is an input", "generate --out the adapter", guarded="adapter")
def _(tmp, m):
    adapter = _copy(m["atoms"], tmp, "adapter")
    argv = _generate(tmp, adapter)
    argv[argv.index("--out") + 1] = str(adapter)
    return argv, "is one of the inputs"


@row("output is an input", "atoms --out the adapter", guarded="adapter")
def _(tmp, m):
    adapter = _copy(m["atoms"], tmp, "adapter")
    argv = [
        "atoms",
        "--pretrained",
        "tiny",
        "--device",
        "cpu",
        "--adapter",
        str(adapter),
        "--prompt",
        "a sks dog",
    ]
    return [*argv, "--out", str(adapter), "--quiet"], "is one of the inputs"


@row("output is an input", "train --output-dir the instance images", guarded="images")
def _(tmp, m):
    images = _copy(m["images"], tmp, "images")
    return _train_args(images, images), "output_dir"


@row("output is an input", "eval --out the manifest it reads", guarded="gen")
def _(tmp, m):
    from atomtune.workflows.manifest import ImageRecord, write_manifest

    gen = tmp / "gen"
    gen.mkdir()
    _png(gen / "a.png", 0)
    write_manifest(gen, [ImageRecord("a.png", "dog", "a sks dog", 0, "atoms")])
    argv = [
        "eval",
        str(gen),
        "--real",
        str(m["images"]),
        "--tiny-models",
        "--out",
        str(gen / "manifest.json"),
    ]
    return argv, "is one of the inputs"


# -- the test -------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_the_table_covers_every_class():
    counts = Counter(r.kind for r in ROWS)
    assert len(ROWS) >= 60 and len({r.name for r in ROWS}) == len(ROWS)
    assert set(counts) == {
        "adapter tensors", "adapter JSON", "checkpoint on --resume", "numbers", "other inputs",
        "output is an input",
    }  # fmt: skip


@pytest.mark.parametrize("case", ROWS, ids=[r.name for r in ROWS])
def test_bad_input_ends_in_one_line(case: Row, made, tmp_path, capsys):
    argv, message = case.make(tmp_path, made)
    guarded = tmp_path / case.guarded if case.guarded else None
    before = _snapshot(guarded) if guarded else None
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses a bad flag before anything runs
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("atomtune") and "error" in err, err
    assert message in err, err
    out = tmp_path / "out"
    if out.is_dir():
        assert not [p for p in out.rglob("*") if p.is_file()], "a refused run wrote files"
    if guarded:
        assert _snapshot(guarded) == before


# -- kill -9 between checkpoints, then --resume latest -----------------------------------------------
_RUNNER = """
import os, sys, time
import torch
torch.set_num_threads(1)
import atomtune.workflows.train.loop as trainer
from atomtune.cli import main

hang = int(os.environ.get("HANG_AT_STEP", "0"))
original = trainer._batch_indices

def batch_indices(step, *args):
    if step == hang:  # mid-way between two checkpoints: say so, then wait for the kill
        open(os.environ["HANG_MARKER"], "w").close()
        time.sleep(600)
    return original(step, *args)

trainer._batch_indices = batch_indices
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_between_checkpoints_then_resume_latest(made, tmp_path):
    runner = tmp_path / "runner.py"
    runner.write_text(_RUNNER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def args(out: Path) -> list[str]:
        return [sys.executable, str(runner), *_train_args(made["images"], out), "--max-steps", "6",
                "--checkpoint-every", "2", "--checkpoints-total-limit", "1"]  # fmt: skip

    subprocess.run(args(tmp_path / "whole"), env=env, check=True, capture_output=True, timeout=300)
    marker = tmp_path / "hang"
    proc = subprocess.Popen(
        args(tmp_path / "killed"),
        env={**env, "HANG_AT_STEP": "6", "HANG_MARKER": str(marker)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the run did not reach step 6"
        proc.send_signal(signal.SIGKILL)  # step 5 done, checkpoint 6 not written
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-000004"]  # limit 1: 2 deleted
    assert not (tmp_path / "killed" / "history.json").exists()
    resumed = [*args(tmp_path / "killed"), "--resume", "latest"]
    subprocess.run(resumed, env=env, check=True, capture_output=True, timeout=300)
    whole = json.loads((tmp_path / "whole" / "history.json").read_text())
    again = json.loads((tmp_path / "killed" / "history.json").read_text())
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    assert again[4] == whole[4]  # the next loss after the checkpoint, exactly
    assert again == whole
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-000006"]


def test_checkpoint_rotation_keeps_the_newest_and_spares_the_new_one(tmp_path):
    from atomtune.checkpoint import latest_checkpoint, prune_checkpoints, save_training_state

    for step in (1, 2, 3, 4):
        save_training_state(tmp_path / f"checkpoint-{step:06d}", {"w": torch.ones(1) * step}, None, step)
    (tmp_path / ".checkpoint-000005.tmpxyz").mkdir()  # left by a save killed mid-way
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["checkpoint-000001", "checkpoint-000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000003", "checkpoint-000004"]
    # a run resumed from an older step: the checkpoint it just wrote survives, however low its step
    save_training_state(tmp_path / "checkpoint-000002", {"w": torch.ones(1)}, None, 2)
    prune_checkpoints(tmp_path, keep=2, newest=tmp_path / "checkpoint-000002")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000002", "checkpoint-000004"]
    assert (
        prune_checkpoints(tmp_path, keep=0) == [] and latest_checkpoint(tmp_path).name == "checkpoint-000004"
    )
