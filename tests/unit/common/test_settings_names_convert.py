from dataclasses import dataclass, field

import pytest

from llmos.common.convert import Violations, enum_word, input_from_proto, sampling_from_proto
from llmos.common.errors import InvalidArgument
from llmos.common.names import ModelRef, parse_model_ref
from llmos.common.settings import from_env
from llmos.v1 import common_pb2, gateway_pb2, monitor_pb2


@dataclass(frozen=True)
class Example:
    listen: str = "127.0.0.1:0"
    slots: int = 4
    ratio: float = 0.5
    verbose: bool = False
    roots: tuple[str, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)


def test_settings_read_prefixed_variables_with_types():
    env = {"LLMOS_DEMO_SLOTS": "16", "LLMOS_DEMO_RATIO": "0.9", "LLMOS_DEMO_VERBOSE": "true",
           "LLMOS_DEMO_ROOTS": "/a, /b", "LLMOS_DEMO_WEIGHTS": "a=2, b = 0.5,", "LLMOS_OTHER_SLOTS": "99"}
    settings = from_env(Example, "demo", env)
    assert settings == Example(slots=16, ratio=0.9, verbose=True, roots=("/a", "/b"), weights={"a": 2.0, "b": 0.5})


@pytest.mark.parametrize("raw", ["a", "=2", "a=many"])
def test_settings_reject_a_malformed_pair(raw):
    with pytest.raises(ValueError, match="LLMOS_DEMO_WEIGHTS"):
        from_env(Example, "demo", {"LLMOS_DEMO_WEIGHTS": raw})


def test_settings_reject_a_malformed_number():
    with pytest.raises(ValueError, match="LLMOS_DEMO_SLOTS"):
        from_env(Example, "demo", {"LLMOS_DEMO_SLOTS": "many"})


def test_model_refs_default_the_tag_and_reject_bad_names():
    assert parse_model_ref("smollm2-135m-instruct") == ModelRef("smollm2-135m-instruct", "latest")
    assert parse_model_ref("tiny:v2") == ModelRef("tiny", "v2")
    # The resource name the protos document (AIP-122) names the same model.
    ref = ModelRef("tiny", "v2")
    assert parse_model_ref("models/tiny:v2") == ref == parse_model_ref(ref.resource_name)
    assert parse_model_ref("models/tiny") == ModelRef("tiny", "latest")
    for bad in ["", "Upper", "a b", "../etc", "x:bad tag"]:
        with pytest.raises(InvalidArgument):
            parse_model_ref(bad)


def _violations(request) -> list[str]:
    errors = Violations()
    input_from_proto(request, errors)
    sampling_from_proto(request.sampling, errors)
    return [v.field for v in errors.items]


def test_exactly_one_of_prompt_and_messages():
    assert _violations(gateway_pb2.GenerateRequest(model="m")) == ["prompt"]
    assert _violations(gateway_pb2.GenerateRequest(model="m", prompt="")) == ["prompt"]
    both = gateway_pb2.GenerateRequest(model="m", prompt="x",
                                       messages=[common_pb2.ChatMessage(role="user", content="y")])
    assert _violations(both) == ["prompt"]
    assert _violations(gateway_pb2.GenerateRequest(model="m", prompt="hi")) == []


def test_sampling_violations_name_each_field_and_defaults_apply():
    request = gateway_pb2.GenerateRequest(model="m", prompt="x", sampling=common_pb2.SamplingParams(
        max_tokens=-1, temperature=3.0, top_p=1.5, top_k=-2, repetition_penalty=0.01))
    assert _violations(request) == ["sampling.max_tokens", "sampling.temperature", "sampling.top_p",
                                    "sampling.top_k", "sampling.repetition_penalty"]
    errors = Violations()
    params = sampling_from_proto(common_pb2.SamplingParams(), errors)
    assert errors.items == []
    assert (params.max_tokens, params.temperature, params.top_p, params.repetition_penalty) == (None, 0.0, 1.0, 1.0)
    assert params.greedy and params.seed is None


def test_violations_raise_one_error_listing_all_fields():
    errors = Violations()
    errors.add("a", "bad")
    errors.add("b", "worse")
    with pytest.raises(InvalidArgument) as caught:
        errors.raise_if_any()
    assert [v.field for v in caught.value.violations] == ["a", "b"]
    assert "a: bad" in caught.value.message and "b: worse" in caught.value.message


def test_model_lease_holders_round_trip_and_other_holders_are_not_theirs():
    from llmos.common.names import model_lease_holder, parse_model_lease_holder, worker_lease_prefix

    holder = model_lease_holder("w1", "tiny:latest")
    assert holder == "worker/w1/model/tiny:latest" and holder.startswith(worker_lease_prefix("w1"))
    assert parse_model_lease_holder(holder) == ("w1", "tiny:latest")
    for other in ("someone/else", "worker/w1/kv", "worker//model/m", "worker/w1/model/", "job/w1/model/m"):
        assert parse_model_lease_holder(other) is None, other


def test_enum_words_drop_the_enums_own_prefix():
    assert enum_word(monitor_pb2.ComponentHealth(state=monitor_pb2.ComponentHealth.STATE_NOT_SERVING),
                     "state") == "not_serving"
    assert enum_word(gateway_pb2.GenerateResponse(finish_reason=common_pb2.FINISH_REASON_STOP),
                     "finish_reason") == "stop"
    assert enum_word(monitor_pb2.Alert(), "severity") == "unspecified"
    assert enum_word(monitor_pb2.Alert(severity=99), "severity") == "99"       # a newer peer's value
