"""How strongly consecutive perplexity windows correlate, read from the protocol's stored results
(no model runs): the lag-1 autocorrelation of the per-window mean NLL, pooled over every model and
corpus series in bench/results/protocol/*.json, each series centred on its own mean. It sizes how
far an error that treats windows as independent understates the truth (about sqrt((1+r)/(1-r)) for
an AR(1) series), which is why surgery.evaluate.perplexity uses batch means.

    python bench/window_correlation.py
"""

from __future__ import annotations

import json
import math

from common import RESULTS, protocol, save


def series(result: dict) -> dict[str, list[list[float]]]:
    """Every window_nll list in one result file, by corpus."""
    found: dict[str, list[list[float]]] = {}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for corpus, value in node.get("perplexity", {}).items() if isinstance(node.get("perplexity"), dict) else ():
                if isinstance(value, dict) and len(value.get("window_nll") or []) > 2:
                    found.setdefault(corpus, []).append(value["window_nll"])
            for value in node.values():
                walk(value)

    walk(result)
    return found


def lag1(lists: list[list[float]]) -> float:
    """Pooled lag-1 autocorrelation of series each centred on its own mean."""
    products = squares = 0.0
    for values in lists:
        mean = sum(values) / len(values)
        centred = [v - mean for v in values]
        products += sum(a * b for a, b in zip(centred, centred[1:]))
        squares += sum(v * v for v in centred)
    return products / squares


def main() -> None:
    by_corpus: dict[str, list[list[float]]] = {}
    files = sorted((RESULTS / "protocol").glob("*.json"))
    for path in files:
        for corpus, lists in series(json.loads(path.read_text())).items():
            by_corpus.setdefault(corpus, []).extend(lists)
    rows = {}
    for corpus, lists in sorted(by_corpus.items()):
        r = lag1(lists)
        rows[corpus] = {"series": len(lists), "windows_per_series": sorted({len(v) for v in lists}), "lag1_autocorrelation": r,
                        "independent_error_understated_by": math.sqrt((1 + r) / (1 - r)) if -1 < r < 1 else None}
        print(f"{corpus:10s} {len(lists):4d} series  lag-1 autocorrelation {r:.2f}  "
              f"(an independent-window error is about {rows[corpus]['independent_error_understated_by']:.2f}x too small)")
    save("window_correlation", {"corpora": rows, "files": len(files), "protocol": protocol()})


if __name__ == "__main__":
    main()
