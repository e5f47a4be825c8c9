"""The evaluate stage: scores under the extractor asked for, the sample's ground truth, the
reference features' cache, and the memorization picture."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import evaluate as stage
from pipeline import ingest, memorization, sample, tfrecords
from pipeline.errors import DataError
from pipeline.features import extract, offline_extractor
from pipeline.feature_cache import FeatureCache, stored_digest
from pipeline.metrics import fid
from pipeline.params import parse

SEED = 3
P = parse({"seed": SEED, "ingest": {"sample_photos": 24, "sample_paintings": 12, "shard_size": 16},
           "evaluate": {"batch_size": 16, "baseline_images": 16, "kid_subsets": 5}})
CPU = torch.device("cpu")
COPIES = 3  # generated images that are exact copies of training paintings


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The embedded sample at 24 photos / 12 paintings, and a 'generated' folder of ground-truth
    paintings where the last COPIES images are byte copies of training paintings' JPEGs."""
    root = tmp_path_factory.mktemp("evaluate")
    manifest = ingest.ingest(P, root / "raw", root / "shards", root / "manifest.csv", root / "cache")
    names = manifest.loc[manifest["domain"] == "photo", "image_name"].tolist()
    truth = sample.render_batch(SEED, [sample.photo_index(i) for i in range(24)], "monet")
    painting_jpegs = [ex.image for f in sorted((root / "raw/monet_tfrec").glob("*.tfrec")) for ex in tfrecords.read(f)]
    (root / "generated").mkdir()
    for i, name in enumerate(names):
        if i >= 24 - COPIES:  # a generator that memorised paintings 0, 1, 2
            (root / "generated" / f"{name}.jpg").write_bytes(painting_jpegs[i - 24 + COPIES])
        else:
            Image.fromarray(truth[i]).save(root / "generated" / f"{name}.jpg", quality=95)
    return root, names


def _evaluate(data, params=P, cache="cache", **kw):
    root, _ = data
    return stage.evaluate(params, root / "shards", root / "manifest.csv", root / "generated", root / cache, **kw)


def test_scores_baselines_and_ground_truth_on_the_sample(data):
    result, extractor = _evaluate(data, cache="cache-a", picture=data[0] / "memorization.png")
    assert result["extractor"] == "offline" and "OFFLINE" in extractor.name
    assert result["generated_images"] == 24 and result["paintings"] == 12 and result["baseline_images"] == 16
    assert result["kid_subset_size"] == 12  # the default 1,000 per subset, of 12 paintings
    for key in ("mifid", "fid", "kid_mean", "kid_std", "fid_identity", "fid_ground_truth", "fid_subset"):
        assert np.isfinite(result[key]), key
    # the first 16 generated images are the ground truth saved as generate saves: exactly as good
    assert result["fid_vs_ground_truth"] == pytest.approx(1.0, abs=1e-6)
    assert result["fid_subset"] == pytest.approx(result["fid_ground_truth"]) and result["fid_vs_identity"] < 0.1
    assert result["pair_l1"] < 0.02 < result["pair_l1_identity"]  # JPEG loss only, against a real gap
    assert all(isinstance(v, (int, float, str)) and (not isinstance(v, str) or len(v) < 20) for v in result.values())


def test_reference_features_are_cached_and_reused(data, capsys, monkeypatch):
    said = []
    first, _ = _evaluate(data, cache="cache-b", say=said.append)
    assert sum("features computed and cached" in s for s in said) == 3  # paintings, photos, ground truth
    assert sum(s.startswith("evaluate: warning: 12 paintings: scores against so few are far larger") for s in said) == 1
    assert sum("ground-truth pixels computed and cached" in s for s in said) == 1  # pair_l1's renders
    said.clear()
    rendered = []
    real_render = sample.render_parallel
    monkeypatch.setattr(sample, "render_parallel", lambda *a, **k: rendered.append(a) or real_render(*a, **k))
    again, _ = _evaluate(data, cache="cache-b", say=said.append)
    assert sum("features from the cache" in s for s in said) == 3 and not any("computed" in s for s in said)
    assert any("ground-truth pixels from the cache" in s for s in said) and not rendered  # nothing rendered
    assert any("BatchNorm statistics from the cache" in s for s in said)  # the offline extractor's
    assert again == first
    other = parse({**{"seed": SEED, "ingest": {"sample_photos": 24, "sample_paintings": 12}},
                   "evaluate": {"batch_size": 16, "baseline_images": 16, "kid_subsets": 5, "offline_image_size": 99}})
    said.clear()
    _evaluate(data, params=other, cache="cache-b", say=said.append)  # another extractor: another key
    assert sum("features computed and cached" in s for s in said) == 3


