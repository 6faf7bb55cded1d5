"""Per-host facts the widened attention call needs: one small table row per diffusers processor.

Each host keeps its own processor; atoms only need to know which processor arguments hold the
tokens that keys and values are made from, and in which order the host joins them in its one
attention call (the kernel's key order). Everything else (RoPE, QK-norm, masks, the output
projections) stays the host's. Each row is checked by its host's tests: the adapted module against a
float64 reference that joins the streams in the host's order, attention maps materialised.

Read from diffusers 0.42.1 (``JointAttnProcessor2_0``: ``[image, text]``; ``FluxAttnProcessor``:
``[text, image]``; Flux single blocks get the joint sequence as ``hidden_states`` already;
QwenImage's ``QwenDoubleStreamAttnProcessor2_0``: ``[text, image]``; ``WanAttnProcessor``: one
stream, self or cross, with the image-to-video context in a second call; ``Lumina2AttnProcessor2_0``:
one stream, grouped k/v repeated to the query heads before its call, its own softmax scale;
``HiDreamAttnProcessor``: ``[image, text]``, text through ``to_v_t``, single blocks on the joint
sequence).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

HIDDEN = "hidden_states"
ENCODER = "encoder_hidden_states"


@dataclass(frozen=True)
class HostLayout:
    """How one host processor joins its streams.

    Args:
        key_order: processor arguments in the order their tokens appear as keys, for modules with
            a second (text) stream through its own value projection (``text_value``); a stream
            passed as ``None`` is absent.
        single_stream_joint: a module without a text value projection still attends text and image
            tokens together (its ``hidden_states`` is the joint sequence: Flux and HiDream single
            blocks).
        linear: the host's kernel is linear attention, not scaled-dot-product (own processor).
        separate_added_kv: the host attends the ``add_k_proj``/``add_v_proj`` stream in an attention
            call of its own (Wan image-to-video's image context); atoms ride in one call, so such
            modules are refused.
        repeats_kv: the host repeats grouped key/value heads up to the query heads before its call
            (Lumina2), so the kernel sees one value head per query head, and so do the channels.
    """

    key_order: tuple[str, ...] = (HIDDEN, ENCODER)
    single_stream_joint: bool = False
    linear: bool = False
    separate_added_kv: bool = False
    repeats_kv: bool = False


LAYOUTS: dict[str, HostLayout] = {
    "JointAttnProcessor2_0": HostLayout(key_order=(HIDDEN, ENCODER)),
    "FluxAttnProcessor": HostLayout(key_order=(ENCODER, HIDDEN), single_stream_joint=True),
    "SanaAttnProcessor2_0": HostLayout(),
    "SanaLinearAttnProcessor2_0": HostLayout(linear=True),
    "QwenDoubleStreamAttnProcessor2_0": HostLayout(key_order=(ENCODER, HIDDEN)),
    "WanAttnProcessor": HostLayout(separate_added_kv=True),
    "Lumina2AttnProcessor2_0": HostLayout(repeats_kv=True),
    "HiDreamAttnProcessor": HostLayout(key_order=(HIDDEN, ENCODER), single_stream_joint=True),
}


def layout_of(processor: object) -> HostLayout | None:
    """The row of ``processor``'s class or of the host class it derives from (atom processors)."""
    for cls in type(processor).__mro__:
        if cls.__name__ in LAYOUTS and cls.__module__.startswith("diffusers"):
            return LAYOUTS[cls.__name__]
    return None


TEXT_VALUES = ("add_v_proj", "to_v_t")  # diffusers' Attention and Flux; HiDream's own attention


def text_value(attn: nn.Module) -> nn.Linear | None:
    """The text tokens' own value projection in a two-stream module, ``None`` in a one-stream one."""
    for name in TEXT_VALUES:
        projection = getattr(attn, name, None)
        if projection is not None:
            return projection
    return None


def has_text_stream(attn: nn.Module) -> bool:
    """Joint (two-stream) module: text tokens get their own value projection (``TEXT_VALUES``)."""
    return text_value(attn) is not None


def value_streams(attn: nn.Module, layout: HostLayout) -> list[tuple[str, nn.Linear]]:
    """``(argument, value projection)`` per stream, in key order. A one-stream module's context is
    ``encoder_hidden_states`` when given, else ``hidden_states`` (argument ``ENCODER``, resolved at call)."""
    if not has_text_stream(attn):
        return [(ENCODER, attn.to_v)]
    projections = {HIDDEN: attn.to_v, ENCODER: text_value(attn)}
    return [(arg, projections[arg]) for arg in layout.key_order]


def encoder_rows(attn: nn.Module, per_stream: bool) -> dict[str, slice | None]:
    """Rows of ``W_s`` each stream's tokens are encoded with: all of them (shared encoder), or the
    stream's own block (per-stream: ``hidden_states`` rows first, then ``encoder_hidden_states``)."""
    if not per_stream or not has_text_stream(attn):
        return {HIDDEN: None, ENCODER: None}
    width = attn.to_v.in_features
    return {HIDDEN: slice(0, width), ENCODER: slice(width, width + text_value(attn).in_features)}


def context_width(attn: nn.Module, per_stream: bool) -> int:
    """Rows of ``W_s``: the value input width, or the two streams' widths stacked (per-stream)."""
    width = attn.to_v.in_features
    text = text_value(attn)
    if per_stream and text is not None:
        return width + text.in_features
    if text is not None and text.in_features != width:
        return -1  # a shared encoder needs one width: the caller names the problem
    return width
