"""Task data: loading and tokenizing, batch streams and length grouping, data checks, causal-LM
prompts, validation splits."""
