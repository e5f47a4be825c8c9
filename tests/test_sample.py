"""The embedded sample renderer: deterministic, paired scenes, and a style gap in the intended
direction (Monet: lighter, flatter, bluer shadows, more stroke texture at 64 px)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import sample

SEED = 0
STAT_SCENES = list(range(100, 132))  # 32 scenes, each rendered in both styles


@pytest.fixture(scope="module")
def pairs() -> tuple[np.ndarray, np.ndarray]:
    """(photos, paintings) of the same 32 scenes, float in [0, 1]."""
    photos = sample.render_batch(SEED, STAT_SCENES, "photo").astype(np.float32) / 255
    paintings = sample.render_batch(SEED, STAT_SCENES, "monet").astype(np.float32) / 255
    return photos, paintings


def _lum(x: np.ndarray) -> np.ndarray:
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def _down(x: np.ndarray, f: int) -> np.ndarray:
    """Box-downscale (n, h, w, ...) by f."""
    n, h, w = x.shape[:3]
    return x.reshape(n, h // f, f, w // f, f, *x.shape[3:]).mean(axis=(2, 4))


# --- interface -------------------------------------------------------------------------------

@pytest.mark.parametrize("style", sample.STYLES)
def test_render_shape_dtype_and_repeatable(style):
    a = sample.render(SEED, 7, style)
    assert a.shape == (256, 256, 3) and a.dtype == np.uint8
    assert np.array_equal(a, sample.render(SEED, 7, style))
    assert a.std() > 10  # a real picture, not a flat fill


@pytest.mark.parametrize("style", sample.STYLES)
def test_render_batch_equals_stacked_renders(style):
    indices = [3, 0, sample.monet_index(1), 3]
    batch = sample.render_batch(SEED, indices, style)
    assert batch.shape == (4, 256, 256, 3) and batch.dtype == np.uint8
    assert np.array_equal(batch, np.stack([sample.render(SEED, i, style) for i in indices]))


def test_render_has_no_hidden_state():
    """Caches (tiles, stroke layouts) must not be mutated: order of calls cannot matter."""
    first = sample.render(SEED, 11, "monet")
    for i in range(20, 26):
        sample.render(SEED, i, "monet")
        sample.render(SEED, i, "photo")
    assert np.array_equal(first, sample.render(SEED, 11, "monet"))


def test_seed_and_index_change_the_scene():
    base = sample.render(SEED, 5, "photo")
    assert not np.array_equal(base, sample.render(SEED, 6, "photo"))
    assert not np.array_equal(base, sample.render(SEED + 1, 5, "photo"))


def test_other_sizes():
    for style in sample.STYLES:
        assert sample.render(SEED, 2, style, size=64).shape == (64, 64, 3)


def test_unknown_style_is_rejected_by_name():
    with pytest.raises(ValueError, match="watercolour"):
        sample.render(SEED, 0, "watercolour")
    with pytest.raises(ValueError, match="watercolour"):
        sample.render_batch(SEED, [], "watercolour")


def test_photo_and_painting_scenes_are_disjoint():
    photos = {sample.photo_index(i) for i in range(sample.PHOTO_COUNT)}
    paintings = {sample.monet_index(i) for i in range(sample.MONET_COUNT)}
    assert len(photos) == sample.PHOTO_COUNT and len(paintings) == sample.MONET_COUNT
    assert not photos & paintings
    for bad in (-1, sample.PHOTO_COUNT):
        with pytest.raises(IndexError):
            sample.photo_index(bad)
    for bad in (-1, sample.MONET_COUNT):
        with pytest.raises(IndexError):
            sample.monet_index(bad)


# --- pairs share the scene -------------------------------------------------------------------

def test_photo_and_painting_of_a_scene_share_its_geometry(pairs):
    """Blurred luminance edges correlate strongly within a pair, hardly across scenes."""
    def edges(x):
        lum = _down(_lum(x), 8)  # 32x32: strokes and noise averaged out, layout kept
        g = np.concatenate([np.diff(lum, axis=1).reshape(len(lum), -1),
                            np.diff(lum, axis=2).reshape(len(lum), -1)], axis=1)
        return g - g.mean(axis=1, keepdims=True)

    def corr(a, b):
        return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))

    photos, paintings = pairs
    gp, gm = edges(photos), edges(paintings)
    paired = corr(gp, gm)
    unpaired = corr(gp, np.roll(gm, 1, axis=0))  # photo k vs painting of scene k+1
    assert paired.min() > 0.5, paired
    assert np.all(paired > unpaired + 0.25), (paired, unpaired)
    assert unpaired.mean() < 0.3


# --- the styles differ in the intended direction ---------------------------------------------

def test_paintings_are_lighter_and_lower_contrast(pairs):
    photos, paintings = pairs
    lp, lm = _lum(photos), _lum(paintings)
    assert lm.mean() > lp.mean() + 0.08
    assert lm.std(axis=(1, 2)).mean() < 0.85 * lp.std(axis=(1, 2)).mean()


def test_painting_shadows_are_blue_violet(pairs):
    """In the darkest fifth of each image, blue minus green is higher in the painting."""
    def dark_blue(images):
        out = []
        for img in images:
            lum = _lum(img)
            dark = lum <= np.quantile(lum, 0.2)
            out.append((img[..., 2] - img[..., 1])[dark].mean())
        return np.array(out)

    photos, paintings = pairs
    assert dark_blue(paintings).mean() > dark_blue(photos).mean() + 0.04


def test_brush_strokes_survive_downscaling_to_64px(pairs):
    """Local high-frequency energy at 64 px (pixel minus its 4-neighbour mean) is clearly
    higher in paintings: the strokes are several px wide there, not 1-px noise."""
    def hf64(images):
        lum = _lum(_down(images, 4))
        blur = (lum[:, :-2, 1:-1] + lum[:, 2:, 1:-1] + lum[:, 1:-1, :-2] + lum[:, 1:-1, 2:]) / 4
        return np.abs(lum[:, 1:-1, 1:-1] - blur).mean(axis=(1, 2))

    photos, paintings = pairs
    hp, hm = hf64(photos), hf64(paintings)
    assert hm.mean() > 1.3 * hp.mean()
    assert (hm > hp).mean() >= 0.9
