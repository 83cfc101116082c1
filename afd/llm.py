"""Offline API: ``LLM(model).generate(prompts, sampling_params)``, vLLM-style."""

from __future__ import annotations

import difflib
import gc
import inspect
import itertools
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence

from tqdm.auto import tqdm

from afd.config import (VLLM_NEUTRAL, VLLM_PARALLELISM, EngineConfig, check_async_layout,
                        check_layout_options, check_prefill_expert_parallel, check_window_layout,
                        resolve_engine_config)
from afd.engine import LLMEngine
from afd.hub import resolve_sources
from afd.outputs import RequestOutput
from afd.placement import ExpertPlacement
from afd.sampling_params import (MAX_JSON_DEPTH, ParamError, RequestOutputKind, SamplingParams,
                                 json_depth, plain_ids)
from models.config import ModelConfig, load_config
from models.default_model import default_model_path

log = logging.getLogger("afd.llm")


FREEZE_GC = True  # generate() freezes the caller's objects while it runs (bench/gc_pause.py)


@contextmanager
def gc_frozen():
    """While ``generate`` runs, every object alive at its start (the model, the tokenizer, the
    caller's own) sits in the garbage collector's permanent generation, so a full pass walks
    only what the run made: at batch 256 such a pass stalled a step for 79-88 ms
    (bench/gc_pause.py). ``gc.unfreeze()`` afterwards gives them back: the caller's process
    is left as it was, and cycles among those objects are collected later as before. Nothing
    done if the collector is off or the caller froze objects already (theirs to manage)."""
    if not FREEZE_GC or not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def load_tokenizer(path: str, trust_remote_code: bool = False,
                   architecture: str | None = None):
    """The HF tokenizer in folder ``path``; one without a chat template of an
    ``architecture`` whose release ships a Python chat encoding instead (DeepSeek-V3.2, V4)
    renders conversations with afd's (afd.chat_encodings). ``trust_remote_code`` (vLLM's
    flag, off by default) lets transformers import the Python code a tokenizer_config.json
    names in its ``auto_map`` (Kimi K2's tiktoken tokenizer has one); without it such a
    tokenizer is refused, never run.
    (Weights never run checkpoint code: afd has its own model code.)"""
    from transformers import AutoTokenizer

    if not any(os.path.isfile(os.path.join(path, f))
               for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ValueError(f"no tokenizer files in {path!r}: pass tokenizer=<folder with "
                         "tokenizer.json> to LLM()")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path,
                                                  trust_remote_code=bool(trust_remote_code))
    except ValueError as exc:  # transformers': "... Please pass ... trust_remote_code=True"
        if trust_remote_code or "trust_remote_code" not in str(exc):
            raise
        raise ValueError(
            f"the tokenizer in {path!r} needs its own Python code (auto_map in "
            "tokenizer_config.json), which afd runs only when asked: if you trust that code, "
            "pass trust_remote_code=True to LLM() (--trust-remote-code to launch/serve.py)"
        ) from exc
    from afd.chat_encodings import attach

    return attach(tokenizer, architecture)


def eos_token_ids(path: str, model_cfg: ModelConfig, tokenizer) -> tuple[int, ...]:
    ids = set(model_cfg.eos_token_ids)
    gen_file = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_file):
        with open(gen_file) as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


# generation_config.json keys that become sampling defaults (as vLLM's --generation-config auto)
_GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(path: str, source: str = "auto") -> dict[str, Any]:
    """Sampling defaults from the checkpoint's generation_config.json ("auto", as vLLM does by
    default) or none ("vllm": SamplingParams' own defaults). A request's own values win."""
    if source not in ("auto", "vllm"):
        raise ValueError(f"generation_config must be 'auto' or 'vllm', got {source!r}")
    gen_file = os.path.join(path, "generation_config.json")
    if source == "vllm" or not os.path.isfile(gen_file):
        return {}
    with open(gen_file) as f:
        gen = json.load(f)
    defaults = {k: gen[k] for k in _GENERATION_DEFAULTS if gen.get(k) is not None}
    SamplingParams(**defaults)  # a checkpoint's bad value fails here, named
    if defaults:
        log.info("sampling defaults from %s: %s (generation_config='vllm' ignores them)",
                 gen_file, defaults)
    return defaults


