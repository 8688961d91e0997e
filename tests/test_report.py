"""Result tables generated from run folders (selfsup.report): rows, baselines, bold, missing
files, markdown markers and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from selfsup.report import ReportError, load_run, main, method_table, update_markdown

DASH = "\u2013"

RANDOM_INIT = {
    "knn_top1@20": 0.8267,
    "knn_top1@200": 0.7854,
    "linear_top1": 0.8324,
    "feature_std": 0.011,
    "effective_rank": 53.6,
}
RAW_PIXELS = {
    "knn_top1@20": 0.8569,
    "knn_top1@200": 0.8211,
    "linear_top1": 0.8462,
    "feature_std": 0.028,
    "effective_rank": 374.6,
}


def make_run(
    root: Path,
    name: str,
    *,
    method: str = "simclr",
    method_options: dict[str, Any] | None = None,
    encoder: dict[str, Any] | None = None,
    baselines: dict[str, dict[str, Any]] | None = None,
    data: dict[str, Any] | None = None,
    backbone: dict[str, Any] | None = None,
    epochs: float = 7,
    seed: int = 0,
    run_info: dict[str, Any] | None = None,
    info: bool = True,
    config: bool = True,
) -> Path:
    """A run folder as `selfsup pretrain` leaves it (results.json, config.yaml, run_info.json)."""
    run = root / name
    run.mkdir(parents=True)
    backbone = backbone or {"name": "convnet", "width": 32}
    encoder = encoder or {
        "knn_top1@20": 0.8663,
        "knn_top1@200": 0.8369,
        "linear_top1": 0.875,
        "feature_std": 0.03,
        "effective_rank": 100.8,
    }
    if baselines is None:
        baselines = {f"random-init {backbone['name']}": RANDOM_INIT, "raw pixels": RAW_PIXELS}
    results = {f"{method} ({backbone['name']})": encoder, **baselines}
    (run / "results.json").write_text(json.dumps(results))
    if config:
        tree = {
            "data": data or {"name": "fashion-mnist"},
            "backbone": backbone,
            "method": {"name": method, **(method_options or {})},
            "views": {"name": None},
            "optim": {"name": "adamw"},
            "train": {"epochs": epochs, "seed": seed, "threads": 2},
            "eval": {},
            "run": {},
        }
        (run / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    if info:
        record: dict[str, Any] = {
            "command": f"selfsup pretrain configs/{method}/fashion_mnist.yaml",
            "train_seconds": 412.3,
            "eval_seconds": 95.1,
            "wall_seconds": 503.0,
            "threads": 2,
            "world_size": 1,
            "cpu": "Test CPU",
            "torch": "2.13.0",
            "finished": "2026-12-01T12:00:00",
        }
        if run_info is not None:
            record.update(run_info)
        (run / "run_info.json").write_text(json.dumps(record))
    return run


def table_rows(table: str) -> list[list[str]]:
    """The cells of every data row of a markdown table (header and rule excluded)."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines[2:]]


def header(table: str) -> list[str]:
    return [c.strip() for c in table.splitlines()[0].strip().strip("|").split(" | ")]


def row(table: str, first: str, last_contains: str = "") -> dict[str, str]:
    columns = header(table)
    for cells in table_rows(table):
        if cells[0] == first and last_contains in cells[-1]:
            return dict(zip(columns, cells, strict=True))
    raise AssertionError(f"no row {first!r} ({last_contains!r}) in\n{table}")


def test_load_run_reads_the_three_files(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, "simclr-fm"))
    assert run.name == "simclr-fm"
    assert run.encoder_row == "simclr (convnet)"
    assert run.encoder["linear_top1"] == 0.875
    assert list(run.baselines) == ["random-init convnet", "raw pixels"]
    assert (run.method, run.dataset, run.backbone, run.epochs, run.seed) == ("simclr", "fashion-mnist", "convnet", 7, 0)
    assert run.command == "selfsup pretrain configs/simclr/fashion_mnist.yaml"
    assert run.wall_seconds == 503.0
    assert run.threads == 2
    assert load_run(tmp_path / "simclr-fm" / "results.json").results == run.results


