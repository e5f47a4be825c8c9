"""pipeline.metrics against an independent, straightforward numpy/scipy implementation."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline.errors import cli
from pipeline.metrics import fid, frechet_distance, kid, memorization_distance, mifid, nearest_real


# ------------------------------------------------------------------ independent references

def ref_fid_sqrtm(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook / pytorch-fid formula with scipy.linalg.sqrtm (full-rank inputs only)."""
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def ref_fid_nuclear(a: np.ndarray, b: np.ndarray) -> float:
    """Exact also for rank-deficient covariances: with centred data A, B,
    Tr sqrt(S1 S2) = ||A B^T||_* / sqrt((n1 - 1)(n2 - 1)) (nuclear norm = sum of singular values)."""
    ac, bc = a - a.mean(axis=0), b - b.mean(axis=0)
    n1, n2 = a.shape[0], b.shape[0]
    tr_sqrt = np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = a.mean(axis=0) - b.mean(axis=0)
    tr1 = (ac * ac).sum() / (n1 - 1)
    tr2 = (bc * bc).sum() / (n2 - 1)
    return float(diff @ diff + tr1 + tr2 - 2 * tr_sqrt)


def ref_distance(generated: np.ndarray, real: np.ndarray) -> float:
    """Explicit loop: for each generated row, the closest real painting by 1 - |cos|."""
    gen = [g for g in generated if np.any(g != 0)]
    rea = [r for r in real if np.any(r != 0)]
    total = 0.0
    for g in gen:
        best = min(1.0 - abs(float(np.dot(g, r)) / (np.linalg.norm(g) * np.linalg.norm(r)))
                   for r in rea)
        total += best
    return total / len(gen)


def feats(rng: np.random.Generator, n: int, d: int, shift: float = 0.0, scale: float = 1.0):
    """Non-negative, pool-feature-like rows (ReLU of Gaussians)."""
    return np.maximum(rng.normal(shift, scale, size=(n, d)), 0.0)


# ------------------------------------------------------------------------------------ FID

def test_fid_matches_sqrtm_reference_full_rank():
    rng = np.random.default_rng(0)
    a, b = feats(rng, 400, 24), feats(rng, 300, 24, shift=0.3, scale=1.5)
    expected = ref_fid_sqrtm(a, b)
    assert expected > 1.0
    assert fid(a, b) == pytest.approx(expected, rel=1e-9)
    assert fid(a, b) == pytest.approx(ref_fid_nuclear(a, b), rel=1e-9)


def test_fid_rank_deficient_like_300_paintings_in_2048_dims():
    rng = np.random.default_rng(1)
    a, b = feats(rng, 60, 512), feats(rng, 40, 512, shift=0.2)   # both covariances singular
    got = fid(a, b)
    assert np.isfinite(got)
    assert got == pytest.approx(ref_fid_nuclear(a, b), rel=1e-9)
    # sqrtm of the singular product is itself only good to ~1e-7 here
    assert got == pytest.approx(ref_fid_sqrtm(a, b), rel=1e-6)
    # the covariance route of the public API agrees as well
    stats = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(*stats) == pytest.approx(ref_fid_nuclear(a, b), rel=1e-9)


@pytest.mark.parametrize("n_generated, n_real", [(400, 4), (400, 30), (300, 60)])
def test_fid_with_more_generated_images_than_dims(n_generated, n_real):
    """Many generated rows against few real ones (7,028 against 300 in 2048 dims, scaled down):
    both ways of factoring the covariances give the exact FID."""
    rng = np.random.default_rng(11)
    a, b = feats(rng, n_generated, 40), feats(rng, n_real, 40, shift=0.3)
    assert fid(a, b) == pytest.approx(ref_fid_nuclear(a, b), rel=1e-9)
    if n_real > 40:  # full rank: the textbook formula holds too
        assert fid(a, b) == pytest.approx(ref_fid_sqrtm(a, b), rel=1e-8)


