"""`slam generate`: one prompt, streamed to stdout."""

from __future__ import annotations

import json
import sys

from slam.cli.common import cache_config, engine_from
from slam.flags import add_cache_flags, add_model_flags


def run(args) -> int:
    from slam.engine.sequence import SamplingParams

    cache = cache_config(args)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=args.stop or [], ignore_eos=args.ignore_eos)
    engine = engine_from(args, cache)
    prompt = engine.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else engine.encode(args.prompt)

    cache_tokens = 0

    def show(out) -> None:
        nonlocal cache_tokens
        cache_tokens = out.cache_tokens
        sys.stdout.write(out.text)
        sys.stdout.flush()

    [seq] = engine.generate([prompt], sampling, cache, on_output=show)
    sys.stdout.write("\n")
    if args.stats:
        print(json.dumps({"prompt_tokens": len(seq.prompt_ids), "generated_tokens": len(seq.output_ids),
                          "finish_reason": seq.finish_reason, "replacements": seq.replacements,
                          "cache_tokens": cache_tokens}), file=sys.stderr)
    return 0


def register(sub) -> None:
    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--stats", action="store_true", help="print token counts as JSON on stderr")
    add_cache_flags(gen)
    add_model_flags(gen)
    gen.set_defaults(func=run)
