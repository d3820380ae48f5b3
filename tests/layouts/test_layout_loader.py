"""Loader/validator tests: every catalog entry loads with no dims, dims override, and each malformed spec gives
exactly one documented line naming the file, the field path and the problem."""

from __future__ import annotations

import copy

import pytest
import yaml

from kvport.errors import UserError
from kvport.layouts import LayoutError, catalog_names, load_file, load_layout
from kvport.layouts.loader import SPECS_DIR

BASE = {
    "name": "t",
    "dims": {"layers": 2, "heads": 2, "head_dim": 16, "block_size": 64},
    "groups": [
        {
            "kind": "attention",
            "layers": "$layers",
            "tokens_per_block": "$block_size",
            "structure": "per_layer",
            "axes": "KBNHC",
            "heads": "$heads",
            "content": {"elements": "$head_dim"},
            "dtype": "bfloat16",
        }
    ],
}


def _load(tmp_path, doc, **dims):
    path = tmp_path / "bad.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return load_file(path, label="bad.yaml", dims=dims)


def _mutate(**changes):
    doc = copy.deepcopy(BASE)
    group = doc["groups"][0]
    for key, value in changes.items():
        if value is None:
            group.pop(key)
        else:
            group[key] = value
    return doc


def test_catalog_has_the_issue_entries():
    names = set(catalog_names())
    for required in (
        "vllm-flash-nhd",
        "vllm-flash-hnd",
        "vllm-flashinfer-nhd",
        "vllm-flashinfer-hnd",
        "vllm-triton-nhd",
        "vllm-packed-nhd",
        "vllm-packed-hnd",
        "vllm-cross-layer",
        "vllm-mla",
        "vllm-cpu-attn",
        "vllm-std-lbnhc",
        "vllm-std-lbhnc",
        "vllm-std-blnhc",
        "vllm-std-blhnc",
        "sglang-mha",
        "sglang-mla",
        "sglang-host-layer-first",
        "sglang-host-page-first",
        "sglang-host-page-first-direct",
        "trtllm-pool",
        "deepseek-v4",
        "hybrid-swa",
    ):
        assert required in names


@pytest.mark.parametrize("name", catalog_names())
def test_catalog_entry_loads_with_defaults_and_cites_its_source(name):
    spec = load_layout(name)
    assert spec.name == name
    assert spec.source
    text = (SPECS_DIR / f"{name}.yaml").read_text()
    assert text.startswith("#"), "each catalog file opens with a comment citing the engine/version it mirrors"
    assert spec.bytes_per_token() > 0
    assert spec.groups and all(g.tokens_per_block > 0 for g in spec.groups)


def test_dims_override_family_defaults():
    small = load_layout("vllm-flash-nhd")
    big = load_layout("vllm-flash-nhd", layers=32, kv_heads=8, head_dim=128, block_size="16")
    assert small.bytes_per_token() == 2 * 2 * 2 * 16 * 2
    assert big.bytes_per_token() == 32 * 2 * 8 * 128 * 2
    assert big.groups[0].layers == tuple(range(32))
    assert small.canonical_fingerprint() != big.canonical_fingerprint()


def test_unknown_dim_override_is_one_line():
    with pytest.raises(LayoutError) as err:
        load_layout("vllm-flash-nhd", kv_head=4)
    assert str(err.value) == (
        "vllm-flash-nhd.yaml: dims: unknown dim 'kv_head' (dims: block_size, dtype, head_dim, kv_heads, layers)"
    )


@pytest.mark.parametrize("text", ["--3", "2\u00b2"])
def test_a_dim_text_that_int_refuses_is_one_line(text):
    with pytest.raises(LayoutError) as err:
        load_layout("vllm-flash-nhd", layers=text)
    assert str(err.value).startswith("vllm-flash-nhd.yaml: groups[0].layers: expected a layer count")


def test_dim_text_that_is_an_integer_becomes_one():
    assert load_layout("vllm-flash-nhd", layers="02", kv_heads="3").groups[0].heads == 3


def test_torch_dtype_objects_are_accepted_as_dims():
    torch = pytest.importorskip("torch")
    assert load_layout("vllm-flash-nhd", dtype=torch.float16).groups[0].dtype == "float16"


def test_unknown_layout_name_lists_the_catalog():
    with pytest.raises(LayoutError, match=r"^unknown layout 'nope'; catalog: deepseek-v4, "):
        load_layout("nope")


