"""Helpers for testing dlinfer and its vendors: conformance kit, tiny models."""
