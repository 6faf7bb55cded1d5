"""The flow-matching hosts' specs (SD3, Flux, Sana): the registry picks them, the training objective is
diffusers' rectified flow, the tiny pipelines build offline and load back from a folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atomtune.diffusion.pipeline import load_pipeline, load_transformer
from atomtune.diffusion.spec import register_spec, spec_for, supported_pipelines
from atomtune.errors import AtomtuneError
from diffusion_helpers import one_thread

HOSTS = {
    "tiny-sd3": ("StableDiffusion3Pipeline", "SD3Spec"),
    "tiny-flux": ("FluxPipeline", "FluxSpec"),
    "tiny-sana": ("SanaPipeline", "SanaSpec"),
}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pipes():
    return {name: load_pipeline(name, device="cpu") for name in HOSTS}


def _image(pipe, prompt="a sks dog", seed=0):
    spec = spec_for(pipe)
    encoded, negative = spec.encode_prompts([prompt]), spec.encode_prompts([""])
    return np.asarray(spec.generate(encoded, negative, seed, 2, 4.5, 32, 32))


@pytest.mark.parametrize("host", HOSTS)
def test_the_registry_picks_each_hosts_spec(host, pipes):
    pipeline_class, spec_class = HOSTS[host]
    pipe = pipes[host]
    assert type(pipe).__name__ == pipeline_class and pipe.name_or_path == host
    assert type(spec_for(pipe)).__name__ == spec_class and pipeline_class in supported_pipelines()


def test_an_unregistered_pipeline_is_refused_and_a_registered_one_is_used(pipes):
    class OtherPipeline:
        transformer = None

    with pytest.raises(
        AtomtuneError, match=r"OtherPipeline is not supported yet \(supported: .*StableDiffusion3Pipeline"
    ):
        spec_for(OtherPipeline())
    register_spec("OtherPipeline", lambda pipe: ("spec of", pipe))
    try:
        pipe = OtherPipeline()
        assert spec_for(pipe) == ("spec of", pipe)
    finally:
        from atomtune.diffusion import spec as module

        del module._SPECS["OtherPipeline"]


@pytest.mark.parametrize("host", HOSTS)
def test_training_noises_by_rectified_flow(host, pipes):
    """x_t = (1 - σ)·x_0 + σ·ε with σ = t / 1000 (the scheduler's timestep), target ε - x_0: the
    DreamBooth scripts' objective, checked against that formula."""
    spec = spec_for(pipes[host])
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(64, 4, 8, 8, generator=g), torch.randn(64, 4, 8, 8, generator=g)
    noised = spec.add_noise(latents, noise, torch.Generator().manual_seed(1))
    sigma = (noised.timesteps.float() / 1000).reshape(-1, 1, 1, 1)
    assert noised.timesteps.shape == (64,) and sigma.min() > 0 and sigma.max() <= 1
    torch.testing.assert_close(noised.noisy, (1 - sigma) * latents + sigma * noise)
    torch.testing.assert_close(noised.target, noise - latents)
    again = spec.add_noise(latents, noise, torch.Generator().manual_seed(1))
    assert torch.equal(again.timesteps, noised.timesteps)  # the generator alone decides
    pred = noised.target + 0.5
    assert float(noised.loss(pred)) == pytest.approx(0.25)  # weights 1 for the hosts' schemes


def test_sd3_draws_logit_normal_timesteps_shifted_by_its_scheduler(pipes):
    """SD3's script samples u logit-normally, and its scheduler (shift 3) maps u to higher σ: the mean
    σ lies well above a uniform draw's 0.5."""
    spec = spec_for(pipes["tiny-sd3"])
    latents = torch.zeros(4000, 1, 1, 1)
    noised = spec.add_noise(latents, latents, torch.Generator().manual_seed(0))
    sigma = noised.timesteps.float() / 1000
    assert spec.weighting_scheme == "logit_normal" and 0.65 < float(sigma.mean()) < 0.8


@pytest.mark.parametrize("host", HOSTS)
def test_tiny_host_pipeline_is_deterministic_and_loads_back_from_a_folder(host, pipes, tmp_path):
    state = torch.get_rng_state()
    again = load_pipeline(host, device="cpu")
    assert torch.equal(state, torch.get_rng_state())  # building it leaves the global RNG alone
    a, b, c = _image(pipes[host]), _image(again), _image(pipes[host], seed=1)
    assert a.shape == (32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, _image(again, prompt="a red cat"))  # the prompt reaches the image
    again.save_pretrained(tmp_path / host)
    loaded = load_pipeline(str(tmp_path / host), device="cpu")
    assert type(loaded) is type(again) and np.array_equal(_image(loaded), a)
    transformer = load_transformer(str(tmp_path / host), device="cpu")  # what merge loads
    assert type(transformer) is type(again.transformer)
    weights = again.transformer.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in transformer.state_dict().items())


