"""Tiny random SD3, Flux and Sana pipelines built in-process from configs: ``load_pipeline("tiny-sd3")``,
``"tiny-flux"``, ``"tiny-sana"``, for tests and for trying the commands on these hosts in seconds.

Every part is the host's real class at small sizes with random weights: the transformer
(``atomtune.tiny``), the text encoders (``CLIPTextModelWithProjection``/``CLIPTextModel``,
``T5EncoderModel``, ``Gemma2Model`` from tiny configs), the VAE (``AutoencoderKL``; Sana's
``AutoencoderDC``) and the scheduler each host ships with. The tokenizers are character-level ones
made with ``tokenizers`` (no download; real CLIP, T5 and Gemma tokenizers need their vocabulary
files). Images are 32x32 px; the global RNG is left as it was.
"""

from __future__ import annotations

import string

import torch

from atomtune.diffusion.pipeline import register_pipeline

SIZE = 32  # px: every tiny host pipeline draws 32x32 images by default


TEMPLATES = {"t5": "$A </s>", "clip": "<bos> $A </s>", "gemma": "<bos> $A"}  # special tokens per family


def char_tokenizer(model_max_length: int, family: str = "t5"):
    """A character-level tokenizer (pad 0, eos 1, unk 2, bos 3), built without any download, that adds
    the special tokens the way ``family``'s does: T5 an eos after the text, CLIP bos and eos around
    it (CLIP pools at the first eos), Gemma a bos before it."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<bos>": 3}
    for ch in string.ascii_lowercase + string.digits + string.punctuation + " ":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    single = TEMPLATES[family]
    specials = [(t, vocab[t]) for t in ("<bos>", "</s>") if t in single]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<bos>",
        model_max_length=model_max_length,
    )


def _clip(hidden: int, projection: int | None, seed: int, vocab: int, length: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=length,
        projection_dim=projection or hidden,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def _t5(d_model: int, seed: int, vocab: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=4,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    return T5EncoderModel(config).eval()


def _vae_kl(latent_channels: int, seed: int, **factors):
    """A 3-level ``AutoencoderKL`` (factor 4): 32 px images, 8x8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=SIZE,
        **factors,
    ).eval()


def tiny_sd3_pipeline(seed: int = 0):
    """A ``StableDiffusion3Pipeline``: the SD3.5-shaped ``tiny_sd3`` transformer (64 image tokens), two
    CLIP encoders (16 wide, projections 8 + 8 = the pooled 16) and T5 (32 wide), 32 + 32 text tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from atomtune.tiny import tiny_sd3

    length = 32
    with torch.random.fork_rng(devices=[]):
        transformer = tiny_sd3(seed, dtype=torch.float32).eval()
        clip_tok, t5_tok = char_tokenizer(length, "clip"), char_tokenizer(length)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae_kl(4, seed + 1, shift_factor=0.0609, scaling_factor=1.5035),
            text_encoder=_clip(16, 8, seed + 2, len(clip_tok), length),
            tokenizer=clip_tok,
            text_encoder_2=_clip(16, 8, seed + 3, len(clip_tok), length),
            tokenizer_2=clip_tok,
            text_encoder_3=_t5(32, seed + 4, len(t5_tok)),
            tokenizer_3=t5_tok,
        )
    pipe.register_to_config(_name_or_path="tiny-sd3")
    return pipe


register_pipeline("tiny-sd3", tiny_sd3_pipeline)


def tiny_flux_pipeline(seed: int = 0):
    """A ``FluxPipeline``: the ``tiny_flux`` transformer (one double, one single block; 16 image
    tokens of packed 2x2 latents), CLIP (32 wide, its pooled output) and T5 (32 wide), Flux-dev's
    scheduler (dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from atomtune.tiny import tiny_flux

    length = 32
    with torch.random.fork_rng(devices=[]):
        transformer = tiny_flux(seed, dtype=torch.float32).eval()
        clip_tok, t5_tok = char_tokenizer(length, "clip"), char_tokenizer(length)
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        pipe = FluxPipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=_vae_kl(
                transformer.config.in_channels // 4, seed + 1, shift_factor=0.1159, scaling_factor=0.3611
            ),
            text_encoder=_clip(32, None, seed + 2, len(clip_tok), length),
            tokenizer=clip_tok,
            text_encoder_2=_t5(32, seed + 3, len(t5_tok)),
            tokenizer_2=t5_tok,
        )
    pipe.default_sample_size = SIZE // pipe.vae_scale_factor  # 32 px by default (Flux's is 1024)
    pipe.register_to_config(_name_or_path="tiny-flux")
    return pipe


register_pipeline("tiny-flux", tiny_flux_pipeline)


def _gemma(hidden: int, seed: int, vocab: int):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        head_dim=4,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
        attn_implementation="eager",
    )
    return Gemma2Model(config).eval()


def _vae_dc(seed: int):
    """A 3-level ``AutoencoderDC`` (factor 4; Sana's is 32): 32 px images, 8x8 latents."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (5,), (5,)),
        decoder_qkv_multiscales=((), (5,), (5,)),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()


def tiny_sana_pipeline(seed: int = 0):
    """A ``SanaPipeline``: the ``tiny_sana`` transformer (linear self-attention, 64 image tokens),
    Gemma-2 (8 wide, 32 tokens), a DC-AE, and Sana's DPM-Solver with flow sigmas (shift 3)."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    from atomtune.tiny import tiny_sana

    with torch.random.fork_rng(devices=[]):
        transformer = tiny_sana(seed, dtype=torch.float32).eval()
        tokenizer = char_tokenizer(32, "gemma")
        scheduler = DPMSolverMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )
        pipe = SanaPipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=_vae_dc(seed + 1),
            text_encoder=_gemma(transformer.config.caption_channels, seed + 2, len(tokenizer)),
            tokenizer=tokenizer,
        )
    pipe.register_to_config(_name_or_path="tiny-sana")
    return pipe


register_pipeline("tiny-sana", tiny_sana_pipeline)
