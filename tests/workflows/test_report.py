"""``atomtune report``: its activation maps equal a direct computation from the coefficients the
layers emit, removing an atom on the page equals ``set_masks``, the page's data round-trips, the
page renders in headless Chromium (its DOM read back), the command runs on tiny PixArt and tiny SD3
adapters, and bad input is one line with exit code 2."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from atomtune.cli import main
from atomtune.core.maps import AtomActivationMaps
from atomtune.core.model import AtomModel
from atomtune.diffusion.pipeline import resolve_pipe
from atomtune.diffusion.spec import spec_for
from atomtune.workflows.report import ReportSettings, pool_map, report
from atomtune.workflows.report_page import read_page_data
from diffusion_helpers import dreambooth_images, one_thread

PROMPTS = ["a sks dog", "a sks dog on the beach"]
STEPS, BANDS = 4, 2


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _train(root, pretrained: str, method: str = "atoms") -> str:
    data = dreambooth_images(root / "data", "dog", 3)
    out = root / f"{pretrained}-{method}"
    argv = ["train", "--pretrained", pretrained, "--method", method, "--max-steps", "3", "--quiet"]
    argv += ["--learning-rate", "0.01", "--instance-data", str(data), "--instance-prompt", "a sks dog"]
    if method == "atoms":
        argv += ["--num-atoms", "8", "--atom-budget", "0"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    return str(out / "adapter")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    with one_thread():
        adapter = _train(root, "tiny")
        settings = ReportSettings(adapter, root / "out", pretrained="tiny", prompts=PROMPTS, steps=STEPS)
        settings.bands, settings.atoms_shown = BANDS, 3
        return adapter, report(settings, progress=False)


def _naive_maps(adapter: str, prompt: str) -> tuple[dict[str, list[torch.Tensor]], tuple[int, int]]:
    """Every coefficient tensor each layer emits while drawing ``prompt``, in call order."""
    pipe = resolve_pipe("tiny")
    spec = spec_for(pipe)
    handle = AtomModel.load(pipe.transformer, adapter)
    names = {id(layer): name for name, layer in handle.layers().items()}
    seen: dict[str, list[torch.Tensor]] = {}
    for layer in handle.layers().values():
        layer.listeners.append(lambda layer, s: seen.setdefault(names[id(layer)], []).append(s.clone()))
    size = spec.native_resolution
    spec.generate(spec.encode_prompts([prompt]), spec.encode_prompts([""]), 0, STEPS, 4.5, size, size)
    handle.unload()
    return seen, spec.token_grid(size, size)


def test_activation_maps_equal_the_mean_magnitude_of_the_recorded_coefficients(tiny_report):
    adapter, result = tiny_report
    seen, grid = _naive_maps(adapter, PROMPTS[1])
    mapped = result.data["maps"]
    assert mapped, "the tiny PixArt's self-attention projections act on image tokens: they have maps"
    checked = 0
    for module, calls in seen.items():
        image_calls = [s for s in calls if s.shape[1] == grid[0] * grid[1]]
        if module not in mapped:
            assert not image_calls  # only modules that never see the image tokens lack maps
            continue
        assert len(image_calls) == STEPS  # one forward per sampler step (both guidance halves batched)
        bands = [[s for i, s in enumerate(image_calls) if i * BANDS // STEPS == b] for b in range(BANDS)]
        for atom_id, per_prompt in mapped[module].items():
            j = int(atom_id)  # no pruning: position = id
            naive = [torch.stack([s[..., j].abs().mean(0) for s in band]).mean(0) for band in bands]
            naive.append(torch.stack([s[..., j].abs().mean(0) for s in image_calls]).mean(0))
            ours = torch.tensor(per_prompt[1], dtype=torch.float64)  # prompt 1
            assert ours.shape == (BANDS + 1, *grid)
            expected = torch.stack([n.double().reshape(grid) for n in naive])
            torch.testing.assert_close(ours, expected, rtol=2e-5, atol=1e-7)
            checked += 1
    assert checked >= 8


def test_recorder_bands_and_pooling_against_hand_computation():
    class Layer:
        def __init__(self):
            self.listeners = []

    class Handle:
        def __init__(self):
            self.layer = Layer()

        def layers(self):
            return {"m": self.layer}

    handle = Handle()
    calls = [torch.randn(2, 6, 3) for _ in range(5)]
    with AtomActivationMaps(handle, (2, 3), steps=5, bands=2) as recorder:
        for s in [*calls, torch.randn(2, 7, 3)]:  # a text-token call (7 tokens) is not mapped
            for listener in handle.layer.listeners:
                listener(handle.layer, s)
    maps = recorder.maps()["m"]
    first = torch.stack([c.abs().mean(0) for c in calls[:3]]).mean(0)  # calls 0,1,2: i*2//5 == 0
    torch.testing.assert_close(maps[0], first.T.reshape(3, 2, 3))
    torch.testing.assert_close(
        maps[-1], torch.stack([c.abs().mean(0) for c in calls]).mean(0).T.reshape(3, 2, 3)
    )
    grid = torch.arange(64.0).reshape(1, 8, 8)
    pooled = pool_map(grid, side=4)
    assert pooled.shape == (1, 4, 4) and float(pooled[0, 0, 0]) == (0 + 1 + 8 + 9) / 4


def test_removing_an_atom_on_the_page_equals_set_masks(tiny_report):
    adapter, result = tiny_report
    shown = result.data["shown"][0]
    pipe = resolve_pipe("tiny")
    spec = spec_for(pipe)
    handle = AtomModel.load(pipe.transformer, adapter)
    atoms = handle.atoms()[shown["module"]]
    mask = torch.ones(atoms.num_atoms)
    mask[int((atoms.atom_ids == shown["id"]).nonzero())] = 0
    handle.set_masks({shown["module"]: mask})
    size = spec.native_resolution
    direct = spec.generate(
        spec.encode_prompts([PROMPTS[0]]), spec.encode_prompts([""]), 0, STEPS, 4.5, size, size
    )
    handle.unload()
    page = np.asarray(result.images[shown["removed"][0]["image"]].convert("RGB"), dtype=int)
    assert np.abs(page - np.asarray(direct.convert("RGB"), dtype=int)).max() <= 3
    full = np.asarray(result.images[result.data["full"][0]].convert("RGB"), dtype=int)
    assert shown["removed"][0]["change"] == pytest.approx(np.abs(page - full).mean() / 255, abs=3 / 255)


def test_page_carries_the_data_and_one_image_per_k(tiny_report):
    _, result = tiny_report
    data, images = read_page_data(result.page)
    assert data == result.data
    assert data["ks"][0] == 0 and data["ks"][-1] == 8
    for row in data["slider"]:
        assert len(row) == len(data["ks"]) and all(
            images[k].startswith("data:image/png;base64,") for k in row
        )
    ids = sorted(a["id"] for a in data["layers"][0]["atoms"])
    assert ids == list(range(8))
    drawn = len(PROMPTS) * (len(data["ks"]) + 2 * 3)  # the last k is the full adapter's own image
    assert len(images) == drawn and f"{drawn} images drawn" in result.page.read_text()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_page_renders_in_headless_chromium(tiny_report, tmp_path):
    _, result = tiny_report
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
         "--virtual-time-budget=5000", "--dump-dom", result.page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    from html.parser import HTMLParser

    class Reader(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.k_images, self.slider, self.title, self.map = 0, 0, None, False, False
            self._in_body = False

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "tbody" and a.get("id") == "atoms-body":
                self._in_body = True
            if tag == "tr" and self._in_body and "data-id" in a:
                self.rows += 1
            if tag == "img" and "k-image" in a.get("class", ""):
                self.k_images += 1
            if tag == "input" and a.get("id") == "k":
                self.slider = a
            self.title |= a.get("id") == "detail-title"
            self.map |= tag == "canvas" and a.get("id") == "atom-map"

        def handle_endtag(self, tag):
            if tag == "tbody":
                self._in_body = False

    reader = Reader()
    reader.feed(dom)
    data = result.data
    assert reader.rows == sum(len(layer["atoms"]) for layer in data["layers"])
    assert reader.k_images == len(data["ks"])
    assert reader.slider is not None and reader.slider["type"] == "range"
    assert reader.title and reader.map  # the top atom is selected and its map drawn


def test_cli_report_on_tiny_sd3_and_bad_input(tmp_path, capsys):
    adapter = _train(tmp_path, "tiny-sd3")
    out = tmp_path / "sd3-report"
    argv = ["report", "--pretrained", "tiny-sd3", "--adapter", adapter, "--steps", "2", "--quiet"]
    assert main([*argv, "--atoms-shown", "1", "--ks", "0,8", "--out", str(out)]) == 0
    data, _ = read_page_data(out / "report.html")
    assert data["maps"] and data["ks"] == [0, 8] and len(data["shown"]) == 1
    capsys.readouterr()
    lora = _train(tmp_path, "tiny-sd3", "lora")
    cases = [
        (["--adapter", lora], "is a lora adapter"),
        (["--adapter", str(tmp_path / "missing")], "missing"),
        (["--adapter", adapter, "--ks", "0,-1"], "--ks"),
        (["--adapter", adapter, "--atoms-shown", "-1"], "atoms shown"),
        (["--adapter", adapter, "--out", adapter], "is one of the inputs"),
    ]
    for extra, words in cases:
        argv = ["report", "--pretrained", "tiny-sd3", "--quiet", "--out", str(tmp_path / "bad"), *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, (extra, err)
    argv = ["report", "--pretrained", "tiny", "--adapter", adapter, "--quiet", "--out", str(tmp_path / "bad")]
    assert main(argv) == 2  # an SD3 adapter on PixArt
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and "is for another model" in err[0]
    assert not (tmp_path / "bad").exists()  # refused before anything is written


@pytest.mark.parametrize("how", ["concat", "sum"])
def test_a_merged_adapter_says_which_input_each_atom_came_from(tiny_report, tmp_path, how):
    concept, _ = tiny_report
    style = _train(tmp_path / "style", "tiny")
    merged = tmp_path / f"merged-{how}"
    assert main(["merge", "--pretrained", "tiny", concept, style, "--how", how, "--out", str(merged)]) == 0
    result = report(
        ReportSettings(
            merged, tmp_path / "out", pretrained="tiny", prompts=PROMPTS[:1], steps=2, ks=[0], atoms_shown=0
        ),
        progress=False,
    )
    sources = [a["source"] for layer in result.data["layers"] for a in layer["atoms"]]
    if how == "concat":
        layer = result.data["layers"][0]["atoms"]
        assert {a["id"]: a["source"] for a in layer} == {
            i: "concept" if i < 8 else "style" for i in range(16)
        }
    else:
        assert all(s.startswith("both (") and s.endswith("% concept)") for s in sources)
