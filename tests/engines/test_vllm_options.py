"""The vLLM connector's kv_connector_extra_config checked as a whole, without vLLM: one line per problem, naming
the adapter keys and the cache keys."""

from __future__ import annotations

import pytest

from kvport.engines.vllm_options import ADAPTER_KEYS, cache_keys, check_extra_config, required_layout
from kvport.errors import UserError


def test_a_good_config_splits_into_options_overrides_and_the_cache_config(tmp_path):
    options, overrides, config = check_extra_config(
        {"l2_path": str(tmp_path), "chunk_tokens": 512, "namespace": "llama@v3", "stats_dir": str(tmp_path / "s")}
    )
    assert options == {"namespace": "llama@v3", "stats_dir": str(tmp_path / "s")}
    assert overrides == {"l2_path": str(tmp_path), "chunk_tokens": 512}
    assert config.chunk_tokens == 512 and config.l2_path == str(tmp_path)
    assert check_extra_config(None)[0] == {}


def test_an_unknown_key_lists_the_adapter_and_the_cache_keys():
    with pytest.raises(UserError) as err:
        check_extra_config({"l2_pth": "/tmp/x"})
    message = str(err.value)
    assert message.startswith("kv_connector_extra_config: unknown key 'l2_pth' (adapter keys: config, layout, ")
    assert all(key in message for key in ADAPTER_KEYS) and all(key in message for key in cache_keys())
    assert "\n" not in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"namespace": ""}, "namespace='', expected a non-empty string"),
        ({"stats_dir": 3}, "stats_dir=3, expected a non-empty string"),
        ({"debug_random_load": "yes"}, "debug_random_load='yes', expected true or false"),
        ({"layout": "no-such-layout"}, "layout='no-such-layout'"),
        ({"chunk_tokens": -1}, "chunk_tokens"),
        ({"config": "/nonexistent/kvport.yaml"}, "/nonexistent/kvport.yaml"),
        ({"kv_cache_layout": "BNLHC"}, "kv_cache_layout='BNLHC', expected one of LBNHC, LBHNC,"),
        ({"whole_blocks": True, "kv_cache_layout": "NHD"}, "whole_blocks needs a block-outer kv_cache_layout"),
    ],
)
def test_bad_values_are_one_line(extra, expected):
    with pytest.raises(UserError) as err:
        check_extra_config(extra)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_not_an_object_is_refused():
    with pytest.raises(UserError, match="expected a JSON object, got list"):
        check_extra_config(["l2_path"])


@pytest.mark.parametrize(
    ("extra", "layout"),
    [
        ({}, None),  # vLLM picks
        ({"kv_cache_layout": "HND"}, "HND"),
        ({"whole_blocks": True}, "BLNHC"),  # block-outer, NHD inside a block: flash-attn's own order
        ({"whole_blocks": True, "kv_cache_layout": "BLHNC"}, "BLHNC"),
    ],
)
def test_the_layout_asked_of_vllm(extra, layout):
    assert required_layout(check_extra_config(extra)[0]) == layout
