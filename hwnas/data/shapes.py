"""`shapes`: the built-in offline proxy task, a deterministic generator (numpy only).

Ten classes of filled outlines — disc, triangle, square, pentagon, hexagon, star, ring, cross,
crescent, half-disc — each at a random scale (25–42% of the image), rotation and position, in a
random colour brighter than a random dark background that carries a faint sinusoidal grating of
random frequency and orientation, plus one small distractor blob and per-pixel Gaussian noise.
Why this and not MNIST: the polygons differ only in their number of corners, which takes
receptive field and capacity to tell apart, so candidates' accuracies spread out instead of
saturating (measured: after 400 stand-alone steps, random det20-w0.25 archs at 64×64 reach
different test accuracies — see tools/bench_search.py). Nothing is downloaded; a split is a pure
function of (seed, split, its size), so every machine generates the same pixels. Images are made
in chunks of 512 seeded by (seed, split, chunk start) and shuffled within their chunk, so splits
of two sizes share their full chunks only (a last, partial chunk differs).
"""

from __future__ import annotations

import numpy as np

CLASSES = ("disc", "triangle", "square", "pentagon", "hexagon", "star", "ring", "cross",
           "crescent", "halfdisc")


def _polygon_radius(theta: np.ndarray, n: int) -> np.ndarray:
    """Boundary radius of a regular n-gon of circumradius 1 along direction `theta`."""
    sector = 2 * np.pi / n
    return np.cos(np.pi / n) / np.cos(np.mod(theta, sector) - np.pi / n)


def _signed_inside(cls: int, x: np.ndarray, y: np.ndarray, radius: np.ndarray,
                   rot: np.ndarray, aux: np.ndarray) -> np.ndarray:
    """Positive inside the shape, in pixels (approximately); x, y [B, H, W] centred coords."""
    r = np.hypot(x, y)
    theta = np.arctan2(y, x) - rot
    name = CLASSES[cls]
    if name == "disc":
        return radius - r
    if name in ("triangle", "square", "pentagon", "hexagon"):
        n = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[name]
        return radius * _polygon_radius(theta, n) - r
    if name == "star":
        return radius * (0.72 + 0.28 * np.cos(5 * theta)) - r
    if name == "ring":
        return np.minimum(radius - r, r - radius * (0.45 + 0.15 * aux))
    xr = x * np.cos(rot) + y * np.sin(rot)
    yr = -x * np.sin(rot) + y * np.cos(rot)
    if name == "cross":
        arm = radius * (0.28 + 0.1 * aux)
        bar_h = np.minimum(radius - np.abs(xr), arm - np.abs(yr))
        bar_v = np.minimum(radius - np.abs(yr), arm - np.abs(xr))
        return np.maximum(bar_h, bar_v)
    if name == "crescent":
        shift = radius * (0.45 + 0.2 * aux)
        return np.minimum(radius - r, np.hypot(xr - shift, yr) - radius * 0.85)
    if name == "halfdisc":
        return np.minimum(radius - r, yr + 0.1 * radius)
    raise AssertionError(name)


CHUNK = 512  # images per generator chunk: a draw of n shares its full chunks with larger ones


def generate(n: int, image_size: int, seed: int, split: int, chunk: int = CHUNK,
             ) -> tuple[np.ndarray, np.ndarray]:
    """`n` images uint8 [n, 3, S, S] and labels int64 [n] (classes balanced, order shuffled).

    Deterministic in (seed, split, n, image_size); chunks bound the float working set.
    """
    s = image_size
    images = np.empty((n, 3, s, s), np.uint8)
    labels = np.empty(n, np.int64)
    grid = np.arange(s, dtype=np.float32) + 0.5
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        rng = np.random.default_rng([seed, split, start])
        lab = (np.arange(start, start + b) % len(CLASSES)).astype(np.int64)
        rng.shuffle(lab)
        radius = (rng.uniform(0.25, 0.42, b) * s).astype(np.float32)
        cx = rng.uniform(0.5 * s - 0.2 * s, 0.5 * s + 0.2 * s, b)
        cy = rng.uniform(0.5 * s - 0.2 * s, 0.5 * s + 0.2 * s, b)
        rot = rng.uniform(0, 2 * np.pi, b).astype(np.float32)
        aux = rng.uniform(0, 1, b)
        x = grid[None, None, :] - cx[:, None, None].astype(np.float32)
        y = grid[None, :, None] - cy[:, None, None].astype(np.float32)
        inside = np.empty((b, s, s), np.float32)
        R, A, T = radius[:, None, None], aux[:, None, None], rot[:, None, None]
        for c in range(len(CLASSES)):
            m = lab == c
            if m.any():
                inside[m] = _signed_inside(c, x[m], y[m], R[m], T[m], A[m])
        alpha = 1 / (1 + np.exp(np.clip(-2.0 * inside, -30, 30)))  # ~1 px anti-aliased edge
        # background: a random colour with a grating of random frequency/orientation/contrast
        bg = rng.uniform(0.0, 0.45, (b, 3, 1, 1))
        freq = rng.uniform(0.1, 0.6, (b, 1, 1))
        ori = rng.uniform(0, np.pi, (b, 1, 1))
        phase = rng.uniform(0, 2 * np.pi, (b, 1, 1))
        wave = np.sin(freq * (x * np.cos(ori) + y * np.sin(ori)) + phase)
        contrast = rng.uniform(0.03, 0.12, (b, 3, 1, 1))
        back = bg + contrast * wave[:, None]
        # foreground: a random colour brighter than the background in every channel (one
        # polarity, so a few hundred SGD steps on a 2-core CPU already learn the task)
        fg = np.clip(bg + rng.uniform(0.3, 0.6, (b, 3, 1, 1)), 0, 1)
        img = alpha[:, None] * fg + (1 - alpha[:, None]) * back
        # a small distractor blob anywhere
        dx = grid[None, None, :] - rng.uniform(0, s, (b, 1, 1))
        dy = grid[None, :, None] - rng.uniform(0, s, (b, 1, 1))
        blob = 1 / (1 + np.exp(np.clip(-2.0 * (rng.uniform(0.03, 0.07, (b, 1, 1)) * s
                                               - np.hypot(dx, dy)), -30, 30)))
        img = blob[:, None] * rng.uniform(0, 1, (b, 3, 1, 1)) + (1 - blob[:, None]) * img
        img = img + rng.normal(0, rng.uniform(0.02, 0.06, (b, 1, 1, 1)), img.shape).astype(np.float32)
        images[start:start + b] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
        labels[start:start + b] = lab
    return images, labels
