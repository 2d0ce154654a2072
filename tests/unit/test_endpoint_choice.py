"""Which endpoint a call that names none goes to: the rule the manager and the Executor share,
the client-side sources ($DLHUB_ENDPOINT, config.json's default_endpoint) and the manager's
setting."""

from __future__ import annotations

import json

import pytest

from dlhub.executor.config import ClientConfig, endpoint_from, write_client_config
from dlhub.protocol import DLHubError, EndpointRequired, UnknownEndpoint
from dlhub.protocol.errors import choose_endpoint


def test_the_default_wins_when_known_even_if_others_are_connected():
    assert choose_endpoint({"local": True, "second": True}, "local") == "local"
    assert choose_endpoint({"local": False, "second": True}, "local") == "local"  # tasks wait for it


def test_without_a_usable_default_the_only_connected_endpoint_is_chosen():
    assert choose_endpoint({"local": False, "second": True}) == "second"
    assert choose_endpoint({"local": False, "second": True}, "absent") == "second"
    assert choose_endpoint({"gone": False}) == "gone"  # known from earlier tasks: they queue


def test_several_endpoints_and_no_default_is_a_typed_error_listing_them():
    with pytest.raises(EndpointRequired) as info:
        choose_endpoint({"local": True, "second": True})
    exc = info.value
    assert isinstance(exc, DLHubError) and isinstance(exc, ValueError)  # was a ValueError before
    assert exc.candidates == ["local", "second"] and exc.code == "endpoint-required"
    assert "local, second" in exc.reason and "no default endpoint is set" in exc.reason
    worded = exc.with_hint("pass endpoint=<name>")
    assert str(worded) == f"{exc.reason}; pass endpoint=<name>" and worded.candidates == exc.candidates
    with pytest.raises(EndpointRequired, match="default endpoint 'x' is not registered"):
        choose_endpoint({"a": True, "b": True}, "x")
    with pytest.raises(UnknownEndpoint, match="no endpoint is registered"):
        choose_endpoint({})


def test_the_client_endpoint_comes_from_the_environment_then_the_file_of_this_manager(tmp_path, monkeypatch):
    monkeypatch.delenv("DLHUB_ENDPOINT", raising=False)
    monkeypatch.delenv("DLHUB_MANAGER", raising=False)
    write_client_config(tmp_path, "tcp://127.0.0.1:1", "t", rest_url="http://h:2", default_endpoint="local")
    assert ClientConfig.resolve(home=tmp_path).endpoint == "local"
    # a default for the manager the file describes means nothing to another manager
    assert ClientConfig.resolve("tcp://127.0.0.1:9", home=tmp_path).endpoint is None
    stored = json.loads((tmp_path / "config.json").read_text())
    assert endpoint_from(stored, "rest_url", "http://h:2/") == "local"
    assert endpoint_from(stored, "rest_url", "http://other:2") is None
    monkeypatch.setenv("DLHUB_ENDPOINT", "second")
    assert ClientConfig.resolve(home=tmp_path).endpoint == "second"
    assert ClientConfig.resolve("tcp://127.0.0.1:9", home=tmp_path).endpoint == "second"
    write_client_config(tmp_path, "tcp://127.0.0.1:1", "t")  # written before default_endpoint existed
    monkeypatch.delenv("DLHUB_ENDPOINT")
    assert ClientConfig.resolve(home=tmp_path).endpoint is None  # the manager decides


def test_the_manager_refuses_a_default_endpoint_that_is_no_endpoint_name(tmp_path):
    from dlhub.manager import ManagerConfig

    assert ManagerConfig(home=tmp_path, default_endpoint="local").default_endpoint == "local"
    with pytest.raises(ValueError, match="default_endpoint must be an endpoint name"):
        ManagerConfig(home=tmp_path, default_endpoint="no spaces/allowed")
