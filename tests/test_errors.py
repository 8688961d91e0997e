"""Every expected failure is one line ``error: ...`` with its class's exit code, and loses no
run-folder content. Each case is a row of the fault table in docs/faults.md: the test checks
the row against what ``selfsup`` really prints (``SELFSUP_WRITE_FAULTS=1`` rewrites the row).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from selfsup.cli import main, one_line
from selfsup.config import resolve_config_path
from selfsup.errors import ConfigError, DataError, SelfsupError, exit_code_of

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
FAULTS_DOC = REPO / "docs" / "faults.md"
TABLE_START = "<!-- fault table: kept by tests/test_errors.py -->"
TABLE_END = "<!-- end of fault table -->"
HEADER = "| input or fault | what the user sees (stderr) | exit code |\n|---|---|---|"


# ---------------------------------------------------------------------------- the table in the docs
def doc_rows() -> dict[str, tuple[str, int]]:
    """``{input: (message, exit code)}`` of the fault table in docs/faults.md."""
    text = FAULTS_DOC.read_text()
    table = text[text.index(TABLE_START) + len(TABLE_START) : text.index(TABLE_END)]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[_uncode(cells[0])] = (_uncode(cells[1]), int(cells[2]))
    return rows


def _code(text: str) -> str:
    """Markdown inline code; double backticks around text that holds a backtick."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _uncode(cell: str) -> str:
    return cell[3:-3] if cell.startswith("`` ") else cell[1:-1]


def write_doc_row(fault: str, message: str, code: int, order: list[str]) -> None:
    """Sets one row of the table (``SELFSUP_WRITE_FAULTS=1``), keeping ``order``."""
    rows = doc_rows()
    rows[fault] = (message, code)
    ordered = [k for k in order if k in rows] + [k for k in rows if k not in order]
    body = "\n".join(f"| {_code(k)} | {_code(rows[k][0])} | {rows[k][1]} |" for k in ordered)
    text = FAULTS_DOC.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    FAULTS_DOC.write_text(text[:start] + f"\n{HEADER}\n{body}\n" + text[end:])


def normalise(line: str, *tmp: Path) -> str:
    """A message with the test's temporary folders and machine-dependent sizes masked."""
    for folder in tmp:
        line = line.replace(str(folder), "<tmp>")
    return re.sub(r"\d+(\.\d+)? (bytes|KB|MB|GB)", "<size>", line).replace("|", "\\|")


def check_row(fault: str, err_text: str, code: int, *tmp: Path) -> None:
    """Exactly one ``error:`` line, a non-zero code, and both equal to the docs' row."""
    lines = [line for line in err_text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err_text
    assert "Traceback" not in err_text, err_text
    assert code != 0
    seen = normalise(errors[0], *tmp)
    if os.environ.get("SELFSUP_WRITE_FAULTS"):
        write_doc_row(fault, seen, code, [c.fault for c in CASES] + SIGNAL_FAULTS)
    assert doc_rows().get(fault) == (seen, code), f"docs/faults.md row for {fault!r} differs from: {seen} ({code})"


# ---------------------------------------------------------------------------- the cases
def tiny(tmp: Path, *extra: str) -> list[str]:
    """``selfsup pretrain`` of a 2-step SimCLR run on digits (shipped config by name)."""
    return [
        "pretrain",
        "simclr/digits",
        "backbone.width=8",
        "method.proj_hidden_dim=32",
        "method.proj_dim=16",
        "train.batch_size=64",
        "train.max_steps=2",
        "train.threads=1",
        "train.progress=false",
        "train.knn_every=0",
        "eval.at_end=false",
        "run.tensorboard=false",
        f"run.out_dir={tmp}",
        "run.name=r",
        *extra,
    ]


def tiny_of(config: str, tmp: Path, *extra: str) -> list[str]:
    """``tiny`` on another shipped config, keeping that config's method options."""
    argv = [a for a in tiny(tmp, *extra) if not a.startswith("method.proj")]
    return [argv[0], config, *argv[2:]]


def image_folder(tmp: Path, good: int, bad: int) -> Path:
    """A folder of ``good`` readable PNGs and ``bad`` undecodable ones."""
    from PIL import Image

    root = tmp / "images"
    root.mkdir(exist_ok=True)
    for i in range(good):
        Image.new("L", (12, 12), color=i * 20).save(root / f"ok{i}.png")
    for i in range(bad):
        (root / f"bad{i}.png").write_bytes(b"not a png")
    return root


@dataclass
class Fault:
    fault: str  # the docs' "input or fault" cell
    argv: Callable[[Path, Path], list[str]]  # (tmp, finished run) -> command line
    exit_code: int
    skip: str | None = None


def _empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _bad_pack(tmp: Path) -> Path:
    (tmp / "pack").mkdir()
    (tmp / "pack" / "manifest.json").write_text('{"format": "selfsup-packed", "version": 1')
    return tmp / "pack"


def _evil(tmp: Path) -> Path:
    class Exploit:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("touch pwned",))

    torch.save({"step": Exploit()}, tmp / "evil.pt")
    return tmp / "evil.pt"


