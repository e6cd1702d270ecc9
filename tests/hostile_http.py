"""Hostile HTTP cases against the real server process, drawn from a seeded random.Random.

Shared by the long form (tests/stress_hostile.py, ``make stress``: 10,000 cases, a fresh
seed) and the short CI form (tests/test_hostile.py: ~300 cases, a fixed seed).

A case is one or more requests sent at once (pipelined), built from random methods,
paths, HTTP versions, header sets and bodies: unsigned, signed with a registered
device's key (``signed()`` of test_transport) and then corrupted, or correctly signed
around a sealed payload of the wrong shape.  Runs of correctly signed requests share
one kept-alive connection (hundreds of cases on it); an error answer closes it, and
the next case opens another.  Every request that leaves the server waiting for more (a short body, a
head cut off) is followed by a half-close, so nothing here waits for a server timeout:
an answer that does not come within T is a hang.

Each request is judged on its own (see judge()): an answer with a valid HTTP status
line below 500, JSON errors for 4xx; no answer at all only where the request was
malformed at the framing level (no request line, or no end of head), after an answer
that closed the connection, or when the client itself closed early.  After every
batch /health must answer 200 and a signed hello 200.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

import ccsync
from server_attacks import HEALTH, T, ServerProcess, exchange
from test_transport import signed

BATCH = 100                         # cases between two checks of /health and hello
MAX_SESSION = 300                   # correctly signed requests in a row on one connection
X_HEADERS = (ccsync.H_KEY, ccsync.H_TIME, ccsync.H_NONCE, ccsync.H_HEAD, ccsync.H_SIG)
ENDPOINTS = ("/v1/hello", "/v1/pull", "/v1/push")


##### what is sent #############################################################

@dataclass
class Request:
    """One request's bytes and what the server may do with them (see framing())."""

    data: bytes
    method: str                     # a HEAD answer has no body
    framed: bool = True             # a request line and a whole head: it must be answered
    bare_ok: bool = False           # no version on the request line: an HTTP/0.9 answer is fine


@dataclass
class Case:
    kind: str                       # the table's category
    requests: list[Request]
    ending: str = "open"            # open: more may follow; half: write side shut after;
                                    # close / reset: the client goes without reading

    @property
    def data(self) -> bytes:
        """All its bytes, as they are sent: at once."""
        return b"".join(r.data for r in self.requests)


def framing(data: bytes) -> tuple[bool, bool]:
    """(framed, bare_ok) of one request's bytes, as http.server reads them: the request
    line split on whitespace (latin-1), then header lines up to an empty line."""
    line, newline, rest = data.partition(b"\n")
    words = line.decode("latin-1").split()
    ended = bool(newline) and (rest.startswith((b"\r\n", b"\n")) or b"\n\r\n" in rest
                               or b"\n\n" in rest)
    return bool(words) and ended, len(words) == 2


def request(method: str | bytes, path: str | bytes, version: str | None,
            headers: list[tuple], body: bytes = b"") -> Request:
    """The bytes of a request (no header added: Content-Length is the caller's)."""
    def raw(text):
        return text if isinstance(text, bytes) else text.encode("utf-8")
    line = raw(method) + b" " + raw(path) + (b" " + raw(version) if version else b"")
    head = b"".join(raw(k) + b": " + raw(v) + b"\r\n" for k, v in headers)
    data = line + b"\r\n" + head + b"\r\n" + body
    framed, bare_ok = framing(data)
    name = method.decode("latin-1") if isinstance(method, bytes) else method
    return Request(data, name, framed, bare_ok)


def reframed(req: Request, data: bytes) -> Request:
    """``req`` with other bytes (framing worked out again)."""
    framed, bare_ok = framing(data)
    return Request(data, req.method, framed, bare_ok)


##### what is answered #########################################################

class Hang(Exception):
    """Neither an answer nor a close within T."""


class Invalid(Exception):
    """Bytes that are no HTTP answer."""


@dataclass
class Answer:
    status: int | None              # None: an HTTP/0.9 answer (a bare body until close)
    headers: dict
    body: bytes
    declared: int = 0               # Content-Length (a HEAD answer carries no body)

    @property
    def closes(self) -> bool:
        return self.status is None or self.headers.get("connection", "").lower() == "close"


