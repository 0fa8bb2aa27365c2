"""The scheduler's brain: resources, their state machines, the evaluator (sans-I/O)."""