CASES = [
    Fault("train.batch_size=0", lambda t, r: tiny(t, "train.batch_size=0"), 2),
    Fault("train.batch_size larger than the data set", lambda t, r: tiny(t, "train.batch_size=4096"), 2),
    Fault("optim.lr=-1", lambda t, r: tiny(t, "optim.lr=-1"), 2),
    Fault("views.crop_scale=[0.9,0.2] (reversed)", lambda t, r: tiny(t, "views.crop_scale=[0.9,0.2]"), 2),
    Fault("method.temperature=0", lambda t, r: tiny(t, "method.temperature=0"), 2),
    Fault("train.log_every=0", lambda t, r: tiny(t, "train.log_every=0"), 2),
    Fault("train.epochs=0", lambda t, r: tiny(t, "train.epochs=0"), 2),
    Fault("train.max_steps=0", lambda t, r: tiny(t, "train.max_steps=0"), 2),
    Fault("eval.knn_k=[0]", lambda t, r: tiny(t, "eval.knn_k=[0]"), 2),
    Fault("train.device=gpu0", lambda t, r: tiny(t, "train.device=gpu0"), 2),
    Fault(
        "train.device=cuda without a GPU",
        lambda t, r: tiny(t, "train.device=cuda"),
        2,
        skip="CUDA is available here" if torch.cuda.is_available() else None,
    ),
    Fault("--nproc 0", lambda t, r: [*tiny(t), "--nproc", "0"], 2),
    Fault("train.epoch=1 (unknown key)", lambda t, r: tiny(t, "train.epoch=1"), 2),
    Fault("pretrain simclr/digitz (no such config)", lambda t, r: ["pretrain", "simclr/digitz"], 2),
    Fault("data.name=image-folder without data.root", lambda t, r: tiny(t, "data.name=image-folder"), 2),
    Fault(
        "backbone.name=timm without timm installed",
        lambda t, r: tiny(t, "backbone.name=timm", "backbone.model_name=resnet18"),
        2,
        skip=None if importlib.util.find_spec("timm") is None else "timm is installed",
    ),
    Fault(
        "method.name=colorization on 1-channel data (digits)",
        lambda t, r: tiny_of("rotation/digits", t, "method.name=colorization"),
        2,
    ),
    Fault("method.views=lab (cmc) on 1-channel data", lambda t, r: tiny_of("cmc/digits", t, "method.views=lab"), 2),
    Fault(
        "method.queue_size=100 with train.batch_size=64 (moco_v1)",
        lambda t, r: tiny_of("moco_v1/digits", t, "method.queue_size=100"),
        2,
    ),
    Fault(
        "method.tile_size=20 on 24 px images (jigsaw)",
        lambda t, r: tiny_of("jigsaw/digits", t, "method.tile_size=20"),
        2,
    ),
    Fault("eval.semi_fractions=[0]", lambda t, r: tiny(t, "eval.semi_fractions=[0]"), 2),
    Fault("eval dense <a run on a data set without masks>", lambda t, r: ["eval", "dense", str(r)], 2),
    Fault(
        "embed <neither a folder nor a data set>",
        lambda t, r: ["embed", str(r), str(t / "nowhere"), "-o", str(t / "out")],
        2,
    ),
    Fault(
        "visualize colorization on a run that is not colorization",
        lambda t, r: ["visualize", "colorization", str(r)],
        2,
    ),
    Fault(
        "visualize embeddings --method umap without umap-learn",
        lambda t, r: ["visualize", "embeddings", str(r), "--method", "umap"],
        2,
        skip=None if importlib.util.find_spec("umap") is None else "umap-learn is installed",
    ),
    Fault(
        "data.root=<a folder that does not exist>",
        lambda t, r: tiny(t, "data.name=image-folder", "data.image_size=8", f"data.root={t}/nowhere"),
        3,
    ),
    Fault(
        "data.root=<an empty folder>",
        lambda t, r: tiny(t, "data.name=image-folder", "data.image_size=8", f"data.root={_empty(t)}"),
        3,
    ),
    Fault(
        "data.root=<a folder of unreadable images>",
        lambda t, r: tiny(t, "data.name=image-folder", "data.image_size=8", f"data.root={image_folder(t, 0, 3)}"),
        3,
    ),
    Fault(
        "data.on_error=raise and an unreadable image",
        lambda t, r: tiny(
            t,
            "data.name=image-folder",
            "data.image_size=8",
            "data.on_error=raise",
            f"data.root={image_folder(t, 3, 1)}",
        ),
        3,
    ),
    Fault(
        "data.name=packed on a folder without manifest.json",
        lambda t, r: tiny(t, "data.name=packed", f"data.root={_empty(t)}"),
        3,
    ),
    Fault("data verify <a pack with a damaged manifest.json>", lambda t, r: ["data", "verify", str(_bad_pack(t))], 3),
    Fault("resume <a run folder that does not exist>", lambda t, r: ["resume", str(t / "nowhere")], 4),
    Fault("eval knn <a checkpoint that does not exist>", lambda t, r: ["eval", "knn", str(t / "last.pt")], 4),
    Fault("eval knn <a crafted pickle that would run code>", lambda t, r: ["eval", "knn", str(_evil(t))], 4),
    Fault(
        "pretrain into a run folder that is not empty",
        lambda t, r: tiny(t, f"run.out_dir={r.parent}", f"run.name={r.name}"),
        4,
    ),
    Fault("resume with a changed head size (method.proj_dim)", lambda t, r: ["resume", str(r), "method.proj_dim=8"], 4),
    Fault(
        "visualize attention on a run without a ViT",
        lambda t, r: ["visualize", "attention", str(r), "--images", "0"],
        2,
    ),
]


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its content."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    assert main(tiny(out)) == 0
    return out / "r"


