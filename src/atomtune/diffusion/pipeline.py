"""Load a diffusion-transformer pipeline, and the thin model-specific part every workflow goes through.

``load_pipeline`` takes a hub id, a local folder (what ``save_pretrained`` writes), or the reserved
name ``tiny``: a small ``PixArtSigmaPipeline`` built in-process from configs (tiny T5 encoder, a
character-level tokenizer made offline, tiny VAE), for tests and for trying the commands in seconds.

``PixArtSpec`` is all the workflows know about the model: how to encode prompts, how to turn images
into latents, how to call the transformer for a noise prediction, and how to run the sampler. Another
DiT (SD3, Sana, Flux, ...) needs another spec of the same shape, nothing else.
"""

from __future__ import annotations

import os
import string
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import AtomtuneError
from ..progress import show_notices_once
from ..validation import check_device

TINY = "tiny"
DIGITS = "digits"  # the offline testbed's pretrained digit model (atomtune.testbed)
DEFAULT_PRETRAINED = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
SUPPORTED = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """``"auto"``/None: bfloat16 on a CUDA device that has it, float32 elsewhere."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        on_cuda = torch.device(device or default_device()).type == "cuda"
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise AtomtuneError(f"dtype must be auto or one of {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# -- the tiny pipeline --------------------------------------------------------------------------
def tiny_tokenizer(model_max_length: int = 64):
    """A character-level T5-style tokenizer (pad 0, eos 1, unk 2), built without any download."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in string.ascii_lowercase + string.digits + string.punctuation + " ":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def tiny_pixart_pipeline(seed: int = 0, layers: int = 2, heads: int = 2, head_dim: int = 8):
    """A ``PixArtSigmaPipeline`` at tiny sizes: 32x32 px images, 8x8 latents, 16 tokens.

    The real classes (``PixArtTransformer2DModel``, ``T5EncoderModel``, ``AutoencoderKL``,
    ``DPMSolverMultistepScheduler``) with random weights; the global RNG is left as it was.
    """
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from transformers import T5Config, T5EncoderModel

    from ..tiny import tiny_pixart

    with torch.random.fork_rng(devices=[]):
        transformer = tiny_pixart(seed=seed, heads=heads, head_dim=head_dim, layers=layers, sample_size=8)
        tokenizer = tiny_tokenizer()
        torch.manual_seed(seed + 1)
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=transformer.config.caption_channels,
                d_kv=4,
                d_ff=24,
                num_layers=1,
                num_heads=2,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=16,
            )
        ).eval()
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
        ).eval()
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.register_to_config(_name_or_path=TINY)
    return pipe


# -- loading ------------------------------------------------------------------------------------
def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


def load_pipeline(
    pretrained: str = DEFAULT_PRETRAINED,
    dtype: str | torch.dtype | None = "auto",
    variant: str | None = None,
    device: str | None = None,
    local_files_only: bool = False,
):
    """A supported diffusers pipeline from a hub id, a local folder or ``"tiny"``, on ``device``.

    A hub id is looked up in the Hugging Face cache first; without network and without a cached copy
    the error says what was looked for and how to point at a local copy instead.
    """
    device = check_device(device or default_device())
    torch_dtype = parse_dtype(dtype, device)
    show_notices_once()
    if pretrained in (TINY, DIGITS):
        if pretrained == TINY:
            pipe = tiny_pixart_pipeline()
        else:
            from ..testbed.pipeline import digit_pipeline

            pipe = digit_pipeline()
        pipe.to(device)
        if torch_dtype != torch.float32:
            pipe.to(dtype=torch_dtype)
    else:
        pipe = _from_pretrained(pretrained, torch_dtype, variant, local_files_only)
        pipe.to(device)
    spec_for(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_pretrained(pretrained: str, torch_dtype: torch.dtype, variant: str | None, local_files_only: bool):
    from diffusers import DiffusionPipeline

    path = Path(pretrained).expanduser()
    local = path.exists()
    if local:
        if not (path / "model_index.json").is_file():
            raise AtomtuneError(
                f"{path} has no model_index.json: not a diffusers pipeline folder "
                f"(write one with save_pretrained, or `atomtune tiny-pipeline {path}` for a tiny one)"
            )
    elif _looks_like_path(pretrained):
        raise AtomtuneError(f"pipeline folder not found: {path}")
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype}
    if variant:
        kwargs["variant"] = variant
    if local_files_only:
        kwargs["local_files_only"] = True
    try:
        with warnings.catch_warnings():  # newer diffusers call torch_dtype "dtype"; both work
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return DiffusionPipeline.from_pretrained(str(path) if local else pretrained, **kwargs)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local:
            raise AtomtuneError(f"could not load the pipeline in {path}: {reason}") from exc
        from huggingface_hub import constants

        raise AtomtuneError(
            f"could not load {pretrained!r}: no local folder of that name, and the Hugging Face Hub "
            f"copy is neither in the cache ({constants.HF_HUB_CACHE}) nor downloadable ({reason}). "
            f"Download it on a machine with network (`hf download {pretrained} --local-dir DIR`), "
            f"then pass --pretrained DIR (or set HF_HOME to a cache that holds it)"
            + (f"; variant {variant!r} was requested" if variant else "")
        ) from exc


