"""A network link emulated on loopback: a TCP relay that delays and paces the bytes.

These machines' kernel has no netem qdisc, so a link's round-trip time and bandwidth are
emulated in user space. The relay listens on a loopback port and forwards every connection to
a target address; each direction is its own link: a chunk that comes in is sent once the link
has carried the chunks before it, at the link's rate, and arrives one one-way delay (half the
round-trip time) after its last byte was sent (`LinkSchedule`). Chunks are cut to at most
PIECE_BYTES first, so that a large write streams out piece by piece as it would on a real
link rather than arriving all at once. Each direction buffers at most BUFFER_PIECES pieces;
beyond that the relay stops reading, and TCP's own flow control holds the sender back.

It is a bench tool: what it measures is labelled as emulated wherever it is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from plora.storage.errors import ConfigError

PIECE_BYTES = 16 * 1024  # 1.3 ms at 100 Mbit/s
BUFFER_PIECES = 256  # 4 MiB a direction


@dataclass(frozen=True)
class Link:
    rtt_s: float
    """Round-trip time; each direction delays by half of it."""
    mbit_per_s: float | None = None
    """Each direction's rate in megabits (10^6 bits) per second; None: unlimited."""

    def __post_init__(self) -> None:
        if self.rtt_s < 0 or (self.mbit_per_s is not None and self.mbit_per_s <= 0):
            raise ConfigError(f"a link needs rtt >= 0 and a rate > 0, got {self.rtt_s} s and {self.mbit_per_s} Mbit/s")

    @property
    def bytes_per_s(self) -> float | None:
        return None if self.mbit_per_s is None else self.mbit_per_s * 1e6 / 8

    def describe(self) -> str:
        rate = "unlimited" if self.mbit_per_s is None else f"{self.mbit_per_s:g} Mbit/s each way"
        return f"{self.rtt_s * 1e3:g} ms RTT, {rate} (emulated)"


class LinkSchedule:
    """When each chunk of one direction arrives at the far end. The link sends one chunk at a
    time: a chunk starts when it has come in and the one before it has been sent, takes its
    size over the rate to send, and arrives `delay_s` after its last byte left."""

    def __init__(self, delay_s: float, bytes_per_s: float | None):
        self.delay_s, self.bytes_per_s = delay_s, bytes_per_s
        self._free_at = float("-inf")  # when the link has sent everything given to it so far

    def arrival(self, came_in: float, size: int) -> float:
        start = max(came_in, self._free_at)
        self._free_at = start + (size / self.bytes_per_s if self.bytes_per_s else 0.0)
        return self._free_at + self.delay_s


async def _carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, schedule: LinkSchedule,
                 clock: Callable[[], float], hang_up: Callable[[], None]) -> None:
    """One direction of one connection, until the sending side closes it. If the receiving
    side has gone, `hang_up` closes the connection's both ends, as a reset would."""
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=BUFFER_PIECES)

    async def deliver() -> None:
        gone = False
        while (item := await queue.get()) is not None:
            if gone:
                continue  # keep taking pieces, so the reading side never waits on a full queue
            when, piece = item
            if (wait := when - clock()) > 0:
                await asyncio.sleep(wait)
            try:
                writer.write(piece)
                await writer.drain()
            except ConnectionError:
                gone = True
                hang_up()
        if not gone and writer.can_write_eof():
            try:
                writer.write_eof()
            except OSError:  # ENOTCONN: the receiving side reset the connection before the end reached it
                hang_up()

    delivering = asyncio.create_task(deliver())
    try:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(PIECE_BYTES):
                await queue.put((schedule.arrival(clock(), len(data)), data))
        await queue.put(None)
        await delivering
    finally:
        delivering.cancel()


async def _relay(link: Link, target_port: int, ready: Callable[[int], None]) -> None:
    delay = link.rtt_s / 2

    async def connection(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.close()
            return

        def hang_up() -> None:
            client_writer.close()
            server_writer.close()

        try:
            await asyncio.gather(
                _carry(client_reader, server_writer, LinkSchedule(delay, link.bytes_per_s), time.monotonic, hang_up),
                _carry(server_reader, client_writer, LinkSchedule(delay, link.bytes_per_s), time.monotonic, hang_up),
            )
        finally:
            hang_up()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    ready(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def _serve_relay(link: Link, target_port: int, ports) -> None:
    asyncio.run(_relay(link, target_port, ports.put))


@contextlib.contextmanager
def relay(link: Link, target_port: int) -> Iterator[str]:
    """A relay emulating `link` to 127.0.0.1:`target_port`, in a process of its own so that
    its timing does not wait on this process's work; yields its HOST:PORT."""
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    process = context.Process(target=_serve_relay, args=(link, target_port, ports), daemon=True, name="plora-relay")
    process.start()
    try:
        yield f"127.0.0.1:{ports.get(timeout=60)}"
    finally:
        process.terminate()
        process.join()
