"""DreamBooth's metrics: DINO, CLIP-I and CLIP-T, batched, on the GPU when there is one.

For one subject with generated images ``g_1..g_n`` (prompt ``p_i`` for ``g_i``) and real images
``r_1..r_m``, with ``cos`` the cosine of two embeddings:

- **DINO** = mean over all n×m pairs of ``cos(dino(g_i), dino(r_j))``, with ``dino(x)`` the CLS
  token of the last layer (after the final LayerNorm) of a self-supervised DINO ViT-S/16;
- **CLIP-I** = the same mean with CLIP image embeddings (the projected ones);
- **CLIP-T** = mean over the n generated images of ``cos(clip_image(g_i), clip_text(p_i'))``, where
  ``p_i'`` is the prompt with the unique token removed (``a sks dog`` → ``a dog``).

This is the DreamBooth paper's protocol (Ruiz et al., CVPR 2023, Sec. 4.1: average pairwise cosine
between generated and real images; average prompt-image cosine). Scores are plain cosines in
[-1, 1] (some papers print them ×100 or clip CLIP-T at 0 and scale it by 2.5 as CLIPScore does;
we do neither). Per method, the benchmark's number is the mean over subjects of the per-subject
means, so every subject weighs the same.

Default models, and why:

- DINO: ``facebook/dino-vits16``, the ViT-S/16 DINO the DreamBooth paper names. The paper prefers
  it to CLIP-I for subject fidelity: a self-supervised model is not trained to ignore the
  differences between two subjects of the same class, so it tells "this dog" from "a dog".
- CLIP: ``openai/clip-vit-base-patch32`` (ViT-B/32). The DreamBooth paper does not name its CLIP
  variant; ViT-B/32 is the usual choice in evaluations on this benchmark that followed (and the
  cheapest CLIP), so numbers can be set beside theirs. Pass another (e.g.
  ``openai/clip-vit-large-patch14``) to compare with work that used it: scores from different
  CLIP models are not comparable.

Models load with transformers from a hub id (from the local cache when offline) or a local folder
holding ``save_pretrained`` output (model, image processor, and for CLIP the tokenizer). Features
are computed in float32 under ``torch.inference_mode``, so scores depend only on the images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from atomtune.errors import AtomtuneError
from atomtune.evaluation.prompts import DEFAULT_TOKEN, strip_token
from atomtune.progress import progress_bar
from atomtune.validation import resolve_device

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
METRICS = ("dino", "clip_i", "clip_t")

ImageLike = Any  # a path (str or Path) or a PIL image


def pairwise_mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all pairs of rows of ``a`` (n×d) and ``b`` (m×d): DINO and CLIP-I."""
    return float((F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T).mean())


