"""The embedded sample: landscape scenes rendered by code as "photos" or as "Monet paintings".

Stands in for Kaggle's "I'm Something of a Painter Myself" data when there is no internet:
PHOTO_COUNT photos and MONET_COUNT paintings, 256x256 RGB. Both domains draw scenes from ONE
distribution (sky, sun, clouds, hazy mountain layers, tree line, lake with reflections or
fields, trees) and differ only in style, so the photo -> Monet gap is palette + local
texture, which a small CycleGAN can learn at 64 px:

* photo: crisp edges, natural contrast, fine sensor noise, slight vignette;
* monet: pastel, lighter, lower-contrast palette with violet shadows and warm highlights,
  painted as short oriented dabs (6-16 px long at 256 px, so they survive a 4x downscale)
  with per-dab colour jitter, impasto shading, bristle streaks and canvas showing through.

Scene geometry and colours are a pure function of (seed, index); the style only changes how
that scene is finished, so render(s, k, "photo") and render(s, k, "monet") are a
ground-truth pair. Photos and paintings use disjoint scene indices (photo_index, monet_index).

Determinism: every random number comes from np.random.default_rng([seed, index, ...]) via
rng.random() (uniform doubles), and per-pixel work uses only IEEE-exact elementwise ops
(+ - * / sqrt, min/max, floor, gathers): no trig/exp/pow, no BLAS, no float reductions on
the rendering path, so pixels do not depend on SIMD width, threads or batch size.
Texture tiles and stroke layouts come from a fixed seed, are built once per size and cached.
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Sequence

import numpy as np

from pipeline.processes import worker_pool

PHOTO_COUNT = 7028
MONET_COUNT = 300
STYLES = ("photo", "monet")

_MONET_SCENE_OFFSET = 1_000_000  # paintings are scenes 1_000_000.., photos 0..: never shared
_TEXTURE_SEED = 0x5EED           # texture tiles and stroke layouts: fixed, shared by all scenes
_STROKE_MARGIN = 64              # stroke layouts are (size+margin)^2; each painting crops one
_PAD = 16                        # px of edge padding per 256 px of size: stroke colour samples
                                 # (<= ~11 px from their pixel at 256) never leave the image

F32 = np.float32


# ----------------------------------------------------------------------------------------------
# Public interface
# ----------------------------------------------------------------------------------------------

def sample_name(seed: int, domain: str, i: int) -> str:
    """The i-th image's name in `domain` ("photo" or "monet"): 10 hex digits like Kaggle's,
    stable for (seed, domain, i)."""
    return hashlib.sha1(f"{seed}/{domain}/{i}".encode()).hexdigest()[:10]


def photo_index(i: int) -> int:
    """Scene index of the i-th photo (0 <= i < PHOTO_COUNT)."""
    if not 0 <= i < PHOTO_COUNT:
        raise IndexError(f"photo {i} out of range [0, {PHOTO_COUNT})")
    return int(i)


def monet_index(i: int) -> int:
    """Scene index of the i-th painting (0 <= i < MONET_COUNT); disjoint from photo scenes."""
    if not 0 <= i < MONET_COUNT:
        raise IndexError(f"painting {i} out of range [0, {MONET_COUNT})")
    return _MONET_SCENE_OFFSET + int(i)


def render(seed: int, index: int, style: str, size: int = 256) -> np.ndarray:
    """One scene as (size, size, 3) uint8. Scene content is a pure function of (seed, index)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    if size < 32 or size % 2:
        raise ValueError(f"size must be an even number >= 32, got {size}")
    s = _draw_scene(seed, index)
    scene = _paint_scene(s, size)
    style_rng = np.random.default_rng([seed, index, STYLES.index(style) + 1])
    if style == "photo":
        return _finish_photo(scene, style_rng)
    return _finish_monet(scene, style_rng, water_top=s["hz"] if s["water"] else None)


def render_batch(seed: int, indices: Sequence[int], style: str, size: int = 256) -> np.ndarray:
    """(len(indices), size, size, 3) uint8; identical to stacking render() results."""
    if style not in STYLES:  # checked here too so an empty batch still rejects a bad style
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    out = np.empty((len(indices), size, size, 3), np.uint8)
    for n, index in enumerate(indices):
        out[n] = render(seed, index, style, size)
    return out


def _render_args(args: tuple[int, list[int], str]) -> np.ndarray:
    return render_batch(*args)