# vLLM's ways to split a model over GPUs: afd splits it by its layout instead


_VLLM_IGNORED = ("disable_log_stats",)  # any bool: afd's LLM logs no periodic stats


def check_engine_args(engine_args: dict[str, Any]) -> dict[str, Any]:
    """The engine's keywords from ``engine_args``, less vLLM's that are no-ops here
    (``VLLM_NEUTRAL`` at their neutral value, ``_VLLM_IGNORED``). TypeError naming ``LLM()``
    and the keyword for one that no part of the engine takes (as Python names a function's
    unknown keyword; found before anything loads), with the nearest known name, or the layout
    arguments for vLLM's parallelism sizes."""
    known = set(inspect.signature(resolve_engine_config).parameters) - {"model", "model_cfg"}
    known |= set(inspect.signature(LLM.__init__).parameters) - {"self", "engine_args"}
    kept = {}
    for name, value in engine_args.items():
        if name in known:
            kept[name] = value
            continue
        if name in _VLLM_IGNORED and isinstance(value, bool):
            continue
        if name in VLLM_NEUTRAL and value == VLLM_NEUTRAL[name] and type(value) is type(
                VLLM_NEUTRAL[name]):
            continue
        if name in VLLM_PARALLELISM:
            hint = ("; afd splits a model by its layout instead: prefill=, attention=, ffn= "
                    "(docs/layouts.md)")
        elif name in VLLM_NEUTRAL:
            hint = (f" = {value!r}: afd takes it only as {VLLM_NEUTRAL[name]!r}, what it "
                    f"always does")
        else:
            near = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
        raise TypeError(f"LLM() got an unexpected keyword argument {name!r}{hint}")
    return kept


def build_engine(model: str | None = None, *, tokenizer: str | None = None,
                 revision: str | None = None, tokenizer_revision: str | None = None,
                 download_dir: str | None = None,
                 prefill: int = 0, attention: int = 1, ffn: int = 0,
                 layout_options: dict[str, Any] | None = None, generation_config: str = "auto",
                 **engine_args: Any) -> LLMEngine:
    """Resolve the model and tokenizer to local folders (a Hub repo id fetched into the HF
    cache, afd.hub), load config and tokenizer, start the ranks of the layout (which get the
    local folders), return the front end."""
    engine_args = check_engine_args(engine_args)
    path, tokenizer = resolve_sources(  # an existing folder (the embedded one too): as it is
        default_model_path() if model is None else model, tokenizer, revision=revision,
        tokenizer_revision=tokenizer_revision,
        download_dir=download_dir, load_format=engine_args.get("load_format", "auto"),
        trust_remote_code=bool(engine_args.get("trust_remote_code", False)))
    model_cfg = load_config(path, engine_args.get("hf_overrides"))
    tok = load_tokenizer(tokenizer or path, engine_args.get("trust_remote_code", False),
                         model_cfg.architecture)
    defaults = generation_defaults(path, generation_config)
    engine_cfg = resolve_engine_config(path, model_cfg, tokenizer=tokenizer, prefill=prefill,
                                       **engine_args)
    core = start_layout(engine_cfg, model_cfg, prefill=prefill, attention=attention, ffn=ffn,
                        **(layout_options or {}))
    from afd.core import EngineCore

    if isinstance(core, EngineCore):  # the single process: its KV pool as sized after loading
        engine_cfg = core.cfg
    return LLMEngine(tok, model_cfg, engine_cfg, core, eos_token_ids(path, model_cfg, tok),
                     default_sampling=defaults)


# rank processes one machine starts for one engine: far above any layout of one node (8 GPUs,
# a few ranks each), far below what a typo (prefill=1000) would start and leave to time out
MAX_LOCAL_RANKS = 64


