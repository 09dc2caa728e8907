"""Reliability tests (issue 9): bad input, faults, concurrency, resource safety, isolation, fuzzing."""