@pytest.mark.parametrize(
    "hub_id",
    [
        "stabilityai/stable-diffusion-3.5-medium",
        "black-forest-labs/FLUX.1-dev",
        "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
    ],
)
def test_a_real_host_not_in_the_cache_says_how_to_get_it(hub_id):
    with pytest.raises(AtomtuneError) as exc:
        load_pipeline(hub_id, device="cpu", local_files_only=True)
    assert f"could not load '{hub_id}'" in str(exc.value) and "--pretrained DIR" in str(exc.value)


@pytest.mark.parametrize("host", HOSTS)
def test_resolution_must_fit_the_host(host, pipes):
    spec = spec_for(pipes[host])
    with pytest.raises(AtomtuneError, match="must be a positive multiple of"):
        spec.check_resolution(30)


def test_flux_packs_2x2_latent_patches_into_tokens_with_their_positions(pipes):
    spec = spec_for(pipes["tiny-flux"])
    latents = torch.randn(2, 3, 6, 8)
    tokens = spec.pack(latents)
    assert tokens.shape == (2, 3 * 4, 12) and torch.equal(spec.unpack(tokens, 6, 8), latents)
    for i in range(3):
        for j in range(4):  # token i·4 + j holds the patch at rows 2i, 2i+1 and columns 2j, 2j+1
            patch = latents[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(2, -1)
            assert torch.equal(tokens[:, i * 4 + j], patch)
    ids = spec.pipe._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    assert ids[4 + 3].tolist() == [0, 1, 3]  # the same token's position: (0, row, column)


def test_flux_dev_gets_the_guidance_input_in_training_and_sampling():
    """A guidance-distilled Flux (dev: ``guidance_embeds``) reads the guidance scale as an input: the
    training call passes the script's 3.5, the sampler the scale asked for."""
    from diffusers import FluxTransformer2DModel

    pipe = load_pipeline("tiny-flux", device="cpu")
    config = dict(pipe.transformer.config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    pipe.transformer = FluxTransformer2DModel(**{**config, "guidance_embeds": True}).eval()
    spec = spec_for(pipe)
    prompts = spec.encode_prompts(["a sks dog"])
    noisy, timesteps = torch.randn(1, 1, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        a = spec.predict_noise(pipe.transformer, noisy, timesteps, prompts)
        spec.train_guidance = 1.0
        b = spec.predict_noise(pipe.transformer, noisy, timesteps, prompts)
    assert a.shape == noisy.shape and not torch.allclose(a, b)
    images = [np.asarray(spec.generate(prompts, prompts, 0, 2, g, 32, 32)) for g in (1.0, 3.5, 3.5)]
    assert np.array_equal(images[1], images[2]) and not np.array_equal(images[0], images[1])


@pytest.mark.parametrize("host", HOSTS)
def test_tiny_pipeline_command_writes_each_host(host, pipes, tmp_path, capsys):
    from atomtune.cli import main

    folder = tmp_path / "pipe"
    assert main(["tiny-pipeline", str(folder), "--host", host.removeprefix("tiny-")]) == 0
    assert "--pretrained" in capsys.readouterr().out
    loaded = load_pipeline(str(folder), device="cpu")
    assert type(loaded) is type(pipes[host]) and np.array_equal(_image(loaded), _image(pipes[host]))
