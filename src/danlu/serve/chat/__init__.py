"""Chat serving: local causal language models behind `danlu chat` and an OpenAI-compatible server.

model.py      find and load a model directory or GGUF file (never the hub)
templates.py  chat templates: the tokenizer's own, built-ins, or a Jinja file
sampling.py   per-request sampling parameters and penalties; a step's rows sampled together
text.py       incremental detokenizing (no split multi-byte characters) and stop strings
engine.py     continuous batching: one forward pass per step over every running sequence
app.py        the HTTP API (/v1/chat/completions, /v1/completions, /v1/models), SSE, the web page
"""
