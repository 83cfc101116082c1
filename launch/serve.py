"""OpenAI-compatible server over any layout.

    afd serve [MODEL] [--prefill P] [--attention A] [--ffn F] [--host 127.0.0.1] [--port 8000]
        [--api-key KEY]
    torchrun --nproc-per-node N launch/serve.py [MODEL | --model PATH] [the same flags]

N = P + A + F (with no flags: the embedded default model on one process). On one node
``afd serve`` (afd/cli.py) starts the N ranks itself through torch's launcher, as torchrun
would, each running :func:`main`; under torchrun (RANK set) it is this script. Multi-node works
through torchrun's own flags (--nnodes, --node-rank, --master-addr ...; N is then the sum of
every node's --nproc-per-node); --model must then be a path every node can read (with none,
each node builds the embedded model itself), --host the address clients reach rank 0's node
on, and GLOO_SOCKET_IFNAME the interface the nodes reach each other on where this machine's
hostname resolves to loopback (docs/serving.md: Multi-node), and --control-key-file a secret
every node holds (the control messages are sealed with it; docs/architecture.md:
Control-plane authentication).

Every torchrun process becomes one rank (prefill ranks first, then attention, then FFN). Rank 0
also starts the HTTP front end as a child process (``python -m afd.api_server``), so serving
HTTP never blocks a step loop; the front end's control-socket addresses reach the other ranks
through torchrun's store. SIGTERM (to torchrun or any rank) drains in-flight requests for
--grace-period seconds, then every rank stops.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist

from afd.api_server import (DEFAULT_MAX_REQUEST_BODY_BYTES, SPEC_MARKER,
                            log_stats_interval)
from afd import hub, protocol
from afd.frontend_flags import FrontendOptions, add_frontend_args, frontend_argv
from afd.config import (KV_CACHE_DTYPES, SCHEDULING_POLICIES, VLLM_NEUTRAL,
                        engine_config_to_dict, resolve_engine_config)
from afd.layouts import is_loopback, loopback_store, threads_per_rank
from afd.reasoning_parsers import PARSERS as REASONING_PARSERS
from afd.spec_decode import parse_speculative_config
from afd.tool_parsers import PARSERS
from afd.workers import Layout, WorkerSpec, join_process_group, loopback_gloo_env, worker_main
from models.config import check_hf_overrides, load_config
from models.weights import LOAD_FORMATS
from models.default_model import default_model_path

log = logging.getLogger("afd.launch")
SPEC_KEY = "afd/front_spec"
SPEC_PURPOSE = b"afd-rank-spec:"  # what the spec's MAC in the store is for (protocol.seal_blob)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """Every serving flag (launch/serve.py's and ``afd serve``'s: one parser for both)."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                 usage="%(prog)s [MODEL] [options] (--help lists them)")
    ap.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                    help="HF checkpoint folder or Hugging Face Hub repo id, as vLLM's 'vllm "
                         "serve MODEL' (the same as --model; give one of the two)")
    ap.add_argument("--model", default=None,
                    help="HF checkpoint folder, or a Hub repo id (org/name) fetched into the "
                         "HF cache or read from it (default: embedded tiny)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub repo id "
                    "(default: the model's)")
    ap.add_argument("--revision", default=None,
                    help="with a Hub repo id: the branch, tag or commit to serve (default: "
                         "main); as vLLM's")
    ap.add_argument("--tokenizer-revision", default=None,
                    help="with a --tokenizer Hub repo id: its branch, tag or commit")
    ap.add_argument("--download-dir", default=None, metavar="DIR",
                    help="the HF cache folder a Hub repo is fetched into and read from "
                         "(default: HF_HUB_CACHE, under HF_HOME); as vLLM's")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="let the tokenizer run the Python code its tokenizer_config.json "
                         "names (auto_map; Kimi K2's needs it); weights never run such code")
    ap.add_argument("--served-model-name", nargs="+", default=None,
                    help="the model id /v1/models lists and requests name (default: the "
                         "checkpoint folder's name; afd-tiny-deepseek-v3 for the embedded one); "
                         "as vLLM, several names are aliases, answers carry the first")
    ap.add_argument("--prefill", type=int, default=0)
    ap.add_argument("--attention", type=int, default=1)
    ap.add_argument("--ffn", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000,
                    help="the HTTP port (default 8000); 0: a free one the OS picks, which the "
                         "front end logs ('afd serving MODEL on http://HOST:PORT ...; ready')")
    ap.add_argument("--api-key", default=os.environ.get("AFD_API_KEY"),
                    help="key clients send as 'Authorization: Bearer KEY' (default: "
                         "$AFD_API_KEY; unset: no key checked)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--kv-cache-memory-gb", type=float, default=None)
    ap.add_argument("--num-window-blocks", type=int, default=None,
                    help="a model with sliding-window layers (MiMo-V2-Flash): blocks of their "
                         "own pool, whose blocks out of the window are freed (default: sized "
                         "from the KV memory; 0: no such pool, every row kept)")
    ap.add_argument("--num-state-snapshots", type=int, default=None,
                    help="a hybrid linear-attention model (Qwen3-Next, Qwen3.5-MoE) with "
                         "prefix caching: snapshots of its linear layers' states kept for "
                         "prefix hits, each one sequence's states, counted in the KV memory "
                         "(default: 16; 0: no prefix caching for it)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                    help="with no --num-kv-blocks / --kv-cache-memory-gb on a GPU: the "
                         "fraction of each GPU's memory a rank may use; what its weights and "
                         "an activation reserve leave is its KV cache (default 0.9, as vLLM)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                    help="run decode steps eagerly; --no-enforce-eager captures CUDA graphs of "
                         "decode steps (layouts without FFN ranks). Default: graphs on CUDA, "
                         "eager on CPU")
    ap.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=None,
                    help="decode batch sizes to capture, in decode rows (default 1 2 4 8 16 "
                         "24 32 ... up to min(max-num-seqs x (1 + num_speculative_tokens), "
                         "256), and that cap)")
    ap.add_argument("--ffn-cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                    help="FFN ranks capture each MoE layer's expert compute (not the "
                         "all_to_all) in CUDA graphs, one per row bucket, and replay them "
                         "(opt-in: not yet run on a GPU; ignored on CPU)")
    ap.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                    default=True, help="reuse the KV of full blocks of tokens that a new prompt "
                    "shares with earlier ones (default on)")
    ap.add_argument("--kv-offload-gb", type=float, default=0,
                    help="GiB of host memory per rank that runs prompts for KV blocks evicted "
                         "from the prefix cache, copied back on a later hit (default 0: none)")
    ap.add_argument("--cache-aware-routing", action=argparse.BooleanOptionalAction,
                    default=True, help="with several prefill or attention ranks, send a prompt "
                    "to the rank that ran its longest prefix unless that rank is overloaded "
                    "(default on); --no-cache-aware-routing places by load alone")
    ap.add_argument("--speculative-config", default=None,
                    help="speculative decoding as vLLM's JSON, n-gram drafts: "
                         "'{\"method\": \"ngram\", \"num_speculative_tokens\": 3, "
                         "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}', or the "
                         "DeepSeek-V3 checkpoint's MTP layer: "
                         "'{\"method\": \"mtp\", \"num_speculative_tokens\": 1}'")
    ap.add_argument("--scheduling-policy", default="fcfs", choices=SCHEDULING_POLICIES,
                    help="fcfs: arrival order (a request's priority must be 0); priority: "
                         "lower request priority first, and the largest is preempted first "
                         "(as vLLM)")
    ap.add_argument("--async-scheduling", action="store_true",
                    help="schedule and launch each step before the previous step's tokens are "
                         "read on the host (vLLM's); attention ranks, P/D decode ranks "
                         "among them (prefill ranks step synchronously); refused with --ffn "
                         "or --speculative-config "
                         "(docs/limits.md#async-scheduling)")
    ap.add_argument("--generation-config", default="auto", choices=["auto", "vllm"],
                    help="auto: sampling defaults from the checkpoint's generation_config.json "
                         "(as vLLM); vllm: SamplingParams' own defaults")
    ap.add_argument("--enable-auto-tool-choice", action="store_true",
                    help='read tool calls the model writes in its own format (tool_choice '
                         '"auto", the default when a request sends tools); needs '
                         "--tool-call-parser")
    ap.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                    help="the model's tool-call format: hermes (Qwen3), deepseek_v3, "
                         "deepseek_v31, kimi_k2, ...; gpt_oss (or openai) for gpt-oss's "
                         "harmony calls (docs/serving.md)")
    ap.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                    help="split the model's <think> ... </think> off its chat answers into "
                         "the message's reasoning field: deepseek_r1, qwen3, deepseek_v3 "
                         "(DeepSeek-V3.1, thinking when chat_template_kwargs sets thinking), "
                         "kimi_k2 (K2-Thinking), ...; gpt_oss (or openai_gptoss) reads "
                         "gpt-oss's harmony channels: analysis is the reasoning, final the "
                         "content (docs/serving.md)")
    ap.add_argument("--max-stored-responses", type=int, default=1000,
                    help="/v1/responses: how many responses (with their conversations) the "
                         "front end keeps in memory for previous_response_id and GET, least "
                         "recently used dropped first; 0 keeps none")
    ap.add_argument("--max-stored-responses-mb", type=int, default=1024,
                    help="/v1/responses: the store's bound in MiB, each response counted as "
                         "the JSON of it and its whole conversation; one larger is not kept")
    ap.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                    help="the largest HTTP request body taken, in bytes (default 32 MiB); a "
                         "larger one is a 413, refused from its Content-Length before any of it "
                         "is read, or as soon as a chunked body passes the limit")
    ap.add_argument("--enable-request-id-headers", action="store_true",
                    help="vLLM's: every HTTP response carries an X-Request-Id header, the "
                         "request's own or a new id (off by default, as vLLM)")
    add_frontend_args(ap)  # vLLM's chat-template, logprobs, CORS, root-path, SSL flags
    vllm = ap.add_argument_group(
        "vLLM's flags afd takes at the one value it has", "so a 'vllm serve' command line runs: "
        "afd splits a model by its layout (--prefill/--attention/--ffn), not by these sizes; "
        "it always chunks long prompts; it logs no request")
    short = {"tensor_parallel_size": "-tp", "pipeline_parallel_size": "-pp",
             "data_parallel_size": "-dp"}
    for name, neutral in VLLM_NEUTRAL.items():  # the values LLM() takes too
        names = ["--" + name.replace("_", "-")] + ([short[name]] if name in short else [])
        if isinstance(neutral, bool):
            vllm.add_argument(*names, action=argparse.BooleanOptionalAction, default=neutral,
                              help=f"{'on' if neutral else 'off'} only")
        else:
            vllm.add_argument(*names, type=type(neutral), default=neutral,
                              help=f"{neutral} only")
    ap.add_argument("--disable-log-stats", action="store_true",
                    help="no periodic engine line in the log (throughput, requests, KV cache "
                         "use, prefix cache hit rate: every AFD_LOG_STATS_INTERVAL seconds, "
                         "default 10), as vLLM's")
    vllm.add_argument("--disable-log-requests", action="store_true", help="no effect")
    ap.add_argument("--quantization", "-q", default=None,
                    choices=["fp8", "mxfp4", "dequantize"],
                    help="default: follow the checkpoint (an FP8 block-scaled checkpoint keeps "
                         "its routed experts in FP8 on CUDA, dequantizes them elsewhere; "
                         "MXFP4 experts are dequantized); fp8: keep them in FP8 on any device "
                         "(a bf16 checkpoint's quantized on load, 128x128 blocks; MXFP4 ones "
                         "converted); mxfp4: keep a checkpoint's MXFP4 routed experts packed "
                         "(gpt-oss's, DeepSeek-V4's releases; weight-only, dequantized "
                         "exactly as each runs); dequantize: every weight in --dtype. "
                         "Other weights are always dequantized")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                    help="auto: the KV cache in --dtype; fp8 / fp8_e4m3: FP8 e4m3, scale 1.0 "
                         "(half the KV memory of bf16); fp8_e5m2 is not supported")
    ap.add_argument("--load-format", default="auto", choices=list(LOAD_FORMATS),
                    help="dummy: random weights from config.json alone, no weight files read "
                         "(as vLLM's; for benchmarks at a model's real shapes: gibberish text)")
    ap.add_argument("--hf-overrides", default=None, metavar="JSON",
                    help="config.json keys to replace on every rank, e.g. "
                         "'{\"num_hidden_layers\": 5}' (as vLLM's)")
    ap.add_argument("--prefill-expert-parallel", action="store_true",
                    help="with --prefill P >= 2: each prefill rank holds only its slice of the "
                         "routed experts (about E/P) and the prefill pool runs the MoE layers "
                         "as expert parallelism among its ranks (default: every prefill rank "
                         "holds the whole model)")
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--transport", default="torch", choices=["torch", "deepep"])
    ap.add_argument("--expert-placement", default=None, metavar="FILE",
                    help="with --ffn: JSON placement of the routed experts on the FFN ranks, "
                         "or an expert load record (POST /dump_expert_distribution_record) to "
                         "compute a balanced per-layer placement from (default: contiguous)")
    ap.add_argument("--num-redundant-experts", type=int, default=0,
                    help="with --ffn: extra expert slots per layer for copies of the hottest "
                         "experts, placed from a load record as --expert-placement or by a "
                         "live rebalance (SGLang's --ep-num-redundant-experts)")
    ap.add_argument("--eplb-interval-steps", type=int, default=0, metavar="N",
                    help="with --ffn: every N decode steps, rebalance the experts live from "
                         "the load of the last N (0: only POST /rebalance_experts)")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds any rank may wait on another before the server fails")
    ap.add_argument("--grace-period", type=float, default=20.0,
                    help="seconds SIGTERM lets in-flight requests finish")
    ap.add_argument("--control-host", default=None,
                    help="address other nodes reach rank 0 on for control messages (default: "
                         "127.0.0.1 on one node, torchrun's MASTER_ADDR across nodes)")
    ap.add_argument("--control-key-file", default=os.environ.get(protocol.KEY_FILE_ENV),
                    metavar="FILE",
                    help="the secret the control messages between the front end and the ranks "
                         "are sealed with (HMAC-SHA256), the same file on every node, this "
                         "user's alone (chmod 600), at least 16 bytes: make one with 'openssl "
                         "rand -hex 32'. Needed across nodes; on one node a new random key is "
                         "made when none is given (default: $AFD_CONTROL_KEY_FILE)")
    return ap


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """``argv`` (default: the command line's) parsed and checked; a bad flag exits naming it."""
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    if args.model_tag is not None:  # `afd serve MODEL`: the same as --model MODEL
        if args.model is not None and not _same_path(args.model, args.model_tag):
            ap.error(f"the positional MODEL {args.model_tag!r} and --model {args.model!r} name "
                     f"different checkpoints: give one of them")
        args.model = args.model or args.model_tag
    for what, value in (("model", args.model), ("tokenizer", args.tokenizer)):
        if value is None:
            continue
        try:  # no Hub call: every rank checks it, afd serve before starting any
            hub.check_name(value, what)
        except hub.ModelSourceError as exc:
            sys.exit(f"{ap.prog}: {exc}")  # one line, as the other startup errors
    for flag, value, low in (("--prefill", args.prefill, 0), ("--attention", args.attention, 1),
                             ("--ffn", args.ffn, 0)):
        if value < low:
            ap.error(f"{flag} must be >= {low}, got {value}")
    if not 0 <= args.port <= 65535:
        ap.error(f"--port must be in [0, 65535] (0: a free port the OS picks), got {args.port}")
    if not args.disable_log_stats:
        try:  # read by the front end, which starts once every rank is up: checked now
            log_stats_interval()
        except ValueError as exc:
            ap.error(str(exc))
    for name, neutral in VLLM_NEUTRAL.items():
        value = getattr(args, name)
        if value == neutral:
            continue
        if isinstance(neutral, bool):
            ap.error(f"--{'no-' if neutral else ''}{name.replace('_', '-')}: afd always "
                     f"chunks long prompts (--max-num-batched-tokens tokens a step)")
        ap.error(f"--{name.replace('_', '-')} {value}: afd takes only {neutral}; it splits a "
                 f"model by its layout instead: --prefill P --attention A --ffn F "
                 f"(docs/layouts.md)")
    if args.prefill_expert_parallel and args.prefill < 2:
        ap.error(f"--prefill-expert-parallel needs --prefill >= 2 (the prefill pool's ranks "
                 f"split the routed experts), got --prefill {args.prefill}")
    if args.speculative_config is not None:
        try:
            args.speculative_config = json.loads(args.speculative_config)
            parse_speculative_config(args.speculative_config)
        except ValueError as exc:  # JSONDecodeError is one
            ap.error(f"--speculative-config: {exc}")
    if args.hf_overrides is not None:
        try:
            args.hf_overrides = check_hf_overrides(json.loads(args.hf_overrides))
        except ValueError as exc:
            ap.error(f"--hf-overrides: {exc}")
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 starts the front end: its files (a
        try:  # template, SSL) need be on that node only; checked before the ranks start
            FrontendOptions.from_args(args)
        except ValueError as exc:
            ap.error(str(exc))
    if args.max_request_body_bytes < 1:
        ap.error(f"--max-request-body-bytes must be >= 1, got {args.max_request_body_bytes}")
    if (args.expert_placement or args.num_redundant_experts or args.eplb_interval_steps) \
            and args.ffn == 0:
        ap.error("--expert-placement, --num-redundant-experts and --eplb-interval-steps need "
                 "--ffn >= 1 (FFN ranks hold the routed experts)")
    if args.eplb_interval_steps < 0:
        ap.error(f"--eplb-interval-steps must be >= 0 (0: off), got {args.eplb_interval_steps}")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        ap.error("--enable-auto-tool-choice needs --tool-call-parser (one of "
                 f"{', '.join(sorted(PARSERS))})")
    if args.async_scheduling and args.ffn:
        ap.error(f"--async-scheduling needs --ffn 0, got --ffn {args.ffn}: every step of a "
                 "layout with FFN ranks is a collective sized on the host "
                 "(docs/limits.md#async-scheduling)")
    if args.async_scheduling and args.speculative_config is not None:
        ap.error(f"--async-scheduling with --speculative-config (method "
                 f"{args.speculative_config.get('method')!r}): drafts need the previous step's "
                 "tokens on the host; use one or the other (docs/limits.md#async-scheduling)")
    return args


FRONT_START_TIMEOUT_S = 300.0

# afd serve's resolved model/tokenizer folders, handed to the ranks it starts (JSON: what it
# resolved, as ``source_request``, and the folders), so that no rank reaches the Hub
SOURCES_ENV = "AFD_RESOLVED_SOURCES"
SOURCES_KEY = "afd/sources/{}/{}"  # under torchrun: a node's folders (GROUP_RANK, restart)
SOURCES_READY_KEY = "afd/sources_ready/{}"  # ranks that have theirs (per restart)
SOURCES_BEAT_KEY = "afd/sources_beat/{}"  # added to while a node fetches (per restart)


def source_request(args: argparse.Namespace) -> list:
    """What resolving the model and tokenizer depends on, as JSON compares it."""
    return [args.model, args.tokenizer, args.revision, args.tokenizer_revision,
            args.download_dir, args.load_format, bool(args.trust_remote_code)]


def needs_hub(args: argparse.Namespace) -> bool:
    """The model or tokenizer is a Hub repo id (no local path of that name)."""
    return any(value is not None and hub.is_hub_id(value)
               for value in (args.model, args.tokenizer))


def resolve_sources(args: argparse.Namespace) -> dict:
    """--model / --tokenizer as local folders (afd.hub: a Hub repo id fetched into the HF cache
    where missing), with what they were resolved from; ModelSourceError naming the one that
    could not be."""
    model, tokenizer = hub.resolve_sources(
        args.model, args.tokenizer, revision=args.revision,
        tokenizer_revision=args.tokenizer_revision, download_dir=args.download_dir,
        load_format=args.load_format, trust_remote_code=args.trust_remote_code)
    return {"request": source_request(args), "model": model, "tokenizer": tokenizer,
            "model_is_hub_id": args.model is not None and hub.is_hub_id(args.model)}


def use_sources(args: argparse.Namespace, sources: dict) -> None:
    """``args`` with the resolved folders in place of --model / --tokenizer; served under the
    repo id as typed (vLLM's default name) where --served-model-name does not say."""
    if sources["model_is_hub_id"] and not args.served_model_name:
        args.served_model_name = [args.model]
    args.model, args.tokenizer = sources["model"], sources["tokenizer"]


def node_sources(args: argparse.Namespace, local_rank: int, world: int,
                 node: str | None = None, poll_s: float = 0.5, beat_s: float = 2.0) -> dict:
    """Under torchrun, before the process group forms: the first rank of each node resolves
    (fetches) the model for the node and hands its folders to the node's other ranks through
    torchrun's store, so a node downloads once, not once a rank; then every rank waits until
    every node has its files, so the process group, which waits --timeout at most, forms only
    then. A download takes what it takes: while one runs, its rank adds to a beat counter every
    ``beat_s``; a rank waiting fails once for --timeout seconds no rank has beaten and none has
    got its files (a node gone mid-download, or failed: a hang otherwise). Exits with the error
    on every rank of the node where it cannot be resolved. ``node``: this node's number
    (torchrun's GROUP_RANK)."""
    store = _store_client()
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    node = os.environ.get("GROUP_RANK", "0") if node is None else node
    key = SOURCES_KEY.format(node, restart)
    beat = SOURCES_BEAT_KEY.format(restart)
    ready = SOURCES_READY_KEY.format(restart)

    def wait(done, what: str) -> None:
        seen, since = None, time.monotonic()
        while not done():
            now = (store.add(beat, 0), store.add(ready, 0))
            if now != seen:
                seen, since = now, time.monotonic()
            elif time.monotonic() - since > args.timeout:
                sys.exit(f"rank {local_rank} of node {node}: waited {args.timeout:.0f}s "
                         f"(--timeout) for {what} while no node fetched model files and no "
                         f"rank got its own ({now[1]} of {world} have): a node is gone or "
                         f"failed to resolve {args.model!r} (its log says why)")
            time.sleep(poll_s)

    if local_rank == 0:
        fetching = threading.Event()

        def beating() -> None:
            while not fetching.wait(beat_s):
                store.add(beat, 1)

        threading.Thread(target=beating, daemon=True, name="afd-fetch-beat").start()
        try:
            sources = resolve_sources(args)
        except hub.ModelSourceError as exc:
            sources = {"error": str(exc)}
        finally:
            fetching.set()
        store.set(key, json.dumps(sources))
    else:
        wait(lambda: store.check([key]), f"node {node}'s first rank to resolve the model")
        sources = json.loads(store.get(key))
    if "error" in sources:
        sys.exit(sources["error"])
    store.add(ready, 1)
    wait(lambda: store.add(ready, 0) >= world, "every node's model files")
    return sources


def model_sources(args: argparse.Namespace, local_rank: int, world: int) -> dict | None:
    """This rank's model/tokenizer folders where a Hub repo id names either: those afd serve
    resolved (SOURCES_ENV), else its own (one rank) or its node's (``node_sources``); None
    where both are local (used as given)."""
    handed = json.loads(os.environ.get(SOURCES_ENV) or "null")
    if handed is not None and handed["request"] == source_request(args):
        return handed
    if not needs_hub(args):
        return None
    if world == 1 or "MASTER_ADDR" not in os.environ:
        return resolve_sources(args)
    return node_sources(args, local_rank, world)


def check_port_free(host: str, port: int) -> None:
    """Exit with a message naming --host/--port if the HTTP port cannot be bound now (taken, or
    an address this machine does not have), before any model is loaded or rank started: the
    front end binds it only once every rank is up, minutes later on a large model. A check,
    not a reservation: the port is free again when this returns (SO_REUSEADDR, as uvicorn's)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        sys.exit(f"--host {host!r}: {exc}")
    for family, kind, proto, _name, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                sys.exit(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); "
                         f"pick a free port or stop what holds it")


def start_front(args, layout: Layout, engine_cfg, control_host: str, key: bytes
                ) -> tuple[subprocess.Popen, str]:
    """Start the HTTP front end (the control key in its environment, not on its command line,
    which any user may read); return it and the rank spec template it publishes."""
    cmd = [sys.executable, "-m", "afd.api_server",
           "--engine-config", json.dumps(engine_config_to_dict(engine_cfg)),
           "--layout", f"{layout.prefill},{layout.attention},{layout.ffn}",
           "--host", args.host, "--port", str(args.port),
           "--micro-batches", str(args.micro_batches), "--transport", args.transport,
           "--num-redundant-experts", str(args.num_redundant_experts),
           "--eplb-interval-steps", str(args.eplb_interval_steps),
           "--timeout", str(args.timeout), "--grace-period", str(args.grace_period),
           "--control-host", control_host,
           "--generation-config", args.generation_config,
           "--max-stored-responses", str(args.max_stored_responses),
           "--max-stored-responses-mb", str(args.max_stored_responses_mb),
           "--max-request-body-bytes", str(args.max_request_body_bytes)]
    for flag, value in (("--api-key", args.api_key), ("--tokenizer", args.tokenizer),
                        ("--expert-placement", args.expert_placement and
                         os.path.abspath(args.expert_placement)),
                        ("--tool-call-parser", args.tool_call_parser),
                        ("--reasoning-parser", args.reasoning_parser)):
        if value:
            cmd += [flag, value]
    if args.served_model_name:  # one or more (vLLM's aliases)
        cmd += ["--served-model-name", *args.served_model_name]
    if args.enable_auto_tool_choice:
        cmd.append("--enable-auto-tool-choice")
    if args.disable_log_stats:
        cmd.append("--disable-log-stats")
    if args.enable_request_id_headers:
        cmd.append("--enable-request-id-headers")
    cmd += frontend_argv(args)
    front = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1,
                             env={**os.environ, protocol.KEY_ENV: key.hex()})
    spec: queue.Queue = queue.Queue()

    def echo() -> None:
        """Forward the front end's output; hand over the spec line (its first marker line)."""
        handed = False
        for line in front.stdout:
            if line.startswith(SPEC_MARKER) and not handed:
                spec.put(line[len(SPEC_MARKER):].strip())
                handed = True
                continue
            sys.stdout.write(line)
            sys.stdout.flush()
        spec.put(None)  # it exited

    threading.Thread(target=echo, daemon=True, name="afd-front-echo").start()
    try:
        template = spec.get(timeout=FRONT_START_TIMEOUT_S)
    except queue.Empty:
        front.kill()
        raise RuntimeError(f"the front end printed no rank spec in {FRONT_START_TIMEOUT_S:.0f}s"
                           ) from None
    if template is None:
        raise RuntimeError(f"the front end exited before starting (code {front.wait()})")
    return front, template


def _same_path(a: str, b: str) -> bool:
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """One rank (this process) of the server; ``argv`` as :func:`parse_args`."""
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    layout = Layout(args.prefill, args.attention, args.ffn)
    if rank == 0:  # its front end serves HTTP: fail now, not after the model has loaded
        check_port_free(args.host, args.port)
    if layout.world_size != world:
        sys.exit(f"--prefill {args.prefill} + --attention {args.attention} + --ffn {args.ffn} = "
                 f"{layout.world_size} ranks, but torchrun started {world}: use "
                 f"--nproc-per-node {layout.world_size} (summed over the nodes)")
    if _control_host() == "127.0.0.1":  # every rank on this node: gloo on loopback too
        os.environ.update(loopback_gloo_env())
    control_host = args.control_host or _control_host()
    key = None
    if args.control_key_file:
        try:
            key = protocol.read_key_file(args.control_key_file)
        except ValueError as exc:
            sys.exit(str(exc))
    elif not is_loopback(control_host):
        sys.exit(f"serving across nodes (the control sockets on {control_host}, listening on "
                 f"every interface) needs a control key: --control-key-file FILE (or "
                 f"{protocol.KEY_FILE_ENV}), the same secret on every node, e.g. made with "
                 f"'openssl rand -hex 32 > FILE; chmod 600 FILE'")
    try:  # before the process group: a download may take longer than it waits for a rank
        sources = model_sources(args, local_rank, world)
    except hub.ModelSourceError as exc:
        sys.exit(f"{prog}: {exc}" if prog else str(exc))
    if sources is not None:
        use_sources(args, sources)
    own_store = None
    if "MASTER_ADDR" not in os.environ:  # plain `python launch/serve.py`: a world of one
        # on loopback only (torchrun's is torchrun's: see docs/serving.md)
        own_store = loopback_store()
    model = args.model or default_model_path()
    timeout = datetime.timedelta(seconds=max(args.timeout, 300))  # startup included
    device = (torch.device("cuda", local_rank % torch.cuda.device_count())
              if torch.cuda.is_available() else torch.device("cpu"))  # as afd.workers._device
    join_process_group(device, rank=rank, world_size=world, timeout=timeout, store=own_store)
    store = dist.distributed_c10d._get_default_store()
    forget_key = None
    if key is None:  # one node, no key file: rank 0 makes one
        key, forget_key = one_node_key(store, rank, world)

    stopping = threading.Event()
    front = None
    if rank == 0:
        engine_cfg = resolve_engine_config(
            model, load_config(model, args.hf_overrides), dtype=args.dtype, seed=args.seed,
            max_model_len=args.max_model_len, block_size=args.block_size,
            num_kv_blocks=args.num_kv_blocks, kv_cache_memory_gb=args.kv_cache_memory_gb,
            num_window_blocks=args.num_window_blocks,
            num_state_snapshots=args.num_state_snapshots,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            enforce_eager=args.enforce_eager, cuda_graph_sizes=args.cuda_graph_sizes,
            ffn_cuda_graphs=args.ffn_cuda_graphs,
            enable_prefix_caching=args.enable_prefix_caching, kv_offload_gb=args.kv_offload_gb,
            cache_aware_routing=args.cache_aware_routing,
            prefill_expert_parallel=args.prefill_expert_parallel, tokenizer=args.tokenizer,
            trust_remote_code=args.trust_remote_code, quantization=args.quantization,
            speculative_config=args.speculative_config, load_format=args.load_format,
            hf_overrides=args.hf_overrides, kv_cache_dtype=args.kv_cache_dtype,
            scheduling_policy=args.scheduling_policy, async_scheduling=args.async_scheduling,
            prefill=layout.prefill)
        log.info("layout P=%d A=%d F=%d over %d ranks; model %s; starting the front end",
                 layout.prefill, layout.attention, layout.ffn, world, model)
        front, template = start_front(args, layout, engine_cfg, control_host, key)
        # sealed: anyone who reaches torchrun's store can write it
        store.set(SPEC_KEY, protocol.seal_blob(key, SPEC_PURPOSE, template.encode()))

        def watch_front() -> None:  # the front end gone means the server is gone
            front.wait()
            if not stopping.wait(15):
                log.error("front end exited (code %s); stopping", front.returncode)
                os._exit(1)

        threading.Thread(target=watch_front, daemon=True, name="afd-front-watch").start()
    else:
        try:
            template = protocol.open_blob(key, SPEC_PURPOSE, store.get(SPEC_KEY)).decode()
        except protocol.Unsealed:
            sys.exit(f"rank {rank}: the rank spec in torchrun's store is not sealed with this "
                     f"node's control key: every node needs the same --control-key-file")

    def on_term(signum, _frame) -> None:
        # Drain, don't die: the front end finishes what is in flight, then stops every rank.
        # Another rank asks rank 0 to (on another node, its torchrun's SIGTERM reaches only
        # its own ranks; torchrun kills them 30 s later).
        if stopping.is_set():
            return
        stopping.set()
        if front is not None and front.poll() is None:
            front.send_signal(signal.SIGTERM)
        elif rank != 0:
            threading.Thread(target=ask_drain, args=(rank,), daemon=True,
                             name="afd-ask-drain").start()

    if rank == 0 and world > 1:
        threading.Thread(target=watch_drain, args=(lambda: on_term(signal.SIGTERM, None),),
                         daemon=True, name="afd-drain-watch").start()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    spec = rank_spec(template, rank, local_rank, embedded=args.model is None,
                     node_folders=sources and (sources["model"], sources["tokenizer"]))

    def before_exit() -> int | None:  # rank 0 leaves no front end (and no key file) behind
        stopping.set()
        if forget_key is not None:
            forget_key()
        return reap_front(front)

    worker_main(spec, key, init_distributed=False, before_exit=before_exit)  # exits the process


def reap_front(front: subprocess.Popen | None, timeout_s: float = 30) -> int | None:
    """Wait for the front end (rank 0's) to exit, killing it after ``timeout_s``; 1 (this
    rank's exit status) if it failed, e.g. its port was taken: the server failed, it did not
    just stop, and torchrun (or ``afd serve``) says so."""
    if front is None:
        return None
    try:
        front.wait(timeout_s)
    except subprocess.TimeoutExpired:
        front.kill()
        front.wait(5)
    if front.returncode != 0:
        log.error("the front end failed (exit code %s)", front.returncode)
        return 1
    return None


KEY_PATH = "afd/control_key_file/{}"  # one per torchrun restart, as DRAIN_KEY


def one_node_key(store, rank: int, world: int) -> tuple[bytes, Callable[[], None] | None]:
    """Every rank on this node, no key file given: a new random control key. Rank 0 makes it
    and writes it to a file in a new folder only this user can enter (mode 700, the file 600),
    whose path goes through torchrun's store (a path, not the key); each other rank reads it,
    refusing a file another user could have written (``protocol.read_key_file``), and says so.
    Rank 0 removes the file once every rank has read it, or when it exits. Returns the key and
    (rank 0) that removal."""
    name = KEY_PATH.format(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if world == 1:
        return protocol.new_key(), None
    if rank != 0:
        path = store.get(name).decode()
        try:
            _check_key_folder(path)
            key = protocol.read_key_file(path, "the control key file rank 0 made:")
        except ValueError as exc:
            sys.exit(f"rank {rank}: {exc}")
        store.add(name + "/read", 1)
        return key, None
    folder = tempfile.mkdtemp(prefix="afd-control-")  # mode 700
    path = protocol.write_key_file(folder, protocol.new_key())
    key = protocol.read_key_file(path)  # as the other ranks will read it
    store.set(name, path)

    def forget() -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def forget_when_read() -> None:
        try:
            own = _store_client()  # a wait on it holds up nothing else
            while own.add(name + "/read", 0) < world - 1:
                time.sleep(0.2)
        except Exception:  # noqa: BLE001 - the store gone: rank 0's exit removes it
            return
        forget()

    threading.Thread(target=forget_when_read, daemon=True, name="afd-key-file").start()
    return key, forget


def _check_key_folder(path: str) -> None:
    """The store (any local user can write it) names the key file: take only a path shaped as
    rank 0 makes one, ``control.key`` in an ``afd-control-*`` folder of this user's, mode 700,
    not a link (read_key_file checks the file itself), so the path cannot point a rank at some
    other private file of this user's to take for the key."""
    folder, name = os.path.split(path)
    try:
        st = os.lstat(folder)
    except OSError as exc:
        raise ValueError(f"{path}: not a key file rank 0 made ({exc.strerror})") from None
    if (name != "control.key" or not os.path.basename(folder).startswith("afd-control-")
            or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid()
            or stat.S_IMODE(st.st_mode) != 0o700):
        raise ValueError(f"{path}: not a key file rank 0 made (control.key in an afd-control-* "
                         f"folder of this user's, mode 700)")


def rank_spec(template: str, rank: int, local_rank: int, embedded: bool,
              node_folders: tuple[str | None, str | None] | None = None) -> WorkerSpec:
    """This rank's spec from rank 0's template, with what differs per node made local: the
    CPU threads are this node's cores over this node's ranks (not the whole world's), the
    embedded model (no --model) is this node's own copy of it (each node builds the same files,
    in its own cache folder, which need not be where rank 0's node keeps its copy), and so are
    the model and tokenizer folders a Hub repo id was resolved to on this node
    (``node_folders``: (model, tokenizer), each in this node's HF cache)."""
    spec = WorkerSpec.from_json(template)
    node_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", spec.layout.world_size))
    spec = replace(spec, rank=rank, local_rank=local_rank,
                   threads=threads_per_rank(node_ranks))
    cfg = spec.engine_cfg
    if embedded:
        cfg = replace(cfg, model=default_model_path())
    if node_folders is not None:
        model, tokenizer = node_folders
        cfg = replace(cfg, model=model or cfg.model, tokenizer=tokenizer or cfg.tokenizer)
    return replace(spec, engine_cfg=cfg)


# set by a rank other than 0 that got SIGTERM or SIGINT; one key per torchrun restart, as the
# store outlives the ranks
DRAIN_KEY = "afd/drain/{}"


def _store_client() -> dist.TCPStore:
    """A connection of its own to torchrun's store: a wait on it holds up nothing else (process
    groups are made through the default store's connection)."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=datetime.timedelta(seconds=30))


def _drain_key() -> str:
    return DRAIN_KEY.format(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def ask_drain(rank: int) -> None:
    """Ask rank 0 to drain the server (``watch_drain`` there)."""
    try:
        _store_client().set(_drain_key(), str(rank))
        log.info("rank %d: SIGTERM; asked rank 0 to drain the server", rank)
    except Exception as exc:  # noqa: BLE001 - the store gone means torchrun is going
        log.error("rank %d: SIGTERM, but rank 0 could not be asked to drain: %s", rank, exc)


def watch_drain(drain: Callable[[], None], poll_s: float = 0.5) -> None:
    """Rank 0: call ``drain`` once another rank asks for it."""
    try:
        store = _store_client()
        while not store.check([_drain_key()]):
            time.sleep(poll_s)
        log.info("rank %s got SIGTERM: draining", store.get(_drain_key()).decode())
    except Exception as exc:  # noqa: BLE001 - the store gone means torchrun is going
        log.warning("no longer watching for other ranks' SIGTERM: %s", exc)
        return
    drain()


def _control_host() -> str:
    """Loopback when every rank is on this node; else the rendezvous address of rank 0's node."""
    one_node = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")) == \
        os.environ.get("WORLD_SIZE", "1")
    return "127.0.0.1" if one_node else os.environ["MASTER_ADDR"]


if __name__ == "__main__":
    main()
