"""``python -m afd``: complete a few prompts (with the embedded default model unless told).

    python -m afd [PROMPT ...] [--model PATH | REPO_ID] [--revision REV] [--max-tokens 32]
                  [--temperature 0] [--prefill P] [--attention A] [--ffn F]

(``afd generate`` takes the same.)
"""

from __future__ import annotations

import argparse
import time

from afd import LLM, SamplingParams

DEFAULT_PROMPTS = ["Hello, my name is", "The capital of France is",
                   "Tell me a story about a robot who learns to paint."]


def main(argv: list[str] | None = None, prog: str = "python -m afd") -> None:
    """``argv``: the command line's by default (``afd generate`` passes its own)."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("prompts", nargs="*", help="prompts (default: three examples)")
    ap.add_argument("--model", default=None, help="HF checkpoint folder or Hugging Face Hub "
                    "repo id (default: embedded tiny)")
    ap.add_argument("--revision", default=None, help="with a Hub repo id: branch, tag or commit")
    ap.add_argument("--download-dir", default=None, help="HF cache folder for a Hub repo id")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prefill", type=int, default=0, help="prefill ranks (P)")
    ap.add_argument("--attention", type=int, default=1, help="decode attention ranks (A)")
    ap.add_argument("--ffn", type=int, default=0, help="expert-parallel FFN ranks (F)")
    ap.add_argument("--async-scheduling", action="store_true",
                    help="schedule and launch each step before the previous step's tokens "
                         "are read on the host (vLLM's; attention ranks only: no --prefill or "
                         "--ffn ranks, no speculative decoding: docs/limits.md#async-scheduling)")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    llm = LLM(args.model, revision=args.revision, download_dir=args.download_dir,
              dtype=args.dtype, prefill=args.prefill, attention=args.attention, ffn=args.ffn,
              **({"async_scheduling": True} if args.async_scheduling else {}))
    print(f"loaded {llm.config.model} on {llm.config.device} ({llm.config.dtype}) "
          f"layout P={args.prefill} A={args.attention} F={args.ffn} "
          f"in {time.perf_counter() - start:.1f}s")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    try:
        for out in llm.generate(args.prompts or DEFAULT_PROMPTS, params):
            c = out.outputs[0]
            print(f"\n> {out.prompt}\n{c.text!r}\n  [{len(c.token_ids)} tokens, "
                  f"finish_reason={c.finish_reason}]")
    finally:
        llm.shutdown()


if __name__ == "__main__":
    main()
