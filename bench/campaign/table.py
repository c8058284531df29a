"""What was tried and what held: one row per check, printed as a Markdown table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    name: str
    done: str
    expected: str
    observed: str
    held: bool

    @property
    def result(self) -> str:
        return "HELD" if self.held else "FAILED"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rows_table(rows: list[Row]) -> str:
    return markdown(
        ["check", "what was done", "expected", "observed", "result"],
        [[r.name, r.done, r.expected, r.observed, r.result] for r in rows],
    )


def latency_markdown(table: list[dict]) -> str:
    return markdown(
        ["endpoint", "requests", "5xx", "no answer", "p50 ms", "p95 ms", "max ms"],
        [
            [
                r["endpoint"],
                str(r["count"]),
                str(r["5xx"]),
                str(r["no_answer"]),
                f"{r['p50'] * 1000:.0f}",
                f"{r['p95'] * 1000:.0f}",
                f"{r['max'] * 1000:.0f}",
            ]
            for r in table
        ],
    )
