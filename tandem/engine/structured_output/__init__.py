"""Structured outputs: a request's tokens constrained by a JSON schema, a regex, a list of
choices or a grammar, with xgrammar and llguidance (guidance) as backends.

`params` (what a request asks for, and the server's config) is pure data and travels on the
wire; `backends` checks a spec and compiles it (the tokenizer stage and the in-process client
check, each worker compiles for itself); `manager` runs the compiles off the step loop,
caches them, and keeps each request's matcher."""
