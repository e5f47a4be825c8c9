"""The paired score on the embedded sample: each photo's scene rendered as its painting is the truth."""
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import sample
from pipeline.errors import DataError
from pipeline.evaluate import pair_l1

SEED, N = 3, 4


@pytest.fixture(scope="module")
def scenes():
    photos = sample.render_batch(SEED, [sample.photo_index(i) for i in range(N)], "photo")
    truth = sample.render_batch(SEED, [sample.photo_index(i) for i in range(N)], "monet")
    names = [sample.sample_name(SEED, "photo", i) for i in range(N)]
    return names, torch.from_numpy(photos), truth


def _write(folder, names, images):
    folder.mkdir()
    for name, img in zip(names, images):
        Image.fromarray(np.asarray(img)).save(folder / f"{name}.jpg", quality=95)
    return folder


def test_the_ground_truth_scores_near_zero_and_the_photos_do_not(tmp_path, scenes):
    names, photos, truth = scenes
    perfect = pair_l1(_write(tmp_path / "perfect", names, truth), names, photos, SEED)
    expected_identity = np.abs(photos.numpy().astype(float) - truth.astype(float)).mean() / 255
    assert perfect["pair_l1_identity"] == pytest.approx(expected_identity)
    assert perfect["pair_l1"] < 0.02 < expected_identity  # JPEG loss only, against a real gap
    copies = pair_l1(_write(tmp_path / "copies", names, photos), names, photos, SEED)
    assert copies["pair_l1"] == pytest.approx(expected_identity, abs=0.01)  # untranslated = identity


def test_photos_of_another_seed_are_refused(tmp_path, scenes):
    names, photos, truth = scenes
    folder = _write(tmp_path / "g", names, truth)
    with pytest.raises(DataError, match="do not match the embedded sample"):
        pair_l1(folder, names, photos, SEED + 1)
