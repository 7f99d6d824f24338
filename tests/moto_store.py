"""A table on a moto server of the test's own, for tests that take the server away mid-way."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import boto3

from gco_infra.localenv import free_port, start_moto, stop_pid
from gco_infra.store import EndpointStore, StoreConfig


@contextmanager
def own_moto_store(log_dir: Path, table: str) -> Iterator[tuple[EndpointStore, int]]:
    """(store, server pid): the test may stop the server early; it is stopped at the end in any case."""
    port = free_port()
    pid = start_moto(port, log_dir / "moto.log")
    try:
        session = boto3.session.Session(aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1")
        store = EndpointStore(StoreConfig(table=table, region="us-east-1", endpoint_url=f"http://127.0.0.1:{port}"),
                              session=session)
        store.create_table()
        yield store, pid
    finally:
        stop_pid(pid, "moto_server")
