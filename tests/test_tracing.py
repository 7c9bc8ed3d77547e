"""Spans: one per RPC continuing the caller's traceparent, children for each stage, attributes."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import ServerFactory, make_request

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


async def test_span_tree_continues_the_callers_trace(
    start_server: ServerFactory, model_dir: Path, spans: InMemorySpanExporter
) -> None:
    srv = await start_server(model_dir=model_dir)
    metadata = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
    resp = await srv.stub.Recommend(make_request(), timeout=5, metadata=metadata)
    finished = spans.get_finished_spans()
    rpc = [s for s in finished if s.name.endswith("/Recommend")]
    assert len(rpc) == 1
    root = rpc[0]
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert root.parent is not None and format(root.parent.span_id, "016x") == PARENT_ID
    children = {
        s.name: s for s in finished if s.parent is not None and s.parent.span_id == root.context.span_id
    }
    assert {"features", "queue_wait", "inference", "policy"} <= set(children)
    for child in children.values():
        assert child.context.trace_id == root.context.trace_id
    attrs = root.attributes or {}
    assert attrs["authopt.decision_source"] == "DECISION_SOURCE_MODEL"
    assert attrs["authopt.model_version"] == "1"
    assert attrs["authopt.route"] == resp.routes[0].route_id
    assert int(attrs["authopt.batch_size"]) >= 1  # type: ignore[arg-type]


async def test_without_traceparent_a_new_trace_starts(
    start_server: ServerFactory, model_dir: Path, spans: InMemorySpanExporter
) -> None:
    srv = await start_server(model_dir=model_dir)
    await srv.stub.Recommend(make_request(), timeout=5)
    root = next(s for s in spans.get_finished_spans() if s.name.endswith("/Recommend"))
    assert root.parent is None
