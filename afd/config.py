"""Engine configuration: one frozen dataclass, resolved once from LLM()/server arguments."""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from afd.spec_decode import SpecConfig, parse_speculative_config
from models.config import MTP_ARCHITECTURES, OTHER_MTP_MODULES, ModelConfig, parse_dtype

if TYPE_CHECKING:  # torch is imported where it is used: the HTTP front end runs no model
    import torch

log = logging.getLogger("afd.config")


@dataclass(frozen=True)
class EngineConfig:
    """Attributes:
    model: checkpoint folder. dtype / device: what the weights and activations run in.
    max_model_len: prompt + generated tokens per sequence at most.
    block_size: tokens per KV block. num_kv_blocks: blocks in this rank's KV pool; None when
        each rank that holds KV sizes its own from its device memory once its weights are
        loaded (CUDA with no size given: ``gpu_memory_utilization``, afd.kv_memory).
    gpu_memory_utilization: the fraction of each GPU's memory a rank may use in all (weights,
        activations, KV), as vLLM's; what its weights and activations leave is its KV pool.
    max_num_seqs: sequences in one step at most.
    max_num_batched_tokens: tokens in one step at most; longer prompts are prefilled in chunks.
    seed: seeds the unseeded samplers, so a whole run is reproducible.
    enforce_eager: run every step eagerly; False captures CUDA graphs of decode steps
    (afd.cuda_graphs), one per batch size in cuda_graph_sizes (in decode rows: a sequence
    verifying k drafts is k + 1 rows). Given as None: False on CUDA (as vLLM), True elsewhere
    (on CPU the graph path runs eagerly and gains nothing), and True for DeepSeek-V4,
    MiMo-V2-Flash / gpt-oss and the hybrid linear-attention models (Qwen3-Next, Qwen3.5-MoE)
    until a GPU has captured them (False opts in).
    ffn_cuda_graphs: on FFN ranks, capture the expert compute of each MoE layer (regroup by
        slot, ``kernels.grouped_moe``, scatter back; not the all_to_all) once per row bucket and
        replay it (afd.ffn_graphs). Opt-in: it has not run on a GPU yet. On CPU nothing is
        captured (the same static-buffer path runs eagerly, which the tests check).
    tokenizer: the tokenizer folder (None: the model's); ranks load it only to build
        structured-output grammars.
    trust_remote_code: the tokenizer may run the Python code its tokenizer_config.json names
        (``auto_map``; afd.llm.load_tokenizer); every process that loads it reads this.
    enable_prefix_caching: keep the KV of full blocks of tokens after their sequence ends and
        reuse it for later sequences that start with the same tokens (afd.block_pool).
    num_state_snapshots: a hybrid model's (models.hybrid) prefix cache: snapshots of its linear
        layers' states kept at block boundaries (afd.state_snapshots), each one sequence's
        conv and recurrent states, beside the max_num_seqs running sequences' slots and
        counted in the KV memory; 0 for every other model, and where prefix caching is off.
    num_offload_blocks: blocks of the host-memory tier of each rank's prefix cache
        (afd.kv_offload; from ``kv_offload_gb``), where evicted cached blocks' KV goes; 0: none.
    cache_aware_routing: with several prefill (or, without a prefill pool, attention) ranks,
        place a prompt on the rank that was sent its longest prefix unless that rank is
        overloaded (afd.router); False places by load alone. Needs enable_prefix_caching.
    prefill_expert_parallel: with a prefill pool of P >= 2 ranks, each prefill rank holds only
        its contiguous slice of the routed experts (about E / P; everything else whole) and the
        pool runs every MoE layer as expert parallelism among its ranks (afd.transport.
        PeerExperts), stepping together (afd.rank_prefill). False: every prefill rank holds the
        whole model and steps on its own.
    quantization: "fp8" when the routed experts are in FP8 on every rank that holds them
        (kernels.fused_moe's w8a8 block path): an FP8 checkpoint's as stored, a bf16/fp32
        checkpoint's quantized on load (models.weights). "mxfp4" when a checkpoint's MXFP4
        routed experts (gpt-oss's, DeepSeek-V4's releases) stay packed on every rank that
        holds them (uint8 with E8M0 scale bytes, kernels.fused_moe's weight-only MXFP4 path).
        None when every weight is in ``dtype``. Only the routed experts: attention, dense
        MLP, shared experts and lm_head are in ``dtype``.
    num_speculative_tokens: draft tokens verified per decoding sequence and step (0: no
        speculative decoding; afd.spec_decode). prompt_lookup_max / prompt_lookup_min: the
        longest and shortest n-gram looked up. speculative_method: "ngram", or "mtp" (drafts
        from the checkpoint's multi-token-prediction layer, which every rank that runs
        attention or experts then loads, with one more layer of KV cache).
        speculative_disable_by_batch_size: a rank with at least this many running sequences
        verifies no drafts that step (0: never; vLLM's ``disable_by_batch_size``).
    load_format: "auto" / "safetensors" (the checkpoint's weights) or "dummy" (vLLM's: random
        weights made from config.json alone, the same on every rank; models.weights).
    hf_overrides: config.json keys replaced on every rank (vLLM's ``hf_overrides``), or None.
    kv_cache_dtype: "auto" (the KV cache in ``dtype``) or "fp8" (FP8 e4m3, scale 1.0: half of
        bf16's bytes a block, twice the blocks for the same memory; ``cache_dtype``,
        ``resolve_kv_cache_dtype``).
    window_pool: the sliding-window layers' caches are a second pool (afd.window_pool: a model
        with such layers, MiMo-V2-Flash and gpt-oss, unless ``num_window_blocks=0`` was
        given), whose blocks out of every query's window go back to it; then
        ``num_kv_blocks`` counts the main pool's blocks (the other layers') and
        ``num_window_blocks`` the window pool's (None where each rank sizes both from its
        memory, as ``num_kv_blocks``).
    scheduling_policy: "fcfs" (requests in arrival order; a request's ``priority`` must be 0)
        or "priority" (vLLM's: the waiting queue in (priority, arrival) order, lower values
        first; the running sequence preempted for KV blocks is the one with the largest
        priority value, latest arrived among equals).
    async_scheduling: overlap a step's host work with the device's forward (vLLM's
        ``--async-scheduling``; afd.core ``EngineCore``): step N + 1 is scheduled and launched
        before step N's samples are read on the host, each sequence that samples in N counted
        as having one more token whose input id the runner takes from N's samples on the
        device. The single-process engine and attention ranks (P/D decode ranks among them;
        prefill ranks and layouts with FFN ranks step synchronously), without speculative
        decoding; the steps that need their samples on the host before the next is built run
        synchronously (docs/limits.md#async-scheduling). Off: every step synchronous.
    """

    model: str
    dtype: torch.dtype
    device: str
    max_model_len: int
    block_size: int
    num_kv_blocks: int | None
    max_num_seqs: int
    max_num_batched_tokens: int
    seed: int = 0
    enforce_eager: bool = True
    cuda_graph_sizes: tuple[int, ...] = ()
    ffn_cuda_graphs: bool = False
    enable_prefix_caching: bool = True
    num_offload_blocks: int = 0
    cache_aware_routing: bool = True
    prefill_expert_parallel: bool = False
    tokenizer: str | None = None
    trust_remote_code: bool = False
    quantization: str | None = None
    num_speculative_tokens: int = 0
    prompt_lookup_max: int = 0
    prompt_lookup_min: int = 0
    speculative_method: str = "ngram"
    speculative_disable_by_batch_size: int = 0
    scheduling_policy: str = "fcfs"
    gpu_memory_utilization: float = 0.9
    load_format: str = "auto"
    hf_overrides: dict | None = None
    kv_cache_dtype: str = "auto"
    window_pool: bool = False
    num_window_blocks: int | None = None
    num_state_snapshots: int = 0
    async_scheduling: bool = False

    @property
    def num_state_slots(self) -> int:
        """A hybrid model's linear-attention state slots: the running sequences' and the
        snapshots' (``state_bytes`` counts them; 0 bytes for other models)."""
        return self.max_num_seqs + self.num_state_snapshots

    @property
    def fp8_experts(self) -> bool:
        return self.quantization == "fp8"

    @property
    def mxfp4_experts(self) -> bool:
        return self.quantization == "mxfp4"

    @property
    def cache_dtype(self) -> torch.dtype:
        """The element type of every layer's KV cache (``kv_cache_dtype``)."""
        return cache_dtype(self.kv_cache_dtype, self.dtype)

    def load_model(self, role: str, device, expert_ids=None):
        """``models.weights.load_model`` of this config's checkpoint, as every rank loads it."""
        from models.weights import load_model

        return load_model(self.model, role, expert_ids, dtype=self.dtype, device=device,
                          fp8_experts=self.fp8_experts, mtp=self.mtp,
                          hf_overrides=self.hf_overrides, load_format=self.load_format,
                          mxfp4_experts=self.mxfp4_experts)

    @property
    def speculative(self) -> SpecConfig | None:
        if not self.num_speculative_tokens:
            return None
        return SpecConfig(self.num_speculative_tokens, self.prompt_lookup_max,
                          self.prompt_lookup_min, self.speculative_method,
                          self.speculative_disable_by_batch_size)

    @property
    def mtp(self) -> bool:
        """Do the models carry the MTP layer (speculative_method "mtp")?"""
        return bool(self.num_speculative_tokens) and self.speculative_method == "mtp"