def test_frechet_distance_from_statistics():
    rng = np.random.default_rng(2)
    a, b = feats(rng, 200, 8), feats(rng, 250, 8, shift=-0.5, scale=2.0)
    got = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert got == pytest.approx(ref_fid_sqrtm(a, b), rel=1e-9)
    # symmetric in its two distributions
    assert got == pytest.approx(
        frechet_distance(b.mean(0), np.cov(b, rowvar=False), a.mean(0), np.cov(a, rowvar=False)),
        rel=1e-9)


def test_identical_sets_give_zero_fid():
    rng = np.random.default_rng(3)
    for n, d in ((300, 16), (50, 200)):        # full rank and rank deficient
        a = feats(rng, n, d)
        scale = np.trace(np.cov(a, rowvar=False))
        assert fid(a, a.copy()) == pytest.approx(0.0, abs=1e-9 * scale)
        assert fid(a, a[::-1].copy()) == pytest.approx(0.0, abs=1e-9 * scale)  # order-free
        d = memorization_distance(a, a.copy())
        assert 0.0 <= d < 1e-12                      # never negative from round-off
    # ...while a shifted copy is not
    assert fid(a, a + 1.0) == pytest.approx(a.shape[1] * 1.0, rel=1e-9)  # |mu1 - mu2|^2 = D


def test_torch_and_low_precision_inputs():
    rng = np.random.default_rng(4)
    a, b = feats(rng, 100, 12), feats(rng, 90, 12, shift=0.4)
    ta, tb = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    a32, b32 = ta.double().numpy(), tb.double().numpy()
    assert fid(ta, tb) == pytest.approx(ref_fid_sqrtm(a32, b32), rel=1e-9)
    assert memorization_distance(ta, tb) == pytest.approx(ref_distance(a32, b32), rel=1e-9)
    abf, bbf = ta.bfloat16(), tb.bfloat16()
    assert fid(abf, bbf) == pytest.approx(
        ref_fid_sqrtm(abf.double().numpy(), bbf.double().numpy()), rel=1e-9)


# ---------------------------------------------------------------------- memorisation distance

def test_distance_matches_loop_reference():
    rng = np.random.default_rng(5)
    g, r = feats(rng, 70, 32), feats(rng, 45, 32)
    got = memorization_distance(g, r)
    assert got == pytest.approx(ref_distance(g, r), rel=1e-12)
    assert 0.0 < got < 1.0


def test_abs_cosine_counts_anti_aligned_rows_as_close():
    r = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    g = np.array([[-2.0, 0.0], [3.0, 3.0 + 1e-9]])
    assert memorization_distance(g, r) == pytest.approx(0.0, abs=1e-12)


def test_copying_generator_is_penalised_and_direction_matters():
    """A mode-collapsed generator that outputs near-copies of 5 of the 300 training paintings."""
    rng = np.random.default_rng(6)
    paintings = feats(rng, 300, 64)
    copies = np.repeat(paintings[:5], 40, axis=0) + rng.normal(0, 1e-3, size=(200, 64))
    copies = np.maximum(copies, 0.0)

    d_gen = memorization_distance(copies, paintings)      # the competition's direction
    d_real = memorization_distance(paintings, copies)     # averaging over REAL rows instead
    assert d_gen == pytest.approx(ref_distance(copies, paintings), rel=1e-9)
    assert d_real == pytest.approx(ref_distance(paintings, copies), rel=1e-9)
    assert d_gen < 1e-3            # every generated image has a near-identical painting
    assert d_real > 0.1            # most paintings have no copy: the wrong direction misses it

    out = mifid(copies, paintings)
    assert out["distance"] == pytest.approx(d_gen)
    assert out["distance_thresholded"] == pytest.approx(d_gen)
    assert out["fid"] == pytest.approx(ref_fid_nuclear(copies, paintings), rel=1e-9)
    assert out["mifid"] == pytest.approx(out["fid"] / (d_gen + 1e-15), rel=1e-12)
    assert out["mifid"] > 100 * out["fid"]                 # penalised
    # the reversed (torchmetrics-style) direction would not have penalised it at all
    assert (d_real if d_real < 0.1 else 1.0) == 1.0


