"""The WebhookService servicer: endpoint management for backends holding the webhooks:manage scope."""

from __future__ import annotations

import grpc

from ..domain.webhooks import DISABLED, ENABLED, AttemptView, EndpointView, WebhookService
from ..gen import webhook_service_pb2, webhook_service_pb2_grpc
from . import convert

pb = webhook_service_pb2
_STATUS = {ENABLED: pb.ENABLED, DISABLED: pb.DISABLED}


def endpoint_message(view: EndpointView) -> webhook_service_pb2.WebhookEndpoint:
    message = pb.WebhookEndpoint(
        id=view.id,
        url=view.url,
        event_types=view.event_types,
        description=view.description,
        status=_STATUS[view.status],
        consecutive_failures=view.consecutive_failures,
        created_at=convert.timestamp(view.created_at),
    )
    if view.last_success_at is not None:
        message.last_success_at.CopyFrom(convert.timestamp(view.last_success_at))
    return message


def attempt_message(view: AttemptView) -> webhook_service_pb2.WebhookDeliveryAttempt:
    return pb.WebhookDeliveryAttempt(
        event_id=view.event_id,
        attempt=view.attempt,
        http_status=view.http_status,
        error=view.error,
        latency_ms=view.latency_ms,
        response_body=view.response_body,
        attempted_at=convert.timestamp(view.attempted_at),
    )


class WebhookServicer(webhook_service_pb2_grpc.WebhookServiceServicer):
    def __init__(self, webhooks: WebhookService) -> None:
        self._webhooks = webhooks

    def CreateWebhookEndpoint(
        self, request: webhook_service_pb2.CreateWebhookEndpointRequest, context: grpc.ServicerContext
    ) -> webhook_service_pb2.CreateWebhookEndpointResponse:
        view, secret = self._webhooks.create(request.url, list(request.event_types), request.description)
        return pb.CreateWebhookEndpointResponse(endpoint=endpoint_message(view), secret=secret)

    def ListWebhookEndpoints(
        self, request: webhook_service_pb2.ListWebhookEndpointsRequest, context: grpc.ServicerContext
    ) -> webhook_service_pb2.ListWebhookEndpointsResponse:
        return pb.ListWebhookEndpointsResponse(
            endpoints=[endpoint_message(v) for v in self._webhooks.endpoints()]
        )

    def GetWebhookEndpoint(
        self, request: webhook_service_pb2.GetWebhookEndpointRequest, context: grpc.ServicerContext
    ) -> webhook_service_pb2.WebhookEndpoint:
        return endpoint_message(self._webhooks.get(request.id))

    def DeleteWebhookEndpoint(
        self, request: webhook_service_pb2.DeleteWebhookEndpointRequest, context: grpc.ServicerContext
    ) -> webhook_service_pb2.DeleteWebhookEndpointResponse:
        self._webhooks.delete(request.id)
        return pb.DeleteWebhookEndpointResponse()

    def RotateWebhookSecret(
        self, request: webhook_service_pb2.RotateWebhookSecretRequest, context: grpc.ServicerContext
    ) -> webhook_service_pb2.RotateWebhookSecretResponse:
        secret, expires_at = self._webhooks.rotate_secret(request.id)
        return pb.RotateWebhookSecretResponse(
            secret=secret, previous_secret_expires_at=convert.timestamp(expires_at)
        )

    def ListWebhookDeliveries(
        self, request: webhook_service_pb2.ListWebhookDeliveriesRequest, context: grpc.ServicerContext
    ) -> webhook_service_pb2.ListWebhookDeliveriesResponse:
        attempts = self._webhooks.attempts(request.id, request.page_size)
        return pb.ListWebhookDeliveriesResponse(attempts=[attempt_message(a) for a in attempts])

    def RedeliverEvents(
        self, request: webhook_service_pb2.RedeliverEventsRequest, context: grpc.ServicerContext
    ) -> webhook_service_pb2.RedeliverEventsResponse:
        queued = self._webhooks.redeliver(request.id, request.after_cursor, request.event_id)
        return pb.RedeliverEventsResponse(queued=queued)

    def EnableWebhookEndpoint(
        self, request: webhook_service_pb2.EnableWebhookEndpointRequest, context: grpc.ServicerContext
    ) -> webhook_service_pb2.WebhookEndpoint:
        return endpoint_message(self._webhooks.enable(request.id))
