"""Large payloads (model state, ONNX files) as a sequence of MQTT messages of at most 1 MiB each.

Brokers cap packet sizes and hold whole packets in memory, and a 40 MB model in one PUBLISH would
stall every other message on the connection, so a blob travels as chunks. Each chunk is
self-describing, `>I` header length + UTF-8 JSON header + raw bytes, with

    {"v": 1, "payload_id": <uuid4 hex>, "kind": <str>, "index": i, "count": n,
     "size": <blob bytes>, "sha256": <hex of the whole blob>, "meta": {...}}

so a receiver can reassemble chunks in any order, ignore QoS 1 redeliveries and detect corruption
from the sha256 of the whole (which also covers a lost or mixed-up chunk). A chunk always starts
with a zero byte (the header is far below 16 MiB) and a JSON control message with `{`, so one topic
can carry both; see `is_chunk`.

The receiver trusts nothing in a header: `Reassembler` bounds the bytes, chunks and concurrent
partial payloads it will hold, and forgets payloads that stop arriving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bitfleet.protocol.errors import ProtocolError
from bitfleet.protocol.messages import SCHEMA_VERSION, parse_json

__all__ = ["MAX_CHUNK", "MAX_HEADER", "Payload", "Reassembler", "is_chunk", "split_payload"]

log = logging.getLogger(__name__)

#: Largest data part of one chunk (the header comes on top).
MAX_CHUNK = 1024 * 1024

#: Largest JSON header of one chunk; `meta` must fit in it.
MAX_HEADER = 64 * 1024

_LEN = struct.Struct(">I")
_PAYLOAD_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Payload:
    """A reassembled blob. `source` is what the caller passed to `Reassembler.add` (a topic)."""

    kind: str
    meta: dict[str, Any]
    blob: bytes = field(repr=False)
    payload_id: str
    source: str = ""


def is_chunk(payload: bytes) -> bool:
    """Whether `payload` looks like a chunk rather than a JSON control message."""
    return len(payload) >= _LEN.size and payload[0] == 0


def split_payload(
    kind: str,
    meta: Mapping[str, Any],
    blob: bytes,
    chunk_size: int = MAX_CHUNK,
    *,
    payload_id: str | None = None,
) -> list[bytes]:
    """Cut `blob` into chunk messages carrying `kind` and `meta` (meta is in every chunk).

    Each call gets a fresh random `payload_id` (uuid4 hex) unless one is given: pass it to get
    the same bytes for the same input (property tests replaying an example), and never reuse
    one for a different blob from the same sender, which a receiver would take for a redelivery.
    """
    if not isinstance(kind, str) or not 0 < len(kind) <= 64:
        raise ValueError(f"kind must be a string of 1..64 characters, got {kind!r}")
    if not 0 < chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK}, got {chunk_size}")
    if payload_id is None:
        payload_id = uuid.uuid4().hex
    elif not isinstance(payload_id, str) or _PAYLOAD_ID.fullmatch(payload_id) is None:
        raise ValueError(f"payload_id must match {_PAYLOAD_ID.pattern}, got {payload_id!r}")
    blob = bytes(blob)
    count = max(1, math.ceil(len(blob) / chunk_size))
    common = {
        "v": SCHEMA_VERSION,
        "payload_id": payload_id,
        "kind": kind,
        "count": count,
        "size": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "meta": dict(meta),
    }
    chunks = []
    for index in range(count):
        try:
            text = json.dumps({**common, "index": index}, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise ProtocolError("bad_value", f"chunk meta is not JSON: {exc}") from None
        header = text.encode("utf-8")
        if len(header) > MAX_HEADER:
            raise ProtocolError(
                "too_large", f"chunk header is {len(header)} bytes, limit {MAX_HEADER}"
            )
        data = blob[index * chunk_size : (index + 1) * chunk_size]
        chunks.append(_LEN.pack(len(header)) + header + data)
    return chunks


def _int_field(header: dict[str, Any], name: str) -> int:
    value = header.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("bad_chunk", f"header field {name!r} must be an integer, got {value!r}")
    return value


@dataclass
class _Partial:
    kind: str
    count: int
    size: int
    sha256: str
    meta: dict[str, Any] | None
    last_seen: float
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0


class Reassembler:
    """Collects chunks from any number of senders and returns each completed payload once.

    Memory is bounded by `max_partial * max_bytes` (plus bookkeeping): a payload declaring more
    than `max_bytes` or `max_chunks` is refused at its first chunk, at most `max_partial`
    payloads are in progress at once, and one that receives nothing for `timeout_s` is dropped.
    Ids of the last `remember` completed payloads are kept so that a QoS 1 redelivery of a
    chunk does not produce the payload a second time.

    Pass the sender (device id) as `source` when several share one reassembler: payloads are
    keyed by (source, payload_id), and each source has quotas, so that one sender's flood costs
    only that sender's uploads (docs/protocol.md#reassembly-quotas):
    - `max_source_bytes`: the declared sizes of one source's payloads in progress; a new payload
      that would exceed it evicts that source's oldest ones first;
    - `slot_of(meta)`: payloads of one source whose metas give the same slot (an update's round)
      replace each other: a sender that starts an upload over abandons the old one;
    - when `max_partial` is reached, the oldest payload of the source holding the most declared
      bytes goes, never one of a source within a fair share.
    `evicted` counts the payloads evicted (not expired) per source.
    Not thread-safe; call it from one thread (the MQTT network thread, or one worker).
    """

    def __init__(
        self,
        max_bytes: int,
        max_chunks: int,
        timeout_s: float,
        *,
        max_chunk: int = MAX_CHUNK,
        max_partial: int = 64,
        remember: int = 1024,
        max_source_bytes: int | None = None,
        slot_of: Callable[[dict[str, Any]], object] | None = None,
    ) -> None:
        if max_bytes < 0 or max_chunks < 1 or timeout_s <= 0 or max_chunk < 1 or max_partial < 1:
            raise ValueError("Reassembler limits must be positive")
        if max_source_bytes is not None and max_source_bytes < max_bytes:
            raise ValueError("max_source_bytes must hold at least one payload of max_bytes")
        self.max_source_bytes = max_source_bytes
        self.slot_of = slot_of
        self.evicted: Counter[str] = Counter()
        self.max_bytes = max_bytes
        self.max_chunks = max_chunks
        self.timeout_s = timeout_s
        self.max_chunk = max_chunk
        self.max_partial = max_partial
        self.remember = remember
        self._partials: dict[tuple[str, str], _Partial] = {}
        self._completed: OrderedDict[tuple[str, str], None] = OrderedDict()

    @property
    def pending(self) -> int:
        """Number of payloads in progress."""
        return len(self._partials)

    def _parse(self, payload: bytes) -> tuple[dict[str, Any], memoryview]:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise ProtocolError("bad_chunk", f"chunk must be bytes, got {type(payload).__name__}")
        view = memoryview(payload).cast("B")
        if len(view) < _LEN.size:
            raise ProtocolError("bad_chunk", f"chunk of {len(view)} bytes has no header length")
        (header_len,) = _LEN.unpack(view[: _LEN.size])
        if header_len > MAX_HEADER:
            raise ProtocolError("too_large", f"chunk header of {header_len} bytes")
        if header_len > len(view) - _LEN.size:
            raise ProtocolError("bad_chunk", "chunk is shorter than its header length says")
        raw = bytes(view[_LEN.size : _LEN.size + header_len])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("bad_chunk", f"chunk header is not UTF-8: {exc}") from None
        header = parse_json(text, "the chunk header", reason="bad_chunk", value_reason="bad_chunk")
        if not isinstance(header, dict):
            raise ProtocolError("bad_chunk", "chunk header is not a JSON object")
        version = header.get("v")
        if isinstance(version, bool) or version != SCHEMA_VERSION:
            raise ProtocolError("schema_version", f"chunk version {version!r}")
        data = view[_LEN.size + header_len :]
        self._check_header(header, len(data))
        return header, data

    def _check_header(self, header: dict[str, Any], data_len: int) -> None:
        payload_id, kind, sha = header.get("payload_id"), header.get("kind"), header.get("sha256")
        if not isinstance(payload_id, str) or _PAYLOAD_ID.fullmatch(payload_id) is None:
            raise ProtocolError("bad_chunk", f"bad payload_id {payload_id!r}")
        if not isinstance(kind, str) or not 0 < len(kind) <= 64:
            raise ProtocolError("bad_chunk", f"bad kind {kind!r}")
        if not isinstance(sha, str) or _SHA256.fullmatch(sha) is None:
            raise ProtocolError("bad_chunk", f"bad sha256 {sha!r}")
        index, count, size = (_int_field(header, k) for k in ("index", "count", "size"))
        if count < 1 or size < 0 or not 0 <= index < count:
            raise ProtocolError("bad_chunk", f"index {index}, count {count}, size {size}")
        if count > self.max_chunks:
            raise ProtocolError("too_large", f"{count} chunks, limit {self.max_chunks}")
        if size > self.max_bytes:
            raise ProtocolError("too_large", f"payload of {size} bytes, limit {self.max_bytes}")
        if data_len > self.max_chunk or size > count * self.max_chunk:
            raise ProtocolError("too_large", f"chunks larger than {self.max_chunk} bytes")
        if count > max(1, size) or data_len > size:
            raise ProtocolError("bad_chunk", f"{count} chunks cannot carry {size} bytes")
        meta = header.get("meta")
        if meta is None and index == 0:
            raise ProtocolError("bad_chunk", "chunk 0 carries no meta")
        if meta is not None and not isinstance(meta, dict):
            raise ProtocolError("bad_chunk", "meta must be a JSON object")

    def add(self, payload: bytes, now: float | None = None, source: str = "") -> Payload | None:
        """Take one chunk; return the payload it completes, else None.

        Raises ProtocolError for a malformed chunk, one that breaks a limit or disagrees with
        earlier chunks of its payload, and for a completed payload whose sha256 does not match
        (that payload is dropped; the sender must send it again under a new id).
        """
        header, data = self._parse(payload)
        now = time.monotonic() if now is None else now
        key = (source, header["payload_id"])
        if key in self._completed:
            return None  # a redelivery of a payload we already returned
        self.expire(now)
        partial = self._partials.get(key)
        if partial is None:
            self._make_room(source, header)
            partial = _Partial(
                kind=header["kind"],
                count=header["count"],
                size=header["size"],
                sha256=header["sha256"],
                meta=header.get("meta"),
                last_seen=now,
            )
            self._partials[key] = partial
        else:
            self._check_agrees(partial, header)
        partial.last_seen = now
        index = header["index"]
        if index in partial.parts:
            return None  # duplicate chunk
        if partial.received + len(data) > partial.size:
            raise ProtocolError("bad_chunk", f"chunks of {key[1]} exceed its size {partial.size}")
        partial.parts[index] = bytes(data)
        partial.received += len(data)
        if partial.meta is None:
            partial.meta = header.get("meta")
        if len(partial.parts) < partial.count:
            return None
        return self._complete(key, partial)

    def _make_room(self, source: str, header: dict[str, Any]) -> None:
        """Evict what a new payload of `source` displaces, from `source` itself where it can."""
        mine = sorted(
            (k for k in self._partials if k[0] == source), key=lambda k: self._partials[k].last_seen
        )
        meta = header.get("meta")
        slot_of = self.slot_of
        if slot_of is not None and isinstance(meta, dict):
            slot = slot_of(meta)
            same = [k for k in mine if (m := self._partials[k].meta) and slot_of(m) == slot]
            for key in same:
                self._evict(key, "a newer upload for the same slot started")
                mine.remove(key)
        if self.max_source_bytes is not None:
            held = sum(self._partials[k].size for k in mine)
            while mine and held + header["size"] > self.max_source_bytes:
                oldest = mine.pop(0)
                held -= self._partials[oldest].size
                self._evict(oldest, f"its uploads would exceed {self.max_source_bytes} bytes")
        if len(self._partials) >= self.max_partial:
            bytes_of: Counter[str] = Counter()
            for (src, _), p in self._partials.items():
                bytes_of[src] += p.size
            heaviest = max(bytes_of, key=lambda src: (bytes_of[src], src == source))
            victim = min(
                (k for k in self._partials if k[0] == heaviest),
                key=lambda k: self._partials[k].last_seen,
            )
            self._evict(victim, "too many uploads in progress, this source holds the most")

    def _evict(self, key: tuple[str, str], why: str) -> None:
        del self._partials[key]
        self.evicted[key[0]] += 1
        log.warning("dropping incomplete payload %s from %r: %s", key[1], key[0], why)

    @staticmethod
    def _check_agrees(partial: _Partial, header: dict[str, Any]) -> None:
        fields = ("kind", "count", "size", "sha256")
        for name in fields:
            if header[name] != getattr(partial, name):
                raise ProtocolError(
                    "bad_chunk",
                    f"payload {header['payload_id']}: {name} {header[name]!r} disagrees with "
                    f"earlier chunks ({getattr(partial, name)!r})",
                )
        meta = header.get("meta")
        if meta is not None and partial.meta is not None and meta != partial.meta:
            raise ProtocolError("bad_chunk", f"payload {header['payload_id']}: meta disagrees")

    def _complete(self, key: tuple[str, str], partial: _Partial) -> Payload:
        del self._partials[key]
        blob = b"".join(partial.parts[i] for i in range(partial.count))
        if len(blob) != partial.size:
            raise ProtocolError(
                "bad_chunk", f"payload {key[1]} has {len(blob)} bytes, not {partial.size}"
            )
        if hashlib.sha256(blob).hexdigest() != partial.sha256:
            raise ProtocolError("sha256_mismatch", f"payload {key[1]} from {key[0]!r} is corrupt")
        self._completed[key] = None
        while len(self._completed) > self.remember:
            self._completed.popitem(last=False)
        meta = partial.meta if partial.meta is not None else {}  # chunk 0 always carries meta
        return Payload(partial.kind, meta, blob, key[1], key[0])

    def expire(self, now: float | None = None) -> list[str]:
        """Drop payloads with no chunk for `timeout_s`; return their ids."""
        now = time.monotonic() if now is None else now
        stale = [k for k, p in self._partials.items() if now - p.last_seen > self.timeout_s]
        for key in stale:
            partial = self._partials.pop(key)
            log.warning(
                "dropping incomplete payload %s from %r: %d of %d chunks after %.0f s",
                key[1],
                key[0],
                len(partial.parts),
                partial.count,
                self.timeout_s,
            )
        return [k[1] for k in stale]

    def discard(self, payload_id: str, source: str = "") -> bool:
        """Forget an incomplete payload (e.g. the sender gave up); True if there was one."""
        return self._partials.pop((source, payload_id), None) is not None

    def discard_source(self, source: str) -> int:
        """Forget every incomplete payload from `source` (e.g. a sender that went offline, whose
        uploads can never complete); return how many."""
        doomed = [key for key in self._partials if key[0] == source]
        for key in doomed:
            del self._partials[key]
        return len(doomed)
