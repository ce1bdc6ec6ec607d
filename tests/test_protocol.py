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
    import pickle

    evil = pickle.dumps({"seq": 0})
    with pytest.raises(ProtocolError):
        decode([b"traces", evil])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=5))
def test_random_bytes_never_escape_as_anything_but_protocol_error(parts):
    try:
        decode(parts)
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
    try:
        msg = decode(parts)
    except ProtocolError:
        return
    # Anything accepted must be self-consistent.
    for spec in msg.header["buffers"]:
        assert msg.arrays[spec["name"]].shape == tuple(spec["shape"])
