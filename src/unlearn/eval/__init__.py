"""Evaluation: suites (what to score), records (one model pass per dataset), run (evaluate)."""