def test_one_row_per_run_then_the_baselines_once_each_naming_the_run(tmp_path: Path) -> None:
    runs = [
        load_run(make_run(tmp_path, "simclr-fm")),
        load_run(
            make_run(
                tmp_path,
                "byol-fm",
                method="byol",
                epochs=7.5,
                seed=1,
                encoder={"knn_top1@20": 0.8609, "linear_top1": 0.8729},
            )
        ),
    ]
    table = method_table(runs)
    assert header(table) == [
        "method",
        "backbone",
        "epochs",
        "seed",
        "kNN@20",
        "kNN@200",
        "linear",
        "feature std",
        "eff. rank",
        "wall time",
        "command",
    ]
    assert [cells[0] for cells in table_rows(table)] == ["simclr", "byol", "random-init convnet", "raw pixels"]
    simclr = row(table, "simclr")
    assert simclr == {
        "method": "simclr",
        "backbone": "convnet",
        "epochs": "7",
        "seed": "0",
        "kNN@20": "**86.63**",
        "kNN@200": "**83.69**",
        "linear": "**87.50**",
        "feature std": "0.030",
        "eff. rank": "100.8",
        "wall time": "8m23s, 2 threads",
        "command": "`selfsup pretrain configs/simclr/fashion_mnist.yaml`",
    }
    byol = row(table, "byol")
    assert (byol["epochs"], byol["seed"], byol["kNN@20"], byol["kNN@200"]) == ("7.5", "1", "**86.09**", DASH)
    pixels = row(table, "raw pixels")
    assert (pixels["kNN@20"], pixels["linear"], pixels["eff. rank"]) == ("85.69", "84.62", "374.6")
    assert pixels["command"] == "printed by `simclr-fm`"
    assert row(table, "random-init convnet")["command"] == "printed by `simclr-fm`"
    assert "Test CPU" in table
    assert "torch 2.13.0" in table


def test_the_baseline_row_comes_from_the_run_that_printed_most_of_it(tmp_path: Path) -> None:
    # A run with eval.baselines=false still prints the random-init fine-tuning of eval.semi:
    # sorted first by name, its partial row must not hide another run's complete one.
    semi_only = {"random-init convnet": {"semi_top1@10%": 0.7503}}
    runs = [
        load_run(make_run(tmp_path, "a-partial", baselines=semi_only)),
        load_run(
            make_run(
                tmp_path,
                "b-complete",
                method="byol",
                baselines={"random-init convnet": {**RANDOM_INIT, "semi_top1@10%": 0.7503}, "raw pixels": RAW_PIXELS},
            )
        ),
    ]
    table = method_table(runs)
    random_init = row(table, "random-init convnet")
    assert random_init["command"] == "printed by `b-complete`"
    assert random_init["kNN@20"] != DASH and random_init["10% labels"] == "75.03"
    assert [cells[0] for cells in table_rows(table)].count("random-init convnet") == 1


def test_bold_only_where_the_encoder_beats_every_baseline_of_its_dataset(tmp_path: Path) -> None:
    encoder = {"knn_top1@20": 0.8569, "knn_top1@200": 0.8300, "linear_top1": 0.80}  # ties pixels in kNN@20
    hog = {"knn_top1@20": 0.70, "knn_top1@200": 0.8350, "linear_top1": 0.75}
    table = method_table(
        [load_run(make_run(tmp_path, "r", encoder=encoder, baselines={"raw pixels": RAW_PIXELS, "HOG": hog}))]
    )
    cells = row(table, "simclr")
    assert (cells["kNN@20"], cells["kNN@200"], cells["linear"]) == ("85.69", "83.00", "80.00")
    assert row(table, "HOG")["kNN@200"] == "83.50"


def test_a_baseline_another_run_printed_higher_still_blocks_bold(tmp_path: Path) -> None:
    higher = {**RAW_PIXELS, "linear_top1": 0.8800}
    runs = [
        load_run(make_run(tmp_path, "a")),
        load_run(make_run(tmp_path, "b", method="byol", baselines={"raw pixels": higher})),
    ]
    table = method_table(runs)
    assert row(table, "simclr")["linear"] == "87.50"  # below b's raw pixels (88.00)
    assert row(table, "simclr")["kNN@20"] == "**86.63**"
    assert "raw pixels (fashion-mnist, convnet) differs between the 2 runs that printed it: linear 84.62" in table


