"""OpenAI-compatible chat completions in front of an inference engine."""
