"""Serving: continuous batching of HRMGemma generation (engine.py) behind a small cache interface
(cache.py), text handling (text.py) and an OpenAI-compatible HTTP front (api.py; needs fastapi)."""
