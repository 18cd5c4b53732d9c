"""The PNGs of one evaluation: per method a ROC curve and a score histogram, per OOD set the best methods' ROCs."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from larex import metrics, plots


def evaluation_plots(directory: Path, all_scores: Mapping[str, Mapping[str, np.ndarray]], oods: list[str],
                     table: pd.DataFrame, tpr: float, best_n: int = 6) -> list[Path]:
    pngs = []
    for name, scores in all_scores.items():
        ood_scores = {o: scores[f"ood/{o}"] for o in oods}
        pngs.append(plots.roc_plot(scores["test"], ood_scores, f"{name}: ID test vs OOD", directory / f"roc_{name}.png"))
        pngs.append(plots.score_histogram({"ID test": scores["test"], **ood_scores}, f"{name} scores",
                                          directory / f"hist_{name}.png",
                                          threshold=metrics.threshold_at_tpr(scores["val"], tpr),
                                          threshold_label=f"threshold ({tpr:.0%} TPR on ID val)"))
    mean = table[table["ood"] == "mean"].sort_values("auroc", ascending=False)
    best = list(mean["method"][:best_n])
    for o in oods:
        curves = {m: (all_scores[m]["test"], all_scores[m][f"ood/{o}"]) for m in best}
        pngs.append(plots.methods_roc_plot(curves, f"best methods: ID test vs {o}", directory / f"roc_ood_{o}.png"))
    return pngs