def test_the_scores_do_not_depend_on_the_batch_size(data):
    # evaluate.batch_size is a speed setting; it was also the batches the offline extractor's
    # BatchNorm statistics were averaged over (on the default sample 32 gave fid_vs_ground_truth
    # 1.391 where 64 gave 1.292), and the statistics' cache did not tell them apart
    results = []
    for batch_size in (16, 4):
        params = parse({**{"seed": SEED, "ingest": {"sample_photos": 24, "sample_paintings": 12}},
                        "evaluate": {"batch_size": batch_size, "baseline_images": 16, "kid_subsets": 5}})
        results.append(_evaluate(data, params=params, cache=f"cache-batch-{batch_size}")[0])
    for key in ("fid", "fid_identity", "fid_ground_truth", "kid_mean", "distance"):
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-4), key
    # features of one batch size are not taken for another's: the same params give the same scores
    # whatever was cached first (they differed in the 7th digit)
    said = []
    params = parse({"seed": SEED, "ingest": {"sample_photos": 24, "sample_paintings": 12},
                    "evaluate": {"batch_size": 4, "baseline_images": 16, "kid_subsets": 5}})
    again = _evaluate(data, params=params, cache="cache-batch-16", say=said.append)[0]
    assert not any("features from the cache" in line for line in said), said
    assert again == results[1]


def test_a_cache_file_that_does_not_read_back_is_recomputed(tmp_path):
    cache = FeatureCache(tmp_path, "extractor-key", say=lambda s: None)
    cache.get("x", "images", lambda: np.ones((3, 2)))
    cache.path("x", "images").write_bytes(b"truncated")
    said = []
    cache.say = said.append
    assert np.array_equal(cache.get("x", "images", lambda: np.full((3, 2), 2.0)), np.full((3, 2), 2.0))
    assert "does not read back" in said[0]
    assert cache.path("x", "images") != FeatureCache(tmp_path, "other-key").path("x", "images")


@pytest.mark.parametrize("damage", ["empty", "other shape"])
def test_an_empty_or_misshapen_cache_file_is_recomputed(tmp_path, damage):
    # an empty file is what a crash can leave once the rename reached the disk and the bytes did not
    cache = FeatureCache(tmp_path, "extractor-key", say=lambda s: None)
    cache.get("x", "images", lambda: np.ones((3, 2)), shape=(3, 2))
    path = cache.path("x", "images")
    if damage == "empty":
        path.write_bytes(b"")
    else:  # whole, with its digest: only its shape is not the one asked for
        with open(path, "wb") as f:
            np.savez(f, features=np.ones((5, 2)), check=stored_digest(path.name, {"features": np.ones((5, 2))}))
    said = []
    cache.say = said.append
    again = cache.get("x", "images", lambda: np.full((3, 2), 2.0), shape=(3, 2))
    assert np.array_equal(again, np.full((3, 2), 2.0)) and "does not read back" in said[0]
    assert np.array_equal(np.load(path)["features"], again)


@pytest.mark.parametrize("damage", ["a flipped bit", "another file's bytes"])
def test_a_cache_file_that_reads_back_as_other_numbers_is_recomputed(tmp_path, damage):
    # trusted as long as it loaded with the right shape: one flipped bit moved the scores, a copy of
    # the photos' features over the ground truth's made FID/ground truth 0.002, both without a word
    cache = FeatureCache(tmp_path, "extractor-key", say=lambda s: None)
    cache.get("truth", "images", lambda: np.arange(6.0).reshape(3, 2), shape=(3, 2))
    cache.get("photos", "images", lambda: np.ones((3, 2)), shape=(3, 2))
    path = cache.path("truth", "images")
    if damage == "a flipped bit":
        data = bytearray(path.read_bytes())
        at = data.index(np.float64(5.0).tobytes())  # the last number of the array, stored uncompressed
        data[at + 6] ^= 8
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(cache.path("photos", "images").read_bytes())
    said = []
    cache.say = said.append
    again = cache.get("truth", "images", lambda: np.arange(6.0).reshape(3, 2), shape=(3, 2))
    assert np.array_equal(again, np.arange(6.0).reshape(3, 2)), again
    assert "its bytes are not those it was written with" in said[0] or "does not read back" in said[0], said


