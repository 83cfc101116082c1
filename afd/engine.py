"""LLMEngine: the front end over a core (in-process or multi-rank).

It owns text: validates and tokenizes prompts, fans ``n`` completions out into core requests,
detokenizes their tokens incrementally, matches stop strings (aborting the core request when one
hits) and assembles vLLM-shaped RequestOutputs, of the kind each request asks for
(``SamplingParams.output_kind``: cumulative, only what is new, or only the final one). The core
speaks token ids only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from afd.config import EngineConfig
from afd.detokenizer import IncrementalDetokenizer, find_stop
from afd.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from afd.sampler import PromptLogprobs
from afd.sampling_params import (ParamError, RequestOutputKind, SamplingParams,
                                  check_text, check_token_ids, plain_ids)
from afd.sequence import CoreOutput, CoreRequest
from afd.token_masks import bad_word_sequences
from models.config import ModelConfig


class CoreClient(Protocol):
    """What the front end needs from the ranks below it (see afd.core, afd.layouts)."""

    def add_request(self, req: CoreRequest) -> None: ...
    def abort(self, request_ids: list[str]) -> None: ...
    def step(self) -> list[CoreOutput]: ...
    def has_unfinished(self) -> bool: ...
    def stats(self) -> list[Any]: ...
    def prefix_cache_stats(self) -> Any: ...
    def reset_prefix_cache(self) -> None: ...
    def start_expert_load_record(self) -> None: ...
    def stop_expert_load_record(self) -> None: ...
    def expert_load_record(self) -> dict: ...
    def rebalance_experts(self, record: dict | None = None, placement: Any = None) -> dict: ...
    def shutdown(self) -> None: ...


@dataclass
class _Completion:
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None  # these two only when the request asks for logprobs
    logprobs: list[dict[int, Logprob]] | None = None
    # DELTA outputs: the tokens and characters of text that earlier outputs carried, and
    # whether the output that carried its finish went out (it is in none after that)
    sent_tokens: int = 0
    sent_chars: int = 0
    done: bool = False


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[_Completion]
    metrics: RequestMetrics
    error: str | None = None
    num_cached_tokens: int | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_logprobs_sent: bool = False  # DELTA: an output carried them
    # While a completion runs, its last len(longest stop) - 1 characters could be the start of
    # a stop string that the next token completes (and cuts): they are held back, so what was
    # shown (streamed) is never taken back. From the params, which never change.
    hold: int = field(init=False)

    def __post_init__(self) -> None:
        p = self.params
        self.hold = 0 if p.include_stop_str_in_output else max(map(len, p.stop), default=1) - 1

    @property
    def finished(self) -> bool:
        for c in self.completions:  # (a loop: all() over a generator costs more, per step)
            if c.finish_reason is None:
                return False
        return True

    @property
    def outputs(self) -> list[_Completion]:
        """The completions, under RequestOutput's name: what the server's metrics read of a
        step's requests (token_ids, finish_reason), whatever outputs the step built."""
        return self.completions

    def output(self, finished: bool | None = None) -> RequestOutput:
        """The request's cumulative output (``finished``: ``self.finished``, if known). A
        finished request's lists are handed over, not copied: the engine is done with them."""
        hold, outs = self.hold, []
        if finished is None:
            finished = self.finished
        for c in self.completions:
            text, token_ids, logprobs = c.text, c.token_ids, c.logprobs
            if not finished:
                token_ids = token_ids[:]
                logprobs = None if logprobs is None else logprobs[:]
                if hold and c.finish_reason is None:
                    text = text[:len(text) - hold] if len(text) > hold else ""
            outs.append(CompletionOutput(c.index, text, token_ids, c.finish_reason,
                                         c.stop_reason, c.cumulative_logprob, logprobs))
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs,
                             finished, self.metrics, self.error, self.num_cached_tokens,
                             self.prompt_logprobs)

    def delta_output(self, finished: bool) -> RequestOutput:
        """What is new since this request's last output (RequestOutputKind.DELTA): per
        completion still running, or finished since, the tokens, logprobs and shown text
        (held-back text, see ``hold``, comes when it is shown) that no output carried yet;
        the prompt's logprobs once."""
        hold, outs = self.hold, []
        for c in self.completions:
            if c.done:
                continue
            text, start = c.text, c.sent_tokens
            shown = len(text)
            if hold and c.finish_reason is None:
                shown = shown - hold if shown > hold else 0
            piece = text[c.sent_chars:shown] if shown > c.sent_chars else ""
            if shown > c.sent_chars:
                c.sent_chars = shown
            token_ids, logprobs = c.token_ids, c.logprobs
            c.sent_tokens = len(token_ids)
            if c.finish_reason is not None:
                c.done = True
            outs.append(CompletionOutput(c.index, piece, token_ids[start:], c.finish_reason,
                                         c.stop_reason, c.cumulative_logprob,
                                         None if logprobs is None else logprobs[start:]))
        prompt_logprobs = None
        if self.prompt_logprobs is not None and not self.prompt_logprobs_sent:
            prompt_logprobs, self.prompt_logprobs_sent = self.prompt_logprobs, True
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs,
                             finished, self.metrics, self.error, self.num_cached_tokens,
                             prompt_logprobs)


