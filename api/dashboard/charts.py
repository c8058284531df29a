"""The geometry of the model page's charts (the paper's Figure 1d and 1e), drawn as SVG by the
templates: no JavaScript, nothing fetched."""

from __future__ import annotations

from api.dashboard.common import _category_key, category_colour


def _bar_chart(counts: list[tuple[str, str, int]], *, room: int = 900) -> dict:
    """Fig. 1d: one vertical bar per concept (units that detect it), grouped by category.

    Bars share ``room`` pixels (16 to 44 each; wider charts scroll), labels stand at 60 degrees below.
    """
    bars_in = sorted(counts, key=lambda row: (_category_key(row[1]), -row[2], row[0]))
    top = max((n for _, _, n in bars_in), default=1)
    step = max(16, min(44, room // max(1, len(bars_in))))
    width, height, left, base = round(step * 0.72), 150, 44, 18
    longest = max((len(name) for name, _, _ in bars_in), default=4)
    bars = []
    for i, (name, category, n) in enumerate(bars_in):
        h = max(1.0, height * n / top)
        x = left + 6 + i * step
        bars.append(
            {
                "x": x,
                "y": round(base + height - h, 1),
                "h": round(h, 1),
                "w": width,
                "n": n,
                "name": name,
                "category": category,
                "colour": category_colour(category),
                "cx": x + width / 2,
                "ly": base + height + 8,
                "ny": round(base + height - h - 4, 1),
            }
        )
    return {
        "bars": bars,
        "width": left + 6 + max(1, len(bars_in)) * step + 4,
        "height": base + height + 16 + round(min(longest, 24) * 5.6),
        "axis_y": base + height,
        "left": left,
        "mid_y": base + height / 2,
        "ticks": _ticks(top, base, height),
    }


def _ticks(top: int, base: float, height: float) -> list[dict]:
    """Gridlines at 0, the middle (when it is a whole number of units) and the top."""
    values = sorted({0, top} | ({top // 2} if top >= 4 else set()))
    return [{"value": v, "y": round(base + height - height * v / top, 1)} for v in values]


def _category_bars(counts: list[tuple[str, str, int]], *, unique: bool) -> list[dict]:
    """Detectors (or unique concepts) per category, as horizontal bars."""
    totals: dict[str, int] = {}
    for _, category, n in counts:
        totals[category] = totals.get(category, 0) + (1 if unique else n)
    top = max(totals.values(), default=1)
    return [
        {"name": c, "n": totals[c], "pct": round(100 * totals[c] / top), "colour": category_colour(c)}
        for c in sorted(totals, key=_category_key)
    ]


def _layers_chart(columns: list[tuple[str, list[tuple[str, str, int]]]]) -> dict:
    """Fig. 1e: unique concepts per layer, stacked by category, layers in network order."""
    stacks = []
    categories: set[str] = set()
    for layer, counts in columns:
        per_cat: dict[str, int] = {}
        for _, category, _n in counts:
            per_cat[category] = per_cat.get(category, 0) + 1
        categories |= per_cat.keys()
        stacks.append((layer, per_cat))
    top = max((sum(p.values()) for _, p in stacks), default=1) or 1
    step = max(48, min(110, 800 // max(1, len(stacks))))
    width, height, left, base = round(step * 0.6), 180, 44, 20
    rotate = any(len(layer) * 6.5 > step for layer, _ in stacks)
    longest = max((len(layer) for layer, _ in stacks), default=4)
    out = []
    for i, (layer, per_cat) in enumerate(stacks):
        x = left + 12 + i * step
        y = base + height
        parts = []
        for category in sorted(per_cat, key=_category_key):
            h = height * per_cat[category] / top
            y -= h
            parts.append(
                {
                    "y": round(y, 1),
                    "h": round(h, 1),
                    "colour": category_colour(category),
                    "category": category,
                    "n": per_cat[category],
                }
            )
        out.append(
            {
                "layer": layer,
                "x": x,
                "w": width,
                "cx": x + width / 2,
                "parts": parts,
                "total": sum(per_cat.values()),
                "ty": round(y - 5, 1),
                "ly": base + height + (8 if rotate else 16),
            }
        )
    return {
        "stacks": out,
        "width": left + 12 + max(1, len(stacks)) * step,
        "height": base + height + (16 + round(min(longest, 30) * 4.2) if rotate else 26),
        "rotate": rotate,
        "axis_y": base + height,
        "left": left,
        "mid_y": base + height / 2,
        "ticks": _ticks(top, base, height),
        "legend": [{"name": c, "colour": category_colour(c)} for c in sorted(categories, key=_category_key)],
    }
