"""Causal language models fine-tuned on conversations (supervised fine-tuning). So far: the conversation
files (conversations.py) and which tokens a conversation trains, on the chat template the run serves
with (tokens.py)."""
