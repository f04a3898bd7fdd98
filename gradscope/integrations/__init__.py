"""Integrations with training frameworks. Each imports its framework only when it is itself imported."""
