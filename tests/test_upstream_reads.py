"""How the upstream client reads a body (upstream/client.py): wide reads, and long bodies of
declared length read past h11 (``_DirectBody``) with the connection still reused and a short
body still an error.  Loopback only."""

from __future__ import annotations

import gzip
import os

import h11
import h11._readers
import pytest

from pytest_upstream.upstream import client as client_module
from pytest_upstream.upstream.addresses import AddressPolicy
from pytest_upstream.upstream.client import UpstreamClient, UpstreamError, iter_body

from .upstreams import Fault, Upstream

MiB = 1024 * 1024


def read(client: UpstreamClient, url: str) -> list[bytes]:
    with client.stream(url, headers={}, timeout=10) as resp:
        assert resp.status_code == 200
        return list(iter_body(resp))


def connections(client: UpstreamClient) -> list[object]:
    return list(client._client._transport._pool.connections)  # type: ignore[attr-defined]


def test_long_and_short_bodies_arrive_whole_over_one_reused_connection(
    upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    big, other, small = os.urandom(3 * MiB + 17), os.urandom(2 * MiB), b"small body"
    upstream.files.update({"/big": big, "/other": other, "/small": small})
    through_h11: list[int] = []
    real = h11._readers.ContentLengthReader.__call__

    def counted(self: h11._readers.ContentLengthReader, buf: object) -> object:
        event = real(self, buf)  # type: ignore[arg-type]
        if isinstance(event, h11.Data):
            through_h11.append(len(event.data))
        return event

    monkeypatch.setattr(h11._readers.ContentLengthReader, "__call__", counted)
    client = UpstreamClient(AddressPolicy([upstream.url]))
    try:
        chunks = read(client, upstream.url + "/big")
        assert b"".join(chunks) == big
        assert sum(through_h11) < 1 * MiB  # what h11 had buffered with the head; the rest went past it
        assert max(len(c) for c in chunks) > 64 * 1024  # wider than httpcore's own reads
        (conn,) = connections(client)
        assert type(conn._connection) is client_module._DirectBody  # type: ignore[attr-defined]
        assert b"".join(read(client, upstream.url + "/small")) == small
        assert b"".join(read(client, upstream.url + "/other")) == other
        assert b"".join(read(client, upstream.url + "/big")) == big
        assert len(connections(client)) == 1  # h11 saw each message end: the connection was reused
        assert sum(upstream.hits.values()) == 4
    finally:
        client.close()


def test_a_long_body_cut_short_is_an_error_naming_the_bytes(upstream: Upstream) -> None:
    upstream.files["/cut"] = os.urandom(3 * MiB)
    upstream.faults["/cut"] = Fault(truncate_at=2 * MiB)
    client = UpstreamClient(AddressPolicy([upstream.url]))
    try:
        with pytest.raises(UpstreamError, match=rf"received {2 * MiB} bytes, expected {3 * MiB}"):
            read(client, upstream.url + "/cut")
    finally:
        client.close()


def test_a_coded_long_body_is_decoded_whole(upstream: Upstream) -> None:
    data = os.urandom(2 * MiB) + b"x" * (3 * MiB)
    upstream.files["/z"] = gzip.compress(data, compresslevel=1)
    upstream.faults["/z"] = Fault(headers={"Content-Encoding": "gzip"})
    client = UpstreamClient(AddressPolicy([upstream.url]))
    try:
        assert b"".join(read(client, upstream.url + "/z")) == data
    finally:
        client.close()
