"""Prompt adherence: does the image show what its caption asked for?

A benchmark prompt carries its target attributes (e.g. colour, shape, position, background) and
whether its combination was held out of training. Each generated image is read back by a pixel
analyser; accuracy is reported per attribute and for all attributes at once, separately for seen
and held-out combinations, each with a 95 % Wilson score interval (Wilson 1927; Agresti & Coull
1998 recommend it over the normal approximation for small n and p near 0 or 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from tqdm import tqdm

Z95 = 1.959963984540054  # Φ⁻¹(0.975)


@dataclass(frozen=True)
class Prompt:
    caption: str
    target: dict  # attribute -> value the caption asks for
    held_out: bool  # combination never shown in training


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials: the p with |p̂ − p| = z·√(p(1−p)/n)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"accuracy": k / n if n else float("nan"), "low": lo, "high": hi, "correct": k, "n": n}


def aggregate(records: Iterable[dict]) -> dict:
    """records: {"target": {...}, "predicted": {...}, "held_out": bool} -> scores per split.

    Returns {"seen": {"all": proportion, "attributes": {attr: proportion}}, "held_out": {...}}.
    """
    counts = {}
    for r in records:
        split = counts.setdefault("held_out" if r["held_out"] else "seen", {"all": [0, 0], "attributes": {}})
        right = {a: r["predicted"].get(a) == v for a, v in r["target"].items()}
        for a, ok in right.items():
            c = split["attributes"].setdefault(a, [0, 0])
            c[0], c[1] = c[0] + ok, c[1] + 1
        split["all"][0] += all(right.values())
        split["all"][1] += 1
    return {
        name: {"all": proportion(*c["all"]), "attributes": {a: proportion(*v) for a, v in sorted(c["attributes"].items())}}
        for name, c in sorted(counts.items(), key=lambda kv: kv[0] != "seen")
    }


def run_benchmark(
    generate: Callable[[list[str], list[int]], Sequence],
    analyse: Callable[[object], dict],
    prompts: Sequence[Prompt],
    n: int = 4,
    seed: int = 0,
    batch_size: int = 32,
    on_image: Callable[[Prompt, int, object, dict], None] | None = None,
) -> tuple[dict, list[dict]]:
    """Generate n images per prompt (seeds seed, seed+1, …), analyse each, aggregate.

    `generate(captions, seeds) -> images` (PIL), `analyse(image) -> attributes`. Returns the
    scores (see `aggregate`) and the per-image records.
    """
    jobs = [(p, seed + i) for p in prompts for i in range(n)]
    records = []
    with tqdm(total=len(jobs), desc="eval", unit="img") as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            images = generate([p.caption for p, _ in chunk], [s for _, s in chunk])
            for (p, s), image in zip(chunk, images):
                predicted = analyse(image)
                records.append({"caption": p.caption, "seed": s, "held_out": p.held_out,
                                "target": dict(p.target), "predicted": predicted})
                if on_image is not None:
                    on_image(p, s, image, predicted)
            bar.update(len(chunk))
    return aggregate(records), records


def _fmt(s: dict) -> str:
    return f"{s['accuracy']:.3f} [{s['low']:.3f}, {s['high']:.3f}] (n={s['n']})"


def markdown_table(scores: dict) -> str:
    """One row per attribute plus 'all attributes'; one column per split (seen / held-out)."""
    splits = list(scores)
    attrs = sorted({a for s in scores.values() for a in s["attributes"]})
    names = {"seen": "seen combinations", "held_out": "held-out combinations"}
    lines = ["| attribute | " + " | ".join(names.get(s, s) for s in splits) + " |",
             "|---|" + "---|" * len(splits)]
    for a in attrs:
        cells = [_fmt(scores[s]["attributes"][a]) if a in scores[s]["attributes"] else "–" for s in splits]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines.append("| **all attributes** | " + " | ".join(f"**{_fmt(scores[s]['all'])}**" for s in splits) + " |")
    lines.append("")
    lines.append("Accuracy with 95 % Wilson score interval; n = images scored.")
    return "\n".join(lines)
