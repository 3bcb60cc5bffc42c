"""uvicorn's httptools protocol with the limits uvicorn lacks: on a request head's size and time, on a
chunked body's framing, on connections that send nothing or a body nobody reads, and on how many
connections are open.

uvicorn bounds none of them. Its parser keeps a header it has not seen the end of, however long, so one
client streaming a single endless header line grew the process by ~500 MB in two minutes (and slowed
every other request: httptools joins the pieces of a value by copying). And a connection is only timed
out once it has had a response: one that sends nothing, or half a request line, is kept open for as long
as the client likes, so a few thousand of them (slowloris) use up the process's file descriptors; and
however many there are, every new one is accepted.

Here a connection that has sent nothing is closed after KEEP_ALIVE_S, like an idle keep-alive connection;
a request head, once begun, must be complete within HEADER_TIMEOUT_S (408) and within MAX_HEADER_BYTES
(431: counted read by read while it is incomplete, measured where it ends), and so must a chunked body's
framing (chunk extensions, trailers: 431 too); the body itself has its own limits
(service.middleware.BodyLimitMiddleware), and the rest of a body the app answered without reading gets
BODY_TIMEOUT_S to arrive before the connection is closed. A connection beyond MAX_CONNECTIONS open at once
is answered 503 (with Retry-After) as soon as it is accepted. These answers, and uvicorn's 400
for bytes that are not HTTP, are written here, by the server, in the one JSON error shape, and close the
connection. One never goes out inside another response: behind pipelined requests still being answered,
it waits for their responses (reading nothing more meanwhile) and follows the last. If one of them closes
the connection itself (Connection: close, a stop, an app failing mid-response) it is not written at all:
only a response that completes (uvicorn's on_response_complete) says the stream is free for it. After
an answer the connection lingers half-closed for up to LINGER_S, dropping what the client still sends, so
that a client still sending reads the answer instead of a reset. A client that half-closes after its
requests still gets their answers (uvicorn closed on the EOF), and the connection closes after the last.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from service.config import Settings
from service.errors import error_body, new_request_id
from service.headers import API_HEADERS

log = logging.getLogger("carvae.service")

# How long a refused connection stays half-open after its answer, dropping what the client still sends.
LINGER_S = 2.0
# What every API answer and error gets (service.headers): the app's middleware never sees these answers.
_ANSWER_HEADERS = b"".join(name + b": " + value + b"\r\n" for name, value in API_HEADERS)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """Set by `protocol_for`: a class per settings, as uvicorn instantiates the class it is given."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 65536
    idle_timeout_s: float = 5.0
    body_timeout_s: float = 30.0
    max_connections: int = 1000
    # Told each refusal's or quiet close's reason (service.metrics.SERVER_REFUSALS); a staticmethod.
    on_refusal: Callable[[str], None] = staticmethod(lambda reason: None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._head_begun = False  # a request's first byte has arrived, its headers' end has not
        self._head_bytes = 0  # bytes received since then (less a read in which a message ended first)
        self._head_span = 0  # ... all of them: at least the head's size, before the read that ends it
        self._read_len = 0  # the size of the read being parsed
        self._refused = False  # refused: nothing the client sends from here on is a request
        self._deferred: bytes | None = None  # the refusal, when responses before it are still to be sent
        self._in_body = False  # its headers have ended, the message (body, trailers) has not
        self._body_seen = False  # the parser found body bytes in the data being fed
        self._message_ended = False  # ... or the end of a message (then maybe a pipelined head's start)
        self._headers_ended = False  # ... or the end of a head (then maybe a chunked body's framing)
        self._bytes_without_body = 0  # body-phase bytes since the last that held any body
        self._eof = False  # the client has half-closed with requests still to answer (eof_received)
        self._write_timer: asyncio.TimerHandle | None = None  # while the transport's buffer is full

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:  # uvicorn has counted this one in already
            self._refuse_connection()
            return
        self._arm(self.idle_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        # The transport's buffer is full: the client reads its answers slower than they are written, or not
        # at all. uvicorn then waits for it to drain with no time limit, so a client that pipelined requests
        # and read nothing held its connection (and a request's task) for good, past every other timer, and
        # delayed a graceful stop by its whole timeout. Writing must resume within body_timeout_s (the time a
        # body may take in the other direction), or the connection is cut off.
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.body_timeout_s, self._write_timed_out)

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().resume_writing()

    def _write_timed_out(self) -> None:
        self._write_timer = None
        self.on_refusal("unread_response_timeout")
        log.warning("a client read nothing of its answers for %g s: connection cut off", self.body_timeout_s)
        self.transport.abort()  # close() would wait for the buffer to drain: for ever

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio.Protocol's own type
        # The client has sent all it will (a half-close: `nc -N`, a shell's `printf ... | nc`, some probes).
        # uvicorn closes at once, so a request it had sent whole was never answered: a model request, or a
        # request pipelined behind another, found its connection gone. Kept open (returning True) until
        # what it sent is answered, then closed. Closed at once when there is nothing to answer: no request,
        # a body that can now never end, or a refusal already written (a lingering close ends here).
        if self._eof:
            return True
        cycle = self.cycle
        if cycle is None or self._in_body or (self._refused and self._deferred is None):
            return None
        if cycle.response_complete and not self.pipeline:
            return None
        self._eof = True
        self._head_begun = False  # a head begun can never end now: no 408 for it
        self._disarm()
        if self._deferred is None:
            cycle.keep_alive = False  # the last request to answer: uvicorn closes after its response
        return True

    def data_received(self, data: bytes) -> None:
        if self._refused:  # only while a refusal waits for the responses before it: dropped unparsed
            return
        self._body_seen = self._message_ended = self._headers_ended = False
        self._read_len = len(data)
        super().data_received(data)
        if self._refused or self.transport.is_closing():
            return
        # Counted after the parser has seen the bytes: a chunk that completes its head (and may carry a
        # large part of the body with it) is not counted against the head. Nor is one in which a message
        # ended before this head began: how much of it is the head is not known, and counting the previous
        # body's tail refused a pipelined request (a 30 KB body, then half a GET's head in the same read:
        # 431 against an 8 KB limit). A read left out is at most ~256 KB (asyncio's and uvloop's read size),
        # and the head is measured again when it ends (on_headers_complete).
        if self._head_begun:
            self._head_span += len(data)
            if not self._message_ended:
                self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._too_large("the request line and headers")
        elif self._in_body:
            # A chunked body's framing carries no body bytes: chunk extensions, and the trailer fields after
            # the last chunk, which uvicorn appends to the request's headers without limit (one client sent
            # 2 GB of trailers in 15 s and grew the process to 5.5 GB). The body's own limits never see them.
            # The read that ended the head is left out, as above: its bytes are mostly the head's (a head
            # near the limit, then a trailer in reads of its own, was a 431).
            if self._body_seen:
                self._bytes_without_body = 0
            elif not self._headers_ended:
                self._bytes_without_body += len(data)
            if self._bytes_without_body > self.max_header_bytes:
                self._too_large("the chunked body's trailers or chunk extensions")
        elif self._timer is None and (self.cycle is None or self.cycle.response_complete):
            # Between requests, with no timer running: uvicorn cancels its keep-alive timer on any bytes
            # and arms it again only when a response completes, so bytes that begin no request (the blank
            # lines a client may send between requests, RFC 9112 §2.2) or the end of a body answered before
            # it was read left the connection open, idle, for as long as the client liked.
            self._arm(self.idle_timeout_s)

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        # The first byte of a request: from here its head has header_timeout_s to arrive (a connection's
        # first request had idle_timeout_s before; a keep-alive one's idle wait is uvicorn's own timer).
        self._head_begun = True
        self._head_bytes = self._head_span = 0
        self._arm(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        # data_received counts a head only once a read has left it incomplete, so one that came whole in a
        # single read, or whose last read was a large one, passed whatever its size. It is measured here,
        # where it ends, when it may be over: the reads it spans say so, in one comparison per request.
        if (
            self._head_span + self._read_len > self.max_header_bytes
            and self._head_size() > self.max_header_bytes
        ):
            self._too_large("the request line and headers")
            return
        self._head_begun = False
        self._in_body, self._bytes_without_body, self._headers_ended = True, 0, True
        self._disarm()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refused:  # the body of a refused head, read with it
            return
        self._body_seen = True
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._in_body, self._message_ended = False, True
        if not self._head_begun:  # what runs is the wait for the rest of an answered request's body
            self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        last = not self.pipeline  # else uvicorn starts the next pipelined request now
        super().on_response_complete()
        if self._refused:
            if last and self._deferred is not None and not self.transport.is_closing():
                answer, self._deferred = self._deferred, None
                self._close(answer, linger=not self._eof)  # after a half-close nothing is left unread
            return
        # The body the parser is in must be this request's: self.cycle is the latest request parsed, so
        # with a pipelined request started just now the body is that one's, which its app is reading under
        # its own timeout (BodyLimitMiddleware's 408; this timer closed the connection silently before it).
        if self._in_body and self.cycle.response_complete and not self.transport.is_closing():
            # Answered before its body was read (a 405, 404 or 401 is sent without reading it): uvicorn
            # reads and drops the rest for as long as it keeps coming, and any byte cancels its keep-alive
            # timer (armed again only when a response completes), so a body trickled a byte at a time held
            # the connection for good. It gets as long as a body read by the app would, then the connection
            # is closed.
            self._arm(self.body_timeout_s)

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own answer to bytes its parser rejects (a broken request line, two Content-Lengths, a
        # bad chunk size, TLS or HTTP/2 spoken to a plain HTTP/1.1 port) is text/plain with no request id.
        self._refuse(400, "bad_request", "not a valid HTTP/1.1 request (request line, headers or framing)")

    def _unsupported_upgrade_warning(self) -> None:
        # uvicorn warns twice per Upgrade request, the second time that no WebSocket library is installed:
        # with ws="none" (service.__main__) that is on purpose, and a scanner's upgrades would flood the log.
        log.debug("an Upgrade request is served as plain HTTP")

    def _head_size(self) -> int:
        """The head that has just ended, as the parser delivered it: the bytes on the wire less the optional
        whitespace around header values, which the parser drops (and nothing keeps), so never more than was
        sent. Counted from the parts uvicorn keeps, not the read, whose other bytes may be bodies and other
        heads (a pipelined head behind a 30 KB body is not charged with it)."""
        size = len(self.parser.get_method()) + len(self.url) + 14  # " ", " HTTP/1.1\r\n", the blank line
        for name, value in self.headers:
            size += len(name) + len(value) + 3  # ":" and "\r\n"
        return size

    def _arm(self, delay_s: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay_s, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if not self._head_begun:  # nothing sent, or an answered request's body: closed quietly
            self.on_refusal("unread_body_timeout" if self._in_body else "idle")
            self.transport.close()
            return
        if self.flow.read_paused:
            # uvicorn has stopped reading: requests pipelined behind one still being answered wait unread
            # (HttpToolsProtocol.on_headers_complete pauses reading until it completes). The rest of this
            # head may be in the socket's buffer, so the time is not the client's: it starts again. Before, a
            # pipelined request got a 408, sent whole and at once, when the one two ahead took longer than
            # the header timeout; the 408 took the place of their answers.
            self._arm(self.header_timeout_s)
            return
        within = f"{self.header_timeout_s:g} s"
        self._refuse(408, "request_timeout", f"the request line and headers did not arrive within {within}")

    def _too_large(self, what: str) -> None:
        self._refuse(431, "headers_too_large", f"{what} are over the limit of {self.max_header_bytes} bytes")

    def _refuse(self, status: int, code: str, message: str) -> None:
        if self._refused:  # a parser error in the rest of the read that held a refused head
            return
        # What follows in the read being parsed (a head refused where it ends: its body, the heads behind
        # it) is parsed on but not acted on: the callbacks above return at once. Raising from one would stop
        # the parser, but uvicorn would log that as "Invalid HTTP request received." and call for a 400.
        self._refused = True
        self._disarm()
        self._head_begun = False
        self.on_refusal(code)
        answer = self._answer(status, code, message)
        cycle = self.cycle  # the latest request parsed; those before it are answered first, in order
        if cycle is None or cycle.response_complete:
            self._close(answer)
        elif self._in_body:
            self._refuse_own_body(cycle, answer)
        else:
            # A head pipelined behind requests still being answered. Written now, the refusal went out in
            # the middle of a response being sent (or took the place of the answers still to come).
            self._defer(answer)

    def _refuse_connection(self) -> None:
        # uvicorn's own limit_concurrency does not bound connections: it is checked when a request's head
        # is complete, so a connection over it stays open (a file descriptor, a protocol object) for as
        # long as it sends nothing or half a head; it counts requests in flight too (for model requests
        # AdmissionMiddleware's MAX_IN_FLIGHT does, with a JSON 503), and answers text/plain with no
        # request id, uncounted. Here the connection is answered and closed as soon as it is accepted,
        # without waiting for its request, which would hold the descriptor for as long as the client took
        # to send it. A request already sent is left unread, so the close may reach the client as a reset,
        # after the answer: httpx reads the 503 even with a 2 MB upload under way (tried on loopback).
        self._refused = True
        self.on_refusal("too_many_connections")
        message = f"the server has its limit of {self.max_connections} connections open; try again shortly"
        self._close(self._answer(503, "overloaded", message, b"retry-after: 1\r\n"), linger=False)

    def _refuse_own_body(self, cycle: RequestResponseCycle, answer: bytes) -> None:
        """What is refused is `cycle`'s own body (its chunked framing): its app sees a disconnect, and what
        it still sends is dropped."""
        cycle.disconnected = True
        cycle.message_event.set()
        if self.pipeline and self.pipeline[0][0] is cycle:  # queued behind another: it never runs
            self.pipeline.popleft()
            self._defer(answer)
        elif cycle.response_started:  # no room for a second response
            self._close(None)
        else:
            self._close(answer)

    def _defer(self, answer: bytes) -> None:
        # Sent when the last of the responses before it is (on_response_complete), and the connection
        # closed; meanwhile nothing more is read into the parser. If one of them closes the connection
        # (Connection: close, a stop, an app that fails mid-response), the refusal is never written.
        self._deferred = answer

    def _answer(self, status: int, code: str, message: str, extra_headers: bytes = b"") -> bytes:
        rid = new_request_id()
        # No request line follows (the app never sees this request): the id and status as fields here.
        log.warning(
            "request_id=%s refused by the server: %d %s",
            rid,
            status,
            message,
            extra={"request_id": rid, "status": status},
        )
        body = error_body(code, message, rid)
        head = [STATUS_LINE[status]]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"x-request-id: " + rid.encode() + b"\r\n",
            _ANSWER_HEADERS,
            extra_headers,
            b"connection: close\r\n\r\n",
        ]
        return b"".join(head) + body

    def _close(self, answer: bytes | None, linger: bool = True) -> None:
        self._disarm()
        if answer is None:
            self.transport.close()
            return
        self.transport.write(answer)
        if not (linger and self.transport.can_write_eof()):
            self.transport.close()
            return
        # A close with the client's bytes still unread (the rest of an oversized head it is still sending)
        # makes the kernel answer them with a reset, which can destroy the answer before the client reads
        # it: seen as ECONNRESET instead of the 431. So, like nginx's lingering close: send the answer and
        # our end of the stream, keep reading (and dropping: _refused) until the client closes its end or
        # LINGER_S has passed. A connection over MAX_CONNECTIONS is closed at once: it holds a descriptor.
        self._refused = True
        self.transport.write_eof()
        self.flow.resume_reading()
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)


def protocol_for(
    settings: Settings, on_refusal: Callable[[str], None] | None = None
) -> type[HttpToolsProtocol]:
    """The protocol class uvicorn is to use for these settings; `on_refusal` counts what it refuses."""
    attrs: dict[str, Any] = {
        "header_timeout_s": settings.HEADER_TIMEOUT_S,
        "max_header_bytes": settings.MAX_HEADER_BYTES,
        "idle_timeout_s": float(settings.KEEP_ALIVE_S),
        "body_timeout_s": settings.BODY_TIMEOUT_S,
        "max_connections": settings.MAX_CONNECTIONS,
    }
    if on_refusal is not None:
        attrs["on_refusal"] = staticmethod(on_refusal)
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), attrs)
