"""The paper's published numbers that the report sets beside ours (Wang et al., BKN).

Table 3 of the paper is printed with its columns run together; it is read here as: CIFAR-10 and
CIFAR-100 accuracy (%) of the paper's Inception network trained at (gradient batch 128,
statistics batch 2), evaluated with batch and with moving statistics, and the plain-BN baseline
at batch 128. Its right half (BN widened to BKN's parameter count, 49M vs 52M parameters) repeats
the BN numbers ("such operation has no gain").
"""

from __future__ import annotations

#: Table 3 (left): {dataset: {norm: (batch statistics, moving statistics)}}.
TABLE3_EVAL_MODES = {
    "CIFAR-10": {"BN": (90.0, 89.4), "BKN": (90.9, 90.9)},
    "CIFAR-100": {"BN": (63.8, 63.1), "BKN": (67.3, 67.3)},
}
#: Table 3: plain BN at batch 128.
TABLE3_BASELINE = {"CIFAR-10": 92.1, "CIFAR-100": 70.5}
#: Table 3 (right): parameters of the BN and BKN networks (millions).
TABLE3_PARAMETERS_M = {"BN": 49, "BKN": 52}
#: Table 2: training throughput on 4 Titan-X (examples/s), Inception-v2.
TABLE2_SPEED = {"BN": 325.74, "BKN": 320.94}
#: Micro-batch settings (gradient batch, statistics batch) and the paper's reported outcome.
SETTINGS = {
    (256, 4): "Inception-v2 ImageNet: BKN 70.04 % vs BN 3.7 pt lower (Fig. 3)",
    (256, 1): "option A (batch statistics at test): BKN +2.11 pt over BN, +2.75 over BRN; "
    "option B (moving statistics): all fail, BKN 0.4 % (Fig. 4)",
    (64, 8): "Inception-v2: BKN 66.02 % vs BN 63.66 % (Fig. 5)",
    (16, 4): "BKN +4.24 pt over BN at 240k steps, Inception-v2 (Fig. 6)",
    (8, 2): "BKN converges faster than BN and BRN (Fig. 7; no number given)",
}