def test_baselines_per_dataset_and_backbone(tmp_path: Path) -> None:
    vit96, vit192 = ({"name": "vit_tiny", "patch_size": 7, "embed_dim": d} for d in (96, 192))
    random96 = {**RANDOM_INIT, "knn_top1@20": 0.7346}
    random192 = {**RANDOM_INIT, "knn_top1@20": 0.7456}
    runs = [
        load_run(make_run(tmp_path, "conv")),
        load_run(
            make_run(
                tmp_path,
                "v96",
                method="moco_v3",
                backbone=vit96,
                baselines={"random-init vit_tiny": random96, "raw pixels": RAW_PIXELS},
            )
        ),
        load_run(
            make_run(
                tmp_path,
                "v192",
                method="moco_v3",
                backbone=vit192,
                baselines={"random-init vit_tiny": random192, "raw pixels": RAW_PIXELS},
            )
        ),
        load_run(make_run(tmp_path, "digits", data={"name": "digits"})),
    ]
    table = method_table(runs)
    assert header(table)[0] == "dataset"
    names = [(cells[0], cells[1], cells[2]) for cells in table_rows(table)]
    assert names == [
        ("fashion-mnist", "simclr", "convnet"),
        ("fashion-mnist", "moco_v3", "vit_tiny (embed_dim=96)"),
        ("fashion-mnist", "moco_v3", "vit_tiny (embed_dim=192)"),
        ("fashion-mnist", "random-init convnet", "convnet"),
        ("fashion-mnist", "raw pixels", "convnet"),  # identical in the ViT runs: shown once
        ("fashion-mnist", "random-init vit_tiny", "vit_tiny (embed_dim=96)"),
        ("fashion-mnist", "random-init vit_tiny", "vit_tiny (embed_dim=192)"),
        ("digits", "simclr", "convnet"),
        ("digits", "random-init convnet", "convnet"),
        ("digits", "raw pixels", "convnet"),
    ]
    assert row(table, "fashion-mnist", "v192")["kNN@20"] == "74.56"


def test_finetune_column_appears_when_a_row_has_it(tmp_path: Path) -> None:
    encoder = {"knn_top1@20": 0.8148, "linear_top1": 0.8178, "finetune_top1": 0.7899}
    scratch = {"knn_top1@20": 0.7082, "linear_top1": 0.7870, "finetune_top1": 0.7400}
    table = method_table(
        [
            load_run(
                make_run(
                    tmp_path,
                    "mae",
                    method="mae",
                    encoder=encoder,
                    baselines={"random-init vit": scratch, "raw pixels": RAW_PIXELS},
                )
            )
        ]
    )
    assert "fine-tuned" in header(table)
    assert row(table, "mae")["fine-tuned"] == "**78.99**"
    assert row(table, "raw pixels")["fine-tuned"] == DASH
    assert "fine-tuned" not in header(method_table([load_run(make_run(tmp_path, "plain"))]))


def test_missing_run_info_config_and_metrics_show_a_dash(tmp_path: Path) -> None:
    path = make_run(tmp_path, "bare", encoder={"knn_top1@20": 0.9}, info=False, config=False)
    run = load_run(path)
    assert run.run_info == {}
    assert run.config == {}
    cells = row(method_table([run]), "simclr (convnet)")
    assert cells["kNN@20"] == "**90.00**"
    for column in (
        "backbone",
        "epochs",
        "seed",
        "kNN@200",
        "linear",
        "feature std",
        "eff. rank",
        "wall time",
        "command",
    ):
        assert cells[column] == DASH, column


def test_wall_time_formats_and_processes(tmp_path: Path) -> None:
    long = load_run(make_run(tmp_path, "long", run_info={"wall_seconds": 6420.0, "world_size": 4, "threads": 1}))
    short = load_run(make_run(tmp_path, "short", method="byol", run_info={"wall_seconds": 42.4}))
    table = method_table([long, short])
    assert row(table, "simclr")["wall time"] == "1h47m, 4 processes x 1 thread"
    assert row(table, "byol")["wall time"] == "42s, 2 threads"
    gpu = load_run(make_run(tmp_path, "gpu", run_info={"wall_seconds": 190.0, "device": "cuda:0"}))
    resumed = load_run(make_run(tmp_path, "resumed", method="byol", run_info={"resumed_from_step": 900}))
    table = method_table([gpu, resumed])
    assert row(table, "simclr")["wall time"] == "3m10s, cuda:0"
    assert row(table, "byol")["wall time"] == "8m23s, 2 threads (resumed at step 900: the last part only)"


def test_a_pipe_in_a_command_does_not_break_the_table(tmp_path: Path) -> None:
    table = method_table([load_run(make_run(tmp_path, "p", run_info={"command": "selfsup pretrain a.yaml | tee x"}))])
    assert "a.yaml \\| tee x" in table
    assert all(len(cells) == len(header(table)) for cells in table_rows(table))


