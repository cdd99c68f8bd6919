"""gRPC face of the monitor."""

from __future__ import annotations

from llmos.common.convert import duration, queue_depth_to_proto, timestamp
from llmos.v1 import (
    monitor_pb2,
    monitor_pb2_grpc,
    registry_pb2,
)

from .alerts import CRITICAL, FIRING, Alert
from .cluster import AlertEvent, ClusterWatch, HealthEvent, RestartEvent
from .health import (
    NOT_SERVING,
    SERVING,
    STALLED,
    UNREACHABLE,
    ComponentHealth,
)

_STATES = {SERVING: monitor_pb2.ComponentHealth.STATE_SERVING,
           NOT_SERVING: monitor_pb2.ComponentHealth.STATE_NOT_SERVING,
           UNREACHABLE: monitor_pb2.ComponentHealth.STATE_UNREACHABLE,
           STALLED: monitor_pb2.ComponentHealth.STATE_STALLED}
_KIND = registry_pb2.WatchModelsResponse.Kind


def _component(c: ComponentHealth) -> monitor_pb2.ComponentHealth:
    out = monitor_pb2.ComponentHealth(component=c.component, address=c.address, state=_STATES[c.state],
                                      detail=c.detail, running=c.running, metrics_address=c.metrics_address)
    if c.last_progress is not None:
        out.last_progress_time.CopyFrom(timestamp(c.last_progress))
    if c.start_time is not None:
        out.start_time.CopyFrom(timestamp(c.start_time))
    out.restarts = c.restarts
    return out


def _alert(a: Alert) -> monitor_pb2.Alert:
    return monitor_pb2.Alert(
        name=a.name, subject=a.subject, summary=a.summary, since=timestamp(a.since),
        severity=monitor_pb2.Alert.SEVERITY_CRITICAL if a.severity == CRITICAL else monitor_pb2.Alert.SEVERITY_WARNING,
        state=monitor_pb2.Alert.STATE_FIRING if a.state == FIRING else monitor_pb2.Alert.STATE_RESOLVED)


def _event(event) -> monitor_pb2.WatchResponse:
    out = monitor_pb2.WatchResponse(time=timestamp(event.time))
    if isinstance(event, HealthEvent):
        out.health.CopyFrom(monitor_pb2.HealthChange(
            previous=_STATES.get(event.previous, monitor_pb2.ComponentHealth.STATE_UNSPECIFIED),
            health=_component(event.health)))
    elif isinstance(event, AlertEvent):
        out.alert.CopyFrom(_alert(event.alert))
    elif isinstance(event, RestartEvent):
        out.restart.CopyFrom(monitor_pb2.Restart(
            component=event.component, previous_start_time=timestamp(event.previous_start),
            start_time=timestamp(event.start), restarts=event.restarts))
    else:
        out.model.CopyFrom(registry_pb2.WatchModelsResponse(
            model=event.model, kind=_KIND.Value("KIND_" + event.kind.upper()), worker_id=event.worker_id,
            reason=event.reason, time=timestamp(event.time)))
    return out


class MonitorServicer(monitor_pb2_grpc.MonitorServiceServicer):
    def __init__(self, watch: ClusterWatch) -> None:
        self.watch = watch

    async def GetClusterHealth(self, request, context):
        health = await self.watch.check()
        response = monitor_pb2.GetClusterHealthResponse(
            healthy=health.healthy, check_time=timestamp(health.check_time),
            components=[_component(c) for c in health.components],
            queues=[queue_depth_to_proto(q) for q in health.queues],
            alerts=[_alert(a) for a in self.watch.alerts])
        probe = self.watch.probe
        if probe is not None:
            response.probe.CopyFrom(monitor_pb2.ProbeResult(model=probe.model, ok=probe.ok, detail=probe.detail,
                                                            latency=duration(probe.seconds),
                                                            time=timestamp(probe.time)))
        return response

    async def Watch(self, request, context):
        first = self.watch.current() if request.include_current else []
        async for event in self.watch.events.subscribe(first):
            yield _event(event)


def register(host, watch: ClusterWatch) -> None:
    servicer = MonitorServicer(watch)
    host.add(monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"].full_name,
             lambda server: monitor_pb2_grpc.add_MonitorServiceServicer_to_server(servicer, server))
