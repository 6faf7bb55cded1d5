"""The tiny PixArt pipeline, loading by name or folder, and the errors when a model is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atomtune.cli import main
from atomtune.diffusion.pipeline import load_pipeline, tiny_pixart_pipeline
from atomtune.diffusion.spec import spec_for
from atomtune.errors import AtomtuneError
from diffusion_helpers import one_thread


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _image(pipe, prompt="a sks dog", seed=0):
    spec = spec_for(pipe)
    encoded, negative = spec.encode_prompts([prompt]), spec.encode_prompts([""])
    return np.asarray(spec.generate(encoded, negative, seed, 2, 4.5, 32, 32))


def test_tiny_pipeline_generates_deterministic_32px_images():
    state = torch.get_rng_state()
    pipe = load_pipeline("tiny", device="cpu")
    assert torch.equal(state, torch.get_rng_state())  # building it leaves the global RNG alone
    assert type(pipe).__name__ == "PixArtSigmaPipeline" and pipe.name_or_path == "tiny"
    a, b, c = _image(pipe, seed=0), _image(pipe, seed=0), _image(pipe, seed=1)
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, _image(pipe, prompt="a cat"))  # the prompt reaches the image


def test_tiny_pipeline_folder_loads_like_a_downloaded_model(tmp_path, capsys):
    assert main(["tiny-pipeline", str(tmp_path / "tiny")]) == 0
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    assert "--pretrained" in capsys.readouterr().out
    loaded = load_pipeline(str(tmp_path / "tiny"), device="cpu")
    assert np.array_equal(_image(loaded), _image(tiny_pixart_pipeline()))
    assert main(["tiny-pipeline", str(tmp_path / "tiny")]) == 2  # not over a non-empty folder


def test_missing_models_say_what_was_looked_for(tmp_path):
    with pytest.raises(AtomtuneError, match="pipeline folder not found"):
        load_pipeline(str(tmp_path / "missing" / "model"), device="cpu")
    with pytest.raises(AtomtuneError, match=r"no model_index\.json: not a diffusers pipeline folder"):
        load_pipeline(str(tmp_path), device="cpu")
    with pytest.raises(AtomtuneError) as exc:
        load_pipeline("atomtune-test/no-such-model", device="cpu", local_files_only=True)
    message = str(exc.value)
    assert "'atomtune-test/no-such-model'" in message and "cache" in message
    assert "--local-dir DIR" in message and "--pretrained DIR" in message


def test_resolution_must_fit_the_model():
    spec = spec_for(tiny_pixart_pipeline())
    assert spec.native_resolution == 32
    with pytest.raises(AtomtuneError, match="image size 36 must be a positive multiple of 8"):
        spec.check_resolution(36)
    with pytest.raises(AtomtuneError, match="dtype must be auto or one of"):
        load_pipeline("tiny", dtype="float8", device="cpu")


def test_named_pipelines_come_from_the_registry_and_installed_entry_points(monkeypatch):
    """The loader knows no specific pipeline: ``tiny`` registers itself, the testbed's ``digits`` is
    found through the package's ``atomtune.pipelines`` entry point, and a user can register a name."""
    from atomtune.diffusion import pipeline as pl
    from atomtune.testbed.digit_pipeline import digit_pipeline

    monkeypatch.setattr(pl, "_NAMED", {k: v for k, v in pl._NAMED.items() if k != "digits"})
    assert pl.named_pipeline("tiny") is tiny_pixart_pipeline
    assert pl.named_pipeline("digits") is digit_pipeline  # loaded from the entry point on first use
    assert pl.named_pipeline("no-such-name") is None
    built = []
    pl.register_pipeline("mine", lambda: built.append(1) or tiny_pixart_pipeline())
    pipe = load_pipeline("mine", device="cpu")
    assert built == [1] and spec_for(pipe) is not None