def test_load_run_errors_name_the_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=r"has no results\.json"):
        load_run(tmp_path / "empty")
    with pytest.raises(ReportError, match="not a run folder"):
        load_run(tmp_path / "nowhere")
    bad = make_run(tmp_path, "bad")
    (bad / "results.json").write_text("[1, 2]")
    with pytest.raises(ReportError, match="mapping of row name"):
        load_run(bad)
    with pytest.raises(ReportError, match="no runs"):
        method_table([])


MARKED = """# Title

Intro.

<!-- results:fashion-mnist:begin -->
generated by `selfsup report docs/runs/* --update README.md --marker fashion-mnist`
<!-- results:fashion-mnist:end -->

After.
"""


def test_update_markdown_replaces_only_the_marked_block(tmp_path: Path) -> None:
    doc = tmp_path / "README.md"
    doc.write_text(MARKED)
    assert update_markdown(doc, "fashion-mnist", "| a |\n|---|\n| 1 |\n")
    text = doc.read_text()
    assert text == MARKED.replace(
        "generated by `selfsup report docs/runs/* --update README.md --marker fashion-mnist`", "| a |\n|---|\n| 1 |"
    )
    assert not update_markdown(doc, "fashion-mnist", "| a |\n|---|\n| 1 |")  # idempotent
    assert update_markdown(doc, "fashion-mnist", "new")
    assert doc.read_text() == MARKED.replace(
        "generated by `selfsup report docs/runs/* --update README.md --marker fashion-mnist`", "new"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("no markers at all\n", "is missing"),
        ("<!-- results:fashion-mnist:begin -->\nonly the start\n", "results:fashion-mnist:end --> is missing"),
        ("<!-- results:fashion-mnist:end -->\n<!-- results:fashion-mnist:begin -->\n", "comes before"),
        (MARKED + MARKED, "appears 2 times"),
        (MARKED.replace("fashion-mnist", "digits"), "is missing"),
    ],
)
def test_update_markdown_without_its_markers_raises_a_clear_error(tmp_path: Path, text: str, problem: str) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    with pytest.raises(ReportError, match=problem):
        update_markdown(doc, "fashion-mnist", "table")
    assert doc.read_text() == text


def test_command_line_prints_or_updates_and_skips_plain_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "a")
    make_run(runs, "b", method="byol")
    (runs / "README.md").write_text("what these folders are\n")
    args = sorted(str(p) for p in runs.iterdir())
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "| simclr |" in out
    assert "| byol |" in out
    assert "skipping" in err

    doc = tmp_path / "README.md"
    doc.write_text(MARKED)
    assert main([*args, "--update", str(doc), "--marker", "fashion-mnist"]) == 0
    assert "| simclr |" in doc.read_text()
    assert "After." in doc.read_text()
    assert main([*args, "--update", str(doc), "--marker", "cifar"]) == 2
    assert "results:cifar:begin" in capsys.readouterr().err
    assert main([*args, "--update", str(doc)]) == 2
    assert main([str(tmp_path / "missing-run")]) == 2


def test_runs_as_a_module_without_importing_torch(tmp_path: Path) -> None:
    make_run(tmp_path, "a")
    code = (
        "import sys, runpy; sys.argv = ['report', sys.argv[1]]\n"
        "try:\n    runpy.run_module('selfsup.report', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'report imported torch'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "a")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "| simclr |" in done.stdout


def test_runs_of_one_method_with_different_options_are_told_apart(tmp_path: Path) -> None:
    make_run(tmp_path, "a", method="jigsaw")
    make_run(tmp_path, "b", method="jigsaw", method_options={"eval_features": "tiles"})
    make_run(tmp_path, "c", method="simclr", method_options={"temperature": 0.1})
    table = method_table(load_run(tmp_path / name) for name in "abc")
    methods = [cells[0] for cells in table_rows(table)][:3]
    # Run a's config lacks the option (a run from before it existed): nothing to show for it.
    assert methods == ["jigsaw", 'jigsaw (eval_features="tiles")', "simclr"]
    make_run(tmp_path, "d", method="jigsaw", method_options={"eval_features": None})
    table = method_table(load_run(tmp_path / name) for name in "bd")
    labels = {cells[0] for cells in table_rows(table)}
    assert {"jigsaw (eval_features=null)", 'jigsaw (eval_features="tiles")'} <= labels, labels
