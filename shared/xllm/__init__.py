"""xLLM: LLM inference serving over NATS — the shared library (engine, models, protocol)."""
