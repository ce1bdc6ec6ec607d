"""Wire protocol: encode/decode round trips, and hostile input is refused with a reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calm_rt.errors import ProtocolError
from calm_rt.wire.protocol import ALLOWED_DTYPES, PROTOCOL_VERSION, decode, encode


def _frames(parts):
    return [bytes(p) for p in parts]


def _decoded_or_refused(parts):
    """Decode ``parts``: refused with a ProtocolError (None), or accepted and self-consistent."""
    try:
        msg = decode(parts)
    except ProtocolError:
        return None
    for spec in msg.header["buffers"]:
        assert msg.arrays[spec["name"]].shape == tuple(spec["shape"])
    return msg


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
def test_round_trip_every_dtype(dtype):
    arr = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    msg = decode(_frames(encode("frame", {"seq": 5, "t_acq": 1.5}, {"image": arr})))
    assert msg.topic == "frame" and msg.seq == 5 and msg.header["v"] == PROTOCOL_VERSION
    np.testing.assert_array_equal(msg.arrays["image"], arr)
    assert msg.arrays["image"].dtype == np.dtype(dtype)
    assert not msg.arrays["image"].flags.writeable  # zero-copy views are read-only


def test_non_contiguous_and_big_endian_arrays_are_sent_correctly():
    arr = np.arange(20, dtype=">f4").reshape(4, 5)[:, ::2]
    msg = decode(_frames(encode("traces", {"seq": 0}, {"x": arr})))
    np.testing.assert_array_equal(msg.arrays["x"], arr)


def test_several_buffers_and_empty_ones():
    parts = encode(
        "forecast",
        {"seq": 1},
        {"mean": np.ones((3, 2), np.float32), "empty": np.zeros(0, np.int64)},
    )
    msg = decode(_frames(parts))
    assert msg.arrays["mean"].shape == (3, 2) and msg.arrays["empty"].size == 0


def _header(**over):
    head = {
        "v": PROTOCOL_VERSION,
        "type": "traces",
        "seq": 0,
        "buffers": [{"name": "x", "dtype": "float32", "shape": [4]}],
    }
    head.update(over)
    return json.dumps(head).encode()


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"traces"], "got 1 part"),
        ([b"nope", _header(), bytes(16)], "unknown topic"),
        ([b"traces", b"{not json", bytes(16)], "not UTF-8 JSON"),
        ([b"traces", b"[1, 2]", bytes(16)], "JSON object"),
        ([b"traces", _header(v=99), bytes(16)], "version 99"),
        ([b"traces", _header(type="frame"), bytes(16)], "does not match topic"),
        ([b"traces", _header(seq=-1), bytes(16)], "non-negative integer"),
        ([b"traces", _header(seq="7"), bytes(16)], "non-negative integer"),
        ([b"traces", _header(), bytes(15)], "bytes do not match"),  # truncated
        ([b"traces", _header(), bytes(16), bytes(4)], "1 buffer"),  # extra frame
        ([b"traces", _header()], "1 buffer"),  # missing frame
        (
            [
                b"traces",
                _header(buffers=[{"name": "x", "dtype": "object", "shape": [4]}]),
                bytes(16),
            ],
            "not allowed",
        ),
        (
            [
                b"traces",
                _header(buffers=[{"name": "x", "dtype": "float32", "shape": [1 << 20, 1 << 20]}]),
                bytes(16),
            ],
            "exceed",
        ),
        (
            [
                b"traces",
                _header(buffers=[{"name": "x", "dtype": "float32", "shape": [-4]}]),
                bytes(16),
            ],
            "sizes >= 0",
        ),
        (
            [
                b"traces",
                _header(buffers=[{"name": "x", "dtype": "float32", "shape": [1, 1, 1, 1, 4]}]),
                bytes(16),
            ],
            "at most 4",
        ),
        ([b"traces", _header(buffers="x"), bytes(16)], "list"),
        ([b"traces", _header(t_acq="noon"), bytes(16)], "finite number"),
        ([b"traces", _header(buffers=[{"name": "x"}]), bytes(16)], "needs name, dtype and shape"),
    ],
)
def test_malformed_messages_raise_with_a_reason(frames, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode(frames)


def test_encode_refuses_what_it_cannot_send():
    with pytest.raises(ProtocolError, match="seq"):
        encode("frame", {}, {})
    with pytest.raises(ProtocolError, match="not allowed"):
        encode("frame", {"seq": 0}, {"x": np.array(["a"])})
    with pytest.raises(ProtocolError, match="NaN"):
        encode("status", {"seq": 0, "p99": float("nan")})


def test_no_pickle_is_ever_interpreted():
    """A pickle as the header fails at JSON; a pickle inside a valid message stays raw bytes."""
    import pickle

    evil = pickle.dumps({"seq": 0})
    with pytest.raises(ProtocolError):
        decode([b"traces", evil])

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled')",))

    payload = pickle.dumps(Boom())
    payload += b"\0" * (-len(payload) % 4)
    parts = _frames(
        encode("traces", {"seq": 0}, {"traces": np.zeros(len(payload) // 4, np.float32)})
    )
    parts[2] = payload  # the buffer's bytes, under a valid float32 spec of the right length
    msg = decode(parts)  # would raise SystemExit if anything unpickled it
    assert msg.arrays["traces"].tobytes() == payload
    for dtype in ("object", "O", "|O", "V8", "<U4", "S4"):  # pickle-capable or non-numeric dtypes
        header = json.loads(parts[1])
        header["buffers"][0]["dtype"] = dtype
        with pytest.raises(ProtocolError):
            decode([parts[0], json.dumps(header).encode(), payload])


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.sampled_from(["seq", "v", "type", "t_acq", "buffers", "extra", "behavior"]),
    _JSON,
    st.sampled_from([None, "name", "dtype", "shape"]),
    st.integers(-1, 3),
)
def test_one_mutated_field_of_a_valid_message_is_refused_or_consistent(
    field, value, spec_field, extra_parts
):
    """Structure-aware fuzz: a valid frame with one header or buffer-spec field replaced.

    It gets past the topic and JSON checks (unlike random bytes), so it exercises the header and
    buffer validation; anything accepted must be a self-consistent message.
    """
    parts = _frames(
        encode("traces", {"seq": 5, "t_acq": 1.0}, {"traces": np.arange(8, dtype=np.float32)})
    )
    header = json.loads(parts[1])
    if spec_field is None:
        header[field] = value
    else:
        header["buffers"][0][spec_field] = value
    parts[1] = json.dumps(header, allow_nan=True).encode()
    if extra_parts > 0:
        parts += [b"\0" * 4] * extra_parts  # more buffers than specs
    elif extra_parts < 0:
        parts = parts[:2]  # a spec without its buffer
    msg = _decoded_or_refused(parts)
    if msg is not None:
        assert isinstance(msg.seq, int) and 0 <= msg.seq < 2**63


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"traces", b"frame", b"forecast", b"nope"]),
    st.lists(st.binary(max_size=64), min_size=0, max_size=4),
)
def test_random_bytes_never_escape_as_anything_but_protocol_error(topic, parts):
    """Random parts behind a (mostly) valid topic, so the fuzz reaches the header parser."""
    try:
        decode([topic, *parts])
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(ALLOWED_DTYPES),
    st.lists(st.integers(0, 6), min_size=0, max_size=3),
    st.integers(0, 2**40),
)
def test_round_trip_property(dtype, shape, seq):
    arr = np.zeros(shape, dtype=dtype)
    msg = decode(_frames(encode("traces", {"seq": seq}, {"a": arr})))
    assert msg.seq == seq and msg.arrays["a"].shape == tuple(shape)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 3))
def test_corrupted_header_or_buffer_is_refused_or_consistent(junk, which):
    parts = _frames(encode("traces", {"seq": 3}, {"x": np.arange(4, dtype=np.float32)}))
    parts[min(which, len(parts) - 1)] = junk
    _decoded_or_refused(parts)
