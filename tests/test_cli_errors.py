"""The command line never ends in a traceback for what the user can fix, and never silently
accepts what no run can use: every such case is one line naming the fix (issue 16)."""

from __future__ import annotations

import errno
import importlib.util
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny

from kalmannorm.lab import cli
from kalmannorm.lab.train.plan import ConfigError

TRAIN = shlex.split(
    "train --dataset digits --model-option width=8 --norm bn --stat-batch-size 2 --batch-size 16 "
    "--steps 4 --threads 1 --progress none"
)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """Bad inputs: a file where a folder belongs, a folder where a file belongs, bad TOML,
    corrupt data files."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "options.toml").write_text("norm_options = 3\n")
    (tmp_path / "binary.toml").write_bytes(bytes(range(256)))
    (tmp_path / "milestones.toml").write_text('milestones = ["a"]\n')
    (tmp_path / "norms.toml").write_text("[compare]\nnorms = 3\n")
    (tmp_path / "table.toml").write_text("compare = 3\n")
    (tmp_path / "sizes.toml").write_text("[compare]\nstat_batch_sizes = [0]\n")
    (tmp_path / "entry.toml").write_text('[compare]\nnorms = [{norm = "bkn", options = 3}]\n')
    idx = tmp_path / "fashion"
    idx.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (idx / f"{name}.gz").write_bytes(b"\x1f\x8b not gzip at all")
    (idx / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")  # short
    cifar = tmp_path / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / name).write_bytes(b"garbage, not a pickle")
    labels = tmp_path / "labels" / "cifar-10-batches-py"  # a label outside the 10 classes
    labels.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 15]}
        (labels / name).write_bytes(pickle.dumps(entry))
    (tmp_path / "bench.json").write_text("{not json")
    return tmp_path


#: (command line, a piece of the one-line message); ``{t}`` is the folder of :func:`files`
CASES = [
    # tracebacks before issue 16
    ("{T} --out {t}/afile", "is a file, not a folder"),
    ("{T} --out {t}/afile/below", "which is a file"),
    ("{T} --config {t}/folder --out {t}/r", "is a folder; give a TOML file"),
    ("{T} --config {t}/options.toml --out {t}/r", "norm_options is a table"),
    ("{T} --config {t}/binary.toml --out {t}/r", "not valid TOML"),
    ("{T} --config {t}/milestones.toml --out {t}/r", "milestones must be a list of fractions"),
    ("compare --config {t}/norms.toml --out {t}/g", "norms is a non-empty list"),
    ("compare --config {t}/table.toml --out {t}/g", "are tables"),
    ("compare --config {t}/sizes.toml --out {t}/g", "stat_batch_sizes is a non-empty list"),
    ("compare --config {t}/entry.toml --out {t}/g", "options must be a table"),
    ("{T} --model-option depth=3 --out {t}/r", "does not accept the options"),
    ("{T} --model-option width=0 --out {t}/r", "width must be positive"),
    ("{T} --device tpu9 --out {t}/r", "unknown device 'tpu9'"),
    ("{T} --device meta --out {t}/r", "the harness runs on cpu, cuda[:N] or mps"),
    ("{T} --threads -1 --out {t}/r", "threads must be a positive integer"),
    ("train --dataset fashion_mnist --data-dir {t}/fashion --out {t}/r", "does not read"),
    ("train --dataset cifar10 --data-dir {t}/cifar --out {t}/r", "not a CIFAR python-format"),
    ("{T} --eval-batch-size 0 --out {t}/r", "eval_batch_size must be a positive integer"),
    ("{T} --norm-option r_max=2 --out {t}/r", "unexpected keyword argument 'r_max'"),
    ("{T} --norm brn --norm-option r_max=-1 --out {t}/r", "r_max must be >= 1"),
    ("{T} --norm gkn --norm-option flow=data --out {t}/r", "link with flow='execution'"),
    ("{T} --norm-option =3 --out {t}/r", "takes KEY=VALUE"),
    ("compare --stat-batch-sizes a --out {t}/g", "--stat-batch-sizes takes comma-separated"),
    ("compare --seeds -1 --out {t}/g", "--seeds takes comma-separated integers >= 0"),
    ("compare --norms , --out {t}/g", "--norms takes comma-separated norm names"),
    ("compare --preset tiny --out {t}/afile", "is a file, not a folder"),
    ("compare --preset tiny --config {t}/norms.toml", "either --config or --preset"),
    ("analyze gain {t}/folder", "pass the --out folder of a `kalmannorm train` run"),
    ("bench --device tpu9", "unknown device"),
    ("demo --batch-size 30 --stat-batch-size 4", "does not divide into statistics groups"),
    ("reproduce --no-train --runs {t}/afile --out {t}/rep", "is a file"),
    ("reproduce --no-train --bench-json {t}/bench.json --out {t}/rep", "--bench-json"),
    # silently accepted before issue 16
    ("{T} --warmup-steps -5 --out {t}/r", "warmup_steps must be a non-negative integer"),
    ("{T} --warmup-steps 100 --out {t}/r", "exceeds the 4 training steps"),
    ("{T} --eval-every -1 --out {t}/r", "eval_every must be a non-negative integer"),
    ("{T} --checkpoint-every -1 --out {t}/r", "checkpoint_every must be a non-negative"),
    ("{T} --threads 0 --out {t}/r", "threads must be a positive integer"),
    ("{T} --train-subset 0 --out {t}/r", "train_subset must be a positive integer"),
    ("{T} --train-subset -5 --out {t}/r", "train_subset must be a positive integer"),
    ("{T} --test-subset 0 --out {t}/r", "test_subset must be a positive integer"),
    (
        "{T} --stat-batch-size 4 --test-subset 3 --out {t}/r",
        "fewer than one statistics group of 4",
    ),
    ("{T} --schedule step --gamma -1 --out {t}/r", "gamma must be a decay factor in (0, 1]"),
    ("{T} --lr nan --out {t}/r", "lr must be a positive finite number"),
    ("{T} --lr -0.1 --out {t}/r", "lr must be a positive finite number"),
    ("{T} --momentum 1.5 --out {t}/r", "momentum must be in [0, 1)"),
    ("{T} --nesterov --momentum 0 --out {t}/r", "nesterov needs a momentum"),
    ("{T} --weight-decay inf --out {t}/r", "weight_decay must be a non-negative finite"),
    ("{T} --kalman-weight-decay -1 --out {t}/r", "kalman_weight_decay must be"),
    ("{T} --seed 1099511627776 --out {t}/r", "seed must be an integer in [0, 2**32)"),
    ("{T} --num-workers -2 --out {t}/r", "num_workers must be a non-negative integer"),
    ("{T} --precise-bn-batches -1 --out {t}/r", "precise_bn_batches must be a non-negative"),
    ("{T} --milestones 2 --out {t}/r", "milestones are fractions of training"),
    ("{T} --out ''", "out must be a non-empty string"),
    # found probing again (issue 16, item 4)
    ("train --dataset cifar10 --data-dir {t}/labels --batch-size 4 --out {t}/r", "labels range"),
    ("{T} --norm-option eps=-1 --out {t}/r", "take these from the model's BatchNorm layers"),
    ("{T} --norm-option momentum=5 --out {t}/r", "take these from the model's BatchNorm layers"),
    ("{T} --threads 100000 --out {t}/r", "threads must be at most 1024"),
    ("{T} --kalman-lr-scale 0 --out {t}/r", "kalman_lr_scale must be a positive finite"),
    ("{T} --norm mabn --norm-option warmup_steps=-1 --out {t}/r", "warmup_steps must be >= 0"),
    # argparse: one line too, and no prefix matching
    ("train --dataset digits --stat-batch 2 --out {t}/r", "unrecognized arguments: --stat-batch"),
    ("train --dataset digits --batch 2 --out {t}/r", "unrecognized arguments: --batch"),
    ("{T} --milestones 0.5,x --out {t}/r", "invalid comma-separated numbers value"),
    ("compare --jobs 0", "invalid positive integer value"),
    ("analyze gain {t}/folder --max-samples 0", "invalid positive integer value"),
    ("reproduce --threads 0", "invalid positive integer value"),
    ("demo --steps 0", "invalid positive integer value"),
]
if not torch.cuda.is_available():
    CASES.append(("{T} --device cuda --out {t}/r", "CUDA is not available here"))
if importlib.util.find_spec("torchvision") is not None:
    CASES.append(("{T} --model tv:no_such_model --out {t}/r", "no_such_model"))
else:
    CASES.append(("{T} --model tv:resnet18 --out {t}/r", "need torchvision: pip install"))


def _argv(case: str, folder: Path) -> list[str]:
    return shlex.split(case.replace("{T}", " ".join(TRAIN)).replace("{t}", str(folder)))


@pytest.mark.parametrize(("case", "expected"), CASES, ids=[c for c, _ in CASES])
def test_one_line_naming_the_fix(files: Path, case: str, expected: str, capsys) -> None:
    try:
        code = cli.main(_argv(case, files))
    except SystemExit as exit:  # argparse
        code = exit.code
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.count("\n") == 1, captured.err
    assert expected in captured.err, captured.err
    assert not (files / "r" / "checkpoint.pt").exists()  # nothing ran


def test_the_real_command_line_prints_no_traceback(files: Path) -> None:
    """Three cases through the installed entry point (a fresh interpreter)."""
    for case in (
        "{T} --out {t}/afile",
        "train --dataset cifar10 --data-dir {t}/cifar --out {t}/r",
        "{T} --threads -1 --out {t}/r",
    ):
        result = subprocess.run(
            [sys.executable, "-m", "kalmannorm", *_argv(case, files)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_debug_shows_the_traceback(files: Path) -> None:
    for argv in (
        ["--debug", *_argv("{T} --threads -1 --out {t}/r", files)],
        [*_argv("{T} --threads -1 --out {t}/r", files), "--debug"],
    ):
        with pytest.raises(ConfigError, match="threads must be a positive integer"):
            cli.main(argv)


def test_a_bug_keeps_its_traceback(monkeypatch, files: Path) -> None:
    """Only the lab's own errors are turned into messages: a ValueError from inside is a bug."""

    def broken(config, resume=False):
        raise ValueError("an internal bug")

    import kalmannorm.lab.train as harness

    monkeypatch.setattr(harness, "train", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(_argv("{T} --out {t}/r", files))


def test_resume_without_a_checkpoint_says_it_starts_anew(tmp_path: Path, capsys) -> None:
    assert cli.main([*TRAIN, "--out", str(tmp_path / "new"), "--resume"]) == 0
    assert "holds no checkpoint to resume: starting at step 0" in capsys.readouterr().out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    from kalmannorm.lab.train import train

    out = tmp_path_factory.mktemp("finished")
    train(tiny(out, norm="bn", steps=2, eval_every=2))
    return out


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("analyze variance-gap {run} --max-samples 1", "no batch reached the normalization"),
        ("analyze estimation-error {run} --stat-batch-sizes 1000", "no batch reached"),
        ("analyze params {run} --out {run}/config.toml", "is a file, not a folder"),
    ],
)
def test_analyze_refuses_in_one_line(finished: Path, case: str, expected: str, capsys) -> None:
    code = cli.main(shlex.split(case.replace("{run}", str(finished))))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err, err


