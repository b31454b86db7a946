"""``webrtc``: Vortex frames over a WebRTC data channel (aiortc), for peers behind NAT.

A child opens one peer connection and one ordered, reliable data channel per
parent. The offer/answer exchange goes through an HTTP endpoint the parent's
daemon serves (``POST /vortex/webrtc/offer`` on this plugin's port); ICE then finds
a path. No STUN or TURN server is contacted unless ``ice_servers`` names one
(``RTCConfiguration(iceServers=[])`` by default), and ICE host candidates come
from ``ice_addresses``, or, when that is empty, from the loopback address when the
other side is on loopback (aioice leaves loopback out by itself) and from every
interface otherwise.

With ``security.tls`` the offer/answer exchange runs over HTTPS with mutual TLS (the
cluster's CA, certificate and key): the parent's endpoint refuses a child without a
certificate chaining to the CA, and the child checks that the parent's certificate
names the address it dialled. The DTLS fingerprints in the offer and the answer thus
come over an authenticated channel, and DTLS (which checks the fingerprint) binds
the data channel to the two daemons that exchanged them. A parent holds at most
``security.limits.piece_connections`` peer connections; past it an offer gets a 503.

Binary messages carry the Vortex byte stream, requests one at a time per channel.
Flow control runs both ways: the parent holds back while the channel's
``bufferedAmount`` is over ``buffer_high``, and while it is more than ``window``
bytes ahead of what the child's storage has taken, which the child reports in
text messages (the count of stream bytes taken, in decimal).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import ipaddress
from typing import TYPE_CHECKING, Any, ClassVar

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from damselfly.contracts import PieceConnection, PieceLookup, PieceServer, PieceWriter, Transport
from damselfly.core import vortex
from damselfly.core.errors import PeerError, ProtocolError
from damselfly.hookspecs import hookimpl
from damselfly.kit import PendingResponse, RequestReader, answer, limits_of, split_address, tls_of
from damselfly.security.tls import client_ssl_context, server_ssl_context

if TYPE_CHECKING:
    from damselfly.contracts import Registry


OFFER_PATH = "/vortex/webrtc/offer"
MESSAGE_SIZE = 60 * 1024  # under aiortc's 64 KiB message limit


class IceServer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    urls: list[str]
    username: str | None = None
    credential: str | None = None


class WebrtcConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    port: int = Field(0, ge=0, le=65535, description="TCP port of the offer/answer endpoint (0: any).")
    ice_servers: list[IceServer] = Field(
        default_factory=list, description="STUN/TURN servers; none by default, so nothing outside is contacted."
    )
    ice_addresses: list[str] = Field(default_factory=list, description="Host candidate addresses (empty: see above).")
    window: int = Field(4 << 20, ge=256 * 1024, description="Bytes a parent may send beyond what the child took.")
    buffer_high: int = Field(1 << 20, ge=64 * 1024, description="A parent waits while bufferedAmount is over this.")
    connect_timeout: float = Field(15.0, gt=0, description="Seconds for signalling, ICE and DTLS together.")


# -- ICE host addresses ----------------------------------------------------------------

_HOST_ADDRESSES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("damselfly_ice", default=None)


@functools.cache
def _patch_aioice() -> None:
    """Let each peer connection say which host addresses ICE gathers (a context variable)."""
    from aioice import ice

    library_default = ice.get_host_addresses

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        chosen = _HOST_ADDRESSES.get()
        return list(chosen) if chosen is not None else library_default(use_ipv4, use_ipv6)

    ice.get_host_addresses = host_addresses


def _addresses_for(options: WebrtcConfig, other_side: str) -> list[str] | None:
    if options.ice_addresses:
        return list(options.ice_addresses)
    try:
        if ipaddress.ip_address(other_side).is_loopback:
            return ["127.0.0.1"]
    except ValueError:
        pass
    return None


def _rtc_configuration(options: WebrtcConfig) -> Any:
    from aiortc import RTCConfiguration, RTCIceServer

    servers = [RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in options.ice_servers]
    return RTCConfiguration(iceServers=servers)


# -- the parent's side ----------------------------------------------------------------


class _ChannelServer:
    """Answers the requests arriving on one data channel, one at a time."""

    def __init__(self, pc: Any, channel: Any, lookup: PieceLookup, options: WebrtcConfig):
        self.pc = pc
        self.channel = channel
        self.lookup = lookup
        self.options = options
        self.reader = RequestReader()
        self.requests: asyncio.Queue[vortex.DownloadPiece | None] = asyncio.Queue()
        self.sent = 0
        self.taken = 0
        self.moved = asyncio.Event()
        channel.bufferedAmountLowThreshold = options.buffer_high // 2
        channel.on("message", self._message)
        channel.on("bufferedamountlow", self.moved.set)
        channel.on("close", self._closed)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def _message(self, message: bytes | str) -> None:
        if isinstance(message, str):
            try:
                self.taken = max(self.taken, int(message))
            except ValueError:
                logger.debug("ignoring a bad credit message {!r}", message[:40])
            self.moved.set()
            return
        try:
            for req in self.reader.requests(message):
                self.requests.put_nowait(req)
        except ProtocolError as exc:
            logger.debug("closing a WebRTC child: {}", exc)
            self.channel.send(vortex.encode_error(vortex.ErrorCode.INVALID_ARGUMENT, str(exc)))
            self.requests.put_nowait(None)

    def _closed(self) -> None:
        self.requests.put_nowait(None)
        self.moved.set()

    # FrameSink for ``answer``
    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for i in range(0, len(view), MESSAGE_SIZE):
            part = bytes(view[i : i + MESSAGE_SIZE])
            self.channel.send(part)
            self.sent += len(part)

    async def drain(self) -> None:
        o = self.options
        while self.channel.bufferedAmount > o.buffer_high or self.sent - self.taken > o.window:
            if self.channel.readyState != "open":
                raise PeerError("the child went away")
            self.moved.clear()
            await self.moved.wait()

    async def _serve(self) -> None:
        try:
            while (req := await self.requests.get()) is not None:
                await answer(self, self.lookup, req, MESSAGE_SIZE * 4)
                await self.drain()
        except PeerError as exc:
            logger.warning("closing a WebRTC channel: {}", exc)
        finally:
            await self.pc.close()


class _Server:
    def __init__(self) -> None:
        self.port = 0
        self.runner: Any = None
        self.peers: set[Any] = set()
        self.channels: set[_ChannelServer] = set()

    async def close(self) -> None:
        for ch in list(self.channels):
            ch.task.cancel()
        await asyncio.gather(*(pc.close() for pc in list(self.peers)), return_exceptions=True)
        await asyncio.gather(*(ch.task for ch in self.channels), return_exceptions=True)
        if self.runner is not None:
            await self.runner.cleanup()


# -- the child's side ------------------------------------------------------------------


class WebrtcConnection(PieceConnection):
    def __init__(self, pc: Any, channel: Any, max_errors: int = vortex.DEFAULT_MAX_ERRORS):
        self._pc = pc
        self._channel = channel
        # one decoder for the channel's life: it counts the parent's Error frames across requests
        self._decoder = vortex.Decoder(max_errors=max_errors)
        self._turn = asyncio.Lock()
        self._current: PendingResponse | None = None
        self._base = 0  # stream bytes before the current request
        self._lost: Exception | None = None
        channel.on("message", self._message)
        channel.on("close", lambda: self._lose(PeerError("parent closed the data channel")))
        pc.on("connectionstatechange", self._state)

    @property
    def broken(self) -> bool:
        return self._lost is not None

    def _state(self) -> None:
        if self._pc.connectionState in ("failed", "closed"):
            self._lose(PeerError(f"peer connection {self._pc.connectionState}"))

    def _lose(self, exc: Exception) -> None:
        if self._lost is None:
            self._lost = exc
        if self._current is not None:
            self._current.fail(self._lost)

    def _message(self, message: bytes | str) -> None:
        if isinstance(message, str) or self._current is None:
            return  # nothing asked: a stray message is dropped
        self._current.receive(message)

    async def fetch(self, task_id: str, number: int, sink: PieceWriter) -> vortex.PieceMetadata:
        async with self._turn:  # one request at a time on a channel, as on a TCP connection
            if self._lost is not None:
                raise PeerError(f"connection is broken: {self._lost}")
            req = self._current = PendingResponse(number, decoder=self._decoder)
            base = self._base

            def taken(n: int) -> None:
                if self._channel.readyState == "open":
                    self._channel.send(str(base + n))

            try:
                self._channel.send(vortex.encode_download_piece(task_id, number))
                return await req.deliver(sink, 256 * 1024, taken)
            except ProtocolError as exc:  # the byte stream is out of step: the channel is done
                self._lose(exc)
                raise
            except PeerError as exc:
                if self._decoder.errors > self._decoder.max_errors:  # too many Error frames: drop the channel
                    self._lose(exc)
                    await self._pc.close()
                raise
            except asyncio.CancelledError:
                self._lose(PeerError("fetch cancelled"))  # its answer would still arrive: drop the channel
                await self._pc.close()
                raise
            finally:
                self._base = base + req.received
                self._current = None

    async def close(self) -> None:
        if self._lost is None and self._channel.readyState == "open" and not self._turn.locked():
            self._channel.send(vortex.encode_close())
        self._lose(PeerError("closed"))
        await self._pc.close()


class WebrtcTransport(Transport):
    name: ClassVar[str] = "webrtc"
    connections_per_parent: ClassVar[int] = 2  # one channel answers one request at a time
    Config = WebrtcConfig
    options: WebrtcConfig

    @classmethod
    def available(cls) -> str | None:
        try:
            import aiortc  # noqa: F401
        except ImportError:
            return "aiortc is not installed (pip install 'damselfly[webrtc]')"
        return None

    async def serve(self, host: str, port: int, lookup: PieceLookup) -> PieceServer:
        from aiohttp import web
        from aiortc import RTCPeerConnection, RTCSessionDescription

        _patch_aioice()
        server = _Server()
        limits = limits_of(self.security)
        cfg = tls_of(self.security)

        async def offer(request: web.Request) -> web.Response:
            try:
                body = await request.json()
                desc = RTCSessionDescription(sdp=str(body["sdp"]), type=str(body["type"]))
            except (ValueError, KeyError, TypeError) as exc:
                return web.json_response({"error": f"bad offer: {exc}"}, status=400)
            if desc.type != "offer":
                return web.json_response({"error": "expected an offer"}, status=400)
            if len(server.peers) >= limits.piece_connections:
                return web.json_response({"error": "too many connections"}, status=503)
            pc = RTCPeerConnection(configuration=_rtc_configuration(self.options))
            server.peers.add(pc)

            @pc.on("datachannel")
            def on_channel(channel: Any) -> None:
                server.channels.add(_ChannelServer(pc, channel, lookup, self.options))

            @pc.on("connectionstatechange")
            async def on_state() -> None:
                if pc.connectionState in ("failed", "closed"):
                    server.peers.discard(pc)
                    await pc.close()

            chosen = _HOST_ADDRESSES.set(_addresses_for(self.options, request.remote or ""))
            try:
                await pc.setRemoteDescription(desc)
                await pc.setLocalDescription(await pc.createAnswer())
            except Exception as exc:  # a malformed SDP: the child gets a clear 400
                server.peers.discard(pc)
                await pc.close()
                return web.json_response({"error": f"cannot answer the offer: {exc}"}, status=400)
            finally:
                _HOST_ADDRESSES.reset(chosen)
            local = pc.localDescription
            return web.json_response({"sdp": local.sdp, "type": local.type})

        app = web.Application()
        app.router.add_post(OFFER_PATH, offer)
        server.runner = web.AppRunner(app, access_log=None)
        await server.runner.setup()
        context = server_ssl_context(cfg) if cfg is not None else None  # mutual TLS: a child must show its own
        site = web.TCPSite(server.runner, host, port or self.options.port, reuse_address=True, ssl_context=context)
        await site.start()
        server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return server

    _client_ssl: Any = None

    def _client_context(self, cfg: Any) -> Any:
        if self._client_ssl is None:  # once: loading the key and the CA per offer costs milliseconds
            self._client_ssl = client_ssl_context(cfg)
        return self._client_ssl

    async def connect(self, address: str, timeout: float) -> PieceConnection:
        import aiohttp
        from aiortc import RTCPeerConnection, RTCSessionDescription

        host, port = split_address(address)
        _patch_aioice()
        pc = RTCPeerConnection(configuration=_rtc_configuration(self.options))
        channel = pc.createDataChannel("vortex", ordered=True)
        opened = asyncio.get_running_loop().create_future()
        channel.on("open", lambda: opened.done() or opened.set_result(None))
        try:
            async with asyncio.timeout(max(timeout, self.options.connect_timeout)):
                chosen = _HOST_ADDRESSES.set(_addresses_for(self.options, host))
                try:
                    await pc.setLocalDescription(await pc.createOffer())
                finally:
                    _HOST_ADDRESSES.reset(chosen)
                offer = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
                cfg = tls_of(self.security)
                scheme = "https" if cfg is not None else "http"
                url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}{OFFER_PATH}"
                context = self._client_context(cfg) if cfg is not None else True
                async with aiohttp.ClientSession() as http, http.post(url, json=offer, ssl=context) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status != 200:
                        raise PeerError(f"parent refused the offer: {body.get('error', resp.status)}")
                await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
                await opened
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError) as exc:
            await pc.close()
            raise PeerError(f"cannot open a WebRTC channel to {address}: {exc or 'timeout'}") from None
        except BaseException:
            await pc.close()
            raise
        return WebrtcConnection(pc, channel, limits_of(self.security).vortex_error_frames)


@hookimpl
def damselfly_add_transports(registry: Registry[Transport]) -> None:
    registry.add(WebrtcTransport)
