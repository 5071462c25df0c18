"""The kvpress side of `slam eval niah --compare kvpress`: the same needle prompts through kvpress's presses."""

from __future__ import annotations

import itertools

from slam.eval.commands import kvpress_answers
from slam.eval.kvpress_compare import KvpressJob
from slam.eval.niah import NiahCase, niah_prompt


def niah_kvpress_cases(args, engine, loaded, python: str, max_tokens: int = 16) -> list[NiahCase]:
    grid = list(itertools.product(args.lengths, args.depths, range(args.seeds)))
    prompts = [niah_prompt(engine, n, d, s, args.needle, args.question) for n, d, s in grid]
    jobs = [KvpressJob(str(i), prompt, max_tokens) for i, (prompt, _) in enumerate(prompts)]
    out = kvpress_answers(args, loaded, python, jobs, args.budgets)
    cases = []
    for row in out["results"]:
        i = int(row["id"])
        (length, depth, seed), key = grid[i], prompts[i][1]
        answer = row.get("answer", f"error: {row.get('error')}")
        cases.append(NiahCase(
            policy=f"kvpress:{row['press']}", budget=row["budget"], length=length, depth=depth, seed=seed, key=key,
            answer=answer.strip(), found="error" not in row and key in answer,
            setting="unseen" if args.question_unseen else "known",
        ))
    return cases
