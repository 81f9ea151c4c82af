"""EventsService: publishing events (operators) and listing them (viewers) over the engine's
`events`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from conveyor.api import convert
from conveyor.api.caller import caller_from
from conveyor.engine.facade import Engine
from conveyor.v1 import events_service_pb2 as events_pb
from conveyor.v1 import events_service_pb2_grpc as events_grpc


class EventsServicer(events_grpc.EventsServiceServicer):
    """Publish and list events."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def PublishEvent(self, request: events_pb.PublishEventRequest,
                           context: grpc.aio.ServicerContext) -> events_pb.Event:
        event = await self._engine.events.publish(caller_from(context), request.project_id, request.name,
                                                  request.key, convert.struct_to_dict(request, "payload"),
                                                  request.id)
        return convert.published_to_proto(event)

    async def ListEvents(self, request: events_pb.ListEventsRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[events_pb.Event]:
        page = await self._engine.events.list_events(caller_from(context), request.project_id, request.name,
                                                     request.key, request.limit, request.page_token)
        await convert.send_next_page_token(context, page.next_token)
        for event in page.items:
            yield convert.published_to_proto(event)