def test_the_memorization_picture_shows_the_copies_first(data, monkeypatch):
    shown = {}
    real_draw = memorization.draw

    def spy(generated, paintings, distances, all_distances, path, **kw):
        shown.update(generated=generated, paintings=paintings, distances=distances)
        real_draw(generated, paintings, distances, all_distances, path, **kw)

    monkeypatch.setattr(memorization, "draw", spy)
    picture = data[0] / "memorization-copies.png"
    _evaluate(data, cache="cache-c", picture=picture)
    with Image.open(picture) as img:
        assert img.format == "PNG" and img.size[0] > 300
    assert len(shown["generated"]) == stage.SHOWN
    assert shown["distances"] == sorted(shown["distances"])
    # the copies come first, at distance zero, each beside the painting it copies ...
    assert shown["distances"][:COPIES] == pytest.approx([0.0] * COPIES, abs=1e-9)
    for gen, painting in zip(shown["generated"][:COPIES], shown["paintings"][:COPIES]):
        assert np.array_equal(gen, painting)
    # ... and no other image is shown beside its own painting
    for gen, painting in zip(shown["generated"][COPIES:], shown["paintings"][COPIES:]):
        assert np.abs(gen.astype(int) - painting.astype(int)).mean() > 10


def test_closest_orders_by_distance_and_skips_nan():
    assert memorization.closest(np.array([0.3, np.nan, 0.01, 0.2]), 3) == [2, 3, 0]


def test_fid_inception_without_weights_fails_before_writing_anything(data, tmp_path, monkeypatch):
    root, _ = data
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    params = tmp_path / "params.yaml"
    params.write_text(f"seed: {SEED}\nevaluate:\n  extractor: fid-inception\n  download: false\n")
    out = tmp_path / "evaluate.json"
    with pytest.raises(SystemExit) as e:
        stage.main(["--params", str(params), "--shards", str(root / "shards"), "--manifest",
                    str(root / "manifest.csv"), "--images", str(root / "generated"), "--generator", "unused",
                    "--out", str(out), "--memorization", str(tmp_path / "m.png"), "--features-cache",
                    str(tmp_path / "cache")])
    assert e.value.code == 2
    assert not out.exists() and not (tmp_path / "m.png").exists() and not (tmp_path / "cache").exists()


def test_offline_extractor_ranks_the_known_cases_on_the_sample():
    # untranslated photos worse than a colour transfer to the paintings' mean and spread, and that
    # worse than the ground-truth paintings (the perfect translation)
    n = 48
    paintings = sample.render_parallel(0, [sample.monet_index(i) for i in range(n)], "monet")
    photos = sample.render_parallel(0, [sample.photo_index(i) for i in range(n)], "photo")
    truth = sample.render_parallel(0, [sample.photo_index(i) for i in range(n)], "monet")
    p, m = photos.reshape(-1, 3).astype(float), paintings.reshape(-1, 3).astype(float)
    transfer = ((photos - p.mean(0)) / p.std(0) * m.std(0) + m.mean(0)).clip(0, 255).round().astype(np.uint8)
    extractor = offline_extractor(torch.from_numpy(paintings), 75, CPU)
    feats = {k: extract(extractor, torch.from_numpy(v), 16, CPU)
             for k, v in {"paintings": paintings, "photos": photos, "transfer": transfer, "truth": truth}.items()}
    scores = {k: fid(feats[k], feats["paintings"]) for k in ("photos", "transfer", "truth")}
    assert scores["photos"] > scores["transfer"] > scores["truth"], scores


def test_pair_l1_is_the_mean_pixel_error_on_a_0_to_1_scale():
    truth = torch.full((2, 4, 4, 3), 100, dtype=torch.uint8)
    got = stage.pair_l1(truth + 51, truth + 102, truth)
    assert got == {"pair_l1": pytest.approx(0.2), "pair_l1_identity": pytest.approx(0.4)}


