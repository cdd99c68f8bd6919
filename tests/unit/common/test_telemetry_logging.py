"""The log noise of cancelled streams (a context token reset in another context) stays at DEBUG."""

import logging

from llmos.common.telemetry import setup_logging


class Keep(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_failed_context_detach_is_kept_below_info():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("INFO")
        keep = Keep()
        root.addHandler(keep)
        context_log = logging.getLogger("opentelemetry.context")
        context_log.error("Failed to detach context")
        context_log.error("something else went wrong")
        assert keep.messages == ["something else went wrong"]
        root.setLevel(logging.DEBUG)
        context_log.error("Failed to detach context")
        assert keep.messages[-1] == "Failed to detach context"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