def test_a_bad_torchrun_environment_is_one_line(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "abc")
    assert cli.main([*TRAIN, "--out", str(tmp_path / "r")]) == 2
    assert "WORLD_SIZE='abc'" in capsys.readouterr().err


def test_a_full_disk_keeps_the_previous_checkpoint(monkeypatch, tmp_path: Path, capsys) -> None:
    from kalmannorm.lab.train import loop
    from kalmannorm.lab.train.checkpoint import load_checkpoint

    save = loop.save_checkpoint
    calls = []

    def full(path, state):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        save(path, state)

    monkeypatch.setattr(loop, "save_checkpoint", full)
    argv = [*TRAIN, "--steps", "6", "--eval-every", "2", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "step 2 is kept" in err
    assert "--resume" in err
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


def test_metrics_lines_that_are_not_records_are_skipped(tmp_path: Path) -> None:
    from kalmannorm.lab.train.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "train_loss": 1.0}\n3\n[1]\n{"step": "x"}\n{"step": 4}\n')
    assert [r["step"] for r in read_metrics(path)] == [2, 4]


def test_compare_resumes_a_run_whose_summary_is_damaged(tmp_path: Path) -> None:
    from kalmannorm.lab.train.compare import CompareConfig, Variant, make_grid, run_status

    cfg = CompareConfig(
        train={"dataset": "digits", "steps": 2}, norms=[Variant("bn", "bn")], stat_batch_sizes=[2]
    )
    cfg.out = str(tmp_path)
    spec = make_grid(cfg)[0]
    spec.folder.mkdir(parents=True)
    (spec.folder / "summary.json").write_text('{"status": "finis')
    assert run_status(spec) == "partial"
