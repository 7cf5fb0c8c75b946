"""Masque model engine: an OpenAI-compatible multimodal model server."""
