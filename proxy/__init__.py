"""openai-resilience-proxy: an outbound resilience proxy for the OpenAI API."""

from __future__ import annotations

__version__ = "0.1.0"
