"""Run and drive ``meshagent-datapath`` (the native byte path) from asyncio.

The binary is built by ``scripts/setup.sh`` (cargo, release profile) into
``agent/tunnel/native/target/release/``, with a stamp over the digest of its sources.
A missing or stale build is an error that says how to fix it, never a fallback to the
Python path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from agent.tunnel.native.protocol import (
    CertificatesApplied,
    CertificatesUpdate,
    ConnectionRecord,
    ControlMessage,
    DatapathConfig,
    DatapathError,
    Event,
    PolicyApplied,
    PolicySnapshot,
    ProtocolError,
    Ready,
    parse_event,
)

CRATE_DIR = Path(__file__).resolve().parent
BINARY_ENV = "MESHAGENT_DATAPATH"
STAMP_NAME = ".meshagent-source-digest"
STOP_TIMEOUT = 5.0


class NativeDatapathError(RuntimeError):
    """The native datapath is missing, stale, failed to start or died."""


class PolicyRefused(RuntimeError):
    """The datapath refused a control message (a policy snapshot, certificates);
    nothing changed: its previous policy and certificates stay in force."""


def _source_files(crate: Path) -> Iterator[Path]:
    yield crate / "Cargo.toml"
    yield crate / "Cargo.lock"
    yield from sorted((crate / "src").rglob("*.rs"))


def source_digest(crate: Path = CRATE_DIR) -> str:
    """sha256 over the crate's sources, byte-for-byte what scripts/setup.sh computes:
    ``find src Cargo.toml Cargo.lock -type f -name ... | LC_ALL=C sort | xargs sha256sum
    | sha256sum`` (relative paths, run in the crate folder). Pure apart from reading."""
    files = sorted(str(p.relative_to(crate)) for p in _source_files(crate))
    lines = "".join(f"{hashlib.sha256((crate / f).read_bytes()).hexdigest()}  {f}\n"
                    for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def binary_path(crate: Path = CRATE_DIR) -> Path:
    """The built datapath. NativeDatapathError if it is missing or older than its sources."""
    override = os.environ.get(BINARY_ENV)
    if override:
        path = Path(override)
        if not os.access(path, os.X_OK):
            raise NativeDatapathError(f"{BINARY_ENV}={override} is not an executable")
        return path
    path = crate / "target" / "release" / "meshagent-datapath"
    if not os.access(path, os.X_OK):
        raise NativeDatapathError(f"{path} is not built: run scripts/setup.sh (it builds the "
                                  "native datapath with cargo)")
    stamp = crate / "target" / STAMP_NAME
    built = stamp.read_text().strip() if stamp.exists() else ""
    if built != source_digest(crate):
        raise NativeDatapathError(f"{path} is older than its sources: run scripts/setup.sh "
                                  "to rebuild it")
    return path


class NativeDatapath:
    """One ``meshagent-datapath`` process. Side effects: starts a process (binds its
    listeners); :meth:`stop` (or leaving the ``async with``) ends it."""

    def __init__(self, config: DatapathConfig, *, policy: PolicySnapshot | None,
                 binary: Path | None = None, netns: str | None = None) -> None:
        """``policy``: the snapshot sent right after the configuration (None: none, so
        every inbound connection is denied until :meth:`apply_policy`). ``netns``: run
        the process in that named network namespace (``ip netns exec``), as the node's
        datapath runs in the node's."""
        self.config = config
        self.policy = policy
        self._stash: list[Event] = []
        self.binary = binary
        self.netns = netns
        self.ready: Ready | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """The process is running (it exits when its stdin closes or it fails)."""
        return self._proc is not None and self._proc.returncode is None

    def address(self, listener: str) -> tuple[str, int]:
        """(host, port) a listener is bound to (after start)."""
        if self.ready is None:
            raise NativeDatapathError("datapath not started")
        host, _, port = self.ready.listeners[listener].rpartition(":")
        return host.strip("[]"), int(port)

    async def start(self, timeout: float = 10.0) -> Ready:
        binary = self.binary or binary_path()
        prefix = ("ip", "netns", "exec", self.netns) if self.netns else ()
        self._proc = await asyncio.create_subprocess_exec(
            *prefix, str(binary), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=1 << 20)
        assert self._proc.stdin is not None
        self._proc.stdin.write(self.config.to_json().encode() + b"\n")
        if self.policy is not None:
            self._proc.stdin.write(self.policy.to_json().encode() + b"\n")
        await self._proc.stdin.drain()
        self._reader = asyncio.create_task(self._read_events())
        try:
            event = await asyncio.wait_for(self._events.get(), timeout)
        except asyncio.TimeoutError:
            event = None
        if not isinstance(event, Ready):
            stderr = await self._stderr()
            await self.stop()
            raise NativeDatapathError(f"meshagent-datapath did not start: {stderr or event}")
        self.ready = event
        if self.policy is not None:
            try:
                if not isinstance(await self._acknowledged(timeout), PolicyApplied):
                    raise NativeDatapathError("the first policy snapshot was not applied")
            except BaseException:
                await self.stop()
                raise
        return event

    async def apply_policy(self, snapshot: PolicySnapshot, timeout: float = 10.0
                           ) -> PolicyApplied:
        """Send a policy snapshot and wait for its acknowledgement. PolicyRefused when
        the datapath refuses it (the previous policy stays). Side effect: live
        connections the new snapshot denies are ended (reported as ``denied``)."""
        await self._send(snapshot)
        ack = await self._acknowledged(timeout)
        assert isinstance(ack, PolicyApplied), ack
        return ack

    async def rotate_certificates(self, update: CertificatesUpdate, timeout: float = 10.0
                                  ) -> CertificatesApplied:
        """Give a local identity a new certificate and key. PolicyRefused when the
        datapath refuses it (unknown identity, another identity's certificate, a key
        that does not match). Side effect: new handshakes of the listeners presenting
        that identity use it; live connections keep theirs."""
        await self._send(update)
        ack = await self._acknowledged(timeout)
        assert isinstance(ack, CertificatesApplied), ack
        return ack

    async def _send(self, message: ControlMessage) -> None:
        if self._proc is None or self._proc.stdin is None:
            raise NativeDatapathError("datapath not started")
        self._proc.stdin.write(message.to_json().encode() + b"\n")
        await self._proc.stdin.drain()

    async def _acknowledged(self, timeout: float) -> PolicyApplied | CertificatesApplied:
        """The next acknowledgement; other events are kept for :meth:`next_event`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        kept: list[Event] = []
        try:
            while True:
                event = await self._next(max(0.01, deadline - loop.time()))
                if isinstance(event, PolicyApplied | CertificatesApplied):
                    return event
                if isinstance(event, DatapathError):
                    raise PolicyRefused(event.message)
                kept.append(event)
        finally:
            self._stash.extend(kept)

    async def _stderr(self) -> str:
        if self._proc is None or self._proc.stderr is None:
            return ""
        with contextlib.suppress(asyncio.TimeoutError):
            return (await asyncio.wait_for(self._proc.stderr.read(1 << 16), 2)).decode(
                errors="replace").strip()
        return ""

    async def _read_events(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            while line := await self._proc.stdout.readline():
                try:
                    await self._events.put(parse_event(line))
                except ProtocolError:
                    await self._events.put(None)
                    raise
        finally:
            await self._events.put(None)

    async def next_event(self, timeout: float = 10.0) -> Event:
        if self._stash:
            return self._stash.pop(0)
        return await self._next(timeout)

    async def _next(self, timeout: float) -> Event:
        event = await asyncio.wait_for(self._events.get(), timeout)
        if event is None:
            raise NativeDatapathError(f"meshagent-datapath exited: {await self._stderr()}")
        return event

    async def connection_records(self, count: int, timeout: float = 10.0
                                 ) -> list[ConnectionRecord]:
        """The next ``count`` connection records (other events are skipped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        records: list[ConnectionRecord] = []
        while len(records) < count:
            event = await self.next_event(max(0.01, deadline - loop.time()))
            if isinstance(event, ConnectionRecord):
                records.append(event)
        return records

    def pending_events(self) -> list[Event]:
        """Events already received and not yet taken."""
        events: list[Event] = self._stash
        self._stash = []
        while not self._events.empty():
            event = self._events.get_nowait()
            if event is not None:
                events.append(event)
        return events

    async def stop(self) -> None:
        """Close stdin (the process exits on its own), kill it if it does not."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> NativeDatapath:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()
