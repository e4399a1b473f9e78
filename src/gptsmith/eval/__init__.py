"""Evaluation: bits-per-byte, task suites, lm-eval tasks, judged comparisons, arena ratings and the report card."""