def load_transformer(
    pretrained: str,
    dtype: str | torch.dtype | None = "auto",
    variant: str | None = None,
    device: str | None = None,
    local_files_only: bool = False,
) -> torch.nn.Module:
    """Only the denoising transformer (what adapters attach to), without text encoder or VAE."""
    device = check_device(device or default_device())
    torch_dtype = parse_dtype(dtype, device)
    show_notices_once()
    if pretrained == TINY:
        transformer = tiny_pixart_pipeline().transformer.to(device)
        return transformer if torch_dtype == torch.float32 else transformer.to(dtype=torch_dtype)
    from diffusers import PixArtTransformer2DModel

    path = Path(pretrained).expanduser()
    if not path.exists() and _looks_like_path(pretrained):
        raise AtomtuneError(f"pipeline folder not found: {path}")
    kwargs: dict[str, Any] = {"subfolder": "transformer", "torch_dtype": torch_dtype}
    if variant:
        kwargs["variant"] = variant
    if local_files_only:
        kwargs["local_files_only"] = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            model = PixArtTransformer2DModel.from_pretrained(
                str(path) if path.exists() else pretrained, **kwargs
            )
    except (OSError, ValueError):
        return load_pipeline(pretrained, torch_dtype, variant, device, local_files_only).transformer
    return model.to(device)


def pipeline_name(pipe) -> str:
    """The name the pipeline was loaded under (hub id, folder or ``tiny``): recorded in adapters."""
    return str(getattr(pipe, "name_or_path", None) or type(pipe).__name__)


# -- the model-specific part --------------------------------------------------------------------
@dataclass
class Prompts:
    """Encoded prompts: T5 embeddings (P, L, C) and their attention mask (P, L)."""

    embeds: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def select(self, index: torch.Tensor | list[int]) -> Prompts:
        index = torch.as_tensor(index, dtype=torch.long, device=self.embeds.device)
        return Prompts(self.embeds[index], self.mask[index])


