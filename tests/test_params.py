import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from pipeline.params import Params, ParamsError, flatten, load, parse


def test_repo_params_load_and_lambda_cycle_is_top_level(repo_root):
    p = load(repo_root / "params.yaml")
    assert isinstance(p, Params)
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    assert "lambda_cycle" in raw and p.lambda_cycle == float(raw["lambda_cycle"])


def test_every_field_appears_in_params_yaml(repo_root):
    # params.yaml is the single source of truth: no default hidden only in code
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    flat_yaml = {f"{s}.{k}" if isinstance(v, dict) else s
                 for s, v in raw.items() for k in (v if isinstance(v, dict) else [None])}
    assert flat_yaml == set(flatten(Params()))


def test_whole_numbers_in_params_yaml_are_written_without_a_point(repo_root):
    # DVC keys its run-cache by the values as written: with `lambda_cycle: 10.0` committed, the
    # README's `dvc exp run -S lambda_cycle=10` (DVC writes 10) trained the committed recipe again
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    written = {f"{s}.{k}": v for s, section in raw.items() if isinstance(section, dict) for k, v in section.items()}
    written.update({s: v for s, v in raw.items() if not isinstance(v, dict)})
    assert [k for k, v in written.items() if isinstance(v, float) and v.is_integer()] == []


def test_a_key_left_out_of_params_yaml_takes_the_committed_value(repo_root):
    # a stage run directly with a params file that lacks a key (an older one, a hand-written one)
    # must train the recipe params.yaml describes, not another one hidden in code
    committed = flatten(load(repo_root / "params.yaml"))
    defaults = flatten(parse({}))
    assert {k: (defaults[k], committed[k]) for k in committed if defaults[k] != committed[k]} == {}