def test_layout_error_is_a_user_error():
    assert issubclass(LayoutError, UserError)


def test_path_loads_like_a_catalog_name():
    spec = load_layout(str(SPECS_DIR / "trtllm-pool.yaml"), layers=4)
    assert spec.groups[0].layers == (0, 1, 2, 3)


CASES = [
    (_mutate(axes=None), "bad.yaml: groups[0]: missing field 'axes'"),
    (_mutate(kind=None), "bad.yaml: groups[0]: missing field 'kind'"),
    ({k: v for k, v in BASE.items() if k != "name"}, "bad.yaml: top level: missing field 'name'"),
    ({**BASE, "groups": []}, "bad.yaml: groups: expected a non-empty list, got a list"),
    (_mutate(heads="two"), "bad.yaml: groups[0].heads: expected an integer, got a string"),
    (_mutate(tokens_per_block=[16]), "bad.yaml: groups[0].tokens_per_block: expected an integer, got a list"),
    (_mutate(heads=True), "bad.yaml: groups[0].heads: expected an integer, got bool True"),
    (_mutate(heads=0), "bad.yaml: groups[0].heads: must be > 0, got 0"),
    (_mutate(tokens_per_block=-16), "bad.yaml: groups[0].tokens_per_block: must be > 0, got -16"),
    (_mutate(content={"elements": 0}), "bad.yaml: groups[0].content.elements: must be > 0, got 0"),
    (_mutate(tokens_per_slot=3), "bad.yaml: groups[0].tokens_per_slot: 3 does not divide tokens_per_block 64"),
    (
        _mutate(axes="KBXHC"),
        "bad.yaml: groups[0].axes: unknown axis letter 'X' in 'KBXHC'; letters are L B K H D N C",
    ),
    (_mutate(axes="KBNNC"), "bad.yaml: groups[0].axes: axis 'N' repeated in 'KBNNC'"),
    (_mutate(axes="KB(NH"), "bad.yaml: groups[0].axes: unbalanced or empty parentheses in 'KB(NH'"),
    (
        _mutate(axes="KBNCH"),
        "bad.yaml: groups[0].axes: 'KBNCH': C (row content) must be the innermost axis",
    ),
    (
        _mutate(axes="KBHC"),
        "bad.yaml: groups[0].axes: 'KBHC' lacks axis 'N' (B block, N slot and C content are required)",
    ),
    (
        _mutate(axes="BNHC"),
        "bad.yaml: groups[0].axes: 'BNHC': needs a K axis (2 components ['k', 'v'])",
    ),
    (
        _mutate(axes="LKBNHC"),
        "bad.yaml: groups[0].axes: 'LKBNHC': structure per_layer must not have an L axis",
    ),
    (
        _mutate(kind="mystery"),
        "bad.yaml: groups[0].kind: 'mystery' is not one of attention, mla, indexer, state, opaque",
    ),
    (
        _mutate(dtype="bf16"),
        "bad.yaml: groups[0].dtype: unknown dtype 'bf16' (dtypes: bfloat16, float16, float32, "
        "float64, float8_e4m3fn, float8_e5m2, uint8, int8, int16, int32)",
    ),
    (
        _mutate(head_dim=16),
        "bad.yaml: groups[0]: unknown field 'head_dim' (fields: axes, components, content, dtype, "
        "hands, heads, kind, layers, name, padded_content, planes, shape_order, strides, structure, tokens_per_block, "
        "tokens_per_slot, vector)",
    ),
    (_mutate(content=16), "bad.yaml: groups[0].content: expected {elements: N} or {bytes: N}, got int 16"),
    (_mutate(content={"bytes": 33}), "bad.yaml: groups[0].content.bytes: 33 is not a multiple of the 2-byte dtype"),
    (
        _mutate(strides={"N": {"bytes": 32}}),
        "bad.yaml: groups[0].strides.N: 32 bytes overlaps the 64-byte extent of the axes inside it",
    ),
    (
        _mutate(strides={"H": {"elements": 8}}),
        "bad.yaml: groups[0].strides.H: 16 bytes overlaps the 32-byte extent of the axes inside it",
    ),
    (_mutate(strides={"Q": {"bytes": 64}}), "bad.yaml: groups[0].strides.Q: no axis 'Q' in 'KBNHC'"),
    (
        _mutate(strides={"K": {"bytes": 4096}}),
        "bad.yaml: groups[0].strides.K: only B and the axes inside a block take explicit strides",
    ),
    (
        _mutate(padded_content={"elements": 8}),
        "bad.yaml: groups[0].padded_content: 8 elements is less than content 16",
    ),
    (
        _mutate(heads="$kv_heads"),
        "bad.yaml: groups[0].heads: unknown dim 'kv_heads' in '$kv_heads' (dims: block_size, head_dim, heads, layers)",
    ),
    (
        _mutate(heads="$heads ** 2"),
        "bad.yaml: groups[0].heads: only integers, $dims and + - * // are allowed in '$heads ** 2'",
    ),
    (_mutate(layers=[0, 1, 1]), "bad.yaml: groups[0].layers: layer indices repeat: [0, 1, 1]"),
    (_mutate(shape_order="KBNC"), "bad.yaml: groups[0].shape_order: 'KBNC' must list the same dims as axes 'KBNHC'"),
    (
        _mutate(hands="layers"),
        "bad.yaml: groups[0].hands: only a shared structure can be handed as a buffer or as per-layer views",
    ),
    (
        _mutate(dtype=["bfloat16"]),
        "bad.yaml: groups[0].dtype: unknown dtype ['bfloat16'] (dtypes: bfloat16, float16, "
        "float32, float64, float8_e4m3fn, float8_e5m2, uint8, int8, int16, int32)",
    ),
    (
        _mutate(structure="kv_lists", axes="BNHC", planes=[{"name": "a", "dtype": "uint8", "content": {"bytes": 4}}]),
        "bad.yaml: groups[0].planes: planes divide one tensor's block; kv_lists hand K and V as separate tensors",
    ),
    ("name: [unclosed\n", "bad.yaml: invalid YAML at line 2: expected ',' or ']', but got '<stream end>'"),
    ("- just\n- a list\n", "bad.yaml: expected a mapping at the top level, got a list"),
    (
        "name: t\ndims: {layers: 2, 3: 1}\ngroups:\n  - {kind: mla, layers: $layers, tokens_per_block: 2,\n"
        "     structure: per_layer, axes: BNC, dtype: uint8, content: {bytes: 3}}\n",
        "bad.yaml: dims: 3 is not a name that $ can refer to (letters, digits, _)",
    ),
    (
        {**BASE, "dims": {**BASE["dims"], "head-dim": 16}},
        "bad.yaml: dims: 'head-dim' is not a name that $ can refer to (letters, digits, _)",
    ),
]


