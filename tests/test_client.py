"""The client's defaults: generated idempotency keys the server always accepts."""

from __future__ import annotations

from authopt.client import new_request_id
from authopt.v1 import optimizer_pb2
from server.validation import find_card_number


def test_generated_request_ids_are_unique_and_never_look_like_card_numbers() -> None:
    # uuid4().hex, the previous generator, held a Luhn-valid run of 12+ digits in ~0.3 % of keys:
    # the server refused those requests with PAN_DETECTED.
    ids = [new_request_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for rid in ids:
        assert 1 <= len(rid) <= 128 and rid.isascii() and rid.isprintable()
        assert find_card_number(optimizer_pb2.RecommendRequest(request_id=rid)) is None, rid
