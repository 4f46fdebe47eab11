"""Shared-memory ring and message channel between ringllm's processes."""