class Reader:
    """A socket's incoming bytes, every wait bounded by ``deadline``."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf, self.ended = sock, b"", False

    def more(self, deadline: float) -> bool:
        """Read once more; False at the end (a close or a reset)."""
        if self.ended:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            raise Hang()
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise Hang() from None
        except OSError:
            chunk = b""
        self.ended = not chunk
        self.buf += chunk
        return bool(chunk)

    def until_end(self, deadline: float) -> bytes:
        """Everything up to the close."""
        while self.more(deadline):
            pass
        rest, self.buf = self.buf, b""
        return rest

    def answer(self, method: str, deadline: float) -> Answer | None:
        """The next final answer (a 100 Continue skipped); None: closed before any byte."""
        while True:
            while b"\r\n\r\n" not in self.buf:
                if self.buf[:5] != b"HTTP/"[:len(self.buf)]:
                    return Answer(None, {}, self.until_end(deadline))
                if not self.more(deadline):
                    if not self.buf:
                        return None
                    raise Invalid("answer cut off in its head")
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            status, headers = parse_head(head)
            if status >= 200:
                break
        length = ccsync.content_length(headers.get("content-length", "x"))
        if length is None:
            raise Invalid("answer without a Content-Length")
        size = 0 if method == "HEAD" else length
        while len(self.buf) < size:
            if not self.more(deadline):
                raise Invalid("answer body cut off")
        body, self.buf = self.buf[:size], self.buf[size:]
        return Answer(status, headers, body, length)


def parse_head(head: bytes) -> tuple[int, dict]:
    """(status, lower-cased headers) of an answer's head; Invalid if it is none."""
    lines = head.split(b"\r\n")
    match = re.fullmatch(rb"HTTP/1\.[01] ([1-5][0-9][0-9]) [^\r\n]*", lines[0])
    if not match:
        raise Invalid(f"no valid status line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise Invalid(f"bad header line {line[:80]!r}")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return int(match[1]), headers


def error_problem(answer: Answer, method: str) -> str | None:
    """What is wrong with an error answer's body (None: a JSON error, as promised)."""
    if b"Traceback" in answer.body or b'File "' in answer.body:
        return "a traceback in the answer"
    if method == "HEAD" and answer.status is not None:
        return None
    try:
        info = json.loads(answer.body)
    except ValueError:
        return "an error answer that is not JSON"
    if not isinstance(info, dict) or (answer.status is not None and not (
            isinstance(info.get("error"), str) and info["error"])):
        return "an error answer without an error message"
    if info.get("code") == "server_error":
        return "a server error"
    if answer.status == 405 and not answer.headers.get("allow"):
        return "a 405 without Allow"
    return None


##### tally ####################################################################

@dataclass
class Tally:
    """Counts for the table, and every failure (with what was sent and got)."""

    seed: int
    cases: int = 0
    requests: int = 0
    connections: int = 0
    longest: int = 0                                    # cases on one connection, at most
    answers: Counter = field(default_factory=Counter, repr=False)     # status -> count
    unanswered: Counter = field(default_factory=Counter, repr=False)  # (kind, why) -> count
    failures: list[str] = field(default_factory=list, repr=False)
    failed: Counter = field(default_factory=Counter)                  # what went wrong -> count
    checks: int = 0                                     # /health + hello after a batch

    def fail(self, case: Case, index: int, what: str, got: bytes = b"",
             req: Request | None = None) -> None:
        """Record a failure: the request it is about (else the whole case) and the answer."""
        at = f" (request {case.requests.index(req) + 1} of {len(case.requests)})" \
            if req is not None and len(case.requests) > 1 else ""
        sent = (req or case).data
        line, _, rest = sent.partition(b"\n")
        shown = f"{line!r}" if len(line) <= 160 else \
            f"{line[:100]!r} ... {line[-40:]!r} (a line of {len(line)} bytes)"
        self.failed[what] += 1
        self.failures.append(f"case {index} [{case.kind}]{at}: {what}\n"
                             f"  sent {len(sent)} bytes: {shown} + {rest[:240]!r}\n"
                             f"  got  {got[:300]!r}")

    def check(self, log: str) -> None:
        """Assert what a user relies on (see the module docstring), and a clean log."""
        assert not self.failures, "\n".join(self.failures[:30])
        problems = log_problems(log)
        assert not problems, "\n".join(problems[:30])

    def table(self) -> str:
        rows = [f"hostile HTTP, seed {self.seed}: {self.cases} cases, {self.requests} "
                f"requests, {self.connections} connections (at most {self.longest} cases "
                f"on one), {self.checks} checks of /health + hello",
                "answers by status:"]
        rows += [f"  {status!s:>24}  {n:6}" for status, n in sorted(
            self.answers.items(), key=lambda kv: str(kv[0]))]
        rows.append("no answer, by category and why:")
        rows += [f"  {kind:>16}  {why:<26}  {n:6}"
                 for (kind, why), n in sorted(self.unanswered.items())]
        rows.append(f"failures: {len(self.failures)}")
        rows += [f"  {n:6}  {what}" for what, n in self.failed.most_common()]
        return "\n".join(rows)


##### the cases ################################################################

class Maker:
    """Draws cases from ``rng``; signed ones with the registered device's ``api_key``."""

    METHODS = ("GET",) * 4 + ("POST",) * 4 + (
        "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT", "get", "PoSt", "BREW",
        "M-SEARCH", b"G\x00T", "G\u00c9T".encode(), b"P\xffST", "X" * 300, "*")
    PATHS = ("/v1/push", "/v1/pull", "/v1/hello", "/health", "/health?x=1", "/v1/hello?a=b",
             "/", "*", "/nope", "/v1/", "//v1/hello", "/v1/hello/../hello", "/v1/%68ello",
             "/%2e%2e/%2e%2e/etc/passwd", "/health%00", "/v1/h\u00e9llo".encode(),
             b"/\xff\xfe", "http://127.0.0.1/v1/hello", "/v1/hello#frag", "/health/")
    VERSIONS = ("HTTP/1.1",) * 6 + ("HTTP/1.0",) * 3 + (
        "HTTP/0.9", "HTTP/2.0", "HTTP/1.x", "http/1.1", "HTTP/1.1 extra", "HTTP/11", None)
    LENGTHS = ("-1", "abc", "1e3", " 12 ", "\u00b2", "+5", "0x10", "", "99999999999999999999",
               "1,1", "\u0661\u0662", "5 5", "007")

    def __init__(self, rng: Random, api_key: str):
        self.rng, self.api_key = rng, api_key
        self.keys = ccsync.DeviceKeys.from_api_key(api_key)
        self.stranger = ccsync.new_api_key()
        self.sent: list[bytes] = []         # signed requests already sent once (replays)

    # -- pieces ---------------------------------------------------------------

    def nonce(self) -> str:
        """A well-formed request nonce (from the seeded generator)."""
        return f"{self.rng.getrandbits(128):032x}"

    def path(self) -> str | bytes:
        """A path: an endpoint, an odd one, or a long one (up to past the 64 KiB head)."""
        if self.rng.random() < 0.1:
            return "/" + "a" * self.rng.choice((1000, 8000, 65000, 70000))
        return self.rng.choice(self.PATHS)

    def odd(self, depth: int = 0):
        """A JSON value of any shape."""
        rng = self.rng
        atoms = (None, True, False, 0, -1, 2 ** 63, -(2 ** 70), 1.5, 1e308, float("nan"), "",
                 "x" * rng.choice((1, 100, 5000)), "\ud800", "\u00e9\u65e5\x00",
                 "2026-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59", f"{rng.getrandbits(64):x}")
        pick = rng.randrange(len(atoms) + (3 if depth < 3 else 0))
        if pick < len(atoms):
            return atoms[pick]
        if pick == len(atoms):
            return [self.odd(depth + 1) for _ in range(rng.randrange(4))]
        keys = ("t", "id", "dev", "c", "p", "v", "records", "cursor", "\u00e9", "")
        return {rng.choice(keys): self.odd(depth + 1) for _ in range(rng.randrange(4))}

    def record(self) -> dict:
        """A record of the right shape with one to three parts of a wrong one (rarely
        none: stored, and pulled by later pulls)."""
        rng = self.rng
        column, value, name = "main_branch", "x", f"hostile-{rng.random()}"
        parts = set() if rng.random() < 0.05 else set(rng.sample(
            ("t", "id", "dev", "c", "p", "value", "key", "column"), rng.randint(1, 3)))
        if "column" in parts:
            column = rng.choice(("id", "sync_id", "~", "x" * 200, "\u00e9", "", "name"))
        value = self.odd() if "value" in parts else value
        name = self.odd() if "key" in parts else name
        rec = {"t": "project", "id": str(uuid.UUID(int=rng.getrandbits(128))),
               "dev": "hostile", "c": {column: ccsync.hlc_at(int(time.time() * 1000))},
               "p": {"v": {column: value}, "k": {"name": name}}}
        for part in parts & set(rec):
            rec[part] = self.odd()
        return rec

    def payload(self, path: str):
        """A payload of a wrong shape for ``path`` (sometimes not even an object)."""
        rng = self.rng
        if rng.random() < 0.1:
            return self.odd()
        if path == "/v1/push":
            records = rng.choice((lambda: self.odd(), lambda: [self.odd() for _ in range(3)],
                                  lambda: [self.record() for _ in range(rng.randrange(1, 4))]))()
            out = {"records": records, "cursor": rng.choice((None, 0, -1, 2 ** 63, "0", 1.0,
                                                             True))}
        elif path == "/v1/pull":
            out = {k: self.odd() if rng.random() < 0.5 else rng.choice((0, 1, 100, 10 ** 9))
                   for k in ("cursor", "limit", "since", "max_bytes") if rng.random() < 0.7}
        else:
            out = {"time": self.odd(), self.rng.choice(("x", "records")): self.odd()}
        if rng.random() < 0.2:
            out["protocol"] = rng.choice((2, 4, "3", None, True, 3.0, -1, 2 ** 70))
        return out

    def valid_payload(self, path: str) -> dict:
        """A payload the server takes (200): odd records in a push are refused one by one."""
        rng = self.rng
        if path == "/v1/pull":
            return rng.choice(({"cursor": rng.randrange(10), "limit": rng.choice((1, 10, 100))},
                               {"cursor": 2 ** 40, "limit": 10 ** 6, "max_bytes": 1},
                               {"cursor": 0, "limit": 5, "since": "2026-01-01T00:00:00+01:00"},
                               {"cursor": 0, "limit": 5, "extra": self.odd()}))
        if path == "/v1/push":
            return {"records": [self.record() for _ in range(rng.randrange(3))],
                    "cursor": rng.choice((None, 0))}
        return {"time": time.time(), **({"extra": self.odd()} if rng.random() < 0.3 else {})}

    def seal_any(self, value, path: str, stamp: str, nonce: str) -> bytes:
        """``value`` (any JSON) sealed as the device would seal a payload."""
        context = ccsync.request_context("POST", path, stamp, nonce, self.keys.key_id)
        aes = ccsync._aes()
        cipher = aes.new(self.keys.enc, aes.MODE_GCM, nonce=self.rng.randbytes(12))
        cipher.update(context)
        sealed, tag = cipher.encrypt_and_digest(zlib.compress(json.dumps(value).encode()))
        return cipher.nonce + sealed + tag

    def signed_parts(self, path: str, payload=None, **kw) -> tuple[list[tuple], bytes]:
        """Header list and body of a signed request (as test_transport.signed builds it)."""
        kw.setdefault("nonce", self.nonce())
        if payload is not None and not isinstance(payload, dict):
            stamp = kw.setdefault("stamp", str(int(time.time())))
            kw["body"] = self.seal_any(payload, path, stamp, kw["nonce"])
            payload = None
        headers, body = signed(self.api_key, path, payload, **kw)
        return [("Host", "x"), *headers.items()], body

    @staticmethod
    def with_length(headers: list[tuple], body: bytes) -> list[tuple]:
        """``headers`` and the body's true Content-Length."""
        return [*headers, ("Content-Length", str(len(body)))]

    # -- the kinds of case ------------------------------------------------------

    def valid(self, remember: bool = True) -> Case:
        """A correctly signed request, in one of the forms a client may use: a 200
        (``remember``: kept to be replayed later, as it is sent whole)."""
        rng, path = self.rng, self.rng.choice(ENDPOINTS)
        headers, body = self.signed_parts(path, self.valid_payload(path))
        headers = self.with_length(headers, body)
        if rng.random() < 0.2:
            headers = [(k.lower(), v) for k, v in headers]
        if rng.random() < 0.1:
            headers.append(("Expect", "100-continue"))
        if rng.random() < 0.1:
            headers.append(("X-Extra", "\u00e9".encode("latin-1")))
        version = "HTTP/1.1"
        if rng.random() < 0.1:          # an HTTP/1.0 client asks to keep the connection
            version, headers = "HTTP/1.0", [*headers, ("Connection", "keep-alive")]
        sent = path + ("?q=1" if rng.random() < 0.1 else "")
        req = request("POST", sent, version, headers, body)
        if remember:
            self.sent.append(req.data)
        return Case("signed-valid", [req])

    def wrong_shape(self) -> Case:
        """Correctly signed, sealed around a payload of the wrong shape."""
        path = self.rng.choice(ENDPOINTS)
        headers, body = self.signed_parts(path, self.payload(path))
        return Case("signed-shape", [request("POST", path, "HTTP/1.1",
                                             self.with_length(headers, body), body)])

    def session(self, longest: int) -> list[Case]:
        """Up to ``longest`` correctly signed requests in a row, on one kept-alive
        connection, and one request of a wrong shape."""
        n = self.rng.randint(1, longest)
        return [self.valid() for _ in range(n)] + [self.wrong_shape()]

    def bad_header(self) -> Case:
        """A signed request with one of its signature headers missing, doubled,
        oversized, non-ASCII, for another key, corrupted, or signed at a wrong time."""
        rng, path = self.rng, self.rng.choice(ENDPOINTS)
        how = rng.choice(("drop", "dup", "huge", "non-ascii", "key-id", "flip", "stamp",
                          "nonce", "content-type", "replay", "stranger"))
        if how == "replay" and self.sent:
            data = rng.choice(self.sent[-50:])
            framed, bare_ok = framing(data)
            return Case("replay", [Request(data, "POST", framed, bare_ok)])
        kw = {}
        if how == "stamp":
            skewed = int(time.time()) + rng.choice((-1, 1)) * 10 ** rng.randint(3, 11)
            kw["stamp"] = rng.choice((str(skewed), "0", "-5", "abc", "1" * 13, " 1"))
        if how == "nonce":
            kw["nonce"] = rng.choice(("zz", "A" * 32, "0" * 15, "0" * 65, "g" * 32, ""))
        if how == "stranger":
            headers, body = signed(self.stranger, path, {})
            headers = [("Host", "x"), *headers.items()]
        else:
            headers, body = self.signed_parts(path, self.valid_payload(path), **kw)
        headers = self.mutate_header(how, headers)
        return Case(f"header-{how}", [request("POST", path, "HTTP/1.1",
                                              self.with_length(headers, body), body)])

    def mutate_header(self, how: str, headers: list[tuple]) -> list[tuple]:
        """``headers`` with one change of kind ``how`` (see bad_header)."""
        rng = self.rng
        name = {"key-id": ccsync.H_KEY, "flip": rng.choice((ccsync.H_SIG, ccsync.H_HEAD)),
                "content-type": "Content-Type"}.get(how, rng.choice(X_HEADERS))
        index = [k for k, _v in headers].index(name)
        value = headers[index][1]
        if how == "drop":
            gone = set(rng.sample(X_HEADERS, rng.randint(1, len(X_HEADERS))))
            return [(k, v) for k, v in headers if k not in gone]
        if how == "dup":
            extra = (name, rng.choice(("", "0" * 64, value[::-1], "\u00e9")))
            pair = [extra, (name, value)] if rng.random() < 0.5 else [(name, value), extra]
            return headers[:index] + pair + headers[index + 1:]
        if how == "huge":
            value = "a" * rng.choice((1000, 8000, 60000))
        elif how == "non-ascii":
            text, encodings = rng.choice(((value + "\u00ff", ("latin-1", "utf-8")),
                                          ("\u00e9" * 64, ("latin-1", "utf-8")),
                                          ("\u65e5\u672c", ("utf-8",))))
            value = text.encode(rng.choice(encodings))
        elif how == "key-id":
            value = rng.choice(("0" * 32, f"{rng.getrandbits(128):032x}", value.upper(),
                                value[:-1], value + "0"))
        elif how == "flip":
            at = rng.randrange(len(value))
            value = value[:at] + ("0" if value[at] != "0" else "1") + value[at + 1:]
        elif how == "content-type":
            value = rng.choice(("application/json", "", "APPLICATION/X-CCSYNC", "text/plain",
                                ccsync.WIRE_TYPE + "; charset=utf-8", ccsync.WIRE_TYPE + "\x00"))
        else:
            return headers
        return headers[:index] + [(name, value)] + headers[index + 1:]

    def bad_body(self) -> Case:
        """A correctly signed head around a body that is not what it signs: random bytes,
        sealed for another endpoint, cut short (then a half-close), or empty."""
        rng, path = self.rng, self.rng.choice(ENDPOINTS)
        how = rng.choice(("random", "other-path", "short", "empty", "padded"))
        if how == "random":
            headers, body = self.signed_parts(path, body=rng.randbytes(rng.randrange(64)))
        elif how == "other-path":
            headers, body = self.signed_parts(path, self.valid_payload(path),
                                              seal_path=rng.choice(ENDPOINTS + ("/x",)))
        elif how == "empty":
            headers, body = self.signed_parts(path, body=b"")
        elif how == "padded":          # big but fine
            headers, body = self.signed_parts(path, {**self.valid_payload(path),
                                                     "pad": "p" * rng.choice((10, 100_000))})
        else:
            headers, body = self.signed_parts(path, self.valid_payload(path))
        req = request("POST", path, "HTTP/1.1", self.with_length(headers, body), body)
        if how == "short":
            return Case("body-short", [reframed(req, req.data[:len(req.data) - rng.randint(
                1, len(body))])], "half")
        return Case(f"body-{how}", [req])

    def plain(self) -> Case:
        """Any method, path and version, a few unsigned headers, maybe a small body."""
        rng = self.rng
        body = rng.choice((b"", b"{}", b'{"records": []}', rng.randbytes(rng.randrange(200))))
        headers = [("Host", "x")] if rng.random() < 0.8 else []
        if rng.random() < 0.5:
            headers.append(("Content-Type", rng.choice((ccsync.WIRE_TYPE, "application/json"))))
        if body or rng.random() < 0.5:
            headers.append(("Content-Length", str(len(body))))
        if rng.random() < 0.2:
            headers.append(("Connection", rng.choice(("close", "keep-alive", "upgrade"))))
        req = request(rng.choice(self.METHODS), self.path(), rng.choice(self.VERSIONS),
                      headers, body)
        return Case("plain", [req], "open" if req.framed else "half")

    def bad_length(self) -> Case:
        """A request (signed or not) whose Content-Length is malformed, doubled, or lies."""
        rng = self.rng
        base = (self.valid(False) if rng.random() < 0.5 else self.plain()).requests[0]
        head, _, body = base.data.partition(b"\r\n\r\n")
        lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"content-length:")]
        values = [rng.choice(self.LENGTHS + (str(len(body) + rng.randint(1, 50)),
                                             str(max(0, len(body) - rng.randint(1, 50))),
                                             str(len(body))))
                  for _ in range(rng.choice((1, 1, 2)))]
        lines += [b"Content-Length: " + v.encode() for v in values]
        data = b"\r\n".join(lines) + b"\r\n\r\n" + body
        return Case("length", [reframed(base, data)], "half")

    def chunked(self) -> Case:
        """Transfer-Encoding: chunked, with or without a Content-Length."""
        rng = self.rng
        path = rng.choice(ENDPOINTS + ("/health",))
        headers, body = self.signed_parts(path, self.valid_payload(path))
        chunks = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n"
                          for part in (body[:10], body[10:]) if part) + b"0\r\n\r\n"
        headers.append(("Transfer-Encoding", rng.choice(("chunked", "Chunked", "gzip, chunked",
                                                         "identity", "chunked, chunked"))))
        if rng.random() < 0.5:
            headers.append(("Content-Length", str(rng.choice((len(body), len(chunks), 0)))))
        return Case("chunked", [request(rng.choice(("POST", "GET")), path, "HTTP/1.1",
                                        headers, chunks)], "half")

    def expect(self) -> Case:
        """Expect: 100-continue on a request the server refuses (or takes)."""
        rng = self.rng
        base = rng.choice((self.plain, self.bad_header, self.valid))().requests[0]
        head, _, body = base.data.partition(b"\r\n\r\n")
        data = head + b"\r\nExpect: " + rng.choice((b"100-continue", b"100-Continue",
                                                     b"200-ok")) + b"\r\n\r\n" + body
        return Case("expect", [reframed(base, data)], "half")

    def junk_head(self) -> Case:
        """Heads that are not HTTP, or not quite: bytes, other protocols, stray blank
        lines, LF-only lines, odd header lines, too many or too long headers, a cut head."""
        rng = self.rng
        ok = b"GET /health HTTP/1.1\r\nHost: x\r\n"
        how = rng.choice(("bytes", "tls", "ssh", "h2", "blank", "lf", "no-colon", "fold",
                          "nul", "space-colon", "non-ascii-name", "many", "long", "cut"))
        data = {
            "bytes": lambda: rng.randbytes(rng.randrange(1, 3000)),
            "tls": lambda: b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + rng.randbytes(64),
            "ssh": lambda: b"SSH-2.0-OpenSSH_9.6\r\n",
            "h2": lambda: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "blank": lambda: b"\r\n" * rng.randint(1, 3) + ok + b"\r\n",
            "lf": lambda: ok.replace(b"\r\n", b"\n") + b"\n",
            "no-colon": lambda: ok + b"just words\r\n\r\n",
            "fold": lambda: ok + b"X-A: 1\r\n  folded\r\n\r\n",
            "nul": lambda: ok + b"X-A: \x00\x01\r\n\r\n",
            "space-colon": lambda: ok + b"Content-Length : 5\r\n\r\nhello",
            "non-ascii-name": lambda: ok + "X-\u00e9: 1\r\n".encode() + b"\xff: 2\r\n\r\n",
            "many": lambda: ok + b"".join(b"X-%d: 1\r\n" % i for i in range(
                rng.choice((99, 101, 500)))) + b"\r\n",
            "long": lambda: ok + b"X-Pad: " + b"a" * rng.choice((60000, 65530, 70000))
            + b"\r\n\r\n",
            "cut": lambda: self.valid(False).requests[0].data[:rng.randrange(1, 200)],
        }[how]()
        framed, bare_ok = framing(data)
        return Case(f"junk-{how}", [Request(data, "GET", framed, bare_ok)], "half")

    def pipelined(self) -> Case:
        """Several requests sent at once; maybe a hostile one among them."""
        rng = self.rng
        makers = (self.valid,) * 4 + (self.wrong_shape, self.plain, self.bad_header)
        reqs = [rng.choice(makers)().requests[0] for _ in range(rng.randint(2, 6))]
        ending = "open"
        if rng.random() < 0.3:
            reqs.append(rng.choice((self.junk_head, self.bad_length))().requests[0])
            ending = "half"
        return Case("pipelined", reqs, ending)

    def early_close(self) -> Case:
        """A case the client closes (sometimes with a reset) at some point of sending."""
        rng = self.rng
        base = rng.choice((lambda: self.valid(False), self.plain, self.bad_body, self.chunked))()
        data = base.data[:rng.randint(0, len(base.data))]
        framed, bare_ok = framing(data)
        return Case("early-close", [Request(data, base.requests[0].method, framed, bare_ok)],
                    rng.choice(("close", "reset")))

    def cases(self, count: int):
        """``count`` cases (a session counts each of its requests)."""
        longest = max(1, min(MAX_SESSION, count // 3))
        kinds = ((lambda: self.session(longest), 0.5), (self.wrong_shape, 8),
                 (self.bad_header, 14), (self.bad_body, 8), (self.plain, 16),
                 (self.bad_length, 8), (self.chunked, 5), (self.expect, 5),
                 (self.junk_head, 12), (self.pipelined, 8), (self.early_close, 6))
        makers, weights = zip(*kinds)
        made = 0
        while made < count:
            drawn = self.rng.choices(makers, weights)[0]()
            for case in (drawn if isinstance(drawn, list) else [drawn])[:count - made]:
                made += 1
                yield case


##### running ##################################################################

class Connection:
    """A client connection and what it has read; how many cases it carried."""

    def __init__(self, address):
        self.sock = socket.create_connection(address, timeout=T)
        self.reader = Reader(self.sock)
        self.cases = 0

    def close(self, reset: bool = False) -> None:
        if reset:                           # an RST instead of a FIN
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def send(conn: Connection, case: Case) -> None:
    """All of the case's bytes at once (then a half-close where the case says)."""
    try:
        conn.sock.settimeout(T)
        conn.sock.sendall(case.data)
        if case.ending == "half":
            conn.sock.shutdown(socket.SHUT_WR)
    except OSError:                         # the server stopped reading: read its answer
        pass


def judge(answer: Answer, req: Request) -> str | None:
    """What is wrong with ``answer`` to ``req`` (None: nothing)."""
    if answer.status is None:
        if not req.bare_ok:
            return "an answer without an HTTP status line"
        return error_problem(answer, req.method)
    if answer.status >= 500:
        return f"a {answer.status}"
    if answer.status >= 400:
        return error_problem(answer, req.method)
    return None


def run_case(conn: Connection, case: Case, index: int, tally: Tally) -> bool:
    """Send ``case``, judge every answer; True if the connection may carry the next."""
    send(conn, case)
    tally.requests += len(case.requests)
    if case.ending in ("close", "reset"):
        conn.close(reset=case.ending == "reset")
        tally.unanswered[(case.kind, "client closed early")] += len(case.requests)
        return False
    deadline = time.monotonic() + T
    try:
        if read_answers(conn, case, index, tally, deadline) or case.ending == "half":
            extra_answers(conn, case, index, tally, deadline)
            return False
        return True
    except Hang:
        tally.fail(case, index, f"neither an answer nor a close within {T:g} s", conn.reader.buf)
    except Invalid as exc:
        tally.fail(case, index, str(exc), conn.reader.buf)
    return False


def read_answers(conn: Connection, case: Case, index: int, tally: Tally,
                 deadline: float) -> bool:
    """Read and judge the answer to each request in turn; True once the server closed."""
    gone = None                             # why no more answers come
    for req in case.requests:
        if gone:
            tally.unanswered[(case.kind, gone)] += 1
            continue
        answer = conn.reader.answer(req.method, deadline)
        if answer is None:
            if req.framed:
                tally.fail(case, index, "closed without answering a whole request", req=req)
            else:
                tally.unanswered[(case.kind, "malformed framing")] += 1
            gone = "after the close"
            continue
        tally.answers["HTTP/0.9 bare body" if answer.status is None else answer.status] += 1
        problem = judge(answer, req)
        if problem:
            tally.fail(case, index, problem, answer.body, req)
        if answer.closes:
            gone = "after a closing answer"
            rest = conn.reader.until_end(deadline)
            if rest and not (req.method == "HEAD" and len(rest) == answer.declared):
                tally.fail(case, index, "bytes after an answer that closed", rest, req)
    return gone is not None


def extra_answers(conn: Connection, case: Case, index: int, tally: Tally,
                  deadline: float) -> None:
    """Answers to bytes the server read as more requests (a body it did not take)."""
    while True:
        answer = conn.reader.answer("?", deadline)
        if answer is None:
            return
        tally.answers[f"{answer.status or 'bare'} (to bytes past the request)"] += 1
        if answer.status is not None and answer.status >= 500:
            tally.fail(case, index, f"a {answer.status} to bytes past the request", answer.body)


class Runner:
    """Cases in order, a kept-alive connection carried from one to the next (across
    batches too) while the server keeps it open."""

    def __init__(self, address, tally: Tally):
        self.address, self.tally = address, tally
        self.conn: Connection | None = None

    def run(self, case: Case, index: int) -> None:
        if self.conn is None:
            self.conn = Connection(self.address)
            self.tally.connections += 1
        self.tally.cases += 1
        self.conn.cases += 1
        self.tally.longest = max(self.tally.longest, self.conn.cases)
        if not run_case(self.conn, case, index, self.tally):
            self.close()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def check_server(address, api_key: str, tally: Tally, after: int) -> None:
    """/health answers 200 and a device's signed hello gets 200."""
    tally.checks += 1
    health = exchange(address, HEALTH)
    if not health.startswith(b"HTTP/1.1 200 "):
        tally.failures.append(f"/health after case {after}: {health[:200]!r}")
    client = ccsync.Client(f"http://{address[0]}:{address[1]}", api_key, timeout=T)
    try:
        client.hello()
    except ccsync.CcsyncError as exc:
        tally.failures.append(f"signed hello after case {after}: {exc}")
    finally:
        client.close()


def run_hostile(tmp_path: Path, count: int, seed: int) -> tuple[Tally, str]:
    """``count`` cases against a fresh server process: the tally and the server's log."""
    tally = Tally(seed)
    server = ServerProcess(tmp_path)
    try:
        store = ccsync.ServerStore.open(str(tmp_path / "server.db"))
        api_key = store.register("hostile")
        store.conn.close()
        address = ("127.0.0.1", server.port)
        runner = Runner(address, tally)
        try:
            for index, case in enumerate(Maker(Random(seed), api_key).cases(count)):
                runner.run(case, index)
                if (index + 1) % BATCH == 0 or index == count - 1:
                    check_server(address, api_key, tally, index)
        finally:
            runner.close()
        if server.proc.poll() is not None:
            tally.failures.append(f"the server process died (exit {server.proc.returncode})")
    finally:
        server.stop()
    return tally, server.log.read_text(errors="replace")


def log_problems(log: str) -> list[str]:
    """Lines of the server's log that say something went wrong inside it: a traceback,
    a 500, or a connection error other than the client going away."""
    gone = ("BrokenPipeError", "ConnectionResetError", "ConnectionAbortedError")
    return [line for line in log.splitlines()
            if "Traceback" in line or " 500 " in line or line.startswith("  File ")
            or "connection error" in line and not any(g in line for g in gone)]
