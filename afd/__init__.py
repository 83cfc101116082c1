"""afd: an inference engine for DeepSeek-style MoE models, disaggregated twice
(prefill/decode pools; attention ranks apart from expert-parallel FFN ranks)."""

from afd.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from afd.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestMetrics", "RequestOutput",
           "RequestOutputKind", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM on first use: afd.llm imports torch, which the HTTP front end (afd.api_server, a
    # process of its own that runs no model) never needs
    if name == "LLM":
        from afd.llm import LLM

        return LLM
    raise AttributeError(f"module 'afd' has no attribute {name!r}")
