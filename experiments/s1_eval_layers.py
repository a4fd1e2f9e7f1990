"""Which layer's moving statistics fail at statistics batch 1? (docs/design/propagate-gain.md)

Loads the micro-batch sweep's s = 1 models (``kalmannorm reproduce --budget small`` must have
trained them under runs/reproduce-small/sweep) and scores each on Fashion-MNIST's test set with
every norm layer on moving statistics, every one on batch statistics (per sample at s = 1), and
the first layer alone switched either way. Run: ``python experiments/s1_eval_layers.py``.
"""

from __future__ import annotations

from kalmannorm.lab.analysis.eval_modes import accuracy
from kalmannorm.lab.analysis.run import load_run

SWEEP = "runs/reproduce-small/sweep"
SETTINGS = {
    "all moving": lambda n: ["moving"] * n,
    "all batch": lambda n: ["batch"] * n,
    "first batch, rest moving": lambda n: ["batch"] + ["moving"] * (n - 1),
    "first moving, rest batch": lambda n: ["moving"] + ["batch"] * (n - 1),
}


def main() -> None:
    for norm in ("bkn-propagate", "bkn", "bn"):
        for seed in (0, 1, 2):
            run = load_run(f"{SWEEP}/{norm}-s1-seed{seed}")
            layers = [m for m in run.model.modules() if hasattr(m, "eval_statistics")]
            scores = {}
            for name, modes in SETTINGS.items():
                for layer, mode in zip(layers, modes(len(layers))):
                    layer.eval_statistics = mode
                correct, _ = accuracy(run.model, run.data.test_batches, batch_size=256)
                scores[name] = round(100 * correct, 2)
            print(norm, f"seed {seed}", scores, flush=True)


if __name__ == "__main__":
    main()