@pytest.mark.parametrize(("doc", "message"), CASES, ids=[m.split(": ", 2)[-1][:40] for _, m in CASES])
def test_malformed_spec_gives_the_one_line_error(tmp_path, doc, message):
    with pytest.raises(LayoutError) as err:
        _load(tmp_path, doc)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"name: t\xff\n")
    with pytest.raises(LayoutError) as err:
        load_file(path, label="bad.yaml")
    assert str(err.value) == "bad.yaml: cannot read: not UTF-8 text (byte 7)"


def test_issue_example_message_for_a_compressed_group(tmp_path):
    doc = yaml.safe_load((SPECS_DIR / "deepseek-v4.yaml").read_text())
    doc["groups"][2]["tokens_per_slot"] = 3
    path = tmp_path / "deepseek.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(LayoutError) as err:
        load_file(path, label="deepseek.yaml")
    assert str(err.value) == "deepseek.yaml: groups[2].tokens_per_slot: 3 does not divide tokens_per_block 64"


def test_planes_must_fit_in_the_block(tmp_path):
    doc = yaml.safe_load((SPECS_DIR / "deepseek-v4.yaml").read_text())
    doc["groups"][2]["planes"][1]["content"] = {"elements": 2}
    with pytest.raises(LayoutError) as err:
        _load(tmp_path, doc)
    assert str(err.value) == "bad.yaml: groups[2].planes: planes need 2176 bytes per block, the block holds 2112"


def test_valid_base_document_loads(tmp_path):
    spec = _load(tmp_path, BASE)
    assert spec.groups[0].components == ("k", "v")
    assert spec.groups[0].slots_per_block == 64
    assert spec.bytes_per_token() == 2 * 2 * 2 * 16 * 2
