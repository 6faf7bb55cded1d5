"""DreamBooth evaluation: prompts, token stripping, the manifest, and the metrics against direct computations.

Tiny CLIP and DINO-style ViT models are built from configs in-process; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from atomtune.errors import AtomtuneError
from atomtune.evaluation.evaluate import evaluate_folder, markdown_table, real_images, write_results
from atomtune.evaluation.metrics import Evaluator, load_evaluator, pairwise_mean_cosine
from atomtune.evaluation.prompts import load_dreambooth, parse_prompts_and_classes, strip_token
from atomtune.evaluation.tiny import save_tiny_models, tiny_evaluator
from atomtune.workflows.manifest import (
    ImageRecord,
    default_image_path,
    read_manifest,
    write_manifest,
)

REAL_DATASET = Path(__file__).resolve().parents[3] / "shared" / "data" / "dreambooth" / "dataset"

MINI_PROMPTS = """Classes

subject_name,class
dog,dog
can,can
bear_plushie,stuffed animal

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a shiny {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


def random_image(path: Path, seed: int, size=(48, 40)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def make_dataset(root: Path, images: int = 3) -> Path:
    """A DreamBooth-shaped dataset folder: the prompts file and random images per subject."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts_and_classes.txt").write_text(MINI_PROMPTS)
    for k, subject in enumerate(("dog", "can", "bear_plushie")):
        for i in range(images):
            random_image(root / subject / f"{i:02d}.jpg", seed=100 * k + i)
    return root


@pytest.fixture(scope="module")
def evaluator():
    return tiny_evaluator(batch_size=4)


# -- prompts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("a sks dog in the jungle", "a dog in the jungle"),
        ("sks dog", "dog"),
        ("a photo of sks", "a photo of"),
        ("a sks, sitting", "a, sitting"),
        ("tasks for a sksx dog", "tasks for a sksx dog"),
        ("a  red   sks can", "a red can"),
    ],
)
def test_strip_token(prompt, expected):
    assert strip_token(prompt, "sks") == expected


def test_strip_other_token():
    assert strip_token("a <v1> dog", "<v1>") == "a dog"
    assert strip_token("a sks dog", "") == "a sks dog"


def test_prompts_by_class(tmp_path):
    data = load_dreambooth(make_dataset(tmp_path / "dataset"))
    assert data.subjects["dog"].live and not data.subjects["can"].live
    assert data.prompts("dog") == ["a sks dog in the jungle", "a sks dog wearing a red hat"]
    assert data.prompts("bear_plushie", "zwx") == [
        "a zwx stuffed animal in the jungle",
        "a shiny zwx stuffed animal",
    ]
    assert len(data.subjects["can"].images) == 3
    # the repository holding dataset/ is accepted too
    assert load_dreambooth(tmp_path).root == tmp_path / "dataset"
    with pytest.raises(AtomtuneError, match="unknown DreamBooth subject 'cat'"):
        data.select(["cat"])


@pytest.mark.skipif(not REAL_DATASET.is_dir(), reason="the DreamBooth dataset is not checked out beside")
def test_real_prompts_file():
    data = load_dreambooth(REAL_DATASET)
    assert len(data.subjects) == 30
    assert sum(s.live for s in data.subjects.values()) == 9
    assert len(data.object_prompts) == len(data.live_prompts) == 25
    assert data.prompts("dog8")[10] == "a sks dog wearing a red hat"
    assert data.prompts("backpack")[10] == "a sks backpack with a wheat field in the background"
    assert data.subjects["grey_sloth_plushie"].class_name == "stuffed animal"
    assert all(len(s.images) >= 4 for s in data.select(None))


def test_bad_prompts_file():
    with pytest.raises(AtomtuneError, match="no 'subject_name,class' table"):
        parse_prompts_and_classes("nothing here")
    with pytest.raises(AtomtuneError, match="no live subject prompts"):
        parse_prompts_and_classes(MINI_PROMPTS.split("Live Subject Prompts")[0])


def test_missing_dataset_and_subject_folder(tmp_path):
    with pytest.raises(AtomtuneError, match="dataset folder not found"):
        load_dreambooth(tmp_path / "nope")
    with pytest.raises(AtomtuneError, match="not a DreamBooth dataset"):
        load_dreambooth(tmp_path)
    root = make_dataset(tmp_path / "dataset")
    for f in (root / "can").iterdir():
        f.unlink()
    (root / "can").rmdir()
    data = load_dreambooth(root)
    with pytest.raises(AtomtuneError, match=r"subject folder not found: .*can"):
        data.select(["can"])
    data.select(["dog"])


# -- manifest ---------------------------------------------------------------------------------------


def make_generations(folder: Path, subjects=("dog",), methods=("atoms",), seeds=(0, 1)) -> list[ImageRecord]:
    records = []
    prompts = {"dog": ["a sks dog in the jungle", "a sks dog wearing a red hat"]}
    for m, method in enumerate(methods):
        for subject in subjects:
            for i, prompt in enumerate(prompts.get(subject, [f"a sks {subject} in the jungle"])):
                for s in seeds:
                    rel = default_image_path(method, subject, i, prompt, s)
                    random_image(folder / rel, seed=1000 * m + 10 * i + s)
                    records.append(ImageRecord(rel, subject, prompt, s, method, f"runs/{subject}"))
    write_manifest(folder, records, {"unique_token": "sks", "base_model": "tiny"})
    return records


def test_manifest_round_trip(tmp_path):
    records = make_generations(tmp_path, methods=("atoms", "lora"))
    manifest = read_manifest(tmp_path)
    assert list(manifest.records) == records
    assert manifest.metadata == {"unique_token": "sks", "base_model": "tiny"}
    assert records[0].file == "atoms/dog/00_a-sks-dog-in-the-jungle/seed0.png"
    assert list(manifest.groups()) == [("atoms", "dog"), ("lora", "dog")]
    # plain dicts work too, and adapter is optional
    write_manifest(
        tmp_path, [{"file": records[0].file, "subject": "dog", "prompt": "p", "seed": 3, "method": "m"}]
    )
    assert read_manifest(tmp_path).records[0].adapter is None
    text = (tmp_path / "manifest.json").read_text()
    assert json.loads(text)["format"] == "atomtune-generations"


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["images"][0].update(colour="red"), "unknown field"),
        (lambda d: d["images"][0].pop("seed"), "lacks field"),
        (lambda d: d["images"][0].update(seed="1"), "seed must be an integer"),
        (lambda d: d["images"][0].update(file="/etc/passwd"), "relative path inside"),
        (lambda d: d["images"][0].update(file="../x.png"), "relative path inside"),
        (lambda d: d["images"].append(dict(d["images"][0])), "listed twice"),
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d.update(format_version=9), "format_version 9"),
        (
            lambda d: d["images"][1].update(file="atoms/dog/gone.png"),
            r"image 1 \(atoms/dog/gone.png\) is missing",
        ),
    ],
)
def test_manifest_validation(tmp_path, edit, message):
    make_generations(tmp_path)
    path = tmp_path / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(AtomtuneError, match=message):
        read_manifest(tmp_path)


def test_manifest_missing_or_corrupt(tmp_path):
    with pytest.raises(AtomtuneError, match="generation folder not found"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(AtomtuneError, match=r"manifest.json is missing"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(AtomtuneError, match="not valid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(AtomtuneError, match="is missing from"):
        write_manifest(tmp_path, [ImageRecord("a.png", "dog", "p", 0, "m")])
    assert (tmp_path / "manifest.json").read_text() == "{not json"  # a failed write changes nothing


# -- metrics ----------------------------------------------------------------------------------------


def direct_features(model, processor, paths, kind):
    images = [Image.open(p).convert("RGB") for p in paths]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        if kind == "dino":
            return model(pixel_values=pixels).last_hidden_state[:, 0]
        out = model.get_image_features(pixel_values=pixels)
        return out if torch.is_tensor(out) else out.pooler_output


def test_metrics_match_direct_computation(tmp_path, evaluator):
    gen = [random_image(tmp_path / f"g{i}.png", seed=i) for i in range(5)]
    real = [random_image(tmp_path / f"r{i}.jpg", seed=50 + i, size=(64, 48)) for i in range(3)]
    prompts = ["a sks dog in the snow"] * 3 + ["a red sks dog"] * 2
    scores = evaluator.score(gen, prompts, real, token="sks")

    def mean_cos(a, b):
        return float(torch.stack([F.cosine_similarity(x, y, dim=0) for x in a for y in b]).mean())

    d_g, d_r = (
        direct_features(evaluator.dino_model, evaluator.dino_processor, p, "dino") for p in (gen, real)
    )
    c_g, c_r = (
        direct_features(evaluator.clip_model, evaluator.clip_processor, p, "clip") for p in (gen, real)
    )
    tok = evaluator.clip_tokenizer(
        ["a dog in the snow"] * 3 + ["a red dog"] * 2, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        t = evaluator.clip_model.get_text_features(**tok)
    t = t if torch.is_tensor(t) else t.pooler_output
    assert scores["dino"] == pytest.approx(mean_cos(d_g, d_r), abs=1e-5)
    assert scores["clip_i"] == pytest.approx(mean_cos(c_g, c_r), abs=1e-5)
    assert scores["clip_t"] == pytest.approx(float(F.cosine_similarity(c_g, t).mean()), abs=1e-5)
    assert (scores["images"], scores["real_images"]) == (5, 3)
    per = scores["prompts"]["a red sks dog"]
    assert per["text"] == "a red dog" and per["images"] == 2
    assert per["clip_t"] == pytest.approx(float(F.cosine_similarity(c_g[3:], t[3:]).mean()), abs=1e-5)
    assert per["dino"] == pytest.approx(mean_cos(d_g[3:], d_r), abs=1e-5)


def test_identical_images_give_cosine_one(tmp_path, evaluator):
    a = random_image(tmp_path / "a.png", seed=7)
    b = tmp_path / "copy.png"
    b.write_bytes(a.read_bytes())
    scores = evaluator.score([a, a], ["a sks dog"] * 2, [b])
    assert scores["dino"] == pytest.approx(1.0, abs=1e-6)
    assert scores["clip_i"] == pytest.approx(1.0, abs=1e-6)
    x = torch.randn(3, 8)
    assert pairwise_mean_cosine(x[:1], x[:1] * 5) == pytest.approx(1.0)
    random_image(b, seed=8)  # a rewritten file is embedded again, not taken from the cache
    assert evaluator.score([a], ["a sks dog"], [b])["dino"] < 0.9999


def test_batching_does_not_change_scores(tmp_path, evaluator):
    gen = [random_image(tmp_path / f"g{i}.png", seed=i) for i in range(5)]
    real = [random_image(tmp_path / f"r{i}.png", seed=9 + i) for i in range(2)]
    prompts = [f"a sks dog number {i}" for i in range(5)]
    e = evaluator
    single = Evaluator(
        e.dino_model, e.dino_processor, e.clip_model, e.clip_processor, e.clip_tokenizer, "cpu", batch_size=1
    )
    one = single.score(gen, prompts, real)
    many = evaluator.score(gen, prompts, real)
    for m in ("dino", "clip_i", "clip_t"):
        assert one[m] == pytest.approx(many[m], abs=1e-5)


def test_unreadable_image(tmp_path, evaluator):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(AtomtuneError, match="could not read image"):
        evaluator.score([bad], ["a sks dog"], [random_image(tmp_path / "r.png", 0)])
    with pytest.raises(AtomtuneError, match="image not found"):
        evaluator.score([tmp_path / "gone.png"], ["a sks dog"], [random_image(tmp_path / "r.png", 0)])


def test_load_from_local_folders_and_offline_error(tmp_path):
    dino_dir, clip_dir = save_tiny_models(tmp_path / "models")
    loaded = load_evaluator(dino_dir, clip_dir, device="cpu", progress=False, local_files_only=True)
    built = tiny_evaluator()
    gen = [random_image(tmp_path / "g.png", 1)]
    real = [random_image(tmp_path / "r.png", 2)]
    for x, y in ((loaded.dino_model, built.dino_model), (loaded.clip_model, built.clip_model)):
        assert all(
            torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values(), strict=True)
        )
    a, b = loaded.score(gen, ["a sks dog"], real), built.score(gen, ["a sks dog"], real)
    for m in (
        "dino",
        "clip_i",
        "clip_t",
    ):  # a loaded processor may use torchvision: resizing differs a little
        assert a[m] == pytest.approx(b[m], abs=1e-3)
    with pytest.raises(AtomtuneError) as exc:
        load_evaluator("nobody/no-such-dino", clip_dir, local_files_only=True)
    message = str(exc.value)
    assert "could not load DINO model 'nobody/no-such-dino'" in message
    assert "pass --dino-model /path/to/local/folder" in message and "\n" not in message
    with pytest.raises(AtomtuneError, match="folder /nonexistent/clip not found"):
        load_evaluator(dino_dir, "/nonexistent/clip")
    with pytest.raises(AtomtuneError, match="not a CLIP model"):
        load_evaluator(dino_dir, dino_dir)


# -- a generation folder ----------------------------------------------------------------------------


def test_evaluate_folder_and_table(tmp_path, evaluator):
    real_root = make_dataset(tmp_path / "dataset")
    gen = tmp_path / "gen"
    records = make_generations(gen, subjects=("dog", "can"), methods=("atoms", "lora"))
    results = evaluate_folder(gen, real_root, evaluator)
    assert results["unique_token"] == "sks"
    atoms = results["methods"]["atoms"]
    assert list(atoms["subjects"]) == ["dog", "can"]
    dog = atoms["subjects"]["dog"]
    direct = evaluator.score(
        [gen / r.file for r in records if r.method == "atoms" and r.subject == "dog"],
        [r.prompt for r in records if r.method == "atoms" and r.subject == "dog"],
        real_images(real_root, "dog"),
    )
    assert dog["dino"] == pytest.approx(direct["dino"]) and dog["images"] == 4
    assert atoms["mean"]["clip_t"] == pytest.approx((dog["clip_t"] + atoms["subjects"]["can"]["clip_t"]) / 2)
    assert atoms["mean"]["subjects"] == 2 and atoms["mean"]["images"] == 6
    only = evaluate_folder(gen, real_root, evaluator, subjects=["can"], methods=["lora"])
    assert list(only["methods"]) == ["lora"] and list(only["methods"]["lora"]["subjects"]) == ["can"]

    table = markdown_table(results)
    lines = table.splitlines()
    assert lines[0] == "| method | subject | images | DINO | CLIP-I | CLIP-T |"
    assert sum(line.startswith("| atoms | ") for line in lines) == 2
    assert "| **atoms** | **mean of 2 subjects** | 6 |" in table
    md = write_results(results, tmp_path / "out" / "eval.json")
    assert md.read_text() == table
    assert json.loads((tmp_path / "out" / "eval.json").read_text()) == results


def test_evaluate_folder_errors(tmp_path, evaluator):
    real_root = make_dataset(tmp_path / "dataset")
    gen = tmp_path / "gen"
    make_generations(gen, subjects=("dog", "cat"))
    with pytest.raises(AtomtuneError, match=r"no real images for subject 'cat': folder .*cat not found"):
        evaluate_folder(gen, real_root, evaluator)
    with pytest.raises(AtomtuneError, match=r"no images of subject\(s\) teapot"):
        evaluate_folder(gen, real_root, evaluator, subjects=["teapot"])
    with pytest.raises(AtomtuneError, match="real-image folder not found"):
        evaluate_folder(gen, tmp_path / "nowhere", evaluator, subjects=["dog"])
    next((gen / "atoms" / "dog").rglob("*.png")).unlink()
    with pytest.raises(AtomtuneError, match="is missing from"):
        evaluate_folder(gen, real_root, evaluator)
