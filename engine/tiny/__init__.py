"""Builders of tiny random (and converted) models for tests and the offline preset."""
