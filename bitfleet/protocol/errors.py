"""The one exception every wire decoder raises for bad input.

A process that receives a message from the network must never crash on it: it logs the reason
and drops the message. Decoders therefore raise only `ProtocolError`, whatever is wrong with the
bytes, so a receive loop needs exactly one `except` clause. `reason` is a short stable code for
logs, metrics and tests; the message is for people.
"""

from __future__ import annotations

__all__ = ["ProtocolError"]


class ProtocolError(ValueError):
    """A payload, topic or identifier that does not follow the wire protocol.

    Reasons in use: bad_json, bad_type, bad_value, schema_version, missing_field,
    unknown_type, unexpected_type, too_large, bad_chunk, sha256_mismatch, bad_tensors,
    bad_topic, bad_device_id.
    """

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.detail = message

    def __reduce__(self) -> tuple[type[ProtocolError], tuple[str, str]]:
        # Keep reason and detail apart across pickling (multiprocessing, pytest-xdist).
        return (type(self), (self.reason, self.detail))
