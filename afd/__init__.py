"""afd: an inference engine for DeepSeek-style MoE models, disaggregated twice
(prefill/decode pools; attention ranks apart from expert-parallel FFN ranks)."""

from afd.llm import LLM
from afd.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from afd.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestMetrics", "RequestOutput",
           "RequestOutputKind", "SamplingParams"]
__version__ = "0.1.0"