def test_all_zero_rows_are_dropped_from_the_distance_only():
    rng = np.random.default_rng(7)
    g, r = feats(rng, 40, 16), feats(rng, 30, 16)
    base = memorization_distance(g, r)
    gz = np.vstack([g[:10], np.zeros((3, 16)), g[10:]])
    rz = np.vstack([np.zeros((2, 16)), r])
    for gen, real in ((gz, r), (g, rz), (gz, rz)):
        got = memorization_distance(gen, real)
        assert np.isfinite(got)
        assert got == pytest.approx(base, rel=1e-12)
        assert got == pytest.approx(ref_distance(gen, real), rel=1e-12)
        out = mifid(gen, real, eps=1.0)
        assert out["distance"] == pytest.approx(base, rel=1e-12)
        assert out["fid"] == pytest.approx(ref_fid_sqrtm(gen, real), rel=1e-9)  # zeros kept
    assert mifid(gz, rz)["fid"] != pytest.approx(mifid(g, r)["fid"], rel=1e-6)
    with pytest.raises(ValueError, match="all zeros"):
        memorization_distance(np.zeros((4, 16)), r)
    with pytest.raises(ValueError, match="all zeros"):
        mifid(g, np.zeros((4, 16)))


def test_threshold_rule():
    rng = np.random.default_rng(8)
    g, r = feats(rng, 50, 64, shift=0.5), feats(rng, 60, 64)
    d = memorization_distance(g, r)
    f = fid(g, r)
    assert d >= 0.1

    out = mifid(g, r)                                 # d >= eps: no penalty
    assert out == {"mifid": pytest.approx(f, rel=1e-12), "fid": pytest.approx(f, rel=1e-12),
                   "distance": pytest.approx(d), "distance_thresholded": 1.0}

    out = mifid(g, r, eps=d + 1e-6)                   # d < eps: divided by d
    assert out["distance_thresholded"] == pytest.approx(d)
    assert out["mifid"] == pytest.approx(f / d, rel=1e-9)

    out = mifid(g, r, eps=d)                          # the rule is strict: d == eps -> 1
    assert out["distance_thresholded"] == 1.0
    assert out["mifid"] == pytest.approx(f, rel=1e-12)


# --------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("gen, real, match", [
    (np.ones((5, 4)), np.ones((5, 3)), "dimensions differ"),
    (np.ones((1, 4)), np.ones((5, 4)), "at least 2 rows"),
    (np.ones((5, 4)), np.ones((1, 4)), "at least 2 rows"),
    (np.ones(5), np.ones((5, 5)), "2-D"),
    (np.array([[1.0, np.nan], [1.0, 2.0]]), np.ones((3, 2)), "NaN or inf"),
    (np.ones((3, 2)), np.array([[1.0, np.inf], [1.0, 2.0]]), "NaN or inf"),
])
def test_bad_inputs_raise_value_error(gen, real, match):
    for fn in (fid, memorization_distance, mifid):
        with pytest.raises(ValueError, match=match):
            fn(gen, real)


def test_features_that_cannot_be_scored_are_one_line_from_a_stage(capsys):
    # NaN or inf features (weights that overflow) stop evaluate with one line, not a traceback
    stage = cli(lambda: mifid(np.array([[1.0, np.inf], [1.0, 2.0]]), np.ones((3, 2))))
    with pytest.raises(SystemExit) as e:
        stage()
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: generated features: 1 row(s) contain NaN or inf\n"


def test_features_whose_covariances_overflow_are_one_line_from_a_stage(capsys):
    # finite features of 1e154 and more: NumPy's eigensolver gave up, a LinAlgError traceback
    rng = np.random.default_rng(0)
    stage = cli(lambda: fid(rng.normal(size=(20, 8)) * 1e160, rng.normal(size=(20, 8)) * 1e160))
    with pytest.raises(SystemExit) as e, np.errstate(over="ignore", invalid="ignore"):
        stage()
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: FID: the features' covariances cannot be compared (")


