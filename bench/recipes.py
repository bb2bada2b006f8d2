"""Recipe variants side by side on the ADBench development sets, trained directly (no flows): fast to iterate on.

Each variant is the default preset with some config fields changed, given as JSON. For each dataset: the
same stratified 60/40 split as ``bench.adbench``, the autoencoder sized for and trained on the training
split's normal rows, and the ROC-AUC of its reconstruction error on the test split. The flows' own figures
(threshold, cross-fitting, flag rates) are ``bench.adbench``'s; this ranks recipes only.

    python -m bench.recipes --variant default '{}' --variant early '{"epochs": 60, "early_stopping_patience": 4}'
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.adbench import TEST_SHARE, dataset_dir, load


def variant_roc_aucs(overrides: dict[str, object], only: tuple[str, ...] = (), seed: int = 0) -> dict[str, float]:
    """Return each dataset's test ROC-AUC for the default preset with ``overrides``."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    from models.autoencoder import build_autoencoder, reconstruction_errors, train_autoencoder
    from models.config import resolve_preset
    from models.training.retraining import sized_for_data

    results = {}
    for path in sorted(dataset_dir().glob("*.npz")):
        if only and not any(part in path.stem for part in only):
            continue
        features, labels = load(path)
        x_train, x_test, y_train, y_test = train_test_split(
            features, labels, test_size=TEST_SHARE, stratify=labels, random_state=seed
        )
        normal = x_train[y_train == 0]
        config = sized_for_data(resolve_preset("default", **overrides), normal)
        model = build_autoencoder(config, normal)
        train_autoencoder(model, normal, config)
        errors = reconstruction_errors(model, x_test, config.loss, compiled=False)
        results[path.stem] = float(roc_auc_score(y_test, errors))
    return results


def main(argv: list[str] | None = None) -> int:
    """Run each variant and print a table of ROC-AUCs with their means."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"), required=True)
    parser.add_argument("--only", nargs="*", default=[], help="datasets whose names contain one of these")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    args = parser.parse_args(argv)
    table = {}
    for name, overrides in args.variant:
        started = time.perf_counter()
        table[name] = variant_roc_aucs(json.loads(overrides), tuple(args.only), args.seed)
        print(f"{name}: mean ROC-AUC {np.mean(list(table[name].values())):.4f} ({time.perf_counter() - started:.0f} s)")
    datasets = list(next(iter(table.values())))
    print("| dataset | " + " | ".join(table) + " |\n|---|" + "---|" * len(table))
    for dataset in datasets:
        print(f"| {dataset} | " + " | ".join(f"{table[name][dataset]:.3f}" for name in table) + " |")
    print("| mean | " + " | ".join(f"{np.mean(list(scores.values())):.3f}" for scores in table.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
