"""Which forward path a config takes, and which configs are refused, from config.json alone."""

import pytest

from llmos.common.architectures import check_servable, implementation
from llmos.common.errors import FailedPrecondition


@pytest.mark.parametrize(("config", "path"), [
    ({"architectures": ["LlamaForCausalLM"]}, "llmos"),
    ({"architectures": ["LlamaForCausalLM"], "attention_bias": True}, "transformers"),  # o_proj's bias
    ({"architectures": ["LlamaForCausalLM"], "mlp_bias": True}, "transformers"),
    ({"architectures": ["Qwen2ForCausalLM"], "attention_bias": True}, "llmos"),           # q/k/v biases only
    ({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096, "use_sliding_window": False,
      "max_position_embeddings": 32768}, "llmos"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096, "max_position_embeddings": 32768},
     "transformers"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": None, "max_position_embeddings": 32768}, "llmos"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096, "max_position_embeddings": 4096}, "llmos"),
    ({"architectures": ["GPT2LMHeadModel"]}, "transformers"),
    ({"architectures": ["Gemma2ForCausalLM"], "sliding_window": 4096}, "transformers"),
])
def test_the_lean_path_only_where_it_computes_what_the_config_says(config, path):
    check_servable(config)
    assert implementation(config) == path


@pytest.mark.parametrize(("config", "reason"), [
    ({"architectures": ["BertForMaskedLM"]}, "NOT_A_CAUSAL_LM"),
    ({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}, "NOT_A_CAUSAL_LM"),
    ({"architectures": ["BartForCausalLM"], "is_encoder_decoder": True}, "NOT_A_CAUSAL_LM"),
    ({}, "NOT_A_CAUSAL_LM"),
    ({"architectures": ["MyForCausalLM"], "auto_map": {"AutoModelForCausalLM": "my.MyForCausalLM"}},
     "REMOTE_CODE_REFUSED"),
])
def test_what_no_path_runs_is_refused_with_its_reason(config, reason):
    with pytest.raises(FailedPrecondition) as caught:
        check_servable(config)
    assert caught.value.reason == reason