def test_frechet_distance_shape_check():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_import_is_light():
    code = ("import sys; from pipeline.metrics import mifid; "
            "bad = [m for m in ('mlflow', 'dvc', 'tfrecord') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------- KID

def _mmd2_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with k(a, b) = (a·b/d + 1)^3, written as the plain double sums."""
    d = x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_equals_the_unbiased_mmd_written_out():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1.2, size=(12, 5))
    # one subset as large as both sets: a permutation of all rows, which the MMD does not see
    got = kid(x, y, subsets=1, subset_size=12)
    assert got["kid_mean"] == pytest.approx(_mmd2_loops(x, y), rel=1e-10)
    assert got["kid_std"] == 0.0


@pytest.mark.parametrize("generated, real", [(30, 8), (8, 30), (6, 6)])
def test_kid_subsets_are_the_unbiased_mmd_of_the_rows_drawn(generated, real):
    """Subsets smaller than a set: each value is the MMD² of exactly the rows the seeded draw
    picks, whether the kernel is computed per subset or indexed from a whole-set matrix."""
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(generated, 5)), rng.normal(0.3, 1.1, size=(real, 5))
    subsets, m = 4, 5
    draw = np.random.default_rng(0)
    values = []
    for _ in range(subsets):
        ix = draw.choice(generated, m, replace=False)
        iy = draw.choice(real, m, replace=False)
        values.append(_mmd2_loops(x[ix], y[iy]))
    got = kid(x, y, subsets=subsets, subset_size=m, seed=0)
    assert got["kid_mean"] == pytest.approx(np.mean(values), rel=1e-10)
    assert got["kid_std"] == pytest.approx(np.std(values), rel=1e-8)


def test_kid_says_the_subset_size_it_used_when_a_set_is_smaller():
    """300 paintings and the default 1,000 per subset: torch-fidelity stops; KID here draws
    subsets of 300 and says so beside the score, so the number's meaning is on record."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 5)), rng.normal(0.3, 1.1, size=(9, 5))
    got = kid(x, y, subsets=3, subset_size=1000, seed=2)
    assert got["kid_subset_size"] == 9
    assert got == kid(x, y, subsets=3, subset_size=9, seed=2)
    assert kid(x, y, subsets=3, subset_size=6, seed=2)["kid_subset_size"] == 6


def test_kid_of_constant_sets_has_the_closed_form():
    a, b = np.full((6, 4), 0.5), np.full((6, 4), -1.0)
    k = lambda u, v: (u * v * 4 / 4 + 1.0) ** 3  # noqa: E731  (every row pair alike)
    expected = k(0.5, 0.5) + k(-1.0, -1.0) - 2 * k(0.5, -1.0)
    got = kid(a, b, subsets=5, subset_size=4)
    assert got["kid_mean"] == pytest.approx(expected) and got["kid_std"] == pytest.approx(0.0, abs=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_gap():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 16))
    same = kid(rng.normal(size=(400, 16)), real, subsets=20, subset_size=200)
    near = kid(rng.normal(0.2, 1.0, size=(400, 16)), real, subsets=20, subset_size=200)
    far = kid(rng.normal(1.0, 1.0, size=(400, 16)), real, subsets=20, subset_size=200)
    assert abs(same["kid_mean"]) < 3 * same["kid_std"] + 1e-3  # unbiased: zero on average
    assert same["kid_mean"] < near["kid_mean"] < far["kid_mean"]
    assert kid(real, real, subsets=3, subset_size=50, seed=1) == kid(real, real, subsets=3, subset_size=50, seed=1)


def test_nearest_real_names_each_generated_rows_nearest_painting():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(20, 8))
    real[4] = 0.0  # an all-zero painting is never the nearest
    gen = np.stack([real[7] * 3.0, -real[2], rng.normal(size=8), np.zeros(8)])
    distance, index = nearest_real(gen, real)
    assert index[:2].tolist() == [7, 2] and distance[:2] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert index[2] not in (-1, 4) and 0 < distance[2] <= 1
    assert index[3] == -1 and np.isnan(distance[3])
    assert memorization_distance(gen, real) == pytest.approx(np.nanmean(distance))
