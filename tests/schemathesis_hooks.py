"""Schemathesis hooks for test_api_schema: keep fuzzed generation requests short.

Without this, a fuzzed max_tokens of 10**6 would be a valid request that runs for hours on a CPU.
"""

import schemathesis

GENERATION_PATHS = {"/v1/completions", "/v1/chat/completions"}
MAX_TOKENS = 2


@schemathesis.hook
def before_call(ctx, case, kwargs):
    body = case.body
    if case.path not in GENERATION_PATHS or not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None and key == "max_tokens" or (type(value) is int and value > MAX_TOKENS):
            body[key] = MAX_TOKENS
