"""How a request ended, from FinishGeneration: one mapping, every finish reason."""

from llmos.scheduler.history import Outcome
from llmos.scheduler.servicer import outcome_of_finish
from llmos.v1 import common_pb2


def test_each_finish_reason_has_its_outcome_and_a_broken_stream_overrides_it():
    assert outcome_of_finish(common_pb2.FINISH_REASON_STOP, False) is Outcome.STOP
    assert outcome_of_finish(common_pb2.FINISH_REASON_LENGTH, False) is Outcome.LENGTH
    assert outcome_of_finish(common_pb2.FINISH_REASON_CANCELLED, False) is Outcome.CANCELLED
    assert outcome_of_finish(common_pb2.FINISH_REASON_UNSPECIFIED, False) is Outcome.FAILED
    for reason in common_pb2.FinishReason.values():
        assert outcome_of_finish(reason, True) is Outcome.WORKER_FAILED
    # Every finish reason the contract has maps to an outcome of its own or to FAILED (an error).
    assert {outcome_of_finish(r, False) for r in common_pb2.FinishReason.values()} <= set(Outcome)
