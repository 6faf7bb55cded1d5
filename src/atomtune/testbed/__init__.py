"""Offline testbed: a small text-to-image PixArt on real handwritten digits, pretrained by us.

No large DiT can be loaded offline, so the project pretrains its own: scikit-learn's bundled
digits rendered on small RGB canvases, captioned from templates, one digit class held out of
pretraining so that customizing it back is a real DreamBooth-style task.
"""
