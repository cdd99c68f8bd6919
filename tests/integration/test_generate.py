"""Generate through real in-process services: stream shape, errors, cancellation, health."""

import asyncio

import grpc
import pytest
import torch
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from llmos.v1 import common_pb2, gateway_pb2, registry_pb2, scheduler_pb2, worker_pb2

pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVICE_NAMES = {"gateway": "llmos.v1.GatewayService", "scheduler": "llmos.v1.SchedulerService",
                 "registry": "llmos.v1.RegistryService", "resources": "llmos.v1.ResourceService",
                 "worker": "llmos.v1.WorkerService", "monitor": "llmos.v1.MonitorService"}


def request(prompt="The capital of France is", max_tokens=12, **sampling):
    return gateway_pb2.GenerateRequest(model="tiny", prompt=prompt,
                                       sampling=common_pb2.SamplingParams(max_tokens=max_tokens, **sampling))


async def collect(stack, req, **kwargs):
    return [r async for r in stack.gateway.Generate(req, **kwargs)]


def error_info(exc: grpc.aio.AioRpcError):
    status = next(status_pb2.Status.FromString(value) for key, value in exc.trailing_metadata()
                  if key == rpc_status.GRPC_DETAILS_METADATA_KEY)
    found = {}
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.__name__] = message
    return found


async def test_every_service_serves_health_and_reflection(stack):
    for name in stack.addresses:
        channel = stack.channels[name]
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING, name
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = [r async for r in reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
        services = {s.name for s in responses[0].list_services_response.service}
        assert SERVICE_NAMES[name] in services and "grpc.health.v1.Health" in services
        # The error details every status carries resolve too (grpcurl prints an ErrorInfo's reason).
        responses = [r async for r in reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="google.rpc.ErrorInfo")]))]
        files = [descriptor_pb2.FileDescriptorProto.FromString(f)
                 for f in responses[0].file_descriptor_response.file_descriptor_proto]
        assert "google/rpc/error_details.proto" in [f.name for f in files], name


async def test_stream_matches_plain_transformers_greedy_output(stack, tiny_reference):
    model, tokenizer = tiny_reference
    responses = await collect(stack, request(max_tokens=12))
    assert all(r.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)
    ids = [t for r in responses for t in r.token_ids]
    prompt_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(prompt_ids, max_new_tokens=12, do_sample=False)[0, prompt_ids.shape[1]:]
    assert ids == expected.tolist()[:len(ids)]
    assert last.usage.prompt_tokens == prompt_ids.shape[1]
    assert last.usage.completion_tokens == len(ids)
    text = "".join(r.text for r in responses)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert len({r.request_id for r in responses}) == 1 and responses[0].request_id


async def test_chat_messages_use_the_chat_template(stack, tiny_reference):
    _, tokenizer = tiny_reference
    req = gateway_pb2.GenerateRequest(model="tiny:latest", messages=[
        common_pb2.ChatMessage(role="user", content="What is the capital of France?")],
        sampling=common_pb2.SamplingParams(max_tokens=4))
    responses = await collect(stack, req)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                             add_generation_prompt=True, tokenize=False)
    assert responses[-1].usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False).input_ids)


async def test_same_seed_same_text_and_logprobs_when_asked(stack):
    req = request(max_tokens=16, temperature=1.0, seed=7, logprobs=True)
    first, second = await collect(stack, req), await collect(stack, req)
    assert [t for r in first for t in r.token_ids] == [t for r in second for t in r.token_ids]
    assert all(len(r.logprobs) == len(r.token_ids) for r in first)
    assert all(lp <= 0.0 for r in first for lp in r.logprobs)


async def test_unknown_model_is_not_found_with_reason(stack):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stack, gateway_pb2.GenerateRequest(model="nope", prompt="hi"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value)["ErrorInfo"].reason == "MODEL_NOT_FOUND"


USER_Y = common_pb2.ChatMessage(role="user", content="y")


@pytest.mark.parametrize("req,field", [
    (gateway_pb2.GenerateRequest(model="tiny", prompt=""), "prompt"),
    (gateway_pb2.GenerateRequest(model="tiny"), "prompt"),
    (gateway_pb2.GenerateRequest(model="tiny", prompt="x", messages=[USER_Y]), "prompt"),
    (gateway_pb2.GenerateRequest(model="tiny", prompt="x", sampling=common_pb2.SamplingParams(max_tokens=-1)),
     "sampling.max_tokens"),
    (gateway_pb2.GenerateRequest(model="", prompt="x"), "model"),
    (gateway_pb2.GenerateRequest(model="tiny", prompt="x", priority=99), "priority"),
])
async def test_bad_input_is_invalid_argument_naming_the_field(stack, req, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stack, req)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_info(caught.value)
    assert [v.field for v in details["BadRequest"].field_violations] == [field]
    assert field in caught.value.details()


async def test_a_prompt_longer_than_the_context_is_refused(stack):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stack, request(prompt="Paris " * 400))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value)["ErrorInfo"].reason == "PROMPT_TOO_LONG"