def _one_token_pieces(out: CoreOutput) -> list[CoreOutput]:
    """A several-token output as one-token outputs: the first with its metrics and prompt
    logprobs, the last with its finish (or error)."""
    tokens, last = out.new_token_ids, len(out.new_token_ids) - 1
    return [CoreOutput(out.request_id, [token],
                       out.finish_reason if i == last else None,
                       out.stop_reason if i == last else None,
                       out.error if i == last else None,
                       out.metrics if i == 0 else None,
                       None if out.logprobs is None else [out.logprobs[i]],
                       out.prompt_logprobs if i == 0 else None)
            for i, token in enumerate(tokens)]


DELTA, FINAL_ONLY = RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY
# vLLM's TextPrompt / TokensPrompt keys for images, audio and video, and its embeddings prompt
_MULTIMODAL_KEYS = ("multi_modal_data", "mm_processor_kwargs", "multi_modal_uuids",
                    "prompt_embeds")


def _child_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


class LLMEngine:
    def __init__(self, tokenizer, model_cfg: ModelConfig, engine_cfg: EngineConfig,
                 core: CoreClient, eos_token_ids: tuple[int, ...] = (),
                 default_sampling: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        # SamplingParams fields a request leaves unset take these (generation_config.json).
        self.default_sampling = dict(default_sampling or {})
        self.model_cfg = model_cfg
        self.engine_cfg = engine_cfg
        self.core = core
        self.eos_token_ids = eos_token_ids
        self.requests: dict[str, _Request] = {}
        self.last_step_requests: dict[str, _Request] = {}  # see ``step``
        self._child: dict[str, tuple[_Request, _Completion]] = {}
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self._token_text: dict[int, str] = {}  # each token id decoded alone, for logprobs
        # the detokenizers' own table of single-token texts, per skip_special_tokens
        # (IncrementalDetokenizer's ``token_texts``; their decode is not the one above)
        self._detok_texts: dict[bool, dict[int, str]] = {True: {}, False: {}}

    def default_params(self) -> SamplingParams:
        return SamplingParams(**self.default_sampling)

    # ---- input ----------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: Any) -> tuple[str | None, list[int]]:
        """A str, {"prompt_token_ids": [...]} (optionally with "prompt"), or {"prompt": str}
        (vLLM's TextPrompt), -> (text, ids). A dict may also carry "cache_salt"
        (``prompt_cache_salt``). vLLM's multimodal keys are a ParamError naming them: afd
        reads text only, and would otherwise answer as if no image had been sent."""
        if isinstance(prompt, dict):
            given = next((k for k in _MULTIMODAL_KEYS if prompt.get(k) is not None and not (
                isinstance(prompt[k], (dict, list, tuple)) and not prompt[k])), None)
            if given is not None:
                raise ParamError("prompt", f"prompt key {given!r}: multimodal input is not "
                                 "supported (afd's models read text only)")
        if isinstance(prompt, dict) and "prompt_token_ids" not in prompt and isinstance(
                prompt.get("prompt"), str):
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if not prompt:
                raise ParamError("prompt", "prompt must be a non-empty string or token id list, "
                                 "got ''")
            check_text(prompt, "prompt")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not self._int_list(ids):  # a numpy array or numpy ints: their Python ints
                ids = plain_ids(ids)
                if not self._int_list(ids):
                    raise ParamError("prompt", "prompt_token_ids must be a list of integers, "
                                     f"got {type(prompt['prompt_token_ids']).__name__}")
            return prompt.get("prompt"), list(ids)
        raise ParamError("prompt", "prompt must be a str or a dict with 'prompt_token_ids' or "
                         f"'prompt', got {type(prompt).__name__}")

    @staticmethod
    def _int_list(ids: Any) -> bool:
        return isinstance(ids, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids)

    @staticmethod
    def check_cache_salt(salt: Any) -> str | None:
        """A request's ``cache_salt`` (vLLM's): None, or a non-empty string that keeps its
        cached KV blocks apart from every other salt's (afd.block_pool.salt_root).
        ParamError("cache_salt") otherwise."""
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise ParamError("cache_salt", f"cache_salt must be a non-empty string if given, "
                             f"got {salt!r:.80}")
        if salt is not None and not salt.isascii():
            try:  # JSON can carry a lone surrogate, which the hash and the wire cannot
                salt.encode()
            except UnicodeEncodeError:
                raise ParamError("cache_salt", f"cache_salt must be valid Unicode (no lone "
                                 f"surrogates), got {salt!r:.80}") from None
        return salt

    def prompt_cache_salt(self, prompt: Any) -> str | None:
        """A dict prompt's "cache_salt" (``check_cache_salt``); None for a str prompt."""
        return self.check_cache_salt(prompt.get("cache_salt") if isinstance(prompt, dict)
                                     else None)

    def prepare_prompt(self, prompt: Any, params: SamplingParams
                       ) -> tuple[str | None, list[int]]:
        """``tokenize_prompt``, then ``params.truncate_prompt_tokens``: only the last k token
        ids are kept (-1: max_model_len, as vLLM; more than max_model_len is a ParamError).
        A prompt cut short has no text (None): the text sent is not the text of its tokens."""
        text, ids = self.tokenize_prompt(prompt)
        k = params.truncate_prompt_tokens
        if k is None:
            return text, ids
        max_len = self.engine_cfg.max_model_len
        if k == -1:
            k = max_len
        if k > max_len:
            raise ParamError("truncate_prompt_tokens", f"truncate_prompt_tokens={k} is greater "
                             f"than max_model_len {max_len}: keep at most {max_len} tokens")
        if len(ids) <= k:
            return text, ids
        return None, ids[-k:]

    def validate(self, prompt_token_ids: list[int], params: SamplingParams
                 ) -> list[list[int]] | None:
        """ParamError naming the field if the prompt or params do not fit this model and engine.
        Returns the bad_words' token sequences (None without bad_words), tokenized once here."""
        vocab = self.model_cfg.vocab_size
        check_token_ids(prompt_token_ids, params, vocab, self.engine_cfg.max_model_len)
        bad_words = (bad_word_sequences(self.tokenizer, params.bad_words, vocab)
                     if params.bad_words else None)
        if params.structured_outputs is not None:
            # imported here: llguidance loads only for a constrained request, so the engine
            # runs where it is not installed (the lent GPU machine's image has none)
            from afd.structured_output import check as check_structured_output

            check_structured_output(params.structured_outputs)
        return bad_words

    def check_priority(self, priority: Any) -> int:
        """A request's ``priority`` (vLLM's: lower is served first): any 64-bit integer under
        scheduling_policy "priority", only 0 under "fcfs". ParamError("priority") otherwise."""
        if not isinstance(priority, int) or isinstance(priority, bool) or not (
                -2**63 <= priority < 2**63):
            raise ParamError("priority", f"priority must be a 64-bit integer, got {priority!r}")
        if priority and self.engine_cfg.scheduling_policy != "priority":
            raise ParamError("priority", f"priority={priority} needs scheduling_policy="
                             "'priority' (--scheduling-policy priority); the engine runs "
                             f"{self.engine_cfg.scheduling_policy!r}, where priority must be 0")
        return priority

    @staticmethod
    def _with_bad_word_ids(params: SamplingParams, ids: list[list[int]] | None
                           ) -> SamplingParams:
        """``params`` with bad_words_token_ids ``ids`` (its bad_words tokenized: what the ranks
        use); a copy, so the caller's object is left as it was."""
        if ids == params.bad_words_token_ids:
            return params
        return SamplingParams(**{**params.to_dict(), "bad_words_token_ids": ids})

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> None:
        """Validate, tokenize and queue one prompt. Raises ValueError and queues nothing if bad.
        ``priority``: see ``check_priority``."""
        params = params or self.default_params()
        params.validate()
        self.check_priority(priority)
        cache_salt = self.prompt_cache_salt(prompt)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        # A request's completions run under ids derived from it ("a" with n=2: "a#0", "a#1"),
        # and none may be one a running request already goes by.
        taken = next((cid for i in range(params.n)
                      if (cid := _child_id(request_id, i, params.n)) in self._child), None)
        if taken is not None:
            raise ValueError(f"request_id {request_id!r} collides with {taken!r}, a completion "
                             "of a running request")
        if arrival_time is not None and not (isinstance(arrival_time, (int, float))
                                             and not isinstance(arrival_time, bool)
                                             and math.isfinite(arrival_time)):
            raise ParamError("arrival_time", f"arrival_time must be a finite number, got "
                             f"{arrival_time!r}")
        text, ids = self.prepare_prompt(prompt, params)
        params = self._with_bad_word_ids(params, self.validate(ids, params))
        arrival = time.monotonic() if arrival_time is None else float(arrival_time)
        req = _Request(request_id, text, ids, params, [], RequestMetrics(arrival_time=arrival))
        children, context = [], None
        for i in range(params.n):
            skip = params.skip_special_tokens
            detok = IncrementalDetokenizer(self.tokenizer, ids, skip,
                                           self._detok_texts[bool(skip)], context)
            context = detok.context  # the prompt's context, chosen once for all n
            comp = _Completion(i, detok)
            if params.logprobs is not None:
                comp.cumulative_logprob, comp.logprobs = 0.0, []
            req.completions.append(comp)
            child = params
            if params.n > 1:  # the prompt's logprobs are the same for all: the first computes them
                child = SamplingParams(**{**params.to_dict(), "n": 1,
                                          "seed": None if params.seed is None else params.seed + i,
                                          "prompt_logprobs": params.prompt_logprobs if i == 0
                                          else None})
            cid = _child_id(request_id, i, params.n)
            children.append((cid, comp, CoreRequest(cid, ids, child, self.eos_token_ids, arrival,
                                                    priority, cache_salt)))
        added: list[str] = []
        try:  # all children or none: a failure here must not leave one running, holding KV
            for cid, comp, core_req in children:
                self.core.add_request(core_req)
                self._child[cid] = (req, comp)
                added.append(cid)
        except Exception:
            for cid in added:
                self._child.pop(cid, None)
            self.core.abort(added)
            raise
        self.requests[request_id] = req
        self.num_prompt_tokens += len(ids)

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        cids = [_child_id(request_id, c.index, req.params.n) for c in req.completions]
        for cid in cids:
            self._child.pop(cid, None)
        self.core.abort(cids)

    # ---- output ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one core step; return an output for every request that changed, of the kind it
        asked for (``SamplingParams.output_kind``): cumulative, what is new (DELTA), or none
        until it finishes (FINAL_ONLY). ``last_step_requests`` then holds every request the
        step changed, outputs built or not."""
        self.last_step_requests = changed = {}
        outputs = self.core.step()
        now = time.monotonic()  # the tokens exist once the step has run (in-process core)
        child, apply_one = self._child.get, self._apply_one
        for out in outputs:
            entry = child(out.request_id)
            if entry is None:
                continue  # aborted or already stopped by a stop string
            req, comp = entry
            if len(out.new_token_ids) > 1:
                self._apply(req, comp, out, now)
            else:
                apply_one(req, comp, out, now)
            changed[req.request_id] = req
        results = []
        for req in changed.values():
            finished = req.finished
            if finished:
                req.metrics.finished_time = now
                del self.requests[req.request_id]
            kind = req.params.output_kind
            if kind == DELTA:
                results.append(req.delta_output(finished))
            elif finished or kind != FINAL_ONLY:
                results.append(req.output(finished))
        return results

    def _apply(self, req: _Request, comp: _Completion, out: CoreOutput, now: float) -> None:
        """Several tokens from one step (accepted speculative drafts): taken one at a time, as
        one-token steps would bring them, so a stop string ends the completion at the token
        that completes it, not at the end of the run. (``step`` takes the others to
        ``_apply_one`` itself.)"""
        for piece in _one_token_pieces(out):
            self._apply_one(req, comp, piece, now)
            if comp.finish_reason is not None:
                return

    def _apply_one(self, req: _Request, comp: _Completion, out: CoreOutput, now: float) -> None:
        if out.error is not None:
            req.error = out.error
        if out.metrics:
            self._apply_metrics(req, out.metrics)
        if out.prompt_logprobs is not None and req.prompt_logprobs is None:
            req.prompt_logprobs = self._prompt_logprobs(req.prompt_token_ids, out.prompt_logprobs)
        new_ids, delta, params = out.new_token_ids, "", req.params
        if new_ids:
            metrics = req.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
            token_ids = comp.token_ids
            token_ids += new_ids
            if comp.logprobs is not None and out.logprobs is not None:
                self._add_logprobs(comp, out.logprobs)
            num_tokens = len(token_ids)
            if num_tokens > metrics.num_generated_tokens:
                metrics.num_generated_tokens = num_tokens
            self.num_generation_tokens += len(new_ids)
            text_ids = new_ids
            if (out.finish_reason == "stop" and not params.include_stop_str_in_output
                    and (isinstance(out.stop_reason, int)  # not a grammar's last token
                         or new_ids[-1] in self.eos_token_ids)):
                text_ids = new_ids[:-1]  # EOS or a stop token id: its text is left out (vLLM)
            if params.detokenize:
                delta = comp.detok.push(text_ids)
        if out.finish_reason is not None and comp.finish_reason is None and params.detokenize:
            # the last text: what the detokenizer held for a character not finished yet
            delta += comp.detok.flush()
        if delta:
            comp.text += delta
            # not at the first min_tokens tokens (a stop token can come after them only)
            if params.stop and len(comp.token_ids) > params.min_tokens:
                hit = find_stop(comp.text, len(delta), params.stop)
                if hit is not None:
                    index, stop = hit
                    keep = index + len(stop) if params.include_stop_str_in_output else index
                    comp.text = comp.text[:keep]
                    comp.finish_reason, comp.stop_reason = "stop", stop
        if comp.finish_reason is None and out.finish_reason is not None:
            comp.finish_reason, comp.stop_reason = out.finish_reason, out.stop_reason
        if comp.finish_reason is not None:
            cid = _child_id(req.request_id, comp.index, req.params.n)
            if self._child.pop(cid, None) is not None and out.finish_reason is None:
                self.core.abort([cid])  # stopped here by a stop string; the core still runs it

    @staticmethod
    def _apply_metrics(req: _Request, metrics: dict) -> None:
        if "queue_time" in metrics:
            req.metrics.queue_time = metrics["queue_time"]
        if "prefill_time" in metrics:
            req.metrics.prefill_time = metrics["prefill_time"]
        if "transfer_time" in metrics:
            req.metrics.transfer_time = metrics["transfer_time"]
        if "spec" in metrics:  # speculative decoding: [drafts, accepted] of a step
            req.metrics.spec_num_draft_tokens += metrics["spec"][0]
            req.metrics.spec_num_accepted_tokens += metrics["spec"][1]
        if "num_preemptions" in metrics:  # of any of its completions
            req.metrics.num_preemptions += metrics["num_preemptions"]
        if "num_cached_tokens" in metrics:
            req.num_cached_tokens = max(req.num_cached_tokens or 0, metrics["num_cached_tokens"])

    def _add_logprobs(self, comp: _Completion, steps: list[list]) -> None:
        """Each new token's [ids, logprobs, sampled rank] (afd.sampler.SamplerOutput)."""
        entry, append = self._logprob_entry, comp.logprobs.append
        for ids, logprobs, rank in steps:
            comp.cumulative_logprob += logprobs[0]
            append(entry(ids, logprobs, rank))

    def _prompt_logprobs(self, prompt: list[int], scored: PromptLogprobs
                         ) -> list[dict[int, Logprob] | None]:
        """vLLM's prompt_logprobs: None for the first prompt token, then one entry per token."""
        k, out = scored.k, [None]
        for i, token in enumerate(prompt[1:]):
            out.append(self._logprob_entry(
                [token, *scored.top_ids[i * k:(i + 1) * k]],
                scored.logprobs[i * (k + 1):(i + 1) * (k + 1)], scored.ranks[i]))
        return out

    def _logprob_entry(self, ids: list[int], logprobs: list[float], rank: int
                       ) -> dict[int, Logprob]:
        """One token's logprobs as vLLM's {token id: Logprob}: the token itself first (with
        ``rank``), then the k likeliest, ranks 1..k (the token among them is one entry)."""
        texts, entry = self._token_text, {}
        for r, tid, lp in zip(range(len(ids)), ids, logprobs):  # r: 0 (the token), 1, 2, ..
            text = texts.get(tid)
            entry[tid] = Logprob(lp, r or rank, self.token_text(tid) if text is None else text)
        return entry

    def token_text(self, token_id: int) -> str:
        """One token decoded alone (vLLM's ``decoded_token``), with the leading spaces of its
        vocabulary piece: a sentencepiece decoder drops the text's first space, which for a
        token alone is the token's own ("▁Paris" decodes as "Paris"; vLLM adds it back too),
        and the logprobs' tokens would no longer add up to the text."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece.startswith("\u2581"):
                missing = (len(piece) - len(piece.lstrip("\u2581"))
                           - (len(text) - len(text.lstrip(" "))))
                if missing > 0:
                    text = " " * missing + text
            self._token_text[token_id] = text
        return text

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache on every rank (KV of running requests stays theirs)."""
        self.core.reset_prefix_cache()
        return True

    def start_expert_load_record(self) -> None:
        """Zero every attention rank's per-layer expert token counts and start counting
        (afd.expert_load; SGLang's /start_expert_distribution_record)."""
        self.core.start_expert_load_record()

    def stop_expert_load_record(self) -> None:
        self.core.stop_expert_load_record()

    def expert_load_record(self) -> dict:
        """{"num_layers", "num_experts", "counts": [[tokens per expert] per decoder layer]},
        summed over the attention ranks; NoExpertLoadRecord (a ValueError) before any start."""
        return self.core.expert_load_record()

    def rebalance_experts(self, record: dict | None = None, placement: Any = None) -> dict:
        """Move to a new expert placement while serving (afd.rebalance): the one afd.eplb
        computes from ``record`` (default: the load recorded so far) or ``placement``; FFN
        ranks only (ValueError otherwise). Requests keep running; their outputs meanwhile
        come with the next ``step``."""
        return self.core.rebalance_experts(record, placement)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished_seqs(self) -> int:
        """Completions still running or queued (a request with n > 1 counts n)."""
        return len(self._child)

    def shutdown(self) -> None:
        self.core.shutdown()
