"""YAML read the way DVC reads it: YAML 1.2 scalars (DVC parses and writes params.yaml with
ruamel.yaml's 1.2 loader), on PyYAML, so that the GPU bench needs no more than PyYAML.

PyYAML implements YAML 1.1, where `1e-05` (what `dvc exp run -S train.lr=1e-5` writes) is a
string, `yes`/`on` are booleans and `010` is octal. Here numbers and booleans resolve as DVC's
loader resolves them: `1e-05`, `1e+3`, `.5`, `-.5` are floats; only true/false (three casings)
are booleans; `010` is ten; `0o10`, `0x1F` and `0b101` keep their bases; `_` between digits is
allowed. Everything else (null, dates, strings) is PyYAML's as before.
tests/test_yaml12.py checks every scalar of a generated corpus against ruamel.yaml itself.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import yaml

BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
FLOAT = re.compile(r"""^(?:
     [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?  # 1.  1.5  1.5e-3
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+               # 1e-05  1E3
    |[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?              # .5  -.5  .5e+3 (a signed exponent only)
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
INT = re.compile(r"""^(?:
     [-+]?0b[01_]+
    |[-+]?0x[0-9a-fA-F_]+
    |[-+]?0o[0-7_]+
    |[-+]?[0-9_]+)$""", re.X)
BOOL_TAG, FLOAT_TAG, INT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:int"
MERGE_TAG = "tag:yaml.org,2002:merge"


class Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans, integers and floats."""

    def __init__(self, stream):
        super().__init__(stream)
        self.merged_pairs: dict[int, int] = {}  # id(mapping node): how many of its pairs `<<` merged in


_MERGE = object()  # the key `<<` stands for in the duplicate check


# drop the 1.1 rules for these three tags (they live in a per-first-character table), add 1.2's
Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in rules if tag not in (BOOL_TAG, FLOAT_TAG, INT_TAG)]
    for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver(BOOL_TAG, BOOL, list("tTfF"))
Loader.add_implicit_resolver(FLOAT_TAG, FLOAT, list("-+0123456789."))
Loader.add_implicit_resolver(INT_TAG, INT, list("-+0123456789"))


def _construct_int(loader: Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    base = {"0b": 2, "0x": 16, "0o": 8}.get(digits[:2].lower(), 10)
    try:
        return sign * int(digits[2:] if base != 10 else digits, base)
    except ValueError:  # `0x_`: the 1.2 pattern lets underscores stand for every digit
        raise yaml.constructor.ConstructorError(None, None, f"cannot read {loader.construct_scalar(node)!r} "
                                                f"as an integer", node.start_mark) from None


def _construct_float(loader: Loader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).replace("_", "").lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    if text == ".nan":
        return math.nan
    return float(text)


def _construct_mapping(loader: Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are unique, as YAML 1.2 (and DVC's reader) requires: PyYAML alone
    keeps the last of two `seed:` lines without a word. Merge keys (`<<: *anchor`) merge, as in DVC."""
    seen: dict[object, yaml.Node] = {}
    # the pairs `<<: *defaults` merged in: SafeLoader puts them first, and may have done so already
    # (a mapping merged into another is flattened there first); their keys may be given again
    for key_node, _ in node.value[loader.merged_pairs.get(id(node), 0):]:
        # `<<` given twice in one mapping is a duplicate too, as in DVC's reader
        key = _MERGE if key_node.tag == MERGE_TAG else loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # SafeLoader's own construct_mapping names an unhashable key
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {'<<' if key is _MERGE else repr(key)}", key_node.start_mark)
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


def _flatten_mapping(loader: Loader, node: yaml.MappingNode) -> None:
    """SafeLoader's merge of `<<` pairs, counting the pairs it puts before the mapping's own (once:
    a mapping merged into two others is flattened again, with nothing left to merge)."""
    own = sum(key.tag != MERGE_TAG for key, _ in node.value)
    merges = own < len(node.value)
    yaml.SafeLoader.flatten_mapping(loader, node)
    if merges:
        loader.merged_pairs[id(node)] = len(node.value) - own


Loader.construct_mapping = _construct_mapping
Loader.flatten_mapping = _flatten_mapping
Loader.add_constructor(INT_TAG, _construct_int)
Loader.add_constructor(FLOAT_TAG, _construct_float)
Loader.add_constructor(BOOL_TAG, lambda loader, node: loader.construct_scalar(node).lower() == "true")


def one_line(e: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what is wrong and where (its own text spans several)."""
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def loads(text: str) -> object:
    return yaml.load(text, Loader=Loader)


def read(path: str | Path) -> object:
    return loads(Path(path).read_text())
