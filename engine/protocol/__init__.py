"""Pydantic schemas of the OpenAI dialect the engine speaks (one module per API family)."""
