"""The key namespace format shared by every engine adapter (kvport.engines.key_namespace)."""

from __future__ import annotations

import json

from kvport.engines.key_namespace import FORMAT, layer_span, namespace_for


def test_namespace_separates_models_dtypes_shards_stages_weights_and_layouts() -> None:
    a = namespace_for("m", None, "bfloat16", 0, 1)
    others = [
        namespace_for("m2", None, "bfloat16", 0, 1),
        namespace_for("m", None, "float16", 0, 1),
        namespace_for("m", None, "bfloat16", 1, 2),
        namespace_for("m", None, "bfloat16", 0, 2),
        namespace_for("m", "v2", "bfloat16", 0, 1),
        namespace_for("m", None, "bfloat16", 0, 1, weights="content:aa"),
        namespace_for("m", None, "bfloat16", 0, 1, config="bb"),
        namespace_for("m", None, "bfloat16", 0, 1, layout="fp1"),
        namespace_for("m", None, "bfloat16", 0, 1, pp_rank=1, pp_world=2),
        namespace_for("m", None, "bfloat16", 0, 1, layers="16-31"),
        namespace_for("m", None, "bfloat16", 0, 1, base="shared"),
    ]
    assert len({a, *others}) == len(others) + 1
    assert json.loads(namespace_for("m", None, base="shared"))["name"] == "shared"
    # Unambiguous: moving separators between fields gives another namespace (the collision).
    assert namespace_for("org/a:b", None) != namespace_for("org/a", "b:")
    assert namespace_for("a|kv=x", None, "y") != namespace_for("a", None, "x|kv=y")


def test_namespace_names_its_format_not_an_engine() -> None:
    fields = json.loads(namespace_for("m", None, "bfloat16", 0, 1, layout="fp", layers="0-3"))
    assert fields["format"] == FORMAT and "engine" not in fields
    order = ["format", "model", "revision", "weights", "config", "kv_dtype", "layout", "tp", "pp", "layers"]
    assert list(fields) == order


def test_layer_span_joins_consecutive_indices() -> None:
    assert layer_span(range(16)) == "0-15"
    assert layer_span([8, 9, 10, 11, 0, 1, 2, 3]) == "0-3,8-11"
    assert layer_span([5]) == "5"
    assert layer_span([3, 3, 4]) == "3-4"
    assert layer_span([]) == ""
