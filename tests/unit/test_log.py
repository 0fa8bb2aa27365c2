"""Logging: JSON lines off a terminal, with ids bound through contextvars."""

from __future__ import annotations

import io
import json

import structlog

from dragonfly.log import bound, configure, get_logger


def test_json_lines_carry_bound_ids_and_respect_the_level() -> None:
    out = io.StringIO()
    configure("info", "auto", stream=out)  # StringIO is not a TTY: JSON
    try:
        log = get_logger("test")
        with bound(task_id="t1", peer_id="p1"):
            log.info("piece.done", number=3)
            log.debug("hidden")
        log.warning("after")
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [entry["event"] for entry in lines] == ["piece.done", "after"]
        assert lines[0]["task_id"] == "t1" and lines[0]["number"] == 3
        assert "task_id" not in lines[1] and lines[1]["level"] == "warning"
    finally:
        structlog.reset_defaults()