QUANTIZATIONS = (None, "fp8", "mxfp4", "dequantize")
SCHEDULING_POLICIES = ("fcfs", "priority")
# vLLM's --kv-cache-dtype names afd takes; "fp8" and "fp8_e4m3" are one format
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")

# vLLM engine arguments at the one value that is what afd does anyway (one GPU's share of the
# model per rank; long prompts always in chunks), taken and dropped by ``LLM()`` and as
# ``afd serve`` flags; any other value is refused, naming the layout arguments for the sizes
VLLM_NEUTRAL = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "data_parallel_size": 1,
                "enable_chunked_prefill": True}
VLLM_PARALLELISM = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                    "enable_expert_parallel")


def resolve_kv_cache_dtype(kv_cache_dtype: str) -> str:
    """``kv_cache_dtype`` as given to LLM/serve -> "auto" or "fp8", or ValueError naming it."""
    if kv_cache_dtype == "fp8_e5m2":
        raise ValueError("kv_cache_dtype='fp8_e5m2' is not supported: afd's FP8 KV cache is "
                         "e4m3 (kv_cache_dtype 'fp8' or 'fp8_e4m3'); or 'auto' for the model "
                         "dtype")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got "
                         f"{kv_cache_dtype!r}")
    return "auto" if kv_cache_dtype == "auto" else "fp8"