@pytest.mark.parametrize("case", CASES, ids=[c.fault for c in CASES])
def test_fault_is_one_line_with_its_exit_code(
    case: Fault, tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if case.skip:
        pytest.skip(case.skip)
    monkeypatch.chdir(tmp_path)
    before = _tree(finished_run)
    argv = case.argv(tmp_path, finished_run)
    capsys.readouterr()
    code = main(argv)
    check_row(case.fault, capsys.readouterr().err, code, tmp_path, finished_run.parent)
    assert code == case.exit_code
    assert _tree(finished_run) == before, "the finished run's folder changed"
    assert not (tmp_path / "pwned").exists()


def test_disk_full_while_checkpointing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    code = main(tiny(tmp_path))
    check_row("disk full while writing a checkpoint", capsys.readouterr().err, code, tmp_path)
    assert code == 6
    assert not list((tmp_path / "r" / "checkpoints").glob(".*.tmp"))


def test_non_finite_loss_names_the_checkpoint_to_resume_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from selfsup.engine.run import PretrainRun
    from selfsup.errors import TrainingError
    from tests.conftest import tiny_config

    run = PretrainRun(tiny_config(tmp_path, "simclr", "train.max_steps=4", "train.checkpoint_every=2"))
    original = run.method.training_step

    def poisoned(batch, step):  # type: ignore[no-untyped-def]
        out = original(batch, step)
        if step.step == 3:
            out["loss"] = out["loss"] * math.nan
        return out

    run.method.training_step = poisoned  # type: ignore[method-assign]
    with pytest.raises(TrainingError) as err:
        run.fit()
    assert exit_code_of(err.value) == 5
    text = f"error: {one_line(err.value)}"
    assert "last good checkpoint is" in text and "checkpoints/last.pt (step 2)" in text
    check_row("non-finite loss (NaN) at step 3", text, 5, tmp_path)


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError):
        main(["--debug", *tiny(tmp_path, "optim.lr=-1")])
    with pytest.raises(ConfigError):
        main([*tiny(tmp_path, "optim.lr=-1"), "--debug"])


