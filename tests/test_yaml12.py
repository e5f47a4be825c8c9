"""params.yaml is read as DVC reads it (ruamel.yaml, YAML 1.2): checked scalar by scalar against
ruamel.yaml itself, and through `load` for the values `dvc exp run -S` writes."""
import itertools
import math
import random

import pytest
from ruamel.yaml import YAML

from pipeline import yaml12
from pipeline.params import ParamsError, load


def _resolve(load_text, scalar: str):
    try:
        value = load_text(f"v: {scalar}\n")["v"]
    except Exception:  # both loaders must refuse the same texts
        return "error", None
    return type(value).__name__, "nan" if isinstance(value, float) and math.isnan(value) else value


def _corpus() -> list[str]:
    every_short = ("".join(t) for n in range(1, 5) for t in itertools.product("01.-+e_", repeat=n))
    rng, alphabet = random.Random(0), "0179._-+eEoxbBIinfaANTtruFlsyO"
    drawn = ("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(6000))
    written = ["1e-05", "1e+3", "2.0e-4", ".5", "-.5", "1.", "1_000", "0o17", "017", "0x1F", "0b101", ".inf",
               "-.Inf", ".NaN", "yes", "no", "on", "off", "y", "True", "FALSE", "tRue", "1:30", "~", "null"]
    return sorted(set(itertools.chain(every_short, drawn, written)))


def test_every_scalar_resolves_as_dvc_reads_it():
    dvc_reader = YAML(typ="safe")  # what dvc/utils/serialize/_yaml.py parses params.yaml with
    both = ((s, _resolve(dvc_reader.load, s), _resolve(yaml12.loads, s)) for s in _corpus())
    differ = [(s, theirs, ours) for s, theirs, ours in both if theirs != ours]
    assert not differ, differ[:10]


def test_anchors_and_merge_keys_read_as_dvc_reads_them():
    # `<<` was refused as "not valid YAML" (the duplicate-key check built the merge key itself)
    text = ("generate:\n  <<: &common {batch_size: 16}\n  jpeg_quality: 95\n"
            "evaluate:\n  <<: *common\n  batch_size: 8\n  kid_subsets: 10\n")
    assert yaml12.loads(text) == YAML(typ="safe").load(text) == {
        "generate": {"batch_size": 16, "jpeg_quality": 95}, "evaluate": {"batch_size": 8, "kid_subsets": 10}}
    with pytest.raises(Exception, match="duplicate key 'b'"):  # a key given twice outright is still refused
        yaml12.loads("a:\n  <<: {b: 1}\n  b: 2\n  b: 3\n")
    # a mapping merged into another is flattened there first: its own `b` then came after a merged
    # one, and read as given twice; and merges from a list, the later keys winning
    for text in ("outer:\n  inner: &x\n    <<: {b: 1}\n    b: 2\nc:\n  <<: *x\n",
                 "outer:\n  inner: &x\n    <<: {b: 1}\n    b: 2\nc:\n  <<: *x\nd:\n  <<: *x\n  e: 3\n",
                 "a: &a {x: 1}\nb: &b {y: 2, x: 5}\nc:\n  <<: [*a, *b]\n  y: 3\n", "'<<': 1\nx: 2\n"):
        assert yaml12.loads(text) == YAML(typ="safe").load(text), text
    with pytest.raises(Exception, match="duplicate key <<"):  # two merges in one mapping: refused, as by DVC
        yaml12.loads("a: &a {x: 1}\nb: &b {y: 2}\nc:\n  <<: *a\n  <<: *b\n")


@pytest.mark.parametrize("text, value", [
    ("1e-05", 1e-5), ("1e+3", 1000.0), ("2.0e-4", 2e-4), (".5", 0.5), ("1", 1.0), ("3E-4", 3e-4)])
def test_values_dvc_writes_for_a_float_param_load(tmp_path, text, value):
    (tmp_path / "params.yaml").write_text(f"lambda_cycle: {text}\n")
    assert load(tmp_path / "params.yaml").lambda_cycle == value


@pytest.mark.parametrize("text, needle", [
    ("train:\n  lr: 1e-5x\n", "'train.lr' must be float, got '1e-5x'"),
    ("train:\n  compile: yes\n", "'train.compile' must be true or false, got 'yes'"),  # YAML 1.2: a string
    ("train:\n  epochs: 1.0e+1\n", "'train.epochs' must be int, got 10.0"),
])
def test_truly_wrong_values_still_name_the_key(tmp_path, text, needle):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=needle.replace("+", r"\+").replace(".", r"\.")):
        load(tmp_path / "params.yaml")