async def _idle(stack, timeout: float = 15.0):
    """Waits (patiently: a loaded machine runs other suites beside this one) until neither the
    worker nor the scheduler runs anything."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        status = await stack.worker.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest())
        stats = await stack.scheduler.GetSchedulerStats(scheduler_pb2.GetSchedulerStatsRequest())
        if status.running == 0 and stats.running == 0:
            return status, stats
        await asyncio.sleep(0.02)
    raise AssertionError(f"not idle: worker running {status.running}, scheduler running {stats.running}")


async def test_cancelling_a_stream_frees_the_worker_and_the_scheduler_slot(stack):
    call = stack.gateway.Generate(request(max_tokens=200))
    received = 0
    async for _ in call:
        received += 1
        if received == 2:
            break
    call.cancel()
    status, stats = await _idle(stack)
    tokens_after_cancel = status.tokens_generated
    await asyncio.sleep(0.2)
    status = await stack.worker.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest())
    assert status.tokens_generated == tokens_after_cancel, "the cancelled sequence kept generating"


async def test_concurrent_streams_each_get_their_own_answer(stack):
    prompts = ["The capital of France is", "Once upon a time", "Café", "東京", "llmos streams", "Emoji too"]
    alone = [await collect(stack, request(p, max_tokens=10)) for p in prompts]
    together = await asyncio.gather(*(collect(stack, request(p, max_tokens=10)) for p in prompts))
    ids = lambda rs: [t for r in rs for t in r.token_ids]  # noqa: E731
    assert [ids(r) for r in together] == [ids(r) for r in alone]
    await _idle(stack)


async def test_monitor_reports_every_component_serving(stack):
    from llmos.v1 import monitor_pb2
    health = await stack.monitor.GetClusterHealth(monitor_pb2.GetClusterHealthRequest())
    assert health.healthy
    assert {c.component for c in health.components} >= {"gateway", "scheduler", "registry", "resources", "worker/w1"}


async def test_registry_reports_the_model_ready_with_its_facts(stack):
    model = (await stack.registry.GetModel(registry_pb2.GetModelRequest(name="tiny"))).model
    assert model.state == common_pb2.Model.STATE_READY
    assert model.architecture == "LlamaForCausalLM" and model.has_chat_template
    assert model.placements[0].worker_id == "w1" and model.placements[0].measured_bytes > 0


async def test_cancelling_10_of_40_streams_leaves_the_rest_whole_and_frees_everything(stack):
    tokens = 40
    before = (await stack.worker.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest())).models[0].tokens_generated
    calls = [stack.worker.GenerateTokens(worker_pb2.GenerateTokensRequest(
        request_id=f"c{i}", model="tiny:latest", prompt=f"Stream number {i} says",
        sampling=common_pb2.SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=1.0, seed=i)))
        for i in range(40)]
    cancelled = set(range(0, 40, 4))

    async def consume(i, call):
        count = 0
        try:
            async for response in call:
                count += len(response.token_ids)
                if i in cancelled and count >= 2:
                    call.cancel()
        except asyncio.CancelledError:
            pass
        return count

    counts = await asyncio.gather(*(consume(i, call) for i, call in enumerate(calls)))
    assert all(call.cancelled() for i, call in enumerate(calls) if i in cancelled)
    assert [c for i, c in enumerate(counts) if i not in cancelled] == [tokens] * 30
    status = await stack.worker.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest())
    for _ in range(50):
        if status.running == 0:
            break
        await asyncio.sleep(0.02)
        status = await stack.worker.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest())
    model = status.models[0]
    assert (model.running, model.waiting, model.kv_tokens_used) == (0, 0, 0)
    assert model.kv_tokens_capacity > 0
    # The cancelled streams stopped early: far fewer than their 400 tokens were generated for them.
    extra = model.tokens_generated - before - 30 * tokens
    print("tokens generated for the cancelled streams:", extra)
    assert extra < 10 * tokens // 2
    await asyncio.sleep(0.2)
    again = (await stack.worker.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest())).models[0]
    assert again.tokens_generated == model.tokens_generated, "a cancelled sequence kept generating"


async def test_top_logprobs_come_with_each_token_most_probable_first(stack):
    responses = await collect(stack, request(max_tokens=6, top_logprobs=3, logprobs=True))
    tops = [top for r in responses for top in r.top_logprobs]
    ids = [t for r in responses for t in r.token_ids]
    assert len(tops) == len(ids) == 6
    for token, top, logprob in zip(ids, tops, [lp for r in responses for lp in r.logprobs], strict=True):
        assert len(top.token_ids) == 3 and list(top.logprobs) == sorted(top.logprobs, reverse=True)
        assert top.token_ids[0] == token          # greedy: the chosen token is the most probable
        assert abs(top.logprobs[0] - logprob) < 1e-5


async def test_load_takes_a_ttl_lease_and_unload_delete_give_everything_back(stack, tiny_model_dir):
    from llmos.v1 import resources_pb2, resources_pb2_grpc

    resources = resources_pb2_grpc.ResourceServiceStub(stack.channels["resources"])
    await stack.registry.ImportModel(registry_pb2.ImportModelRequest(name="tiny", tag="second",
                                                                     source=str(tiny_model_dir)))
    loaded = await stack.registry.LoadModel(registry_pb2.LoadModelRequest(name="tiny:second"))
    assert loaded.model.measured_bytes == loaded.placement.measured_bytes > 0
    leases = (await resources.ListLeases(resources_pb2.ListLeasesRequest())).leases
    lease = next(lease for lease in leases if lease.holder == "worker/w1/model/tiny:second")
    assert lease.ttl.ToSeconds() > 0 and lease.expire_time.seconds > 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.registry.DeleteModel(registry_pb2.DeleteModelRequest(name="tiny:second"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    unloaded = await stack.registry.UnloadModel(registry_pb2.UnloadModelRequest(name="tiny:second"))
    assert unloaded.model.state == common_pb2.Model.STATE_AVAILABLE
    leases = (await resources.ListLeases(resources_pb2.ListLeasesRequest())).leases
    assert not [lease for lease in leases if lease.holder.endswith("tiny:second")]
    status = await stack.worker.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest())
    assert [m.model for m in status.models] == ["tiny:latest"]
    await stack.registry.DeleteModel(registry_pb2.DeleteModelRequest(name="tiny:second"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.registry.GetModel(registry_pb2.GetModelRequest(name="tiny:second"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_watch_models_streams_each_lifecycle_transition(stack, tiny_model_dir):
    kinds = registry_pb2.WatchModelsResponse
    watch = stack.registry.WatchModels(registry_pb2.WatchModelsRequest(name="tiny:third"))
    seen = []

    async def collect_until_deleted():
        async for event in watch:
            seen.append(event)
            if event.kind == kinds.KIND_DELETED:
                return

    collector = asyncio.create_task(collect_until_deleted())
    await asyncio.sleep(0.1)
    await stack.registry.ImportModel(registry_pb2.ImportModelRequest(name="tiny", tag="third",
                                                                     source=str(tiny_model_dir)))
    await stack.registry.LoadModel(registry_pb2.LoadModelRequest(name="tiny:third"))
    await stack.registry.UnloadModel(registry_pb2.UnloadModelRequest(name="tiny:third"))
    await stack.registry.DeleteModel(registry_pb2.DeleteModelRequest(name="tiny:third"))
    await asyncio.wait_for(collector, 5)
    watch.cancel()
    assert [e.kind for e in seen] == [kinds.KIND_IMPORTING, kinds.KIND_IMPORTED, kinds.KIND_LOADING,
                                      kinds.KIND_READY, kinds.KIND_UNLOADING, kinds.KIND_UNLOADED,
                                      kinds.KIND_DELETED]
    assert {e.model for e in seen} == {"tiny:third"}
    assert seen[3].worker_id == "w1" and seen[3].time.seconds > 0


async def test_clients_list_the_models_they_can_generate_with(stack):
    page = await stack.gateway.ListAvailableModels(gateway_pb2.ListAvailableModelsRequest())
    tiny = next(m for m in page.models if m.name == "tiny:latest")
    assert tiny.loaded and tiny.has_chat_template and tiny.context_length == 256
    assert tiny.architecture == "LlamaForCausalLM" and tiny.parameter_count > 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.gateway.ListAvailableModels(gateway_pb2.ListAvailableModelsRequest(page_size=5000))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_request_keep_alive_is_kept_for_the_model(stack):
    req = request(max_tokens=2)
    req.keep_alive.FromSeconds(-1)                     # never unload for idleness
    await collect(stack, req)
    model = (await stack.registry.GetModel(registry_pb2.GetModelRequest(name="tiny"))).model
    assert model.keep_alive.ToSeconds() == -1
    req.keep_alive.FromSeconds(3600)
    await collect(stack, req)
    model = (await stack.registry.GetModel(registry_pb2.GetModelRequest(name="tiny"))).model
    assert model.keep_alive.ToSeconds() == 3600
    req.keep_alive.FromSeconds(40 * 24 * 3600)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stack, req)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "keep_alive" in caught.value.details()


async def test_every_list_rpc_pages(stack):
    """ListWorkers, ListNodes and ListLeases page as every other List (AIP-158): one item a page
    with a token until the last, and a page size out of range is INVALID_ARGUMENT."""
    from llmos.v1 import resources_pb2

    for method, request, field, key in [
            (stack.registry.ListWorkers, registry_pb2.ListWorkersRequest, "workers", "worker_id"),
            (stack.resources.ListNodes, resources_pb2.ListNodesRequest, "nodes", "name"),
            (stack.resources.ListLeases, resources_pb2.ListLeasesRequest, "leases", "name")]:
        # (compared by name: a node's live memory figures change between two calls)
        whole = [getattr(item, key) for item in getattr(await method(request()), field)]
        assert whole, field
        seen, token = [], ""
        while True:
            response = await method(request(page_size=1, page_token=token))
            assert len(getattr(response, field)) == 1
            seen.extend(getattr(item, key) for item in getattr(response, field))
            token = response.next_page_token
            if not token:
                break
        assert seen == whole, field
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await method(request(page_size=1001))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