def test_options_and_overrides_in_any_order() -> None:
    from selfsup.cli import parse_args

    a = parse_args(["pretrain", "simclr/digits", "--nproc", "2", "train.epochs=3", "optim.lr=0.1"])
    b = parse_args(["pretrain", "simclr/digits", "train.epochs=3", "--nproc", "2", "optim.lr=0.1"])
    c = parse_args(["pretrain", "simclr/digits", "train.epochs=3", "optim.lr=0.1", "--nproc", "2"])
    assert a.overrides == b.overrides == c.overrides == ["train.epochs=3", "optim.lr=0.1"]
    assert a.nproc == b.nproc == c.nproc == 2
    with pytest.raises(SystemExit):
        parse_args(["pretrain", "simclr/digits", "--bogus"])


def test_error_classes_have_distinct_codes() -> None:
    from selfsup import errors

    classes = [errors.ConfigError, errors.DataError, errors.CheckpointError, errors.TrainingError, errors.StorageError]
    codes = [c.exit_code for c in classes]
    assert len(set(codes)) == len(codes) and 1 not in codes
    assert errors.RunInterrupted("x", 2).exit_code == 130 and errors.RunInterrupted("x", 15).exit_code == 143
    assert issubclass(DataError, SelfsupError) and issubclass(DataError, ValueError)


def test_a_dataloader_workers_error_prints_its_own_message() -> None:
    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        "  File \"x.py\", line 1, in f\nselfsup.errors.DataError: cannot decode image 'a.png': broken"
    )
    assert one_line(wrapped) == "cannot decode image 'a.png': broken"


# ---------------------------------------------------------------------------- shipped configs
def test_configs_resolve_by_name_and_are_listed_as_package_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_config_path("simclr/fashion_mnist") == REPO / "configs" / "simclr" / "fashion_mnist.yaml"
    assert resolve_config_path("configs/simclr/digits.yaml").is_file()
    with pytest.raises(ConfigError, match="did you mean 'simclr/digits'"):
        resolve_config_path("simclr/digitz")
    # Every config folder is installed as data files (a regular install has no checkout).
    pyproject = (REPO / "pyproject.toml").read_text()
    section = pyproject.split("[tool.setuptools.data-files]", 1)[1].split("\n[", 1)[0]
    data_files = dict(re.findall(r'^"([^"]+)" = \["([^"]+)"\]', section, re.M))
    folders = sorted(p.name for p in (REPO / "configs").iterdir() if p.is_dir())
    assert data_files == {f"share/selfsup/configs/{f}": f"configs/{f}/*.yaml" for f in folders}
    # A regular install: no checkout next to the package, the configs under <prefix>/share.
    import sysconfig

    import selfsup.config as config

    installed = tmp_path / "share" / "selfsup" / "configs" / "simclr"
    installed.mkdir(parents=True)
    (installed / "fashion_mnist.yaml").write_text("data: {name: digits}\n")
    monkeypatch.setattr(config, "__file__", str(tmp_path / "site-packages" / "selfsup" / "config.py"))
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path))
    assert resolve_config_path("simclr/fashion_mnist") == installed / "fashion_mnist.yaml"


def test_pretrain_accepts_a_config_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = tiny(tmp_path)
    argv[1] = "simclr/fashion_mnist"
    # The Fashion-MNIST config by name, trained on digits so the test needs no download.
    assert main([*argv, "data.name=digits", "backbone.width=8"]) == 0
    assert (tmp_path / "r" / "checkpoints" / "last.pt").is_file()


SIGNAL_FAULTS = ["SIGTERM during pretraining", "SIGINT (Ctrl-C) during pretraining"]


def test_the_docs_table_has_a_row_per_case() -> None:
    expected = {c.fault for c in CASES} | set(SIGNAL_FAULTS)
    expected |= {"disk full while writing a checkpoint", "non-finite loss (NaN) at step 3"}
    assert set(doc_rows()) == expected
