"""Evaluating a state on the shared base: classification accuracy and loss, causal-LM verbalizer scoring."""
