"""Evaluations: perplexity, passkey, needle-in-a-haystack, RULER and the theta search."""
