"""Protobuf messages serialized column-wise: many rows' bytes at once, without building a message.

`encode(descriptor, fields, n)` writes the wire format of `n` messages of one type from columns:
a text field from an Arrow string or binary array, a varint field (integers, enums, booleans) from
a numpy array, a sub-message from a nested mapping of its own fields, and any field from a
constant (`Const`). Fields are written in field-number order, proto3 defaults (empty text, zero)
are left out and a sub-message is always written, as `SerializeToString()` does, so the bytes equal
it (tests/test_history_columnar.py compares the two). Each varint column is a numpy computation,
each message one `binary_join_element_wise`: `authopt log import` serializes its events this way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf.descriptor import Descriptor, FieldDescriptor

__all__ = ["Const", "Fields", "encode", "varints"]

_LENGTH_DELIMITED = 2
_VARINT = 0
_TEXT = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
_VARINTS = (
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_ENUM,
    FieldDescriptor.TYPE_BOOL,
)


@dataclass(frozen=True)
class Const:
    """The same value in every row (a text, a number, or a sub-message's fields)."""

    value: Any


Fields = Mapping[str, Union[pa.Array, npt.NDArray[Any], Const, "Fields"]]


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64: its 10-byte two's complement, as protobuf writes it
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint_bytes(number << 3 | wire_type)


def varints(tag: bytes, values: npt.NDArray[Any], *, omit_zero: bool) -> pa.BinaryArray:
    """Per row: `tag` then `values[i]` as a base-128 varint (nothing at all for a 0 when `omit_zero`)."""
    v = np.asarray(values).astype(np.int64).view(np.uint64)
    n = v.shape[0]
    count = np.ones(n, dtype=np.int64)
    top = int(v.max()) if n else 0
    for k in range(1, 10):
        if top < 1 << (7 * k):
            break
        count += v >= np.uint64(1 << (7 * k))
    width = len(tag) + count
    if omit_zero:
        width[v == 0] = 0
    most = int(width.max()) if n else 0
    matrix = np.zeros((n, max(most, 1)), dtype=np.uint8)
    if tag:
        matrix[:, : len(tag)] = np.frombuffer(tag, dtype=np.uint8)
    for k in range(max(most - len(tag), 0)):
        byte = (v >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = count > k + 1
        matrix[:, len(tag) + k] = (byte | (more.astype(np.uint64) << np.uint64(7))).astype(np.uint8)
    used = np.arange(matrix.shape[1]) < width[:, None]
    data = matrix[used]
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(width, out=offsets[1:])
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data.tobytes())])


def _lengths(values: pa.Array) -> npt.NDArray[np.int64]:
    lengths: npt.NDArray[np.int64] = pc.binary_length(values).to_numpy(zero_copy_only=False).astype(np.int64)
    return lengths


def _message_type(field: FieldDescriptor) -> Descriptor:
    if field.message_type is None:
        raise TypeError(f"{field.full_name} is not a message field")
    return field.message_type


def _constant(field: FieldDescriptor, value: Any) -> bytes:
    """One row's bytes of `field` holding the constant `value`."""
    if field.type in _TEXT:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        return b"" if not raw else _tag(field.number, _LENGTH_DELIMITED) + _varint_bytes(len(raw)) + raw
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        body: bytes = encode(_message_type(field), value, 1)[0].as_py()
        return _tag(field.number, _LENGTH_DELIMITED) + _varint_bytes(len(body)) + body
    if field.type in _VARINTS:
        number = int(value)
        return b"" if not number else _tag(field.number, _VARINT) + _varint_bytes(number)
    raise TypeError(f"{field.full_name}: field type {field.type} is not supported column-wise")


def encode(descriptor: Descriptor, fields: Fields, n: int) -> pa.BinaryArray:
    """`n` serialized messages of `descriptor`'s type from `fields` (by field name; absent: unset)."""
    unknown = set(fields) - set(descriptor.fields_by_name)
    if unknown:
        raise KeyError(f"{descriptor.full_name} has no field {', '.join(sorted(unknown))}")
    parts: list[pa.Array | pa.Scalar] = []
    for field in sorted(descriptor.fields, key=lambda f: f.number):
        if field.name not in fields:
            continue
        if field.is_repeated:
            raise TypeError(f"{field.full_name}: repeated fields are not supported column-wise")
        value = fields[field.name]
        if isinstance(value, Const):
            parts.append(pa.scalar(_constant(field, value.value), pa.binary()))
        elif field.type in _TEXT:
            text = value if isinstance(value, pa.Array) else pa.array(value)
            text = text.cast(pa.binary())
            parts += [varints(_tag(field.number, _LENGTH_DELIMITED), _lengths(text), omit_zero=True), text]
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            body = encode(_message_type(field), value, n)  # type: ignore[arg-type]
            parts += [varints(_tag(field.number, _LENGTH_DELIMITED), _lengths(body), omit_zero=False), body]
        elif field.type in _VARINTS:
            parts.append(varints(_tag(field.number, _VARINT), np.asarray(value), omit_zero=True))
        else:
            raise TypeError(f"{field.full_name}: field type {field.type} is not supported column-wise")
    arrays = [p for p in parts if isinstance(p, pa.Array)]
    if not arrays:  # constants only (or nothing): the same bytes in every row
        row = b"".join(p.as_py() for p in parts if isinstance(p, pa.Scalar))
        return pa.array([row] * n, pa.binary())
    if any(len(a) != n for a in arrays):
        raise ValueError(f"{descriptor.full_name}: every column must have {n} rows")
    joined = pc.binary_join_element_wise(*parts, pa.scalar(b"", pa.binary()))
    return joined.cast(pa.binary()) if not isinstance(joined, pa.ChunkedArray) else joined.combine_chunks()
