"""The tier registry without any server or client library: tier URLs, the shared `write` option, URL redaction."""

from __future__ import annotations

import pytest

from kvport.errors import UserError
from kvport.store.tiers import check_tier_spec, shown_spec, spec_from_url
from kvport.store.tiers.remote import positive_seconds, redact_url


def test_urls_become_specs_with_their_query_as_options():
    assert spec_from_url("redis://h:6379/1?ttl=5&timeout=0.2", "t") == {
        "type": "redis",
        "url": "redis://h:6379/1",
        "ttl": "5",
        "timeout": "0.2",
    }
    assert spec_from_url("unix:///run/r.sock", "t") == {"type": "redis", "url": "unix:///run/r.sock"}
    assert spec_from_url("mooncake://m:50051?protocol=rdma", "t")["type"] == "mooncake"
    assert spec_from_url("local-disk:/x/y", "t") == {"type": "local_disk", "path": "/x/y"}


@pytest.mark.parametrize(
    "url,message",
    [
        ("s3://bucket", "is not a tier URL"),
        ("redis://h?ttl=1&ttl=2", "option 'ttl' given twice"),
        ("redis://h?=", "not name=value"),
        ("local-disk:", "expected local-disk:/path"),
    ],
)
def test_bad_urls_are_one_line(url, message):
    with pytest.raises(UserError) as info:
        spec_from_url(url, "t")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_redaction_hides_passwords_and_secret_parameters():
    assert redact_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://:pw@h:1/0") == "redis://***@h:1/0"
    assert redact_url("rediss://h:1/0?password=pw&ttl=3") == "rediss://h:1/0?password=***&ttl=3"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    with pytest.raises(UserError) as info:
        spec_from_url("s3://user:pw@bucket", "t")
    assert "pw" not in str(info.value).replace("s3://user:***", "")
    shown = shown_spec({"type": "redis", "url": "redis://a:b@h:1", "password": "c"})
    assert shown == {"type": "redis", "url": "redis://a:***@h:1", "password": "***"}


def test_write_policy_is_through_and_back_is_refused(tmp_path):
    spec = check_tier_spec({"type": "local_disk", "path": str(tmp_path), "write": "through"}, "t")
    assert spec["write"] == "through"
    for value, message in (("back", "write=back is not implemented"), ("never", "expected one of through, back")):
        with pytest.raises(UserError) as info:
            check_tier_spec({"type": "local_disk", "path": str(tmp_path), "write": value}, "cache config: tiers[0]")
        assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1", "soon", None])
def test_seconds_must_be_positive_and_finite(value):
    with pytest.raises(UserError):
        positive_seconds(value, "timeout")