def check_local_ranks(world: int, what: str) -> None:
    """ValueError naming ``what`` and the limit when ``world`` rank processes would start on
    this machine past ``MAX_LOCAL_RANKS``."""
    if world > MAX_LOCAL_RANKS:
        raise ValueError(f"{what} = {world} rank processes on this machine; at most "
                         f"{MAX_LOCAL_RANKS} (more ranks: several nodes under torchrun, "
                         f"docs/serving.md#multi-node)")


def start_layout(engine_cfg: EngineConfig, model_cfg: ModelConfig, *, prefill: int, attention: int,
                 ffn: int, **options: Any):
    """The core client for a layout: in-process for the colocated reference."""
    import torch

    for name, value, low in (("prefill", prefill, 0), ("attention", attention, 1), ("ffn", ffn, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    check_local_ranks(prefill + attention + ffn, "prefill + attention + ffn")
    if ffn == 0 and options.get("placement") is not None:  # no layout without FFN ranks uses it
        raise ValueError("expert_placement needs ffn >= 1")
    for name in ("num_redundant_experts", "eplb_interval_steps"):
        if ffn == 0 and options.get(name):
            raise ValueError(f"{name} needs ffn >= 1")
    check_layout_options(**options)
    check_prefill_expert_parallel(engine_cfg.prefill_expert_parallel, prefill,
                                  model_cfg.num_experts)
    check_window_layout(engine_cfg, model_cfg, prefill)
    check_async_layout(engine_cfg.async_scheduling, prefill, ffn)
    if prefill == 0 and attention == 1 and ffn == 0:
        from afd.core import EngineCore
        model = engine_cfg.load_model("full", engine_cfg.device)
        if engine_cfg.num_kv_blocks is None:  # sized from the GPU's memory left after loading
            from afd.kv_memory import kv_pools_from_memory

            engine_cfg = replace(engine_cfg, **kv_pools_from_memory(
                engine_cfg, model.cfg, torch.device(engine_cfg.device), "single",
                graphs=not engine_cfg.enforce_eager))
        return EngineCore(model, engine_cfg)

    from afd.layouts import start_multi_rank

    return start_multi_rank(engine_cfg, model_cfg, prefill=prefill, attention=attention, ffn=ffn,
                            **options)


PromptType = str | dict[str, Any]
UseTqdm = bool | Callable[..., Any]  # vLLM's: show the bar, or a callable that makes it


def json_path(root: str, loc: Sequence[Any]) -> str:
    """Where in an argument a validation error is, as Python indexes it: ``messages[1][0].role``
    (conversation 1, message 0), not pydantic's ``messages.0.role`` after the conversation."""
    return root + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc)


def check_no_lora(lora_request: Any) -> None:
    """vLLM's ``lora_request`` keyword: None (what code written for vLLM passes when it runs
    the base model) is taken; an adapter is a ParamError: afd serves no LoRA adapters."""
    if lora_request is not None:
        raise ParamError("lora_request", "lora_request must be None: afd serves no LoRA "
                         f"adapters, got {type(lora_request).__name__}")


class LLM:
    """An engine for offline batches.

    LLM(model=None, *, dtype="auto", seed=0, max_model_len=None, tokenizer=None, revision=None,
        tokenizer_revision=None, download_dir=None, device=None,
        block_size=16, num_kv_blocks=None, kv_cache_memory_gb=None, max_num_seqs=256,
        max_num_batched_tokens=None, enable_prefix_caching=True, kv_offload_gb=0,
        cache_aware_routing=True, prefill_expert_parallel=False,
        quantization=None, prefill=0, attention=1, ffn=0, micro_batches=2, transport="torch",
        timeout_s=60.0, prefill_block_size=None, expert_placement=None, num_redundant_experts=0,
        eplb_interval_steps=0, generation_config="auto", speculative_config=None,
        scheduling_policy="fcfs", gpu_memory_utilization=0.9, kv_cache_dtype="auto",
        trust_remote_code=False, num_window_blocks=None, num_state_snapshots=None)

    ``model``: a local checkpoint folder, or a Hugging Face Hub repo id (``"org/name"``)
    fetched into the HF cache (config, tokenizer and safetensors files only) or read from it,
    as vLLM does; ``revision`` (a branch, tag or commit), ``tokenizer_revision`` (for a
    ``tokenizer`` repo id of its own) and ``download_dir`` (a cache folder instead of
    HF_HUB_CACHE's) are vLLM's; HF_HUB_OFFLINE=1 and HF_TOKEN apply (afd.hub). A path that is
    neither, or a repo that cannot be had, is a ValueError naming it before any rank starts.
    ``model=None`` uses the embedded tiny DeepSeek-V3 checkpoint (built on first use).
    ``prefill``/``attention``/``ffn`` pick the layout (P, A, F); anything but (0, 1, 0) starts
    P+A+F rank processes. ``micro_batches``: ping-pong micro-batches per decode step.
    ``transport``: "torch" (all_to_all over gloo/NCCL) or "deepep". ``timeout_s``: how long any
    rank may wait on another before the run fails with RankFailure. ``prefill_block_size``: the
    P/D prefill ranks' KV block size where it differs from ``block_size``. ``generation_config``:
    "auto" takes temperature/top_p/top_k/min_p/repetition_penalty defaults from the checkpoint's
    generation_config.json (as vLLM does), "vllm" uses SamplingParams' own defaults.
    ``enable_prefix_caching``: reuse the KV of full blocks of earlier prompts (and outputs) that
    a new prompt starts with (``RequestOutput.num_cached_tokens`` says how many tokens it reused).
    ``kv_offload_gb``: GiB of host memory per rank that runs prompts where the KV of blocks
    evicted from the prefix cache is kept, and copied back when a prompt starts with them
    (afd.kv_offload; 0, the default: none).
    ``cache_aware_routing``: with several prefill or attention ranks, send a prompt to the rank
    that already ran its longest prefix unless that rank is overloaded (False: by load alone).
    ``prefill_expert_parallel``: with ``prefill`` >= 2, each prefill rank holds only its slice
    of the routed experts (about E / P) and the prefill pool runs the MoE layers as expert
    parallelism among its ranks, stepping together (docs/layouts.md); False: every prefill
    rank holds the whole model.
    ``quantization``: None follows the checkpoint (an FP8 block-scaled checkpoint's routed experts
    stay in FP8 where the MoE runs as Triton kernels, on CUDA; every other weight, and the
    experts elsewhere, are dequantized to ``dtype``; a bf16 checkpoint loads as it is); "fp8"
    keeps the experts in FP8 on any device, quantizing a bf16/fp32 checkpoint's on load
    ([128, 128] blocks); "mxfp4" keeps a checkpoint's MXFP4 routed experts (gpt-oss's,
    DeepSeek-V4's releases) packed, weight-only (outputs equal the dequantized load's);
    "dequantize" dequantizes every weight (``afd.config.resolve_quantization``).
    ``speculative_config``: speculative decoding, vLLM's dict: n-gram drafts (``{"method":
    "ngram", "num_speculative_tokens": k, "prompt_lookup_max": ..., "prompt_lookup_min": ...}``)
    or the checkpoint's MTP layer (``{"method": "mtp", "num_speculative_tokens": k}``, k <= 4);
    the outputs are those of plain decoding (afd.spec_decode).
    ``expert_placement`` (with FFN ranks): which experts each FFN rank holds, per layer or for
    all: an ``ExpertPlacement``, or a JSON file holding one (``ExpertPlacement.to_dict``) or a
    load record (``dump_expert_load_record``), from which afd.eplb computes a balanced placement
    with ``num_redundant_experts`` extra slots per layer for copies of the hottest experts.
    ``eplb_interval_steps`` (with FFN ranks): every that many decode steps, rebalance the
    experts live from the load routed since the last one (``rebalance_experts``; 0: never).
    ``gpu_memory_utilization``: on a GPU with no ``num_kv_blocks`` / ``kv_cache_memory_gb``
    (nor AFD_KV_CACHE_GB), the fraction of each GPU's memory a rank may use in all; each rank
    that holds KV makes what its weights and an activation reserve leave of it its KV pool,
    after loading (vLLM's; afd.kv_memory). ``LLM.config.num_kv_blocks`` then says what the
    single process chose (None with several ranks: each reports its own).
    ``kv_cache_dtype``: "auto" (the KV cache in ``dtype``) or "fp8" / "fp8_e4m3" (vLLM's
    names): keys/values stored as FP8 e4m3 with a scale of 1.0 (clamped to +-448), half of
    bf16's memory a block, so twice the blocks for the same memory; "fp8_e5m2" is refused.
    ``num_window_blocks``: a model with sliding-window layers (MiMo-V2-Flash): their KV in a
    pool of its own whose blocks out of every query's window are freed (afd.window_pool;
    None sizes it, 0: none, every row kept in one pool; no ``kv_offload_gb`` nor P/D with it).
    ``num_state_snapshots``: a hybrid linear-attention model (Qwen3-Next, Qwen3.5-MoE) with
    prefix caching: how many snapshots of its linear layers' states it keeps for prefix hits
    (afd.state_snapshots; each one sequence's states, counted in the KV memory; None: 16, 0:
    its prefix caching off).
    ``scheduling_policy``: "fcfs" or "priority" (vLLM's; ``generate(..., priority=[...])``,
    lower values first; see afd.scheduler).
    ``trust_remote_code``: let transformers run the Python code a tokenizer names in its
    tokenizer_config.json ``auto_map`` (Kimi K2's needs it); False (the default, as vLLM's)
    refuses such a tokenizer. Only the tokenizer: afd's own model code runs the weights.
    """

    def __init__(self, model: str | None = None, *, tokenizer: str | None = None,
                 revision: str | None = None, tokenizer_revision: str | None = None,
                 download_dir: str | None = None, prefill: int = 0, attention: int = 1,
                 ffn: int = 0, micro_batches: int = 2,
                 transport: str = "torch", timeout_s: float = 60.0,
                 prefill_block_size: int | None = None,
                 expert_placement: ExpertPlacement | str | os.PathLike | None = None,
                 num_redundant_experts: int = 0, eplb_interval_steps: int = 0,
                 generation_config: str = "auto", **engine_args: Any):
        self.engine = build_engine(
            model, tokenizer=tokenizer, revision=revision, tokenizer_revision=tokenizer_revision,
            download_dir=download_dir, prefill=prefill, attention=attention, ffn=ffn,
            layout_options=dict(micro_batches=micro_batches, transport=transport,
                                timeout_s=timeout_s, prefill_block_size=prefill_block_size,
                                placement=expert_placement,
                                num_redundant_experts=num_redundant_experts,
                                eplb_interval_steps=eplb_interval_steps),
            generation_config=generation_config, **engine_args)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` uses when given no sampling_params (generation_config defaults)."""
        return self.engine.default_params()

    @property
    def config(self) -> EngineConfig:
        return self.engine.engine_cfg

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: UseTqdm = True, priority: Sequence[int] | None = None,
                 lora_request: Any = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the prompts' order.

        A prompt is a str, ``{"prompt_token_ids": [...]}`` or ``{"prompt": str}``; a dict may
        carry ``"cache_salt"`` (vLLM's: its cached KV is shared only with the same salt).

        ``use_tqdm``: a progress bar (False: none), or a callable that makes it (vLLM's: a tqdm
        class or a ``functools.partial`` of one, called with tqdm's keywords).
        ``priority``: one integer per prompt (vLLM's; lower is served first), only with
        ``scheduling_policy="priority"``; None: all 0. ``lora_request``: vLLM's, None only
        (afd serves no LoRA adapters; anything else is a ParamError naming it).
        Every prompt is validated before any is queued: a bad one raises ValueError and leaves
        the engine as it was. The requests run with ``output_kind`` FINAL_ONLY (copies of the
        params given, which are left as they are): only their final outputs are built.
        """
        check_no_lora(lora_request)
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        elif not isinstance(prompts, Iterable) or isinstance(prompts, bytes):
            raise ParamError("prompt", "prompts must be a prompt (a str, or a dict with "
                             "'prompt' or 'prompt_token_ids') or a list of them, got "
                             f"{type(prompts).__name__}")
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                  else [sampling_params] * len(prompts))
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        engine = self.engine
        if priority is None:
            priority = [0] * len(prompts)
        else:  # a numpy array or numpy ints: the Python ints they stand for
            priority = plain_ids(priority)
            if not isinstance(priority, list) or len(priority) != len(prompts):
                raise ParamError("priority", f"priority must be a list of one integer per "
                                 f"prompt ({len(prompts)}), got {priority!r:.80}")
        for value in priority:
            engine.check_priority(value)
        tokenized = []
        for prompt, p in zip(prompts, params):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
            p.validate()
            salt = engine.prompt_cache_salt(prompt)
            text, ids = engine.prepare_prompt(prompt, p)
            engine.validate(ids, p)
            tokenized.append({"prompt": text, "prompt_token_ids": ids, "cache_salt": salt})
        final: dict[int, SamplingParams] = {}  # one copy per params object given
        for i, p in enumerate(params):
            if p.output_kind != RequestOutputKind.FINAL_ONLY:
                if id(p) not in final:
                    final[id(p)] = replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                params[i] = final[id(p)]
        order = {}
        try:
            for prompt, p, rank in zip(tokenized, params, priority):
                rid = str(next(self._ids))
                engine.add_request(rid, prompt, p, priority=rank)
                order[rid] = len(order)
        except BaseException:  # queue all or none
            for rid in order:
                engine.abort_request(rid)
            raise
        return self._run(order, use_tqdm)

    def chat(self, messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: UseTqdm = True, *, chat_template: str | None = None,
             chat_template_kwargs: dict[str, Any] | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict[str, Any]] | None = None,
             priority: Sequence[int] | None = None,
             lora_request: Any = None) -> list[RequestOutput]:
        """vLLM's ``LLM.chat``: one conversation (a list of OpenAI-style messages) or a list of
        them, each rendered by the tokenizer's chat template (or ``chat_template``, a Jinja
        string) exactly as the server's /v1/chat/completions renders it, then ``generate``.
        ``chat_template_kwargs`` are template variables (e.g. ``enable_thinking``); ``tools``
        are OpenAI tool definitions handed to the template. The outputs' text is the raw
        completion: no reasoning or tool-call parsing (those are the server's). A conversation
        that does not render raises ParamError("messages") before anything is queued (bad
        ``tools`` or ``chat_template_kwargs``: ParamError naming that argument).
        ``lora_request``: None only, as for ``generate``."""
        from pydantic import ValidationError

        from afd.openai_protocol import APIError, ChatTemplateFields

        check_no_lora(lora_request)
        many = (isinstance(messages, (list, tuple)) and len(messages) > 0
                and all(isinstance(m, (list, tuple)) for m in messages))
        conversations = list(messages) if many else [messages]
        prompts = []
        for name, value in (("tools", tools), ("chat_template_kwargs", chat_template_kwargs)):
            if json_depth(value) >= MAX_JSON_DEPTH:  # the request holds it one level down
                raise ParamError(name, f"{name} nests objects and arrays deeper than "
                                 f"{MAX_JSON_DEPTH - 1} levels")
        for i, conversation in enumerate(conversations):
            where = f"messages[{i}]" if many else "messages"
            if json_depth(conversation) >= MAX_JSON_DEPTH:
                raise ParamError("messages", f"{where} nests objects and arrays deeper than "
                                 f"{MAX_JSON_DEPTH - 1} levels")
            try:
                fields = ChatTemplateFields(
                    messages=conversation, add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    chat_template_kwargs=chat_template_kwargs, tools=tools)
                text, ids = fields.prompt_ids(self.get_tokenizer(), template=chat_template)
            except ValidationError as exc:
                first = exc.errors()[0]
                loc = tuple(first["loc"])
                if loc and loc[:1] != ("messages",):  # tools, template kwargs
                    raise ParamError(str(loc[0]), f"{json_path(str(loc[0]), loc[1:])}: "
                                     f"{first['msg']}") from None
                raise ParamError("messages", f"{json_path(where, loc[1:])}: "
                                 f"{first['msg']}") from None
            except APIError as exc:
                raise ParamError(exc.param or "messages", f"{where}: {exc.message}") from None
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm, priority)

    def _run(self, order: dict[str, int], use_tqdm: UseTqdm) -> list[RequestOutput]:
        with gc_frozen():
            return self._steps(order, use_tqdm)

    def _steps(self, order: dict[str, int], use_tqdm: UseTqdm) -> list[RequestOutput]:
        results: list[RequestOutput | None] = [None] * len(order)
        # vLLM's use_tqdm: True, False, or a callable that makes the bar (a tqdm class or a
        # functools.partial of one)
        bar = (use_tqdm if callable(use_tqdm) else tqdm)(
            total=len(order), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        start = time.perf_counter()
        in_tokens = out_tokens = 0
        left = len(order)
        try:
            while left:
                for out in self.engine.step():
                    if out.finished and out.request_id in order:
                        left -= 1
                        results[order[out.request_id]] = out
                        in_tokens += len(out.prompt_token_ids)
                        out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        elapsed = max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(f"est. speed input: {in_tokens / elapsed:.1f} toks/s, "
                                            f"output: {out_tokens / elapsed:.1f} toks/s")
                        bar.update(1)
        except BaseException:
            for rid in order:  # leave nothing half-run in the engine
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return results  # type: ignore[return-value]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached KV block (on every rank); requests running keep theirs."""
        return self.engine.reset_prefix_cache()

    def start_expert_load_record(self) -> None:
        """Start counting the tokens routed to each expert of each MoE layer (from zero), on
        every rank that routes (afd.expert_load)."""
        self.engine.start_expert_load_record()

    def stop_expert_load_record(self) -> None:
        """Stop counting; the counts stay for ``dump_expert_load_record``."""
        self.engine.stop_expert_load_record()

    def dump_expert_load_record(self, path: str | os.PathLike | None = None) -> dict:
        """The record so far (while recording or after stop): {"num_layers", "num_experts",
        "counts": [[tokens per expert] per decoder layer]}, summed over attention ranks; also
        written to ``path`` as JSON, which ``expert_placement=path`` reads back (afd.eplb)."""
        record = self.engine.expert_load_record()
        if path is not None:
            with open(path, "w") as f:
                json.dump(record, f)
        return record

    def rebalance_experts(self, record: dict | None = None,
                          placement: ExpertPlacement | None = None) -> dict:
        """Re-place the experts on the FFN ranks while serving, with no restart (vLLM's
        ``--enable-eplb`` rearranges the same way): from ``record`` (a dump), by default the
        load recorded so far (``start_expert_load_record``; NoExpertLoadRecord before any),
        as ``expert_placement=`` a record file would at start, keeping each FFN rank's slot
        count (redundant copies need ``num_redundant_experts`` at start); or to ``placement``,
        with the same slots. Every rank switches at one step boundary, FFN ranks moving the
        weights they lack from each other (afd.rebalance). Returns {"epoch", "placement",
        "moved", "seconds", and from a record "imbalance_before"/"imbalance_after"}.
        ValueError with no FFN ranks."""
        return self.engine.rebalance_experts(record, placement)

    def shutdown(self) -> None:
        """Give back the engine: rank processes exit; the single process releases its model,
        KV cache and CUDA graphs (``EngineCore.close``). ``generate`` raises RuntimeError
        after, in every layout."""
        from afd.core import EngineCore

        self.engine.shutdown()
        if isinstance(self.engine.core, EngineCore):
            self.engine.core.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