def paired_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of row i of ``a`` with row i of ``b``: CLIP-T per image."""
    return (F.normalize(a.double(), dim=-1) * F.normalize(b.double(), dim=-1)).sum(-1)


def open_image(image: ImageLike):
    """An RGB PIL image from a path or a PIL image; a clear error for a missing or unreadable file
    (or one over the pixel limit: ``atomtune.diffusion.data.open_image`` reads it)."""
    from PIL import Image

    from atomtune.io import open_image as read_image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise AtomtuneError(f"image not found: {path}")
    try:
        return read_image(path)
    except AtomtuneError as exc:
        raise AtomtuneError(f"could not read image {path}: {exc}") from exc


def _cache_key(kind: str, image: ImageLike) -> tuple | None:
    """Files are cached by path, size and modification time (a rewritten file is embedded again)."""
    if not isinstance(image, (str, Path)):
        return None
    path = Path(image).resolve()
    try:
        stat = path.stat()
    except OSError:
        return None  # open_image reports it
    return (kind, str(path), stat.st_size, stat.st_mtime_ns)


def _embeddings(output: Any) -> torch.Tensor:
    # transformers 4.x returns the projected tensor, 5.x an output whose pooler_output holds it
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class Evaluator:
    """DINO and CLIP models with their processors: turns images and prompts into the three metrics.

    Image files' features are cached (by path, size and modification time), so the real set of a
    subject is embedded once however many methods are scored against it.
    """

    def __init__(
        self,
        dino_model: torch.nn.Module,
        dino_processor: Callable,
        clip_model: torch.nn.Module,
        clip_processor: Callable,
        clip_tokenizer: Callable,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        progress: bool = True,
        names: dict[str, str] | None = None,
    ):
        if batch_size < 1:
            raise AtomtuneError(f"batch size must be at least 1, got {batch_size}")
        self.device = resolve_device(device)
        self.dino_model = dino_model.to(self.device, torch.float32).eval()
        self.clip_model = clip_model.to(self.device, torch.float32).eval()
        self.dino_processor = dino_processor
        self.clip_processor = clip_processor
        self.clip_tokenizer = clip_tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.names = names or {"dino": type(dino_model).__name__, "clip": type(clip_model).__name__}
        self._cache: dict[tuple, torch.Tensor] = {}

    # -- features -------------------------------------------------------------------------------

    def _image_features(
        self, kind: str, images: Sequence[ImageLike], encode: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        if not images:
            raise AtomtuneError("no images to embed")
        processor = self.dino_processor if kind == "dino" else self.clip_processor
        keys = [_cache_key(kind, x) for x in images]
        todo = [i for i, k in enumerate(keys) if k is None or k not in self._cache]
        fresh: dict[int, torch.Tensor] = {}
        bar = progress_bar(
            total=len(todo), desc=f"{kind} features", unit="img", leave=False, disable=not self.progress
        )
        with torch.inference_mode():
            for start in range(0, len(todo), self.batch_size):
                idx = todo[start : start + self.batch_size]
                pixels = processor(images=[open_image(images[i]) for i in idx], return_tensors="pt")
                feats = encode(pixels["pixel_values"].to(self.device, torch.float32)).float().cpu()
                for i, f in zip(idx, feats, strict=True):
                    fresh[i] = f
                    if keys[i] is not None:
                        self._cache[keys[i]] = f
                bar.update(len(idx))
        bar.close()
        return torch.stack([fresh[i] if i in fresh else self._cache[keys[i]] for i in range(len(images))])

    def dino_features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """DINO CLS features (n×d, CPU, not normalised)."""
        return self._image_features(
            "dino", images, lambda px: self.dino_model(pixel_values=px).last_hidden_state[:, 0]
        )

    def clip_image_features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """CLIP image embeddings after the visual projection (n×d, CPU, not normalised)."""
        return self._image_features(
            "clip", images, lambda px: _embeddings(self.clip_model.get_image_features(pixel_values=px))
        )

    def clip_text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings after the text projection (n×d, CPU, not normalised)."""
        max_len = getattr(getattr(self.clip_model.config, "text_config", None), "max_position_embeddings", 77)
        unique = list(dict.fromkeys(texts))
        out: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            for start in range(0, len(unique), self.batch_size):
                chunk = unique[start : start + self.batch_size]
                enc = self.clip_tokenizer(
                    chunk, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
                )
                feats = self.clip_model.get_text_features(
                    input_ids=enc["input_ids"].to(self.device),
                    attention_mask=enc["attention_mask"].to(self.device),
                )
                out.update(zip(chunk, _embeddings(feats).float().cpu(), strict=True))
        return torch.stack([out[t] for t in texts])

    # -- metrics --------------------------------------------------------------------------------

    def score(
        self,
        generated: Sequence[ImageLike],
        prompts: Sequence[str],
        real: Sequence[ImageLike],
        token: str = DEFAULT_TOKEN,
    ) -> dict[str, Any]:
        """DINO, CLIP-I and CLIP-T of one subject's generated images against its real ones.

        Also per prompt (in first-seen order): the same three means over that prompt's images.
        """
        if len(generated) != len(prompts):
            raise AtomtuneError(f"{len(generated)} generated images but {len(prompts)} prompts")
        if not generated:
            raise AtomtuneError("no generated images to score")
        if not real:
            raise AtomtuneError("no real images to score against")
        dino_g, dino_r = self.dino_features(generated), self.dino_features(real)
        clip_g, clip_r = self.clip_image_features(generated), self.clip_image_features(real)
        texts = [strip_token(p, token) for p in prompts]
        clip_t = paired_cosines(clip_g, self.clip_text_features(texts))
        dino_rows = (F.normalize(dino_g.double(), dim=-1) @ F.normalize(dino_r.double(), dim=-1).T).mean(1)
        clip_rows = (F.normalize(clip_g.double(), dim=-1) @ F.normalize(clip_r.double(), dim=-1).T).mean(1)
        per_prompt: dict[str, dict[str, Any]] = {}
        for prompt in dict.fromkeys(prompts):
            sel = torch.tensor([p == prompt for p in prompts])
            per_prompt[prompt] = {
                "dino": float(dino_rows[sel].mean()),
                "clip_i": float(clip_rows[sel].mean()),
                "clip_t": float(clip_t[sel].mean()),
                "text": strip_token(prompt, token),
                "images": int(sel.sum()),
            }
        return {
            "dino": pairwise_mean_cosine(dino_g, dino_r),
            "clip_i": pairwise_mean_cosine(clip_g, clip_r),
            "clip_t": float(clip_t.mean()),
            "images": len(generated),
            "real_images": len(real),
            "prompts": per_prompt,
        }


