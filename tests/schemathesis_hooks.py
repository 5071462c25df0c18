"""Schemathesis hooks for test_api_schema.

Fuzzed bodies name a random model, which is a 404 before any other check; the served name is put in so
fuzzing reaches the rest of the request (the 404 has its own test). Nothing else is changed: in particular
`max_tokens` is not capped here; the server's own limits (the fixture's --max-model-len) must bound the work.
"""

import schemathesis

GENERATION_PATHS = {"/v1/completions", "/v1/chat/completions"}
SERVED_MODEL = "SmolLM2-135M-Instruct"


@schemathesis.hook
def before_call(ctx, case, kwargs):
    body = case.body
    if case.path in GENERATION_PATHS and isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = SERVED_MODEL
