"""Load a diffusion-transformer pipeline: a hub id, a local folder, or a registered name.

``load_pipeline`` takes a hub id, a local folder (what ``save_pretrained`` writes), or a name
registered with ``register_pipeline`` (or installed under the ``atomtune.pipelines`` entry points):
``tiny`` is a small ``PixArtSigmaPipeline`` built in-process from configs (tiny T5 encoder, a
character-level tokenizer made offline, tiny VAE), for tests and for trying the commands in seconds;
the testbed installs ``digits``. What a workflow needs to know about the model is in ``spec``.
"""

from __future__ import annotations

import os
import string
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from atomtune.diffusion.spec import spec_for
from atomtune.errors import AtomtuneError
from atomtune.progress import show_notices_once
from atomtune.validation import check_device, default_device

TINY = "tiny"
PIPELINE_ENTRY_POINTS = "atomtune.pipelines"  # installed packages name their pipelines here
DEFAULT_PRETRAINED = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
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

    from atomtune.tiny import tiny_pixart

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


# -- named pipelines ------------------------------------------------------------------------------
_NAMED: dict[str, Callable[[], Any]] = {}


def register_pipeline(name: str, build: Callable[[], Any]) -> None:
    """Let ``load_pipeline(name)`` build a pipeline in-process (``tiny``; the testbed's ``digits``).

    The generic loader never imports a specific one: a package registers its builder here, or names it
    under the ``atomtune.pipelines`` entry-point group of its metadata, found on first use.
    """
    _NAMED[name] = build


def named_pipeline(name: str) -> Callable[[], Any] | None:
    """The builder registered under ``name``, or None (then ``name`` is a hub id or a folder)."""
    if name not in _NAMED:
        from importlib.metadata import entry_points

        for entry in entry_points(group=PIPELINE_ENTRY_POINTS):
            if entry.name == name:
                _NAMED[name] = entry.load()
    return _NAMED.get(name)


register_pipeline(TINY, tiny_pixart_pipeline)


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
    """A supported diffusers pipeline from a hub id, a local folder or a registered name, on ``device``.

    A hub id is looked up in the Hugging Face cache first; without network and without a cached copy
    the error says what was looked for and how to point at a local copy instead.
    """
    device = check_device(device or default_device())
    torch_dtype = parse_dtype(dtype, device)
    show_notices_once()
    build = named_pipeline(pretrained)
    if build is not None:
        pipe = build()
        pipe.to(device)
        if torch_dtype != torch.float32:
            pipe.to(dtype=torch_dtype)
    else:
        pipe = _from_pretrained(pretrained, torch_dtype, variant, local_files_only)
        pipe.to(device)
    spec_for(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve_pipe(pretrained, dtype="auto", variant=None, device=None, local_files_only=False):
    """A pipeline object as given, or loaded from a name/folder."""
    if isinstance(pretrained, str):
        return load_pipeline(pretrained, dtype, variant, device, local_files_only)
    spec_for(pretrained)
    pretrained.set_progress_bar_config(disable=True)
    return pretrained


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
    """Only the denoising transformer (what adapters attach to), without text encoder or VAE: a
    registered name builds its pipeline; a folder or hub id loads its ``transformer`` subfolder as
    the class its config names."""
    device = check_device(device or default_device())
    torch_dtype = parse_dtype(dtype, device)
    show_notices_once()
    build = named_pipeline(pretrained)
    if build is not None:
        transformer = build().transformer.to(device)
        return transformer if torch_dtype == torch.float32 else transformer.to(dtype=torch_dtype)
    from diffusers import AutoModel

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
            model = AutoModel.from_pretrained(str(path) if path.exists() else pretrained, **kwargs)
    except (OSError, ValueError):
        return load_pipeline(pretrained, torch_dtype, variant, device, local_files_only).transformer
    return model.to(device)


def pipeline_name(pipe) -> str:
    """The name the pipeline was loaded under (hub id, folder or ``tiny``): recorded in adapters."""
    return str(getattr(pipe, "name_or_path", None) or type(pipe).__name__)
