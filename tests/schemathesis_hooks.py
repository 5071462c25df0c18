"""Schemathesis hooks for test_api_schema: keep fuzzed generation requests short.

Without this, a fuzzed max_tokens of 10**6 would be a valid request that runs for hours on a CPU.
"""

import schemathesis

GENERATION_PATHS = {"/v1/completions", "/v1/chat/completions"}
MAX_TOKENS = 2
SERVED_MODEL = "SmolLM2-135M-Instruct"


@schemathesis.hook
def before_call(ctx, case, kwargs):
    body = case.body
    if case.path not in GENERATION_PATHS or not isinstance(body, dict):
        return
    # A random model name is a 404 before any other check; use the served one so fuzzing reaches the
    # rest of the request (the 404 has its own test).
    if isinstance(body.get("model"), str):
        body["model"] = SERVED_MODEL
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None and key == "max_tokens" or _number(value) > MAX_TOKENS:
            body[key] = MAX_TOKENS


def _number(value) -> float:
    """What the server's lax validation reads as a number: ints, floats and numeric strings ("1e9")."""
    if isinstance(value, bool):
        return 0.0
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0
