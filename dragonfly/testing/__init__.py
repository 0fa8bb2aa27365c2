"""Real third-party parts started for tests, benchmarks and the demo (nginx as origin)."""