def cache_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type: ``dtype`` for "auto", float8_e4m3fn for "fp8" (or
    "fp8_e4m3": a config made without ``resolve_kv_cache_dtype``); ValueError for any other."""
    import torch

    return torch.float8_e4m3fn if resolve_kv_cache_dtype(kv_cache_dtype) == "fp8" else dtype


def resolve_quantization(quantization: str | None, model_cfg: ModelConfig,
                         device: str) -> str | None:
    """What ``quantization`` (as given to LLM/serve) means for this checkpoint and device:
    "fp8" (routed experts kept in FP8), "mxfp4" (a checkpoint's MXFP4 routed experts kept
    packed) or None (every weight dequantized to the run dtype).

    None (the default) follows the checkpoint: an FP8 ``quantization_config`` keeps the experts
    in FP8 where the MoE runs as Triton kernels (CUDA, unless AFD_KERNEL_BACKEND=torch), and
    dequantizes them elsewhere (the torch path would dequantize them on every call); a bf16/fp32
    checkpoint stays as it is. "fp8" keeps them in FP8 on any device (on CPU, the FP8 torch
    reference: slow, for tests), quantizing a bf16/fp32 checkpoint's on load (vLLM's online
    FP8, routed experts only); "dequantize" dequantizes everything, as before FP8 experts
    existed. An INT4 (compressed-tensors) checkpoint is a bf16 one here: its experts are
    dequantized on load, and with "fp8" quantized from there (``models.quant_int4``).

    "mxfp4" keeps the MXFP4 routed experts of gpt-oss's and DeepSeek-V4's releases as stored
    (about a quarter of bf16's bytes, half of FP8's), weight-only: each expert is dequantized
    exactly to the run dtype as it runs, so outputs equal the dequantized load's. Not the
    default (the default dequantizes them, or converts V4's to FP8 where FP8 is kept): it is
    refused for a checkpoint without MXFP4 experts and for hidden / expert sizes not
    multiples of 32. On CUDA the Triton MoE kernels run them (``kernels.fused_moe``).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "mxfp4":
        _check_mxfp4(model_cfg)
        return "mxfp4"
    if quantization == "fp8" and model_cfg.fp8 is None:
        if not model_cfg.num_experts:
            raise ValueError("quantization='fp8' on a checkpoint without FP8 weights quantizes "
                             "its routed experts on load, and this model has none: leave "
                             "quantization unset")
        return "fp8"
    if quantization == "dequantize" or model_cfg.fp8 is None:
        return None
    if quantization == "fp8" or model_cfg.num_experts == 0:
        return "fp8" if model_cfg.num_experts else None
    from kernels.backend import triton_available

    triton_moe = (device.startswith("cuda") and os.environ.get("AFD_KERNEL_BACKEND") != "torch"
                  and triton_available())
    return "fp8" if triton_moe else None


def _check_mxfp4(model_cfg: ModelConfig) -> None:
    """quantization='mxfp4' for this checkpoint, or ValueError naming why not
    (``resolve_quantization``)."""
    from models.moe import MXFP4_EXPERT_DTYPES, check_mxfp4_sizes, no_mxfp4_experts

    if not model_cfg.num_experts or model_cfg.expert_dtype not in MXFP4_EXPERT_DTYPES:
        raise ValueError(no_mxfp4_experts(model_cfg))
    check_mxfp4_sizes(model_cfg)


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_layout_options(*, micro_batches: int = 2, transport: str = "torch",
                         timeout_s: float = 60.0, prefill_block_size: int | None = None,
                         eplb_interval_steps: int = 0, **_: Any) -> None:
    """ValueError naming the first bad layout option (every layout checks them, the
    single-process one too, where they change nothing; here, not in afd.layouts, so that
    the single process does not import the multi-rank code and its pyzmq)."""
    def positive_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if not positive_int(micro_batches):
        raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
    if transport not in ("torch", "deepep"):
        raise ValueError(f"transport must be 'torch' or 'deepep', got {transport!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or \
            not 0 < timeout_s < float("inf"):
        raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
    if prefill_block_size is not None and not positive_int(prefill_block_size):
        raise ValueError(f"prefill_block_size must be a positive integer, got "
                         f"{prefill_block_size!r}")
    if eplb_interval_steps != 0 and not positive_int(eplb_interval_steps):
        raise ValueError(f"eplb_interval_steps must be an integer >= 0 (0: off), got "
                         f"{eplb_interval_steps!r}")


def check_prefill_expert_parallel(enabled: bool, prefill: int, num_experts: int) -> None:
    """``prefill_expert_parallel`` against the layout: a pool of at least two prefill ranks (one
    rank would hold every expert: the flag would change nothing) and a MoE checkpoint with at
    least one routed expert per prefill rank. ValueError naming both otherwise."""
    if not enabled:
        return
    if prefill < 2:
        raise ValueError(f"prefill_expert_parallel needs prefill >= 2 (the prefill pool's "
                         f"ranks split the routed experts), got prefill={prefill}")
    if num_experts < prefill:
        raise ValueError(f"prefill_expert_parallel splits the routed experts over the prefill "
                         f"ranks: this checkpoint has {num_experts} routed experts for "
                         f"prefill={prefill} ranks (each needs at least one)")


def check_async_layout(async_scheduling: bool, prefill: int, ffn: int) -> None:
    """Async scheduling runs in the single-process engine, on attention ranks alone and on the
    decode ranks of a P/D layout (its prefill ranks step synchronously: each parks a sequence
    after its first token); a layout with FFN ranks steps synchronously."""
    if async_scheduling and ffn:
        raise ValueError(f"async_scheduling=True needs ffn=0 (the single-process engine, "
                         f"attention ranks alone, or P/D without FFN ranks), got ffn={ffn}: "
                         "every step of a layout with FFN ranks is a collective sized on the "
                         "host (docs/limits.md#async-scheduling)")


def check_window_layout(engine_cfg: EngineConfig, model_cfg: ModelConfig, prefill: int) -> None:
    """A window pool (afd.window_pool) in a layout with a prefill pool: refused, since a P/D
    transfer moves every row of every layer and the sliding layers keep only the window's."""
    if engine_cfg.window_pool and prefill:
        raise ValueError(f"prefill={prefill}: prefill/decode disaggregation is not supported "
                         f"for {model_cfg.architecture} (model_type {model_cfg.model_type!r}) "
                         "with its window pool (its sliding layers keep only the window's rows, "
                         "a transfer moves every row): leave num_window_blocks unset or give 0 "
                         "to keep every row, or use prefill=0")


def _check_hybrid_engine_args(model_cfg: ModelConfig, spec: SpecConfig | None,
                              kv_offload_gb: float) -> None:
    """The engine features a hybrid model (linear-attention layers with per-sequence states,
    models.hybrid) cannot use yet, refused naming the feature and the model. The caller
    leaves CUDA graphs opt-in for it and sizes its state snapshots (``_state_snapshots``). The FP8
    KV cache is not refused: it holds the full-attention layers' KV only, the states keep their
    dtypes (docs/limits.md#hybrid)."""
    name = f"{model_cfg.architecture} (model_type {model_cfg.model_type!r})"
    if spec is not None:
        raise ValueError(f"speculative_config (method {spec.method!r}) is not supported for "
                         f"{name}: its linear-attention layers' states cannot be rolled back "
                         "past rejected drafts; leave speculative_config unset")
    if kv_offload_gb:
        raise ValueError(f"kv_offload_gb is not supported for {name}: it is the prefix cache's "
                         "host tier, which keeps KV blocks and not the linear layers' state "
                         "snapshots (num_state_snapshots); leave kv_offload_gb at 0")


def resolve_engine_config(
    model: str,
    model_cfg: ModelConfig,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    seed: int | None = 0,
    max_model_len: int | None = None,
    block_size: int = 16,
    num_kv_blocks: int | None = None,
    kv_cache_memory_gb: float | None = None,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int | None = None,
    enforce_eager: bool | None = None,
    cuda_graph_sizes: list[int] | tuple[int, ...] | None = None,
    ffn_cuda_graphs: bool = False,
    enable_prefix_caching: bool = True,
    kv_offload_gb: float = 0,
    cache_aware_routing: bool = True,
    prefill_expert_parallel: bool = False,
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
    quantization: str | None = None,
    speculative_config: dict | None = None,
    scheduling_policy: str = "fcfs",
    gpu_memory_utilization: float = 0.9,
    load_format: str = "auto",
    hf_overrides: dict | None = None,
    kv_cache_dtype: str = "auto",
    num_window_blocks: int | None = None,
    num_state_snapshots: int | None = None,
    async_scheduling: bool = False,
    prefill: int = 0,
) -> EngineConfig:
    """``model_cfg``: ``model``'s config.json as ``load_config(model, hf_overrides)`` reads it.
    ``num_window_blocks``: a model with sliding-window layers (afd.window_pool): None sizes
    their pool (none in a layout with ``prefill`` ranks or with ``kv_offload_gb``: they need
    every row), 0 keeps them in the main pool (every row kept), n > 0 gives it n blocks.
    ``prefill``: the layout's prefill ranks (the caller checks the layout itself).
    ``num_state_snapshots``: a hybrid model with prefix caching: None keeps
    DEFAULT_STATE_SNAPSHOTS (afd.state_snapshots), 0 turns its prefix caching off."""
    if num_window_blocks is not None and (
            not isinstance(num_window_blocks, int) or isinstance(num_window_blocks, bool)
            or num_window_blocks < 0):
        raise ValueError(f"num_window_blocks must be an integer >= 0 (0: no window pool), got "
                         f"{num_window_blocks!r}")
    for name, value in (("max_model_len", max_model_len), ("block_size", block_size),
                        ("num_kv_blocks", num_kv_blocks), ("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens)):
        _positive(name, value)
    if (isinstance(gpu_memory_utilization, bool)
            or not isinstance(gpu_memory_utilization, (int, float))
            or not 0 < gpu_memory_utilization <= 1):
        raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1] of each GPU's "
                         f"memory (default 0.9), got {gpu_memory_utilization!r}")
    if enforce_eager is not None and not isinstance(enforce_eager, bool):
        raise ValueError(f"enforce_eager must be True, False or None (CUDA graphs on CUDA "
                         f"only), got {enforce_eager!r}")
    if not isinstance(ffn_cuda_graphs, bool):
        raise ValueError(f"ffn_cuda_graphs must be True or False (CUDA graphs of the FFN ranks' "
                         f"expert compute, default False), got {ffn_cuda_graphs!r}")
    if scheduling_policy not in SCHEDULING_POLICIES:
        raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got "
                         f"{scheduling_policy!r}")
    from models.config import check_hf_overrides
    from models.weights import LOAD_FORMATS

    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    hf_overrides = check_hf_overrides(hf_overrides) or None
    kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype)
    spec = parse_speculative_config(speculative_config)
    mtp = spec is not None and spec.method == "mtp"
    if mtp:
        check_mtp_checkpoint(model, model_cfg, weights=load_format != "dummy")
    # a step verifying drafts has 1 + num_speculative_tokens decode rows per sequence
    graph_sizes = _graph_sizes(cuda_graph_sizes, max_num_seqs * (
        1 + (spec.num_speculative_tokens if spec else 0)))
    for name, flag in (("enable_prefix_caching", enable_prefix_caching),
                       ("cache_aware_routing", cache_aware_routing),
                       ("prefill_expert_parallel", prefill_expert_parallel),
                       ("trust_remote_code", trust_remote_code),
                       ("async_scheduling", async_scheduling)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if async_scheduling and spec is not None:
        raise ValueError(f"async_scheduling=True with speculative_config (method "
                         f"{spec.method!r}): a step's drafts need the previous step's tokens "
                         "on the host; use one or the other (docs/limits.md#async-scheduling)")
    if seed is None:  # as vLLM: a random seed, drawn once here for every rank
        seed = secrets.randbits(63)
    if not isinstance(seed, int) or isinstance(seed, bool) or not -2**63 <= seed < 2**64:
        # what torch.Generator.manual_seed takes; found otherwise only at the first sample
        raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    quantization = resolve_quantization(quantization, model_cfg, device)
    run_dtype = model_cfg.torch_dtype if dtype == "auto" else parse_dtype(dtype)
    if max_model_len is None:
        max_model_len = min(model_cfg.max_position_embeddings, 8192)
    # DSA (DeepSeek-V3.2, GLM-5) past index_topk: a graph's decode rows run kernels.dsa's
    # decode op (a GLM-5 shared layer's: its selected-attention op over the full layer's picks),
    # whose Triton path reads nothing on the host (models.attention MLAttention._sparse), so
    # enforce_eager=False captures them; not the default there until a GPU has captured and
    # timed them (never yet: docs/limits.md#dsa). A graph's batch is sparse by its tables'
    # width (max_model_len rounded up to whole blocks), so the default reads the same
    dsa_sparse = (model_cfg.dsa
                  and -(-max_model_len // block_size) * block_size > model_cfg.index_topk)
    # DeepSeek-V4 (models.deepseek_v4): a graph's batch (no host lengths) runs its static
    # decode path (every entry the table holds, every row's window pooled, nothing read on the
    # host), so enforce_eager=False captures it; not the default until a GPU has captured it
    # (never yet: docs/limits.md#deepseek-v4)
    v4 = model_cfg.attention == "v4"
    if v4 and kv_cache_dtype == "fp8":
        raise ValueError(f"kv_cache_dtype='fp8' is not supported for {model_cfg.architecture} "
                         "(its cache rows hold compressor inputs and entries, not only keys); "
                         "use kv_cache_dtype='auto'")
    if model_cfg.linear_attn is not None:  # hybrid: what its states cannot do yet, refused
        _check_hybrid_engine_args(model_cfg, spec, kv_offload_gb)
    num_state_snapshots = _state_snapshots(model_cfg, num_state_snapshots,
                                           enable_prefix_caching)
    if model_cfg.linear_attn is not None and not num_state_snapshots:
        enable_prefix_caching = False  # (a cached block holds KV, not the states)
    window_pool = _window_pool(model_cfg, num_window_blocks, kv_offload_gb, prefill)
    # MiMo-V2-Flash / gpt-oss ("mimo", models.mimo_v2_flash): a graph's batch runs the window
    # decode kernels with the lengths on the device (the window pool's tables static too), so
    # enforce_eager=False captures it; not the default until a GPU has captured it (never yet).
    # Hybrid linear-attention models (models.hybrid) likewise: a graph's batch carries the
    # rows' state slots on the device and its linear layers' decode rows run the Gated
    # DeltaNet decode kernels, nothing read on the host (afd.cuda_graphs); opt-in until a GPU
    # has captured them (never yet: docs/limits.md#hybrid)
    if enforce_eager is None:  # graphs where they capture: CUDA (bench/results/h100_20261127)
        enforce_eager = (torch.device(device).type != "cuda" or dsa_sparse or v4
                         or model_cfg.attention == "mimo" or model_cfg.linear_attn is not None)
    if max_model_len > model_cfg.max_position_embeddings:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                         f"max_position_embeddings={model_cfg.max_position_embeddings}")
    if max_num_batched_tokens is None:
        max_num_batched_tokens = max(2048, min(max_model_len, 8192))
    per_block = bytes_per_block(model_cfg, block_size, cache_dtype(kv_cache_dtype, run_dtype),
                                mtp)
    num_offload_blocks = _offload_blocks(kv_offload_gb, per_block, enable_prefix_caching)
    sizes = (WindowSizes(model_cfg, block_size, cache_dtype(kv_cache_dtype, run_dtype), mtp,
                         max_num_seqs, max_num_batched_tokens, max_model_len)
             if window_pool else None)
    # a hybrid model's linear-attention state slots (0 bytes for other models), with CUDA
    # graphs one more (their padding rows' scratch slot)
    states = state_bytes(model_cfg, run_dtype,
                         max_num_seqs + num_state_snapshots + (not enforce_eager))
    if num_kv_blocks is None:
        if kv_cache_memory_gb is None:
            kv_cache_memory_gb = _default_kv_memory_gb(device)
        if kv_cache_memory_gb is not None:  # else each rank sizes its own after loading
            budget = kv_cache_memory_gb * 2**30 - states
            if sizes is None:
                num_kv_blocks = max(1, int(budget // per_block))
            else:
                num_kv_blocks, num_window_blocks = sizes.pools(int(budget), num_window_blocks)
    if sizes is not None and num_kv_blocks is not None and num_window_blocks is None:
        num_window_blocks = max(sizes.least, min(sizes.bound, num_kv_blocks))
    if sizes is not None and num_window_blocks is not None:
        sizes.check(num_window_blocks)
    if num_kv_blocks is not None and num_kv_blocks < -(-max_model_len // block_size):
        raise ValueError(
            f"num_kv_blocks={num_kv_blocks} x block_size={block_size} holds fewer tokens than "
            f"max_model_len={max_model_len}: raise num_kv_blocks (or kv_cache_memory_gb) or lower "
            "max_model_len" + (
                f" or max_num_seqs / num_state_snapshots (their {max_num_seqs} + "
                f"{num_state_snapshots} linear-attention state slots"
                f"{'' if enforce_eager else ' and the CUDA graph scratch slot'} take "
                f"{states / 2**20:.1f} MiB of kv_cache_memory_gb)"
                if model_cfg.linear_attn is not None else "")
            + (f" or num_window_blocks (the window pool's {num_window_blocks} blocks take "
               f"{sizes.window_bytes * num_window_blocks / 2**20:.1f} MiB of the KV memory)"
               if sizes is not None and num_window_blocks else ""))
    return EngineConfig(model=model, dtype=run_dtype, device=device, max_model_len=max_model_len,
                        block_size=block_size, num_kv_blocks=num_kv_blocks,
                        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        seed=seed, enforce_eager=enforce_eager, cuda_graph_sizes=graph_sizes,
                        ffn_cuda_graphs=ffn_cuda_graphs,
                        enable_prefix_caching=enable_prefix_caching,
                        num_offload_blocks=num_offload_blocks,
                        cache_aware_routing=cache_aware_routing,
                        prefill_expert_parallel=prefill_expert_parallel, tokenizer=tokenizer,
                        trust_remote_code=trust_remote_code, quantization=quantization,
                        num_speculative_tokens=spec.num_speculative_tokens if spec else 0,
                        prompt_lookup_max=spec.prompt_lookup_max if spec else 0,
                        prompt_lookup_min=spec.prompt_lookup_min if spec else 0,
                        speculative_method=spec.method if spec else "ngram",
                        speculative_disable_by_batch_size=(spec.disable_by_batch_size
                                                           if spec else 0),
                        scheduling_policy=scheduling_policy,
                        gpu_memory_utilization=float(gpu_memory_utilization),
                        load_format=load_format, hf_overrides=hf_overrides,
                        kv_cache_dtype=kv_cache_dtype, window_pool=window_pool,
                        num_window_blocks=num_window_blocks if window_pool else None,
                        num_state_snapshots=num_state_snapshots,
                        async_scheduling=async_scheduling)


def _state_snapshots(model_cfg: ModelConfig, num: int | None, caching: bool) -> int:
    """A hybrid model's state snapshots (afd.state_snapshots): ``num``, or by default
    DEFAULT_STATE_SNAPSHOTS with prefix caching on; 0 turns its prefix caching off. ValueError
    for a bad count, snapshots without prefix caching, or a model with no linear layers."""
    from afd.state_snapshots import DEFAULT_STATE_SNAPSHOTS

    if num is not None and (not isinstance(num, int) or isinstance(num, bool) or num < 0):
        raise ValueError(f"num_state_snapshots must be an integer >= 0 (0: no prefix caching "
                         f"for a hybrid model), got {num!r}")
    if model_cfg.linear_attn is None:
        if num:
            raise ValueError(f"num_state_snapshots={num}: {model_cfg.architecture} has no "
                             "linear-attention layers (state snapshots are a hybrid model's "
                             "prefix cache: Qwen3-Next, Qwen3.5-MoE); leave it unset")
        return 0
    if not caching:
        if num:
            raise ValueError(f"num_state_snapshots={num} needs enable_prefix_caching: the "
                             "snapshots serve prefix cache hits; leave it unset or 0")
        return 0
    if num is None:
        return DEFAULT_STATE_SNAPSHOTS
    if num == 0:
        log.info("prefix caching off for %s: num_state_snapshots=0 (a cached block holds KV, "
                 "not its linear layers' state: docs/limits.md#hybrid)", model_cfg.architecture)
    return num


def _window_pool(model_cfg: ModelConfig, num_window_blocks: int | None,
                 kv_offload_gb: float, prefill: int = 0) -> bool:
    """Does this engine give the sliding layers their own pool (afd.window_pool)? Not where
    P/D transfers (``prefill`` ranks) or the host tier (``kv_offload_gb``) need every row:
    left unset, ``num_window_blocks`` then keeps every row in the main pool (logged), asked
    for (n > 0) it is refused, naming the model, the feature and ``num_window_blocks=0``."""
    from afd.window_pool import window_layers

    if not window_layers(model_cfg):
        if num_window_blocks:
            raise ValueError(f"num_window_blocks={num_window_blocks}: "
                             f"{model_cfg.architecture} has no sliding-window layers (a "
                             "window pool is for MiMo-V2-Flash's and gpt-oss's); leave it "
                             "unset")
        return False
    if num_window_blocks == 0:
        return False
    name = f"{model_cfg.architecture} (model_type {model_cfg.model_type!r})"
    needs_rows = ([f"prefill={prefill} (a P/D transfer moves every row)"] if prefill else []) + (
        [f"kv_offload_gb={kv_offload_gb} (the prefix cache's host tier keeps the main pool's "
         "blocks, not the window pool's)"] if kv_offload_gb else [])
    if needs_rows and num_window_blocks is None:
        log.info("%s: no window pool for its sliding layers (every row in the main pool, as "
                 "num_window_blocks=0), since %s", name, " and ".join(needs_rows))
        return False
    if needs_rows:
        raise ValueError(f"num_window_blocks={num_window_blocks}: a window pool for {name} is "
                         f"not supported with {' and '.join(needs_rows)}: leave "
                         "num_window_blocks unset or give 0 to keep every row in one pool")
    return True


class WindowSizes:
    """The two pools' arithmetic for one engine (afd.window_pool): a block's bytes over the
    full layers (the MTP layer's too) and over the sliding ones, the window pool's bound and
    the least one sequence needs."""

    def __init__(self, model_cfg: ModelConfig, block_size: int, dtype: torch.dtype, mtp: bool,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        from afd.window_pool import blocks_per_seq, window_dims, window_pool_bound

        element = dtype.itemsize
        self.window_bytes = block_size * window_dims(model_cfg) * element
        self.full_bytes = bytes_per_block(model_cfg, block_size, dtype, mtp) - self.window_bytes
        window = model_cfg.mimo.sliding_window
        self.window, self.step, self.block_size = window, max_num_batched_tokens, block_size
        # a sequence's block table never passes max_model_len's blocks (its drafts neither):
        # a window or step longer than that needs no more window blocks
        self.max_model_len, self.most = max_model_len, -(-max_model_len // block_size)
        # every sequence's whole length (also where the full layers hold no rows)
        self.max_full = max_num_seqs * self.most
        self.bound = min(self.max_full, window_pool_bound(window, block_size, max_num_seqs,
                                                          max_num_batched_tokens))
        self.least = min(self.most, blocks_per_seq(window, block_size, max_num_batched_tokens))

    def split(self, budget: int) -> tuple[int, int]:
        from afd.window_pool import split_kv_budget

        full, window = split_kv_budget(budget, self.full_bytes, self.window_bytes, self.bound,
                                       self.least, self.max_full)
        return max(1, full), window

    def pools(self, budget: int, num_window_blocks: int | None) -> tuple[int, int]:
        """(main pool blocks, window pool blocks) in ``budget`` bytes: ``split`` where
        ``num_window_blocks`` is None, else the main pool takes the rest (``rest``)."""
        if num_window_blocks is None:
            return self.split(budget)
        return self.rest(budget, num_window_blocks), num_window_blocks

    def rest(self, budget: int, num_window_blocks: int) -> int:
        """The main pool's blocks in ``budget`` bytes beside ``num_window_blocks``."""
        if self.full_bytes == 0:
            return self.max_full
        return max(1, (budget - num_window_blocks * self.window_bytes) // self.full_bytes)

    def check(self, num_window_blocks: int) -> None:
        if num_window_blocks < self.least:
            why = (f"ceil(max_model_len={self.max_model_len} / block_size={self.block_size})"
                   if self.least == self.most else
                   f"ceil((sliding_window={self.window} + max_num_batched_tokens={self.step}) "
                   "/ block_size) + 1")
            raise ValueError(
                f"num_window_blocks={num_window_blocks} holds fewer blocks than one sequence "
                f"needs at once, {why} = {self.least}: raise it (or the KV memory), lower "
                "max_num_batched_tokens, or 0 for no window pool")


def check_mtp_checkpoint(path: str, model_cfg: ModelConfig, weights: bool = True) -> None:
    """ValueError unless the checkpoint at ``path`` has an MTP layer afd can draft with
    (``weights``: its tensors too, not only config.json's word)."""
    if model_cfg.architecture not in MTP_ARCHITECTURES:
        why = OTHER_MTP_MODULES.get(model_cfg.architecture)
        raise ValueError(f"speculative_config method 'mtp' is not supported for architecture "
                         f"{model_cfg.architecture!r} (model_type {model_cfg.model_type!r}, "
                         f"{path!r}): afd runs the multi-token-prediction layer of "
                         f"architectures {MTP_ARCHITECTURES}"
                         + (f" ({why})" if why else "") + "; use method 'ngram'")
    if model_cfg.num_nextn_predict_layers < 1:
        raise ValueError(f"speculative_config method 'mtp': {path!r} has no MTP layer "
                         "(config.json: num_nextn_predict_layers is 0 or absent); use method "
                         "'ngram' or a checkpoint that ships its MTP weights")
    if not weights:
        return
    from models.weights import checkpoint_files

    name = f"model.layers.{model_cfg.num_layers}.eh_proj.weight"
    if name not in checkpoint_files(path):
        raise ValueError(f"speculative_config method 'mtp': config.json of {path!r} says "
                         f"num_nextn_predict_layers={model_cfg.num_nextn_predict_layers} but "
                         f"the checkpoint has no MTP weights ({name} is missing)")


def _offload_blocks(gb: float, per_block: int, caching: bool) -> int:
    """Host blocks in ``gb`` GiB (kv_offload_gb), or ValueError naming what is wrong."""
    if (not isinstance(gb, (int, float)) or isinstance(gb, bool) or not gb >= 0
            or gb == float("inf")):
        raise ValueError(f"kv_offload_gb must be a finite number of GiB >= 0 (0: no host "
                         f"tier), got {gb!r}")
    if not gb:
        return 0
    if not caching:
        raise ValueError("kv_offload_gb needs enable_prefix_caching: the host tier keeps "
                         "blocks the prefix cache evicts")
    blocks = int(gb * 2**30 // per_block)
    if blocks < 1:
        raise ValueError(f"kv_offload_gb={gb} holds no KV block ({per_block} bytes "
                         "each, every layer): raise it, or 0 for no host tier")
    return blocks


def _graph_sizes(sizes: list[int] | tuple[int, ...] | None, max_rows: int) -> tuple[int, ...]:
    """``max_rows``: decode rows a step can have, max_num_seqs x (1 + num_speculative_tokens)."""
    from afd.cuda_graphs import default_sizes

    if sizes is None:
        return default_sizes(max_rows)
    if (not isinstance(sizes, (list, tuple)) or not sizes
            or any(not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= max_rows
                   for s in sizes)):
        raise ValueError(f"cuda_graph_sizes must be a non-empty list of batch sizes (decode "
                         f"rows) in [1, max_num_seqs x (1 + num_speculative_tokens) = "
                         f"{max_rows}], got {sizes!r}")
    return tuple(sorted(set(sizes)))


def state_bytes(model_cfg: ModelConfig, dtype: torch.dtype, max_num_seqs: int) -> int:
    """A hybrid model's linear-attention states (one slot per sequence a step may run, each
    every linear layer's conv state in ``dtype``, the run dtype, and fp32 recurrent state):
    what the KV memory holds besides its blocks. 0 for every other model."""
    lin = model_cfg.linear_attn
    return 0 if lin is None else max_num_seqs * lin.state_bytes(dtype)


def bytes_per_block(model_cfg: ModelConfig, block_size: int, dtype: torch.dtype,
                    mtp: bool) -> int:
    """Bytes of one KV block over every layer that caches (the MTP layer's too, when on);
    ``dtype``: the cache's (``EngineConfig.cache_dtype``: 1 byte an element in FP8)."""
    return (block_size * model_cfg.kv_cache_dims(model_cfg.num_layers + mtp)
            * dtype.itemsize)


def _default_kv_memory_gb(device: str) -> float | None:
    """AFD_KV_CACHE_GB, else None where each rank sizes its pool from its device memory after
    loading its weights (CUDA: afd.kv_memory), else 0.25 GiB (CPU)."""
    from afd.kv_memory import sized_from_device_memory

    if os.environ.get("AFD_KV_CACHE_GB"):
        return float(os.environ["AFD_KV_CACHE_GB"])
    if sized_from_device_memory(device):
        return None
    return 0.25


def engine_config_to_dict(cfg: EngineConfig) -> dict:
    """Plain data (for JSON between processes)."""
    return {**cfg.__dict__, "dtype": str(cfg.dtype).removeprefix("torch.")}


def engine_config_from_dict(d: dict, torch_dtype: bool = True) -> EngineConfig:
    """``engine_config_to_dict``'s inverse. ``torch_dtype=False`` (a process that runs no
    model: the HTTP front end, which would otherwise import torch for it alone) leaves
    ``dtype`` its name, a str ("bfloat16"), which ``engine_config_to_dict`` writes back."""
    return EngineConfig(**{**d, "dtype": parse_dtype(d["dtype"]) if torch_dtype else d["dtype"],
                           "cuda_graph_sizes": tuple(d.get("cuda_graph_sizes", ()))})