@pytest.mark.parametrize("damage, needle", [
    (lambda path: path.write_bytes(path.read_bytes()[:300]), "a.jpg: generated image does not decode"),
    (lambda path: Image.new("RGB", (128, 128)).save(path, "JPEG"), "a.jpg: generated image is a JPEG 128x128 RGB; "
                                                                     "expected a 256x256 RGB JPEG"),
    (lambda path: path.unlink(), "a.jpg: generated image missing"),
    # scored as converted to RGB, where package refuses them: the score was of images not submitted
    (lambda path: Image.new("L", (256, 256)).save(path, "JPEG"), "a.jpg: generated image is a JPEG 256x256 L;"),
    (lambda path: Image.new("CMYK", (256, 256)).save(path, "JPEG"), "a.jpg: generated image is a JPEG 256x256 CMYK;"),
    (lambda path: Image.new("RGB", (256, 256)).save(path, "PNG"), "a.jpg: generated image is a PNG 256x256 RGB;"),
])
def test_a_damaged_generated_image_is_named(tmp_path, damage, needle):
    for name in ("a", "b"):
        Image.new("RGB", (256, 256), (10, 20, 30)).save(tmp_path / f"{name}.jpg")
    assert next(stage.read_jpegs(tmp_path, ["a", "b"], 2)).shape == (2, 256, 256, 3)
    damage(tmp_path / "a.jpg")
    with pytest.raises(DataError, match=needle):
        list(stage.read_jpegs(tmp_path, ["b", "a"], 1))


@pytest.mark.parametrize("threads", [1, 3])
def test_generated_images_come_in_the_order_of_their_names(tmp_path, threads):
    names = [f"img{i}" for i in range(11)]
    for i, name in enumerate(names):
        Image.new("RGB", (256, 256), (i * 20, 0, 0)).save(tmp_path / f"{name}.jpg", quality=95)
    order = names[::-1]
    batches = list(stage.read_jpegs(tmp_path, order, 2, threads))
    assert [len(b) for b in batches] == [2, 2, 2, 2, 2, 1]
    reds = torch.cat(batches)[:, 128, 128, 0].tolist()
    assert [round(r / 20) for r in reds] == [names.index(n) for n in order]


def test_photos_of_another_seed_are_refused():
    names = [sample.sample_name(SEED, "photo", i) for i in range(4)]
    stage.check_sample_names(names, SEED)
    with pytest.raises(DataError, match="do not match the embedded sample"):
        stage.check_sample_names(names, SEED + 1)


def test_the_metrics_file_holds_numbers_and_short_ids(data, tmp_path, monkeypatch):
    root, _ = data
    import pipeline.tracking as tracking  # no MLflow here: the row is tested end to end

    class NoRun:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(tracking, "open_run", lambda *a, **k: NoRun())
    monkeypatch.setattr(tracking, "log_metrics_file", lambda *a, **k: None)
    monkeypatch.setattr(tracking, "log_artifact", lambda *a, **k: None)
    monkeypatch.setattr(tracking, "log_tags", lambda *a, **k: None)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"seed": SEED, "evaluate": {"batch_size": 16, "baseline_images": 16,
                                                             "kid_subsets": 5}}))
    out = tmp_path / "evaluate.json"
    from pipeline import generator_file

    generator = tmp_path / "g.pt"  # names the row only, and there is none here; checked to be a generator
    config = generator_file.config_of(parse({"image_size": 32, "train": {"gen_filters": 4, "resnet_blocks": 1}}))
    generator_file.save(generator_file.build(config), config, generator)
    stage.main(["--params", str(params), "--shards", str(root / "shards"), "--manifest", str(root / "manifest.csv"),
                "--images", str(root / "generated"), "--generator", str(generator), "--out", str(out),
                "--memorization", str(tmp_path / "m.png"), "--features-cache", str(tmp_path / "cache")])
    metrics = json.loads(out.read_text())
    assert metrics["extractor"] == "offline"
    assert all(isinstance(v, (int, float)) for k, v in metrics.items() if k != "extractor")


