"""Scorers (Ray Data callable-class contract), prompt templates and the in-process reference runner."""