def render_parallel(seed: int, indices: Sequence[int], style: str, workers: int | None = None) -> np.ndarray:
    """render_batch over the cores (chunks of 32 scenes per task); the same pixels."""
    indices = list(indices)
    chunks = [(seed, indices[i:i + 32], style) for i in range(0, len(indices), 32)]
    if len(chunks) <= 1:
        return render_batch(seed, indices, style)
    with worker_pool(workers or os.cpu_count() or 1) as pool:
        return np.concatenate(list(pool.map(_render_args, chunks)))


# ----------------------------------------------------------------------------------------------
# Noise helpers (elementwise only, see the module docstring)
# ----------------------------------------------------------------------------------------------

def _smooth(t):
    return t * t * (3.0 - 2.0 * t)


@functools.lru_cache(maxsize=256)
def _resample_weights(cells: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Left neighbour and smoothstep weight for sampling cells+1 grid points at n positions."""
    pos = (np.arange(n, dtype=np.float64) + 0.5) * (cells / n)
    i0 = np.minimum(pos.astype(np.int64), cells - 1)
    return i0, _smooth(pos - i0).astype(F32)


def _resample_axis(grid: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Smooth (smoothstep-weighted) interpolation of grid points to n samples along axis."""
    i0, t = _resample_weights(grid.shape[axis] - 1, n)
    if grid.ndim == 2 and axis == 0:
        t = t[:, None]
    a = np.take(grid, i0, axis=axis)
    return a + (np.take(grid, i0 + 1, axis=axis) - a) * t


def _fbm2d(rng, rows: int, cols: int, cells_y: int, cells_x: int, octaves: int) -> np.ndarray:
    """Fractal value noise in [0, 1], (rows, cols) float32."""
    out = np.zeros((rows, cols), F32)
    amp = 1.0
    for o in range(octaves):
        gy, gx = min(cells_y << o, rows - 1), min(cells_x << o, cols - 1)
        grid = rng.random((gy + 1, gx + 1)).astype(F32)
        out += F32(amp) * _resample_axis(_resample_axis(grid, rows, 0), cols, 1)
        amp *= 0.5
    lo, hi = out.min(), out.max()
    return (out - lo) / (hi - lo)


def _fbm1d(rng, n: int, cells: int, octaves: int, gain: float = 0.5) -> np.ndarray:
    """1-D fractal noise in about [-1, 1]; control points are fixed, so n only sets resolution."""
    out = np.zeros(n, F32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        grid = (rng.random((cells << o) + 1) * 2.0 - 1.0).astype(F32)
        out += F32(amp) * _resample_axis(grid, n, 0)
        total += amp
        amp *= gain
    return out / F32(total)


@functools.lru_cache(maxsize=4)
def _tiles(size: int) -> dict:
    """Texture tiles scenes crop from (at offsets drawn per scene): cheap per-image variety."""
    rng = np.random.default_rng([_TEXTURE_SEED, size, 0])
    t = 3 * size
    return {
        # soft clouds / terrain variation
        "fbm": _fbm2d(rng, t, t, 4, 4, 6),
        # foliage speckle, features of 2-4 px
        "fine": _fbm2d(rng, 2 * size, 2 * size, size // 2, size // 2, 2),
        # grass blades: narrow and tall
        "grass": _fbm2d(rng, 2 * size, 2 * size, size // 6, size // 2, 2),
        # horizontal streaks for water ripples and field furrows
        "streak": _fbm2d(rng, 2 * size, 2 * size, size // 10, 3, 4),
    }


# ----------------------------------------------------------------------------------------------
# Scene: parameters from (seed, index) only
# ----------------------------------------------------------------------------------------------

def _mix(a, b, t) -> np.ndarray:
    """Blend two RGB triples; returned as (3, 1, 1) float32 to broadcast over planar images."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a + (b - a) * t).astype(F32).reshape(3, 1, 1)


def _rgb(r: float, g: float, b: float) -> np.ndarray:
    return np.array([r, g, b], F32).reshape(3, 1, 1)


def _draw_scene(seed: int, index: int) -> dict:
    """All random choices of one scene. Draw order is fixed, so nothing depends on style/size."""
    rng = np.random.default_rng([seed, index])
    u = rng.random  # every draw is a uniform double: the most stable numpy stream
    warm, overcast, season = u() ** 2, u() ** 3, u()
    autumn = 1.0 if u() < 0.25 else 0.0
    light = _mix((1.0, 0.99, 0.95), (1.0, 0.80, 0.58), warm) * F32((0.95 + 0.1 * u()) * (1 - 0.25 * overcast))
    horizon = _mix(_mix((0.68, 0.80, 0.93), (0.99, 0.76, 0.52), warm).ravel(), (0.80, 0.80, 0.80), overcast)
    s = {
        "hz": 0.50 + 0.20 * u(),  # horizon: where water or fields start
        "zenith": _mix(_mix((0.20, 0.40, 0.78), (0.32, 0.40, 0.66), warm).ravel(), (0.56, 0.59, 0.64), overcast),
        "horizon": horizon,
        "sun": (0.1 + 0.8 * u(), 0.08 + 0.3 * u(), 0.025 + 0.03 * u(), bool(u() < 0.6 and overcast < 0.3)),
        "sun_col": _mix((1.0, 0.98, 0.88), (1.0, 0.72, 0.38), warm),
        "clouds": (0.35 + 0.3 * u() - 0.2 * overcast, 0.4 + 0.6 * u(), int(u() * 1e6), int(u() * 1e6)),
        "cloud_col": _mix((0.98, 0.97, 0.96), (1.0, 0.86, 0.75), warm) * F32(1 - 0.2 * overcast),
        "light": light,
        # aerial perspective tints distant land toward the sky: bluer than the horizon glow
        "haze": horizon * F32(0.55) + _mix((0.20, 0.40, 0.78), (0.56, 0.59, 0.64), overcast) * F32(0.35)
        + light * F32(0.1),
        "water": u() < 0.55,
        "water_col": _mix((0.10, 0.20, 0.27), (0.16, 0.27, 0.26), u()),
        "tex_off": [int(u() * 1e6) for _ in range(8)],
    }
    n = 96  # ridge control points: geometry does not depend on the output size
    hz = s["hz"]
    far_top = hz - 0.14 - 0.18 * u()
    # |noise| has sharp minima -> sharp peaks (y grows downward), rounded valleys
    s["far"] = (u() < 0.8, far_top + 0.3 * np.abs(_fbm1d(rng, n, 3, 5, 0.55)),
                _mix((0.28, 0.34, 0.48), (0.40, 0.40, 0.48), u()) * light)
    s["snow"] = far_top + 0.03 + 0.05 * u() if u() < 0.35 else None
    s["mid"] = (u() < 0.85, hz - 0.04 - 0.10 * u() + 0.05 * _fbm1d(rng, n, 2, 3),
                _mix((0.24, 0.34, 0.22), (0.36, 0.36, 0.28), u()) * light)
    bumps = np.abs(_fbm1d(rng, n, 24, 2))  # tree-crown silhouette
    s["treeline"] = (u() < 0.75, hz - 0.015 - 0.03 * u() - 0.035 * bumps,
                     _mix((0.12, 0.24, 0.10), (0.42, 0.27, 0.09), autumn * u()) * light)
    s["grass_far"] = _mix((0.46, 0.56, 0.27), (0.66, 0.60, 0.32), season) * light * F32(0.8) + horizon * F32(0.2)
    s["grass_near"] = _mix((0.22, 0.40, 0.12), (0.48, 0.44, 0.16), season) * light
    s["field"] = hz + 0.01 * _fbm1d(rng, n, 3, 2)
    s["fore"] = (u() < 0.6, 0.80 + 0.12 * u() + 0.04 * _fbm1d(rng, n, 2, 3) + 0.06 * (u() - 0.5)
                 * np.linspace(-1, 1, n + 1)[:n].astype(F32))
    s["poppies"] = u() < 0.3
    s["ripple"] = (rng.random(64) * 2 - 1).astype(F32)  # per-row reflection wobble, 64 bands
    s["foliage"] = _mix((0.13, 0.26, 0.10), (0.45, 0.28, 0.08), autumn * u()) * light
    s["trees"] = []
    for _ in range(4):
        present, poplar, tx, tb, th, wr = u() < 0.55, u() < 0.4, u(), u(), u(), u()
        s["trees"].append((present, poplar, 0.04 + 0.92 * tx, tb, th, wr))
    return s


# ----------------------------------------------------------------------------------------------
# Scene painting: channel-planar float32 (3, size, size) in about [0, 1], style-free.
# Planar because numpy broadcasts a (rows, cols) alpha/shade over (3, rows, cols) ~10x faster
# than a (rows, cols, 1) one over (rows, cols, 3).
# ----------------------------------------------------------------------------------------------

def _crop(tile: np.ndarray, off: int, rows: int, cols: int, row_step: int = 1) -> np.ndarray:
    """A (..., rows, cols) view of tile at a scene-chosen offset (views cost nothing)."""
    max_y = tile.shape[-2] - rows * row_step
    max_x = tile.shape[-1] - cols
    y, x = off % (max_y + 1), (off // 7919) % (max_x + 1)
    return tile[..., y:y + rows * row_step:row_step, x:x + cols]


def _over(img, top: int, alpha: np.ndarray, colour, solid_from: int | None = None) -> None:
    """Alpha-composite colour (broadcastable to (3, h, W)) over img rows top.. in place.

    Rows from solid_from (relative to top) on are known to be fully covered: plain copy there."""
    h = alpha.shape[0]
    if solid_from is not None and solid_from < h:
        solid_from = max(solid_from, 0)
        colour = np.broadcast_to(colour, (3, h, img.shape[2]))
        img[:, top + solid_from:top + h] = colour[:, solid_from:]
        alpha, colour, h = alpha[:solid_from], colour[:, :solid_from], solid_from
    region = img[:, top:top + h]
    d = colour - region
    d *= alpha
    region += d


def _ridge_px(ridge: np.ndarray, size: int) -> np.ndarray:
    """Ridge height (fraction of image, one value per control point) -> one value per column."""
    return _resample_axis(np.append(ridge, ridge[-1]).astype(F32), size, 0)


def _smooth_slope(r: np.ndarray, k: int) -> np.ndarray:
    """d(ridge)/dx over a 2k-px window (cumsum box filter: no BLAS, fixed order), per column."""
    c = np.cumsum(np.concatenate([np.full(k, r[0], F32), r, np.full(k, r[-1], F32)]))
    return (c[2 * k:] - c[:-2 * k]) * F32(len(r) / (2 * k * 2 * k))


def _land(img, yy, r, top, bottom, colour, haze, haze_range, shade) -> None:
    """Opaque land below ridge r over rows top..bottom: colour*shade, hazier toward its foot."""
    if bottom <= top:
        return
    H = img.shape[1]
    y = yy[top:bottom]
    alpha = np.clip((y - r) * F32(H) + F32(0.5), 0, 1)
    # aerial perspective: mist gathers toward the layer's foot (valley / lake shore)
    depth = (y - y[0]) / F32(max(float(y[-1, 0] - y[0, 0]), 1e-3))
    w = F32(haze_range[0]) + F32(haze_range[1] - haze_range[0]) * depth  # (h, 1)
    colour = (colour * (1 - w)) * shade + haze * w
    _over(img, top, alpha, colour, solid_from=int(float(r.max()) * H) + 2 - top)


def _paint_scene(s: dict, size: int) -> np.ndarray:
    tiles = _tiles(size)
    H = W = size
    yy = ((np.arange(H, dtype=F32) + F32(0.5)) / F32(H))[:, None]
    xx = ((np.arange(W, dtype=F32) + F32(0.5)) / F32(W))[None, :]
    hz = s["hz"]
    off = s["tex_off"]
    img = np.zeros((3, H, W), F32)  # zeros, not empty: layers blend over rows a nearer layer later covers
    row = lambda frac: int(min(max(frac, 0.0), 1.0) * H)

    # Layers far -> near. Each is painted only down to the row below which a nearer opaque
    # layer surely covers it (painter's algorithm without the wasted overdraw).
    names = [n for n in ("far", "mid", "treeline") if s[n][0]]
    ridges = {n: _ridge_px(s[n][1], W) for n in names}
    below = hz if s["water"] else float(_ridge_px(s["field"], W).max()) + 1 / H
    cover = {}
    for n in reversed(names):
        cover[n] = min(below, hz + 0.01) + 1 / H
        below = min(below, float(ridges[n].max()) + 1 / H)

    _sky(img, s, yy, xx, tiles, row(below) + 1)
    sun_side = F32(1.0 if s["sun"][0] > 0.5 else -1.0)
    for k, n in enumerate(names):
        r = ridges[n]
        top, bottom = max(row(float(r.min())) - 1, 0), row(cover[n]) + 1
        y = yy[top:bottom]
        h = bottom - top
        fbm = _crop(tiles["fbm"], off[k], h, W)
        fine = _crop(tiles["fine"], off[3], h, W)
        if n == "far":
            # rock gullies run down the slope; faces turned toward the sun are lit
            gully = _crop(tiles["streak"].T, off[4], h, W)
            fall = np.clip(F32(1) - (y - r) * F32(5), 0, 1)
            lit = np.clip(_smooth_slope(r, max(W // 40, 1)) * sun_side, -1, 1) * F32(0.4)
            shade = F32(0.7) + F32(0.3) * fbm + F32(0.3) * gully * fall + lit * fall
            if s["snow"] is not None:
                # snow patches above a ragged snow line, streaking down the gullies
                edge = (F32(s["snow"]) - y) * F32(40) + (fbm - F32(0.5)) * F32(4) + (gully - F32(0.5)) * F32(8)
                shade += np.clip(edge, 0, 1) * F32(0.9)
            haze_range = (0.25, 0.6)
        elif n == "mid":
            shade = F32(0.75) + F32(0.35) * fbm + F32(0.2) * fine
            haze_range = (0.12, 0.35)
        else:  # tree line: dense foliage speckle
            shade = F32(0.45) + F32(0.9) * fine * (F32(0.5) + F32(0.5) * fbm)
            haze_range = (0.05, 0.15)
        _land(img, yy, r, top, bottom, s[n][2], s["haze"], haze_range, shade)

    if s["water"]:
        _trees(img, s, yy, xx, tiles, shore=True)  # before the water: they get reflected
        _water(img, s, xx, tiles)
    else:
        _fields(img, s, yy, tiles, near_only=False)
    if s["fore"][0]:
        _fields(img, s, yy, tiles, near_only=True)
    if not s["water"]:
        _trees(img, s, yy, xx, tiles, shore=False)
    return img


def _sky(img, s, yy, xx, tiles, rows: int) -> None:
    """Rows 0..rows: zenith -> horizon gradient, sun disc with glow, clouds with grey undersides."""
    W = img.shape[2]
    hz = s["hz"]
    ys = yy[:rows]
    g = np.clip(ys / F32(hz), 0, 1)
    base = s["zenith"] + (s["horizon"] - s["zenith"]) * (g * g)  # (3, rows, 1)
    # clouds: fbm squashed vertically into flat banks, thinning toward the horizon
    thr, amount, o0, o1 = s["clouds"]
    c = _crop(tiles["fbm"], o0, rows, W, row_step=2)
    fade = np.clip((F32(hz) - ys) * F32(6), 0, 1)
    cover = np.clip((c - F32(thr)) * F32(3.5), 0, 1) * (F32(amount) * fade)
    shade = F32(0.72) + F32(0.28) * _crop(tiles["fbm"], o1, rows, W)  # grey undersides
    d = s["cloud_col"] * shade - base
    d *= cover
    np.add(base, d, out=img[:, :rows])
    sx, sy, sr, sun_on = s["sun"]
    if sun_on:  # disc + glow with compact support: only a box around the sun is touched
        reach = 10 * sr
        y0, y1 = int(max(sy - reach, 0) * len(yy)), min(int((sy + reach) * len(yy)) + 1, rows)
        x0, x1 = int(max(sx - reach, 0) * W), min(int((sx + reach) * W) + 1, W)
        if y1 > y0:
            d2 = (xx[:, x0:x1] - F32(sx)) ** 2 + (ys[y0:y1] - F32(sy)) ** 2
            fade = np.clip(F32(1) - d2 * F32(1 / reach ** 2), 0, 1)
            glow = F32(0.5) * fade * fade + np.clip((F32(sr * sr) - d2) * F32(1 / (0.15 * sr * sr)), 0, 1)
            _over(img[:, :, x0:x1], y0, np.minimum(glow, 1), s["sun_col"])


def _fields(img, s, yy, tiles, near_only: bool) -> None:
    """Meadow from the horizon (or a foreground bank) down: hazy and pale far, rich near."""
    H, W = img.shape[1:]
    off = s["tex_off"]
    r = _ridge_px(s["fore"][1] if near_only else s["field"], W)
    top = max(int(float(r.min()) * H) - 1, 0)
    y = yy[top:]
    alpha = np.clip((y - r) * F32(H) + F32(0.5), 0, 1)
    t = np.clip((y - F32(s["hz"])) / F32(1 - s["hz"]), 0, 1)  # 0 far .. 1 near, (h, 1)
    far, near = s["grass_far"], s["grass_near"] * (F32(0.85) if near_only else F32(1))
    streak = _crop(tiles["streak"], off[5], H - top, W)       # furrows / mown strips
    grass = _crop(tiles["grass"], off[6], H - top, W)         # blades and clumps, crisper nearer
    shade = F32(0.7) + F32(0.3) * streak + (F32(0.1) + F32(0.6) * t) * (grass - F32(0.5))
    col = (far + (near - far) * t) * shade
    if s["poppies"] and not near_only:
        dots = np.clip((grass - F32(0.7)) * F32(8), 0, 1) * t * (streak > F32(0.45))
        _over(col, 0, dots, _rgb(0.85, 0.18, 0.12) * s["light"])
    _over(img, top, alpha, col, solid_from=int(float(r.max()) * H) + 2 - top)


def _water(img, s, xx, tiles) -> None:
    """Lake from the horizon down: wobbly mirror of what is above, tinted, with ripples and glitter."""
    H, W = img.shape[1:]
    top = int(s["hz"] * H)
    rows = np.arange(top, H)
    depth = ((rows - top) / max(H - top, 1)).astype(F32)[:, None]  # 0 at the shore .. 1 nearest
    src_rows = np.clip(2 * top - 1 - rows, 0, H - 1)
    # ripples: each row's reflection is shifted sideways, more so nearer the viewer
    shift = np.round(s["ripple"][(rows * 64) // H] * (1 + depth[:, 0] * 6)).astype(np.int64)
    src = src_rows[:, None] * W + np.clip(np.arange(W)[None, :] + shift[:, None], 0, W - 1)
    flat = img.reshape(3, -1)
    col = np.stack([np.take(flat[c], src) for c in range(3)])
    streak = _crop(tiles["streak"], s["tex_off"][7], H - top, W)
    k = F32(0.25) + F32(0.35) * depth  # more water colour, less mirror, nearer
    col *= (F32(0.88) - k) * (F32(0.85) + F32(0.3) * streak)
    col += (s["water_col"] * s["light"]) * k
    sx, _, _, sun_on = s["sun"]
    if sun_on:  # glitter path under the sun
        path = np.clip(F32(1) - np.abs(xx - F32(sx)) / (F32(0.05) + F32(0.15) * depth), 0, 1)
        glint = np.clip((streak - F32(0.55)) * F32(3.2), 0, 1) * path
        _over(col, 0, glint, s["sun_col"])
    img[:, top:] = col


def _trees(img, s, yy, xx, tiles, shore: bool) -> None:
    """Up to four trees: noisy-edged canopy blobs (round or poplar) on short dark trunks."""
    H, W = img.shape[1:]
    hz = s["hz"]
    trunk_col = _rgb(0.18, 0.13, 0.09) * s["light"]
    sun_dir = F32(1.0 if s["sun"][0] > 0.5 else -1.0)
    for n, (present, poplar, tx, tb, th, wr) in enumerate(s["trees"]):
        if not present:
            continue
        base = hz + 0.005 if shore else hz + 0.08 + (1 - hz - 0.05) * tb
        scale = 0.7 + 0.6 * tb if shore else 0.6 + 1.6 * (base - hz) / (1 - hz)  # perspective
        ry = (0.07 + 0.07 * th) * scale * (1.6 if poplar else 1.0)
        rx = ry * ((0.25 + 0.12 * wr) if poplar else (0.6 + 0.35 * wr))
        cy = base - ry * (0.25 if poplar else 0.55) - ry * 0.9
        y0, y1 = max(int((cy - ry * 1.3) * H), 0), min(int(base * H) + 1, H)
        x0, x1 = max(int((tx - rx * 1.3) * W), 0), min(int((tx + rx * 1.3) * W) + 1, W)
        if y1 <= y0 or x1 <= x0:
            continue
        y, x, view = yy[y0:y1], xx[:, x0:x1], img[:, :, x0:x1]
        tw = max(rx * 0.12, 0.7 / W)
        trunk = np.clip((F32(tw) - np.abs(x - F32(tx))) * F32(W), 0, 1) * (y > F32(cy))
        _over(view, y0, trunk, trunk_col)
        # canopy: an ellipse whose edge is eaten by noise -> leafy blob, lit on the sun side
        u, v = (x - F32(tx)) / F32(rx), (y - F32(cy)) / F32(ry)
        noise = _crop(tiles["fine"], s["tex_off"][n] + 31 * n, y1 - y0, W)[:, x0:x1]
        a = np.clip((F32(1) - (u * u + v * v) - F32(0.55) * (noise - F32(0.5))) * F32(6), 0, 1)
        shade = F32(0.75) + F32(0.15) * (u * sun_dir - v) + F32(0.6) * (noise - F32(0.5))
        _over(view, y0, a, np.maximum(shade, F32(0.2)) * s["foliage"])


# ----------------------------------------------------------------------------------------------
# Photo style
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _photo_textures(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Vignette (size, size) pre-scaled to 0..255, and a (3, 2*size, 2*size) sensor-noise tile."""
    rng = np.random.default_rng([_TEXTURE_SEED, size, 1])
    c = (np.arange(size, dtype=F32) + F32(0.5)) / F32(size) - F32(0.5)
    # x1.1 - 0.05: a touch more contrast than the scene colours, like a camera tone curve
    vignette = F32(255 * 1.1) * (F32(1) - F32(0.35) * (c[:, None] ** 2 + c[None, :] ** 2))
    t = 2 * size
    # sum of 3 uniforms ~ gaussian: luminance grain (sigma ~2.2/255) plus weaker chroma grain;
    # +0.5 makes the final float->uint8 truncation round to nearest
    g = lambda *shape: (rng.random(shape) + rng.random(shape) + rng.random(shape) - 1.5).astype(F32)
    noise = F32(3.8) * g(1, t, t) + F32(1.6) * g(3, t, t) + F32(0.5 - 0.05 * 255)
    return vignette, noise


def _to_hwc_uint8(planar: np.ndarray) -> np.ndarray:
    """(3, H, W) float in 0..255 -> (H, W, 3) uint8 (channel-by-channel copies are the fast way)."""
    q = planar.astype(np.uint8)
    out = np.empty(q.shape[1:] + (3,), np.uint8)
    for c in range(3):
        out[..., c] = q[c]
    return out


def _finish_photo(img: np.ndarray, rng) -> np.ndarray:
    size = img.shape[1]
    vignette, noise = _photo_textures(size)
    img *= vignette
    img += _crop(noise, int(rng.random() * 1e9), size, size)
    np.clip(img, 0, 255, out=img)
    return _to_hwc_uint8(img)


# ----------------------------------------------------------------------------------------------
# Monet style
# ----------------------------------------------------------------------------------------------

def _pad(size: int) -> int:
    return _PAD * -(-size // 256)


def _stroke_layout(rng, size: int, horizontal: bool) -> dict:
    """Pre-painted brush dabs on a (size+margin)^2 canvas.

    Per pixel: `src`, the flat index (into the padded half-resolution image) of the colour the
    dab on top there carries -- one colour per dab, sampled near its centre -- and `mul`/`add`
    (H, W, 3): the dab's value/hue jitter, impasto and bristle texture, and the canvas weave
    where no dab landed. Everything here is elementwise float64/int; no trig.
    """
    L = size + _STROKE_MARGIN
    k = size / 256
    n = int(2.6 * L * L / (11 * 4.5 * 0.85 * k * k))  # ~2.6 coats on average -> few gaps
    cy, cx = rng.random(n) * (L + 8) - 4, rng.random(n) * (L + 8) - 4
    if horizontal:  # water / sky: near-horizontal strokes
        dx, dy = np.ones(n), (rng.random(n) * 2 - 1) * 0.35
    else:           # land: short strokes in all directions, biased to diagonals/verticals
        dx, dy = rng.random(n) * 2 - 1, rng.random(n) * 2 - 1
        dy += np.sign(dy) * 0.3
    norm = np.sqrt(dx * dx + dy * dy)
    dx, dy = dx / norm, dy / norm
    hl = (3 + 5 * rng.random(n)) * k      # half length: 6..16 px strokes at 256
    hw = (1.5 + 1.5 * rng.random(n)) * k  # half width: 3..6 px
    R = int(np.ceil(8 * k)) + 1
    oy, ox = np.mgrid[-R:R + 1, -R:R + 1].reshape(2, -1)
    py = np.floor(cy)[:, None].astype(np.int64) + oy[None, :]
    px = np.floor(cx)[:, None].astype(np.int64) + ox[None, :]
    ry, rx = py + 0.5 - cy[:, None], px + 0.5 - cx[:, None]
    u = (rx * dx[:, None] + ry * dy[:, None]) / hl[:, None]
    v = (ry * dx[:, None] - rx * dy[:, None]) / hw[:, None]
    u2 = u * u  # not u ** 4: NumPy's power can differ by a unit in the last place between CPUs (SIMD)
    inside = (u2 * u2 + v * v <= 1) & (py >= 0) & (py < L) & (px >= 0) & (px < L)  # rounded-rect dab
    dab = np.broadcast_to(np.arange(n)[:, None], inside.shape)[inside]
    top = np.full(L * L, -1, np.int64)
    np.maximum.at(top, (py * L + px)[inside], dab)  # later dabs cover earlier ones
    top = top.reshape(L, L)
    gap = top < 0
    i = np.where(gap, 0, top)
    yy, xx = np.mgrid[0:L, 0:L]
    ry, rx = yy + 0.5 - cy[i], xx + 0.5 - cx[i]
    v = (ry * dx[i] - rx * dy[i]) / hw[i]  # across the stroke, -1..1
    u = (rx * dx[i] + ry * dy[i]) / hl[i]  # along the stroke, -1..1
    # colour sample: near the dab's start (paint is dragged from there along the stroke)
    sy = np.where(gap, yy, np.floor(cy[i] - 2 * k * dy[i]).astype(np.int64))
    sx = np.where(gap, xx, np.floor(cx[i] - 2 * k * dx[i]).astype(np.int64))
    # row stride of the padded half-resolution image; cropping at even offsets shifts all alike
    pad = _pad(size)
    src = ((sy + pad) // 2) * (size // 2 + pad) + (sx + pad) // 2
    jitter = rng.random((n, 5))
    bristle = np.abs((v * 3.1 + jitter[i, 3] * 7) % 2 - 1) - 0.5  # triangle wave across bristles
    mul = (1 + 0.14 * (jitter[i, 0] - 0.5)  # per-dab value jitter: strokes stay visible at 64 px
           - 0.07 * v - 0.05 * u * u         # impasto: one lit edge, thinner ends
           + 0.06 * bristle)
    hue = 0.05 * (jitter[i][:, :, 1:4] - 0.5)  # per-dab hue jitter (broken colour)
    canvas = np.array([0.87, 0.83, 0.72])
    mul = np.where(gap, 0.55, mul)[..., None] * np.ones(3)
    add = np.where(gap[..., None], 0.45 * canvas, hue)
    add += (((yy % 3 == 0) ^ (xx % 3 == 0)) * 0.025 - 0.012)[..., None]  # canvas weave
    # bake the 0..1 -> 0..255 scaling and the rounding offset into the maps
    return {"src": src.astype(np.int32), "mul": (255 * mul).astype(F32), "add": (255 * add + 0.5).astype(F32)}


@functools.lru_cache(maxsize=2)
def _stroke_layouts(size: int) -> tuple[dict, dict]:
    rng = np.random.default_rng([_TEXTURE_SEED, size, 2])
    return _stroke_layout(rng, size, horizontal=True), _stroke_layout(rng, size, horizontal=False)


def _monet_palette(base: np.ndarray, rng) -> np.ndarray:
    """Planar (3, h, w): pastel, light, low-contrast; violet-blue shadows, warm highlights."""
    lum = F32(0.3) * base[0] + F32(0.59) * base[1] + F32(0.11) * base[2]
    out = base + (base - lum) * F32(0.45)              # more colour ...
    out = F32(0.24) + F32(0.70) * out                  # ... but lighter and flatter
    shadow = np.clip(F32(1) - lum * F32(2.4), 0, 1)    # darks -> blue-violet, not black
    violet = _mix((0.36, 0.34, 0.62), (0.30, 0.36, 0.60), rng.random())
    out += (violet - out) * (shadow * F32(0.45))
    high = np.clip((lum - F32(0.5)) * F32(2.5), 0, 1)  # lights -> warm cream/gold
    out += (_mix((1.0, 0.90, 0.68), (1.0, 0.84, 0.62), rng.random()) - out) * (high * F32(0.35))
    return out


def _finish_monet(img: np.ndarray, rng, water_top: float | None) -> np.ndarray:
    size = img.shape[1]
    # paint from a half-resolution, recoloured scene: the strokes are coarser than that anyway
    half = (img[:, 0::2, 0::2] + img[:, 1::2, 0::2] + img[:, 0::2, 1::2] + img[:, 1::2, 1::2]) * F32(0.25)
    half = _monet_palette(half, rng)
    p = _pad(size) // 2
    padded = np.pad(half, ((0, 0), (p, p), (p, p)), mode="edge").transpose(1, 2, 0).reshape(-1, 3)
    wp = size // 2 + _pad(size)
    horiz, mixed = _stroke_layouts(size)
    out = np.zeros((size, size, 3), F32)
    # horizontal strokes for sky and water, mixed directions for the land between
    land_top = int(size * 0.35)
    land_bottom = int(size * water_top) if water_top is not None else size
    bands = [(0, land_top, horiz), (land_top, land_bottom, mixed), (land_bottom, size, horiz)]
    for top, bottom, lay in bands:
        if bottom <= top:
            continue
        oy, ox = 2 * int(rng.random() * _STROKE_MARGIN // 2), 2 * int(rng.random() * _STROKE_MARGIN // 2)
        sl = (slice(oy + top, oy + bottom), slice(ox, ox + size))
        # layout pixel (y+oy, x+ox) paints image pixel (y, x): shift its colour source alike
        src = lay["src"][sl] - ((oy // 2) * wp + ox // 2)
        seg = np.take(padded, src.ravel(), axis=0).reshape(bottom - top, size, 3)
        seg *= lay["mul"][sl]
        seg += lay["add"][sl]
        out[top:bottom] = seg
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)