def test_a_score_that_is_no_finite_number_is_one_line_and_no_metrics_file(data, tmp_path, monkeypatch, capsys):
    # features that overflow gave MiFID inf and KID nan, written as Infinity and NaN: not JSON, and
    # `dvc metrics show` listed them, with exit 0
    from pipeline import generator_file

    root, _ = data
    monkeypatch.setattr(stage, "mifid", lambda *a: {"mifid": float("inf"), "fid": float("nan")})
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"seed": SEED, "evaluate": {"batch_size": 16, "baseline_images": 16,
                                                             "kid_subsets": 5}}))
    generator = tmp_path / "g.pt"
    config = generator_file.config_of(parse({"image_size": 32, "train": {"gen_filters": 4, "resnet_blocks": 1}}))
    generator_file.save(generator_file.build(config), config, generator)
    out = tmp_path / "evaluate.json"
    with pytest.raises(SystemExit) as e:
        stage.main(["--params", str(params), "--shards", str(root / "shards"), "--manifest", str(root / "manifest.csv"),
                    "--images", str(root / "generated"), "--generator", str(generator), "--out", str(out),
                    "--memorization", str(tmp_path / "m.png"), "--features-cache", str(tmp_path / "cache")])
    assert e.value.code == 2 and not out.exists() and not (tmp_path / "m.png").exists()  # nor the picture
    assert capsys.readouterr().err.endswith("error: evaluate: mifid, fid came out inf, not a number to compare "
                                            "(features that overflow or tell no images apart?); no output was written\n")


def test_weights_that_tell_no_images_apart_are_one_line(data, tmp_path):
    # the right shapes, every weight 0: every image the same features, and a ZeroDivisionError
    # traceback (fid_vs_identity = 0 / 0) after all of the work
    from pipeline.errors import ScoreError
    from pipeline.fid_inception import build_fid_inception

    weights = tmp_path / "zeros.pth"
    torch.save({k: torch.ones_like(v) if k.endswith("running_var") else torch.zeros_like(v)
                for k, v in build_fid_inception().state_dict().items()}, weights)
    params = parse({"seed": SEED, "ingest": {"sample_photos": 24, "sample_paintings": 12},
                    "evaluate": {"extractor": "fid-inception", "weights": str(weights), "batch_size": 16,
                                 "baseline_images": 16, "kid_subsets": 5}})
    with pytest.raises(ScoreError, match="the extractor gives all 12 paintings the same features"):
        _evaluate(data, params=params, cache="cache-zeros", say=lambda s: None)


def test_features_every_core_computed_are_not_taken_for_another_core_count(data):
    # above 128 px each batch runs on every core, and its features round by the core count: cached
    # by a 2-core run, they made a 1-core run's scores (a sweep with OMP_NUM_THREADS=1) the 2-core ones
    params = parse({"seed": SEED, "ingest": {"sample_photos": 24, "sample_paintings": 12},
                    "evaluate": {"batch_size": 16, "baseline_images": 16, "kid_subsets": 5, "offline_image_size": 160}})
    before, said = torch.get_num_threads(), {}
    try:
        for cores in (2, 1):
            torch.set_num_threads(cores)
            said[cores] = []
            _evaluate(data, params=params, cache="cache-cores", say=said[cores].append)
    finally:
        torch.set_num_threads(before)
    assert not any("paintings features from the cache" in line for line in said[1]), said[1]
    # the BatchNorm statistics are computed on one thread whatever the cores: those are shared
    assert any("BatchNorm statistics from the cache" in line for line in said[1]), said[1]


def test_photos_that_are_the_paintings_leave_out_the_identity_ratio(data, monkeypatch):
    # a local dataset with the same images as photos and paintings: the untranslated photos score
    # FID 0, and fid_vs_identity was a ZeroDivisionError traceback after the whole evaluation
    root, _ = data
    manifest = stage.shards.read_manifest(root / "manifest.csv")
    _, paintings = stage.shards.load_domain(root / "shards", manifest, "monet")
    monkeypatch.setattr(stage, "first_photos", lambda *a: paintings.clone())
    said = []
    params = parse({"seed": SEED, "ingest": {"sample_photos": 24, "sample_paintings": 12},
                    "evaluate": {"batch_size": 16, "baseline_images": 12, "kid_subsets": 5}})
    result, _ = _evaluate(data, params=params, cache="cache-same", say=said.append)
    assert result["fid_identity"] == 0 and "fid_vs_identity" not in result
    assert result["fid_subset"] > 0 and np.isfinite(result["fid_vs_ground_truth"])
    assert any("fid_vs_identity has no scale and is left out" in s for s in said)