class PixArtSpec:
    """PixArt-α and PixArt-Σ (``PixArtTransformer2DModel``): everything model-specific, in one place."""

    #: modules the PEFT baselines adapt; atoms adapt the attention modules holding them
    target_modules = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        transformer = pipe.transformer
        self.alpha = type(pipe).__name__ == "PixArtAlphaPipeline"
        self.max_sequence_length = 120 if self.alpha else 300
        if pipe.text_encoder is not None and hasattr(pipe.tokenizer, "model_max_length"):
            self.max_sequence_length = min(self.max_sequence_length, pipe.tokenizer.model_max_length)
        self.vae_scale_factor = pipe.vae_scale_factor
        self.patch_size = transformer.config.patch_size
        self.use_additional_conditions = bool(getattr(transformer, "use_additional_conditions", False))
        self.native_resolution = transformer.config.sample_size * self.vae_scale_factor

    def check_resolution(self, height: int, width: int | None = None) -> None:
        multiple = self.vae_scale_factor * self.patch_size
        for side in (height, width if width is not None else height):
            if side < multiple or side % multiple:
                raise AtomtuneError(
                    f"image size {side} must be a positive multiple of {multiple} for this model "
                    f"(VAE factor {self.vae_scale_factor} x patch {self.patch_size})"
                )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Prompts:
        if self.pipe.text_encoder is None:
            raise AtomtuneError("this pipeline has no text encoder loaded")
        embeds, mask, _, _ = self.pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            device=self.pipe.text_encoder.device,
            max_sequence_length=self.max_sequence_length,
        )
        return Prompts(embeds, mask)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] (B, 3, H, W) → the VAE posterior's mean and std (sample latents from them)."""
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    def latents(self, mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        config = self.pipe.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return (mean + std * eps - shift) * config.scaling_factor

    def predict_noise(
        self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: Prompts
    ) -> torch.Tensor:
        """The transformer's noise (or velocity) prediction, learned-sigma channels dropped."""
        batch = noisy.shape[0]
        added = {"resolution": None, "aspect_ratio": None}
        if self.use_additional_conditions:
            h, w = (s * self.vae_scale_factor for s in noisy.shape[-2:])
            added = {
                "resolution": torch.tensor([[h, w]], dtype=noisy.dtype, device=noisy.device).repeat(batch, 1),
                "aspect_ratio": torch.tensor([[h / w]], dtype=noisy.dtype, device=noisy.device).repeat(
                    batch, 1
                ),
            }
        out = model(
            noisy,
            encoder_hidden_states=prompts.embeds,
            encoder_attention_mask=prompts.mask,
            timestep=timesteps,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        if out.shape[1] == 2 * noisy.shape[1]:
            out = out.chunk(2, dim=1)[0]
        return out

    @torch.no_grad()
    def generate(
        self,
        prompt: Prompts,
        negative: Prompts,
        seed: int,
        steps: int,
        guidance_scale: float,
        height: int,
        width: int,
    ):
        """One image (PIL) for one encoded prompt and seed."""
        self.check_resolution(height, width)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        latents = torch.randn(
            (
                1,
                self.pipe.transformer.config.in_channels,
                height // self.vae_scale_factor,
                width // self.vae_scale_factor,
            ),
            generator=generator,
        )
        device, dtype = self.pipe.transformer.device, self.pipe.transformer.dtype
        out = self.pipe(
            negative_prompt=None,
            prompt_embeds=prompt.embeds.to(device, dtype),
            prompt_attention_mask=prompt.mask.to(device),
            negative_prompt_embeds=negative.embeds.to(device, dtype),
            negative_prompt_attention_mask=negative.mask.to(device),
            latents=latents.to(device, dtype),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            use_resolution_binning=False,
            max_sequence_length=self.max_sequence_length,
            clean_caption=False,
            output_type="pil",
        )
        return out.images[0]

    def timesteps(self) -> list[int]:
        """The timesteps the sampler visited in the last ``generate`` call."""
        return [int(t) for t in self.pipe.scheduler.timesteps]


def spec_for(pipe) -> PixArtSpec:
    """The model-specific part for ``pipe``; a clear error for a pipeline not supported yet.

    A pipeline class may name its own spec as ``atomtune_spec`` (the testbed's ``DigitPipeline``
    does): that is how another diffusion transformer plugs in.
    """
    own = getattr(type(pipe), "atomtune_spec", None)
    if own is not None:
        return own(pipe)
    name = type(pipe).__name__
    if name not in SUPPORTED or not hasattr(pipe, "transformer"):
        raise AtomtuneError(
            f"{name} is not supported yet (supported: {', '.join(SUPPORTED)}); "
            f"a new diffusion transformer needs a spec like PixArtSpec in atomtune/diffusion/pipeline.py"
        )
    return PixArtSpec(pipe)
