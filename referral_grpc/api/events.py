"""The EventService servicer: log entries to typed Event messages, pages and the live stream."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.protobuf import json_format

from ..domain.events import EVENT_TYPES, EventLog, EventStream, EventView
from ..gen import event_service_pb2, event_service_pb2_grpc
from . import convert

pb = event_service_pb2


def payload_field(event_type: str) -> str:
    """The Event.payload field of a dotted type: "referral.qualified" -> "referral_qualified"."""
    return event_type.replace(".", "_")


# Every declared type has its payload message in the contract (checked at import, not at first use).
_PAYLOAD_FIELDS = {name: pb.Event.DESCRIPTOR.fields_by_name[payload_field(name)] for name in EVENT_TYPES}


def event_message(view: EventView) -> event_service_pb2.Event:
    message = pb.Event(
        id=view.event_id,
        cursor=view.cursor,
        type=view.type,
        occurred_at=convert.timestamp(view.occurred_at),
    )
    field = _PAYLOAD_FIELDS[view.type]
    json_format.ParseDict(view.payload, getattr(message, field.name))
    return message


class EventServicer(event_service_pb2_grpc.EventServiceServicer):
    def __init__(self, log: EventLog, stream: EventStream) -> None:
        self._log = log
        self._stream = stream

    def ListEvents(
        self, request: event_service_pb2.ListEventsRequest, context: grpc.ServicerContext
    ) -> event_service_pb2.ListEventsResponse:
        page = self._log.list_events(request.after_cursor, list(request.types), request.page_size)
        return pb.ListEventsResponse(
            events=[event_message(view) for view in page.events], next_cursor=page.next_cursor
        )

    def WatchEvents(
        self, request: event_service_pb2.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[event_service_pb2.Event]:
        # Validated before the first message (the stream is a plain function returning an iterator),
        # so bad input is an error status, not a stream that ends at once.
        views = self._stream.watch(request.after_cursor, list(request.types), context.is_active)
        return (event_message(view) for view in views)