# -- loading ------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _load(what: str, name: str, flag: str, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except (OSError, ValueError, KeyError) as exc:
        if Path(name).exists():
            raise AtomtuneError(f"could not load {what} from {name}: {_one_line(exc)}") from exc
        if name.startswith(("/", "./", "../", "~")):
            raise AtomtuneError(f"could not load {what}: folder {name} not found") from exc
        raise AtomtuneError(
            f"could not load {what} {name!r}: not in the local cache and no network (or no such hub id); "
            f"pass {flag} /path/to/local/folder ({_one_line(exc)})"
        ) from exc


def _cached(name: str) -> bool:
    """Whether hub id ``name`` is in the local cache (then it loads without touching the network)."""
    if Path(name).exists():
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an id the hub library rejects: let from_pretrained say what is wrong
        return False


def _hub_kwargs(name: str, local_files_only: bool, model: bool = False) -> dict[str, Any]:
    offline = local_files_only or _cached(name)
    kwargs: dict[str, Any] = {"local_files_only": offline}
    if model and offline:  # transformers looks for a PEFT adapter config online unless told not to
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    return kwargs


def load_dino(name: str = DEFAULT_DINO, local_files_only: bool = False) -> tuple[torch.nn.Module, Callable]:
    """A DINO ViT (``AutoModel``, no pooler: only the CLS token is used) and its image processor."""
    from transformers import AutoImageProcessor, AutoModel

    def model() -> torch.nn.Module:
        kwargs = _hub_kwargs(name, local_files_only, model=True)
        try:
            return AutoModel.from_pretrained(name, add_pooling_layer=False, **kwargs)
        except TypeError:  # a backbone without a pooler argument
            return AutoModel.from_pretrained(name, **kwargs)

    m = _load("DINO model", name, "--dino-model", model)
    p = _load(
        "DINO image processor",
        name,
        "--dino-model",
        lambda: AutoImageProcessor.from_pretrained(name, **_hub_kwargs(name, local_files_only)),
    )
    return m, p


def load_clip(
    name: str = DEFAULT_CLIP, local_files_only: bool = False
) -> tuple[torch.nn.Module, Callable, Callable]:
    """A ``CLIPModel`` (or any model with ``get_image_features``/``get_text_features``), processor, tokenizer."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    m = _load(
        "CLIP model",
        name,
        "--clip-model",
        lambda: AutoModel.from_pretrained(name, **_hub_kwargs(name, local_files_only, model=True)),
    )
    if not (hasattr(m, "get_image_features") and hasattr(m, "get_text_features")):
        raise AtomtuneError(f"{name} is a {type(m).__name__}, not a CLIP model with image and text towers")
    p = _load(
        "CLIP image processor",
        name,
        "--clip-model",
        lambda: AutoImageProcessor.from_pretrained(name, **_hub_kwargs(name, local_files_only)),
    )
    t = _load(
        "CLIP tokenizer",
        name,
        "--clip-model",
        lambda: AutoTokenizer.from_pretrained(name, **_hub_kwargs(name, local_files_only)),
    )
    return m, p, t


def load_evaluator(
    dino_model: str = DEFAULT_DINO,
    clip_model: str = DEFAULT_CLIP,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    progress: bool = True,
    local_files_only: bool = False,
) -> Evaluator:
    """An ``Evaluator`` with the DINO and CLIP models named by hub id or local folder."""
    device = resolve_device(device)
    dino, dino_proc = load_dino(str(dino_model), local_files_only)
    clip, clip_proc, tok = load_clip(str(clip_model), local_files_only)
    return Evaluator(
        dino,
        dino_proc,
        clip,
        clip_proc,
        tok,
        device=device,
        batch_size=batch_size,
        progress=progress,
        names={"dino": str(dino_model), "clip": str(clip_model)},
    )
