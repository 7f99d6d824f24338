"""Shared fixtures: real parts started on 127.0.0.1 with random ports."""

from __future__ import annotations

import uuid

import pytest

from gco_infra.localenv import free_port, start_moto, stop_pid
from gco_infra.store import EndpointStore, StoreConfig


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory):
    """moto's standalone DynamoDB server, over HTTP, for the whole session."""
    port = free_port()
    pid = start_moto(port, tmp_path_factory.mktemp("moto") / "moto.log")
    yield f"http://127.0.0.1:{port}"
    stop_pid(pid, "moto_server")


@pytest.fixture
def store(moto_url, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    s = EndpointStore(StoreConfig(table=f"endpoints-{uuid.uuid4().hex[:8]}", region="us-east-1", endpoint_url=moto_url))
    s.create_table()
    return s