@pytest.mark.parametrize("raw, needle", [
    ({"lambda_cycel": 5}, "unknown key 'lambda_cycel'"),
    ({"train": {"epohcs": 3}}, "unknown key 'train.epohcs'"),
    ({"lambda_cycle": "five"}, "'lambda_cycle' must be float"),
    ({"train": {"epochs": 2.5}}, "'train.epochs' must be int"),
    ({"train": {"epochs": True}}, "'train.epochs' must be int"),
    ({"train": {"compile": 1}}, "'train.compile' must be true or false, got 1 (int)"),
    ({"train": {"generator": "vit"}}, "'train.generator' is 'vit'"),
    ({"image_size": 100}, "'image_size' must be a multiple of 32"),
    ({"image_size": 96, "train": {"generator": "unet"}}, "'image_size' is 96; the unet generator halves it"),
    ({"train": 3}, "'train' must be a mapping"),
    ({"package": {"min_images": 10, "max_images": 5}}, "package.min_images"),
    ({"ingest": {"sample_photos": 7029}}, "'ingest.sample_photos' must be in [2, 7028]"),
    ({"ingest": {"sample_paintings": 301}}, "'ingest.sample_paintings' must be in [2, 300]"),
    ({"ingest": {"sample_paintings": 1}}, "'ingest.sample_paintings' must be in [2, 300]"),
    ({"seed": -1}, "'seed' must be in [0, 2**32 - 1]"),  # NumPy refused both with a traceback
    ({"seed": 2**32}, "'seed' must be in [0, 2**32 - 1]"),
    ({"evaluate": {"offline_image_size": 100_000}}, "'evaluate.offline_image_size' must be in [75, 299]"),
    ({"lambda_cycle": float("inf")}, "'lambda_cycle' must be a finite number, got inf"),  # YAML's .inf
    ({"train": {"lr": float("nan")}}, "'train.lr' must be a finite number, got nan"),
    ({"lambda_cycle": 10**400}, "'lambda_cycle' must be a finite number, got inf"),  # was an OverflowError
    ({"train": {"lr": 1e39}}, "'train.lr' must be in (0, 1]"),  # overflowed Adam's float32 step: a traceback
    ({"train": {"lr": 0}}, "'train.lr' must be in (0, 1]"),
    ({"lr_typo": 1, 1: 2}, "unknown key '1'"),  # keys of two types: sorting them was a TypeError
    # beyond 64 bits each failed late with torch's traceback ("Overflow when unpacking long long")
    ({"train": {"batch_size": 10**20}}, "'train.batch_size' must be a whole number from -2**63 to 2**63 - 1 (torch"),
    ({"evaluate": {"kid_subsets": 2**63}}, "'evaluate.kid_subsets' must be a whole number from -2**63 to 2**63 - 1"),
    ({"seed": -2**63 - 1}, "'seed' must be a whole number from -2**63 to 2**63 - 1"),
])
def test_bad_params_are_one_clear_error(raw, needle):
    with pytest.raises(ParamsError) as e:
        parse(raw)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_int_accepted_for_float_and_result_is_frozen():
    p = parse({"lambda_cycle": 5})  # what `dvc exp run -S lambda_cycle=5` writes
    assert p.lambda_cycle == 5.0 and isinstance(p.lambda_cycle, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.lambda_cycle = 1.0


def test_a_params_file_other_than_params_yaml_is_named_in_its_errors(tmp_path, monkeypatch):
    # `python -m pipeline.train --params other.yaml`: its errors named params.yaml, or no file
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text("- 1\n")
    with pytest.raises(ParamsError, match=f"^params: '{re.escape(str(other))}' must be a mapping, got list$"):
        load(other)
    other.write_text("image_size: 33\n")
    with pytest.raises(ParamsError, match=rf"^params: 'image_size' must be a multiple of 32 .* \(in {re.escape(str(other))}\)$"):
        load(other)
    Path("p").write_text("image_size: 33\n")  # a name every message holds: named all the same
    with pytest.raises(ParamsError, match=r"^params: 'image_size' must be a multiple of 32 .* \(in p\)$"):
        load("p")
    Path("params.yaml").write_text("image_size: 33\n")
    with pytest.raises(ParamsError, match="^params: 'image_size' must be a multiple of 32 between 32 and 256$"):
        load("params.yaml")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load(bad)


@pytest.mark.parametrize("text, needle", [
    (b"seed: 0 # caf\xe9\n", r"is not UTF-8 text \(byte 13: b'\\xe9'\)"),
    (b"seed: 0\n oops: 1\n", r"is not valid YAML: mapping values are not allowed here \(line 2, column 6\)"),
    (b"seed:\t0\n", r"is not valid YAML: found character '\\t' that cannot start any token \(line 1, column 6\)"),
    (b"seed: 0\nseed: 1\n", r"is not valid YAML: found duplicate key 'seed' \(line 2, column 1\)"),  # as DVC says
    (b"seed: 0x_\n", r"is not valid YAML: cannot read '0x_' as an integer \(line 1, column 7\)"),  # DVC refuses it too
    (None, r"is a folder, not a params file"),
])
def test_a_params_file_that_cannot_be_read_is_one_line_saying_where(tmp_path, text, needle):
    path = tmp_path / "params.yaml"
    path.mkdir() if text is None else path.write_bytes(text)
    with pytest.raises(ParamsError, match=f"^params: {re.escape(str(path))} {needle}$"):
        load(path)


@pytest.mark.parametrize("generator", ["resnet", "unet"])
def test_every_image_size_the_params_accept_goes_through_the_generator(generator):
    """A size the params take must not fail later, in training, as a shape mismatch."""
    import torch

    from pipeline import generator_file
    accepted = []
    for size in range(8, 257, 8):
        try:
            p = parse({"image_size": size, "train": {"generator": generator, "gen_filters": 2}})
        except ParamsError:
            continue
        accepted.append(size)
        net = generator_file.build(generator_file.config_of(p))
        with torch.no_grad():
            assert net(torch.zeros(1, 3, size, size)).shape == (1, 3, size, size), size
    assert accepted == ([32, 64, 128, 256] if generator == "unet" else list(range(32, 257, 32)))
