"""Host cost of a constrained sequence's grammar masks per step, plain and speculating.

    python bench/grammar_draft_masks.py [--vocab 129280] [--k 1 2 3 4] [--rounds 3] [--json out]

The plain engine computes one mask per constrained sequence and step (``GrammarState.fill``)
and the matcher takes the sampled token; a speculating sequence with k drafts gets k + 1 masks
(``GrammarState.draft_masks``: take the drafts, a mask per row, roll back). This walks a JSON
document (a schema's output, one byte token per step) through a matcher built over a
synthetic tokenizer of ``--vocab`` tokens (the 256 bytes plus random 2-8 byte strings of
JSON-ish characters, seeded: no model tokenizer of that size ships with the repo), and times
per position (mean over the document, best of ``--rounds``): the plain step (mask, then take
the token) and the speculating one (``draft_masks`` over the next k tokens, then take them and
the token after: every draft accepted). A last row times ``GrammarState.forced`` (the tokens
the grammar forces next, llguidance's ``compute_ff_tokens``: what a speculating constrained
sequence asks each step besides its masks), with the share of positions where it found any.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

import llguidance
import torch
from llguidance._tokenizer import TokenizerWrapper

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results_io import commit_id, write_result  # noqa: E402

from afd.sampling_params import StructuredOutputsParams  # noqa: E402
from afd.structured_output import GrammarState, grammar_source  # noqa: E402

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}
DOC = json.dumps({"name": "Ada Lovelace", "age": 36,
                  "tags": ["math", "engines", "notes", "poetry"]}).encode()


def synthetic_tokenizer(vocab: int) -> llguidance.LLTokenizer:
    rng = random.Random(0)
    alphabet = b"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789{}[]\":,._-"
    tokens = [bytes([i]) for i in range(256)]
    seen = set(tokens)
    while len(tokens) < vocab:
        t = bytes(rng.choice(alphabet) for _ in range(rng.randint(2, 8)))
        if t not in seen:
            seen.add(t)
            tokens.append(t)

    class Tok:
        eos_token_id, bos_token_id = 0, None

        def __init__(self):
            self.tokens = tokens

        def __call__(self, s):
            return list(s)

    return llguidance.LLTokenizer(TokenizerWrapper(Tok()))


def walk(tok: llguidance.LLTokenizer, k: int, forced: list[int] | None = None) -> float:
    """Mean seconds per position over DOC: k = 0, the plain step; else draft_masks(k); with
    ``forced`` (a list, filled with the count of forced tokens per position) forced(k)."""
    source = grammar_source(StructuredOutputsParams(json=SCHEMA))
    state = GrammarState(llguidance.LLMatcher(tok, source, log_level=0),
                         -(-tok.vocab_size // 32))
    row = torch.empty(state.words, dtype=torch.int32)
    ids = list(DOC)
    spent, steps = 0.0, 0
    for i in range(len(ids) - k - 1):
        start = time.perf_counter()
        if forced is not None:
            got = len(state.forced(k))
        elif k:
            state.draft_masks(ids[i:i + k])
        else:
            state.fill(row)
        spent += time.perf_counter() - start
        if forced is not None:
            forced.append(got)
        steps += 1
        state.accept(ids[i])  # (outside the timing: both take the tokens alike)
    return spent / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tok = synthetic_tokenizer(args.vocab)
    rows = []
    for k in [0, *args.k]:
        best = min(walk(tok, k) for _ in range(args.rounds))
        rows.append({"k": k, "masks_per_step": k + 1, "us_per_step": round(best * 1e6, 1)})
        print(f"k={k}: {best * 1e6:8.1f} us per sequence and step")
    k = max(args.k)
    counts: list[int] = []
    best = min(walk(tok, k, counts if not r else []) for r in range(args.rounds))
    share = sum(1 for c in counts if c) / len(counts)
    rows.append({"forced": True, "k": k, "us_per_step": round(best * 1e6, 1),
                 "positions_with_forced_tokens": round(share, 3)})
    print(f"forced({k}): {best * 1e6:8.1f} us per sequence and step; forced tokens at "
          f"{share:.0%} of positions")
    result = {"bench": "grammar_draft_masks", "commit": commit_id(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version(), "llguidance": llguidance.__version__
              if hasattr(llguidance, "__version__") else "unknown",
              "vocab": args.vocab, "tokenizer": "synthetic (256 bytes + random 2-8 byte tokens)",
              "schema": SCHEMA, "positions": len(DOC), "rounds": args.rounds, "rows": rows}
    write_result(result, args.json, "grammar_draft_masks.json")


if __name__ == "__main__":
    main()
