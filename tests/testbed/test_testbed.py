"""Offline testbed: rendering and captions, the judges on real held-out digits, pretraining resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atomtune.testbed.digits import (
    CANVAS,
    COLORS,
    PLACES,
    Attributes,
    all_captions,
    load_digits,
    random_attributes,
    render,
    split_indices,
)
from atomtune.testbed.judges import (
    alignment,
    extract_glyph,
    fidelity,
    load_classifier,
    measure,
    rendered_glyphs,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_render_places_the_colored_digit_where_the_caption_says(digits):
    images, _ = digits
    a = Attributes(3, "green", "small", "in the bottom right corner")
    x = render(images[3], a)
    assert x.shape == (3, CANVAS, CANVAS) and x.min() >= -1 and x.max() <= 1
    ink = (x + 1).amax(0) > 0.1
    ys, xs = ink.nonzero(as_tuple=True)
    top, left = PLACES[a.place]
    assert ys.min() >= top and ys.max() < top + 8 and xs.min() >= left and xs.max() < left + 8
    r, g, b = ((x + 1) / 2)[:, ink].mean(1)
    assert g > r and g > b  # green stroke
    assert a.caption() == "a small green three in the bottom right corner"
    assert Attributes(9, "red", "large", "in the center").caption("sks digit") == "a large red sks digit"


def test_data_is_deterministic_and_split_is_disjoint(digits):
    _, labels = digits
    train, held = split_indices(labels, seed=0)
    assert len(set(train) & set(held)) == 0 and len(train) + len(held) == len(labels)
    assert np.array_equal(split_indices(labels, seed=0)[1], held)
    a = [random_attributes(1, np.random.default_rng(7)) for _ in range(2)]
    assert a[0] == a[1]
    assert len(all_captions([0, 1])) == 2 * len(COLORS) * (1 + len(PLACES))


def test_selection_and_report_prompts_split_every_setting():
    """The 5 selection prompts and the 25 report prompts are disjoint, together every color x
    (size, place) setting once; the selection holds each color once and each setting at most once, and
    every prompt reads back (parse_prompt) as the attributes it was made from."""
    from atomtune.testbed import customize as cz

    chosen, report = cz.selection_prompts(), cz.report_prompts()
    texts = [p.text for p in chosen + report]
    assert len(chosen) == 5 and len(report) == 25 and len(set(texts)) == 30
    assert sorted(texts) == sorted(p.text for p in cz.all_prompts())
    assert sorted(p.attributes.color for p in chosen) == sorted(COLORS)
    settings = [(p.attributes.size, p.attributes.place) for p in chosen]
    assert len(set(settings)) == 5
    assert all(cz.parse_prompt(p.text) == p.attributes for p in chosen + report)
    captions = cz.instance_captions(9, 5)
    assert all(cz.parse_prompt(c) is not None and cz.TOKEN in c.split() for c in captions)


def test_judges_on_held_out_real_digits(digits):
    """Shipped classifier: accuracy floor on held-out real digits; measurements exact on renders."""
    images, labels = digits
    _, held = split_indices(labels)
    x, y = rendered_glyphs(images, labels, held, copies=1, seed=123)
    classifier = load_classifier()
    with torch.no_grad():
        accuracy = (classifier(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.95
    rng = np.random.default_rng(3)
    attrs = [random_attributes(int(labels[i]), rng) for i in held[:150]]
    canvas = (torch.stack([render(images[i], a) for i, a in zip(held[:150], attrs, strict=True)]) + 1) / 2
    assert alignment(canvas, attrs).mean().item() == 1.0
    # a wrong prompt is caught: swap every color
    names = list(COLORS)
    wrong = [Attributes(a.digit, names[(names.index(a.color) + 1) % 5], a.size, a.place) for a in attrs]
    assert alignment(canvas, wrong).max().item() == pytest.approx(2 / 3)
    nines = torch.tensor([i for i in held if labels[i] == 9][:10])
    refs = (
        torch.stack([render(images[i], Attributes(9, "white", "large", "in the center")) for i in nines]) + 1
    ) / 2
    score = fidelity(classifier, refs, 9, refs)
    assert score["p_target"].mean() > 0.9 and score["feature_cosine"].mean() > 0.5
    assert fidelity(classifier, refs, 4, refs)["p_target"].mean() < 0.1
    # the log keeps apart what P rounds together: the naive log of the softmax, in float64
    with torch.no_grad():
        naive = classifier(extract_glyph(refs)).double().softmax(1)[:, 9].log()
    torch.testing.assert_close(score["log_p_target"], naive, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(score["log_p_target"].exp(), score["p_target"])
    blank = torch.zeros(1, 3, CANVAS, CANVAS)
    assert measure(blank)[0].color is None and extract_glyph(blank).abs().sum() == 0


def test_batched_rendering_equals_one_by_one(digits):
    from atomtune.testbed.digits import render_batch

    images, labels = digits
    rng = np.random.default_rng(11)
    idx = rng.choice(len(labels), size=40)
    attrs = [random_attributes(int(labels[i]), rng) for i in idx]
    one_by_one = torch.stack([render(images[i], a) for i, a in zip(idx, attrs, strict=True)])
    assert torch.equal(render_batch(images[idx], attrs), one_by_one)
