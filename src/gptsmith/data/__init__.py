"""Data stages: read inputs, clean, de-duplicate, split, tokenize into shards; conversation formats."""
