"""Evaluation: scores, task suites, side-by-side judging, ratings and the report card."""
