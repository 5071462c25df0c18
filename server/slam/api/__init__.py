"""The OpenAI-compatible HTTP server: schemas, routes, metrics and the engine loop that feeds them."""
