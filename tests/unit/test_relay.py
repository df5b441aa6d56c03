"""The link emulator of the network benchmarks: its schedule exactly, on an injected clock, and
a real relay between real sockets within loose bounds."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time

import pytest

from plora.platform.bench.relay import Link, LinkSchedule, _carry, relay
from plora.storage.errors import ConfigError


def test_each_chunk_waits_for_the_ones_before_it_then_takes_its_size_over_the_rate_and_the_delay():
    link = LinkSchedule(delay_s=0.010, bytes_per_s=1000)
    assert link.arrival(0.0, 100) == pytest.approx(0.110)  # sent over 0.1 s, then 10 ms on the way
    assert link.arrival(0.05, 50) == pytest.approx(0.160)  # came in while the first was sent: sent 0.10-0.15
    assert link.arrival(0.151, 10) == pytest.approx(0.171)  # the link was free again
    assert link.arrival(1.0, 0) == pytest.approx(1.010)  # an empty chunk: the delay alone
    unlimited = LinkSchedule(delay_s=0.025, bytes_per_s=None)
    assert [unlimited.arrival(t, 10**9) for t in (0.0, 0.0, 0.5)] == [0.025, 0.025, 0.525]


def test_a_link_is_checked_and_says_it_is_emulated():
    assert Link(0.02, 100).bytes_per_s == 12.5e6
    assert Link(0.02, 100).describe() == "20 ms RTT, 100 Mbit/s each way (emulated)"
    for bad in ((-0.001, None), (0.02, 0)):
        with pytest.raises(ConfigError):
            Link(*bad)


@pytest.fixture
def echo_port():
    """A TCP echo server on loopback, one connection at a time."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def test_a_real_relay_delays_a_round_trip_and_caps_the_rate(echo_port):
    rtt, rate, size = 0.040, 8.0, 200_000  # 8 Mbit/s: 1 MB/s each way
    with relay(Link(rtt, rate), echo_port) as address:
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as conn:
            started = time.perf_counter()
            conn.sendall(b"x")
            assert conn.recv(1) == b"x"
            round_trip = time.perf_counter() - started
            assert rtt <= round_trip < rtt + 0.25

            sender = threading.Thread(target=conn.sendall, args=(b"y" * size,))
            started = time.perf_counter()
            sender.start()
            received = 0
            while received < size:
                received += len(conn.recv(65536))
            elapsed = time.perf_counter() - started
            sender.join()
    paced = size / (rate * 1e6 / 8)  # each direction carries the bytes this long; the two overlap
    assert received == size
    assert paced + rtt <= elapsed < 2 * paced + rtt + 1.0
    assert received / elapsed <= rate * 1e6 / 8


class _ResetWriter:
    """The relay's side of a connection its receiver has reset: the end of the stream cannot be passed on."""

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")


def test_a_receiver_gone_before_the_end_of_the_stream_hangs_the_connection_up_without_an_error():
    hung_up = []

    async def carry() -> None:
        reader = asyncio.StreamReader()
        reader.feed_eof()
        await _carry(reader, _ResetWriter(), LinkSchedule(0.0, None), time.monotonic, lambda: hung_up.append(True))

    asyncio.run(carry())
    assert hung_up == [True]
