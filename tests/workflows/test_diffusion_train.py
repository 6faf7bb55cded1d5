"""One trainer for all four methods, on the tiny PixArt pipeline with DreamBooth images (downscaled):
what it writes, exact resume from a checkpoint, gradient checkpointing, mixed precision."""

from __future__ import annotations

import json
import math

import pytest
import torch

from atomtune.diffusion.adapters import load_adapters
from atomtune.diffusion.methods import METHODS
from atomtune.diffusion.pipeline import tiny_pixart_pipeline
from atomtune.errors import AtomtuneError
from atomtune.workflows.train import TrainSettings, train
from diffusion_helpers import dreambooth_images, one_thread


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def dog_images(tmp_path_factory):
    return dreambooth_images(tmp_path_factory.mktemp("data") / "dog", "dog", 4)


def _settings(images, out, **changes):
    base = {
        "instance_data": str(images),
        "instance_prompt": "a sks dog",
        "output_dir": str(out),
        "pretrained": "tiny",
        "num_atoms": 8,
        "max_steps": 2,
        "sample_steps": 2,
    }
    return TrainSettings(**{**base, **changes})


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_writes_adapter_card_samples_checkpoints(method, dog_images, tmp_path):
    settings = _settings(
        dog_images,
        tmp_path,
        method=method,
        class_prompt="a dog",
        num_class_images=2,
        sample_every=2,
        checkpoint_every=2,
        learning_rate=1e-2,
    )
    result = train(settings, progress=False)
    assert [h["step"] for h in result.history] == [1, 2]
    assert all(math.isfinite(h["total"]) and "prior" in h for h in result.history)
    assert ("l1" in result.history[0]) == (method == "atoms")
    adapter = result.adapter_dir
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "atomtune.json",
        "training.json",
        "README.md",
    ):
        assert (adapter / name).is_file(), name
    card = (adapter / "README.md").read_text()
    assert "tiny" in card and "a sks dog" in card and "CAME, lr 0.01" in card and "prior preservation" in card
    record = json.loads((adapter / "training.json").read_text())
    assert record["method"] == method and record["instance_images"] == 4 and record["class_images"] == 2
    from PIL import Image

    assert [Image.open(p).size for p in result.class_images] == [(32, 32)] * 2
    assert len(result.samples) == 1 and Image.open(result.samples[0]).size[1] >= 32
    ckpt = result.checkpoints[0]
    assert {p.name for p in ckpt.iterdir()} == {"adapter", "trainer_state.json", "state.safetensors"}
    # the adapter changed the model, and a fresh pipeline loads it
    pipe = tiny_pixart_pipeline()
    inputs = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 12)
    kwargs = {
        "encoder_hidden_states": inputs[1],
        "timestep": torch.tensor([500]),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    with torch.no_grad():
        base = pipe.transformer(inputs[0], **kwargs).sample
        load_adapters(pipe.transformer, [adapter], "tiny")
        tuned = pipe.transformer(inputs[0], **kwargs).sample
    assert (tuned - base).abs().max() > 1e-5


@pytest.mark.parametrize("method", ["atoms", "lora", "atoms-budget"])
def test_resume_gives_the_same_next_loss_as_an_uninterrupted_run(method, dog_images, tmp_path):
    common = {"method": method, "class_prompt": "a dog", "num_class_images": 2, "learning_rate": 1e-2}
    common["atom_budget"] = 0  # keep all atoms: a cut's schedule depends on the run's length
    if method == "atoms-budget":  # cuts at steps 1 and 3: the checkpoint at 2 holds masks and an open window
        common.update(method="atoms", atom_budget=2, atoms={"prune_at": [0.25, 0.75], "lr_exponent": 1.0})
    full = train(
        _settings(dog_images, tmp_path / "full", max_steps=4, checkpoint_every=2, **common), progress=False
    )
    if method == "atoms-budget":  # interrupted after step 2 of the same 4-step run
        first = full
        resume = str(full.checkpoints[0])
    else:  # a 2-step run, continued to 4 steps
        first = train(_settings(dog_images, tmp_path / "cut", checkpoint_every=2, **common), progress=False)
        resume = "latest"
    state = first.checkpoints[0] / "trainer_state.json"
    marked = json.loads(state.read_text())
    marked["extra"]["history"][0]["marker"] = True  # shows that the resumed run read this checkpoint
    state.write_text(json.dumps(marked))
    resumed = train(
        _settings(dog_images, tmp_path / "cut", max_steps=4, resume=resume, **common), progress=False
    )
    assert resumed.history[0].get("marker") is True and len(resumed.history) == 4
    for a, b in zip(full.history[2:], resumed.history[2:], strict=True):
        assert a["step"] == b["step"]
        assert a["total"] == pytest.approx(b["total"], rel=1e-6, abs=1e-7)
    assert full.history[2]["total"] != full.history[1]["total"]
    if method == "atoms-budget":
        from safetensors.torch import load_file

        ids = [load_file(r.adapter_dir / "adapter_model.safetensors") for r in (full, resumed)]
        assert ids[0].keys() == ids[1].keys()
        for key in ids[0]:
            assert torch.allclose(ids[0][key].double(), ids[1][key].double(), rtol=1e-5, atol=1e-7), key
    with pytest.raises(AtomtuneError, match=r"checkpoint .* was made with method="):
        train(_settings(dog_images, tmp_path / "cut", resume=str(first.checkpoints[0]), method="oft"))
    with pytest.raises(AtomtuneError, match="not a checkpoint folder"):
        train(_settings(dog_images, tmp_path / "cut", resume=str(tmp_path)))


@pytest.mark.parametrize(
    ("step", "max_steps", "message"),
    [(1000000, 2, r"at step 1000000, past this run's 2 steps"), (3, 4, r"says step 3 but holds 2 steps")],
)
def test_resume_refuses_a_checkpoint_past_the_run_or_with_a_step_its_history_lacks(
    step, max_steps, message, dog_images, tmp_path
):
    first = train(_settings(dog_images, tmp_path, checkpoint_every=2, atom_budget=0), progress=False)
    state = first.checkpoints[0] / "trainer_state.json"
    record = json.loads(state.read_text())
    record["step"] = step
    state.write_text(json.dumps(record))
    adapter = (first.adapter_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(AtomtuneError, match=message):
        train(_settings(dog_images, tmp_path, max_steps=max_steps, atom_budget=0, resume="latest"))
    assert (first.adapter_dir / "adapter_model.safetensors").read_bytes() == adapter  # nothing overwritten


def test_gradient_checkpointing_changes_memory_not_results(dog_images, tmp_path, monkeypatch):
    plain = train(_settings(dog_images, tmp_path / "a", max_steps=3, learning_rate=1e-2), progress=False)
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    settings = _settings(
        dog_images, tmp_path / "b", max_steps=3, learning_rate=1e-2, gradient_checkpointing=True
    )
    checkpointed = train(settings, progress=False)
    assert len(calls) == 3 * 2  # each step, each of the 2 blocks
    for a, b in zip(plain.history, checkpointed.history, strict=True):
        assert a["total"] == pytest.approx(b["total"], rel=1e-5)
        assert a["l1"] == pytest.approx(b["l1"], rel=1e-5)


def test_bf16_mixed_precision_keeps_adapters_in_float32(dog_images, tmp_path):
    result = train(_settings(dog_images, tmp_path, mixed_precision="bf16"), progress=False)
    assert all(math.isfinite(h["total"]) for h in result.history)
    assert result.tuned.model.dtype == torch.bfloat16
    assert {p.dtype for p in result.tuned.trainable_parameters()} == {torch.float32}
    train(_settings(dog_images, tmp_path / "again"), progress=False)  # a later fp32 run in the same process


def test_bad_instance_data_fails_before_loading_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AtomtuneError, match="no images in"):
        train(_settings(tmp_path / "empty", tmp_path / "out"))


def test_pixart_alpha_with_size_conditioning_trains_and_generates(dog_images, tmp_path):
    """PixArt-α at 1024 (sample size 128) conditions on image size and aspect ratio: the spec passes them."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    from atomtune.workflows.generate import GenerateSettings, generate

    sigma = tiny_pixart_pipeline()
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=24,
        sample_size=128,
        patch_size=2,
        caption_channels=12,
        norm_num_groups=1,
    ).eval()
    assert transformer.use_additional_conditions
    components = {k: getattr(sigma, k) for k in ("tokenizer", "text_encoder", "vae", "scheduler")}
    alpha = PixArtAlphaPipeline(transformer=transformer, **components)
    settings = _settings(dog_images, tmp_path, resolution=32, sample_every=2)
    result = train(settings, pipe=alpha, progress=False)
    assert all(math.isfinite(h["total"]) for h in result.history) and len(result.samples) == 1
    result.tuned.unload()
    settings = GenerateSettings(
        ["a sks dog"], tmp_path / "gen", adapters=[result.adapter_dir], steps=2, height=32
    )
    images = generate(settings, alpha, progress=False)
    from PIL import Image

    assert Image.open(images.images[0]).size == (32, 32)


def test_class_images_with_their_own_captions_need_no_class_prompt(dog_images, tmp_path):
    """Prior preservation from a folder in the imagefolder layout (metadata.jsonl): each class image
    is paired with its own caption; a missing caption or a folder with neither is refused."""
    from atomtune.diffusion.data import read_captions

    cats = dreambooth_images(tmp_path / "cats", "cat", 2)
    names = sorted(p.name for p in cats.iterdir())
    lines = [json.dumps({"file_name": n, "text": f"a photo of cat number {i}"}) for i, n in enumerate(names)]
    (cats / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    images = sorted(cats.glob("*.png"))
    assert read_captions(cats, images) == [f"a photo of cat number {i}" for i in range(2)]
    result = train(
        _settings(dog_images, tmp_path / "run", class_data=str(cats), num_class_images=2), progress=False
    )
    assert all("prior" in h for h in result.history) and len(result.class_images) == 2
    assert "class images of their own captions" in (result.adapter_dir / "README.md").read_text()
    (cats / "metadata.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(AtomtuneError, match="has no caption for"):
        train(_settings(dog_images, tmp_path / "run2", class_data=str(cats)), progress=False)
    (cats / "metadata.jsonl").unlink()
    with pytest.raises(AtomtuneError, match=r"need a class-prompt or a metadata\.jsonl"):
        train(_settings(dog_images, tmp_path / "run3", class_data=str(cats)), progress=False)


def test_instance_images_with_their_own_captions(dog_images, tmp_path):
    """An instance folder with a metadata.jsonl trains each image under its own caption: the loop's
    prompt rows are those captions' encodings, in the images' order; a caption without the token is
    refused (the token would not name the subject)."""
    import shutil

    from accelerate import Accelerator

    from atomtune.diffusion.spec import spec_for
    from atomtune.workflows.train.data import prepare_data

    dogs = tmp_path / "dogs"
    shutil.copytree(dog_images, dogs)
    names = sorted(p.name for p in dogs.iterdir())
    captions = [f"a sks dog number {i}" for i in range(len(names))]
    lines = [json.dumps({"file_name": n, "text": c}) for n, c in zip(names, captions, strict=True)]
    (dogs / "metadata.jsonl").write_text("\n".join(lines[::-1]) + "\n")  # order in the file does not matter
    pipe = tiny_pixart_pipeline()
    spec = spec_for(pipe)
    settings = _settings(dogs, tmp_path / "run", class_prompt="a dog", num_class_images=2)
    data = prepare_data(settings, pipe, spec, Accelerator(cpu=True), tmp_path / "run", 32, False)
    rows = data.prompts.select(data.instance_prompt_ids)
    expected = spec.encode_prompts(captions)
    assert torch.equal(rows.embeds, expected.embeds) and torch.equal(rows.mask, expected.mask)
    class_rows = data.prompts.select(data.class_prompt_ids)
    assert torch.equal(class_rows.embeds, spec.encode_prompts(["a dog"] * 2).embeds)
    result = train(_settings(dogs, tmp_path / "run2"), progress=False)
    assert json.loads((result.adapter_dir / "training.json").read_text())["instance_captions"] is True
    assert "each under its own caption" in (result.adapter_dir / "README.md").read_text()
    (dogs / "metadata.jsonl").write_text(json.dumps({"file_name": names[0], "text": "a dog"}) + "\n")
    with pytest.raises(AtomtuneError, match="has no caption for"):
        train(_settings(dogs, tmp_path / "run3"), progress=False)
    lines[0] = json.dumps({"file_name": names[0], "text": "a dog"})
    (dogs / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(AtomtuneError, match="lacks the token 'sks'"):
        train(_settings(dogs, tmp_path / "run4"), progress=False)
    one = tmp_path / "one"  # a single captioned image is captioned too
    one.mkdir()
    shutil.copy(dogs / names[0], one / names[0])
    (one / "metadata.jsonl").write_text(json.dumps({"file_name": names[0], "text": "a red sks dog"}) + "\n")
    result = train(_settings(one, tmp_path / "run5"), progress=False)
    assert json.loads((result.adapter_dir / "training.json").read_text())["instance_captions"] is True


def test_default_atoms_are_lora_parity_and_the_card_records_the_count(dog_images, tmp_path):
    """``num_atoms="parity"`` (the default) trains the count ``core.parity`` gives for the loaded
    model and writes that number, not the word, into the card and the checkpoints' structure."""
    from atomtune.core.config import AtomConfig
    from atomtune.core.parity import parity_atoms
    from atomtune.diffusion.spec import PixArtSpec

    settings = _settings(dog_images, tmp_path, num_atoms="parity", atom_budget=0, max_steps=1)
    targets = list(PixArtSpec.target_modules)  # the default form: atoms on LoRA's projections
    config = AtomConfig(mode="linear", target_modules=targets)
    expected = parity_atoms(tiny_pixart_pipeline().transformer, config, targets)
    result = train(settings, progress=False)
    record = json.loads((result.adapter_dir / "training.json").read_text())
    assert record["settings"]["num_atoms"] == expected
    assert f"atoms: {expected} per projection on {', '.join(targets)}" in record["method_description"]
    shapes = {a.num_atoms for a in result.tuned.handle.atoms().values()}
    assert shapes == {expected}


def test_num_atoms_takes_a_count_or_parity_only(dog_images, tmp_path):
    with pytest.raises(AtomtuneError, match="positive integer or 'parity'"):
        _settings(dog_images, tmp_path, num_atoms="lots").validate()
