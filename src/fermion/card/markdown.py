"""Markdown pieces of the model card: numbers, durations, tables, code blocks."""

from __future__ import annotations


def number(value: int) -> str:
    return f"{value:,}"


def duration(seconds: float) -> str:
    seconds = float(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{seconds:,.1f} s"
    if hours >= 1:
        text += f" ({int(hours)} h {int(minutes)} min)"
    elif minutes >= 1:
        text += f" ({int(minutes)} min {secs:.0f} s)"
    return text


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return lines


def fenced(text: str) -> list[str]:
    """A code block that a run of backticks inside the text cannot close early."""
    fence = "```"
    while fence in text:
        fence += "`"
    return [fence + "text", text.rstrip(), fence]


def clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
