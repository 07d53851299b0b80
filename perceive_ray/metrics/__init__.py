"""Metrics: pure functions of a manifest and a scores table."""
