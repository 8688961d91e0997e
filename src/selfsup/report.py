"""Result tables generated from run folders, so that no number in the docs is typed by hand.

    selfsup report runs/simclr-fashion-mnist runs/byol-fashion-mnist
    selfsup report docs/runs/*fashion-mnist* --update docs/results.md --marker fashion-mnist
    python -m selfsup.report docs/runs/*fashion-mnist* --update docs/results.md --marker fashion-mnist

A run folder is what ``selfsup pretrain`` writes. The report reads three of its files:

- ``results.json`` (required): ``{row name: {metric: value}}``. The first row is the trained
  encoder; every other row ("random-init convnet", "raw pixels", "HOG", ...) is a baseline
  that the run evaluated with the same protocol. Accuracies are fractions in [0, 1].
- ``config.yaml``: the resolved config (method, data, backbone, epochs, seed, threads).
- ``run_info.json``: the command, wall time, thread and process counts, device, CPU and torch
  version (written at the end of the run; a resumed run's times cover its last part only).

Only ``results.json`` is required; a missing file or metric shows as an en dash.

The table has one row per run (its trained encoder) and, for every distinct dataset and
backbone, the baseline rows taken from the run that printed most of their protocols (the
first on a tie), each naming that run.
An accuracy is bold where the encoder is above every baseline row that any of the given runs
printed for its dataset, compared at the precision shown. Where runs printed different values
for the same baseline, a note under the table gives the range.

Tokenizer runs (``vq_tokenizer``, ``vqkd_tokenizer``) whose first row holds the tokenizer
metrics (``tokenizer_reconstruction``, ``codebook_usage``, ``codebook_perplexity``,
``codebook_size``: written by the run's final evaluation or ``selfsup eval tokenizer RUN``) get a
table of their own, :func:`tokenizer_table`: chosen with ``--table tokenizers``, and by default
when every given run is such a run (``selfsup report runs/vq*_tokenizer-* --update
docs/results.md --marker tokenizers``).

``--update FILE --marker NAME`` replaces the text between ``<!-- results:NAME:begin -->`` and
``<!-- results:NAME:end -->`` in FILE with the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ReportError",
    "RunRecord",
    "configure_parser",
    "load_run",
    "main",
    "markers",
    "method_table",
    "tokenizer_table",
    "update_markdown",
]

MISSING = "\u2013"  # en dash

# (results.json key, column header); accuracies are shown in percent and compared for bold.
ACCURACY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("knn_top1@20", "kNN@20"),
    ("knn_top1@200", "kNN@200"),
    ("linear_top1", "linear"),
)
FINETUNE_COLUMN: tuple[str, str] = ("finetune_top1", "fine-tuned")  # shown when any row has it
# Scores of the protocols a run enables (eval.semi, eval.cluster, eval.retrieval, eval.dense), shown in
# percent when any row has them; higher is better for each, so they are compared for bold too.
PROTOCOL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("semi_top1@1%", "1% labels"),
    ("semi_top1@10%", "10% labels"),
    ("cluster_acc", "k-means ACC"),
    ("nmi", "NMI"),
    ("ari", "ARI"),
    ("retrieval_map@r", "mAP@R"),
    ("retrieval_recall@1", "R@1"),
    ("dense_miou", "dense mIoU"),
    # Image-text runs (`selfsup eval zeroshot|retrieval`): zero-shot top-1, on held-out
    # attribute combinations apart, and image->text / text->image Recall@1.
    ("zeroshot_top1", "zero-shot"),
    ("zeroshot_top1_heldout", "zero-shot held-out"),
    ("i2t_recall@1", "I->T R@1"),
    ("t2i_recall@1", "T->I R@1"),
)
# Collapse monitors of the test features: shown as they are, never bold (higher is not better).
MONITOR_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("feature_std", "feature std", "{:.3f}"),
    ("effective_rank", "eff. rank", "{:.1f}"),
)


class ReportError(ValueError):
    """A run folder cannot be read, or a markdown file lacks the markers to update."""


@dataclass(frozen=True)
class RunRecord:
    """What one run folder holds, as plain data.

    Attributes:
        path: the run folder.
        results: ``results.json``: row name -> metric name -> value; the first row is the
            trained encoder, the others are baselines.
        config: ``config.yaml`` as a mapping of sections (empty when the file is missing).
        run_info: ``run_info.json`` (empty when the file is missing).
    """

    path: Path
    results: dict[str, dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    run_info: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The run folder's name."""
        return self.path.name

    @property
    def encoder_row(self) -> str:
        """Name of the trained encoder's row: the first key of ``results.json``."""
        return next(iter(self.results))

    @property
    def encoder(self) -> dict[str, Any]:
        """The trained encoder's metrics."""
        return self.results[self.encoder_row]

    @property
    def baselines(self) -> dict[str, dict[str, Any]]:
        """Every row after the first: the baselines this run evaluated."""
        return {k: v for k, v in self.results.items() if k != self.encoder_row}

    def section(self, name: str) -> dict[str, Any]:
        """A config section (``{}`` when absent)."""
        value = self.config.get(name)
        return dict(value) if isinstance(value, dict) else {}

    def _setting(self, section: str, key: str) -> Any:
        return self.section(section).get(key)

    @property
    def method(self) -> str:
        """``method.name``, or the encoder row's name when the config is missing."""
        return str(self._setting("method", "name") or self.encoder_row)

    @property
    def dataset(self) -> str | None:
        name = self._setting("data", "name")
        return None if name is None else str(name)

    @property
    def backbone(self) -> str | None:
        name = self._setting("backbone", "name")
        return None if name is None else str(name)

    @property
    def epochs(self) -> float | None:
        value = self._setting("train", "epochs")
        return _number(value)

    @property
    def seed(self) -> int | None:
        value = self._setting("train", "seed")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def threads(self) -> int | None:
        """Intra-op threads per process: ``run_info.json``'s, else ``train.threads`` when set."""
        for value in (self.run_info.get("threads"), self._setting("train", "threads")):
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    @property
    def world_size(self) -> int:
        value = self.run_info.get("world_size")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1

    @property
    def command(self) -> str | None:
        value = self.run_info.get("command")
        return value if isinstance(value, str) and value else None

    @property
    def wall_seconds(self) -> float | None:
        return _number(self.run_info.get("wall_seconds"))


def _number(value: Any) -> float | None:
    """A JSON/YAML number as float; anything else (missing, a string, a bool) as ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: invalid JSON: {err}") from None


def load_run(path: str | os.PathLike[str]) -> RunRecord:
    """Reads a run folder (or its ``results.json``).

    Raises:
        ReportError: no ``results.json``, or it is not a non-empty mapping of row name to
            metric mapping, or a file is not valid JSON / YAML.
    """
    run_dir = Path(path)
    if run_dir.is_file() and run_dir.name == "results.json":
        run_dir = run_dir.parent
    results_path = run_dir / "results.json"
    if not run_dir.is_dir():
        raise ReportError(f"{str(run_dir)!r} is not a run folder (a folder written by `selfsup pretrain`)")
    if not results_path.is_file():
        raise ReportError(f"{str(run_dir)!r} has no results.json (the run did not finish its evaluation)")
    results = _read_json(results_path)
    if not isinstance(results, dict) or not results or not all(isinstance(v, dict) for v in results.values()):
        raise ReportError(f"{results_path}: expected a non-empty mapping of row name to metrics")

    config: dict[str, Any] = {}
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        try:
            loaded = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as err:
            raise ReportError(f"{config_path}: invalid YAML: {err}") from None
        if isinstance(loaded, dict):
            config = loaded

    run_info: dict[str, Any] = {}
    info_path = run_dir / "run_info.json"
    if info_path.is_file():
        loaded = _read_json(info_path)
        if isinstance(loaded, dict):
            run_info = loaded
    return RunRecord(run_dir, {str(k): dict(v) for k, v in results.items()}, config, run_info)


# ------------------------------------------------------------------------------ formatting
def _percent(value: Any) -> float | None:
    """An accuracy fraction as percent rounded to the 2 decimals shown (``None``: absent)."""
    number = _number(value)
    return None if number is None else round(100.0 * number, 2)


def _format_percent(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def _format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return MISSING
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _format_seed(seed: int | None) -> str:
    return MISSING if seed is None else str(seed)


def _format_epochs(epochs: float | None) -> str:
    if epochs is None:
        return MISSING
    return str(int(epochs)) if epochs.is_integer() else f"{epochs:g}"


def _cell(text: str) -> str:
    """Markdown table cell: a ``|`` would end the cell, a newline the row."""
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{text}`" if "`" not in text else text


def _wall_time(run: RunRecord) -> str:
    """``8m23s, 2 threads``; ``1h47m, 4 processes x 1 thread``; ``3m10s, cuda:0``; a resumed
    run's ``run_info.json`` times only its last part, which the cell says."""
    duration = _format_duration(run.wall_seconds)
    if duration == MISSING:
        return MISSING
    parts = []
    if run.world_size > 1:
        parts.append(f"{run.world_size} processes")
    device = run.run_info.get("device")
    if isinstance(device, str) and device and not device.startswith("cpu"):
        parts.append(device)
    elif run.threads is not None:
        parts.append(f"{run.threads} thread{'s' if run.threads != 1 else ''}")
    text = duration + (f", {' x '.join(parts)}" if parts else "")
    resumed = run.run_info.get("resumed_from_step")
    if isinstance(resumed, int) and not isinstance(resumed, bool) and resumed > 0:
        text += f" (resumed at step {resumed}: the last part only)"
    return text


def _canonical(section: dict[str, Any]) -> str:
    return json.dumps(section, sort_keys=True, default=str)


def _labels(runs: Sequence[RunRecord], section: str) -> dict[str, str]:
    """A short label per distinct ``section`` (keyed by its canonical JSON): the component's
    name, plus the options that differ between runs using a component of that name
    (``vit_tiny (embed_dim=96)`` beside ``vit_tiny (embed_dim=192)``)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        options = run.section(section)
        by_name.setdefault(str(options.get("name", MISSING)), []).append(options)
    labels: dict[str, str] = {}
    for name, variants in by_name.items():
        keys: list[str] = []
        for options in variants:
            keys += [k for k in options if k != "name" and k not in keys]
        differing = [k for k in keys if len({_canonical({"v": o.get(k)}) for o in variants}) > 1]
        for options in variants:
            # A key the run's config lacks (a run from before the option existed) is not shown.
            shown = ", ".join(f"{k}={json.dumps(options[k], default=str)}" for k in differing if k in options)
            labels[_canonical(options)] = f"{name} ({shown})" if shown else name
    return labels


@dataclass
class _Row:
    cells: dict[str, str]
    accuracies: dict[str, float | None]


def _monitor_cells(metrics: dict[str, Any]) -> dict[str, str]:
    cells = {}
    for key, header, fmt in MONITOR_COLUMNS:
        number = _number(metrics.get(key))
        cells[header] = MISSING if number is None else fmt.format(number)
    return cells


def method_table(runs: Iterable[RunRecord]) -> str:
    """A markdown table of the runs' trained encoders and their baselines.

    Columns: method, backbone, epochs, seed, kNN@20, kNN@200, linear (fine-tuned when any
    row has ``finetune_top1``), feature std, eff. rank, wall time, command; a dataset column
    first when the runs span more than one dataset. Rows, per dataset in order of first
    appearance: one per run (its first ``results.json`` row), then per distinct backbone the
    baseline rows from the first run that printed them (an identical row already shown for
    the dataset is not repeated). Accuracies in percent with 2 decimals, bold where the
    encoder is above every baseline row printed for its dataset by any of the runs. A caption
    under the table says what the numbers are and where they were measured.

    Raises:
        ReportError: no runs.
    """
    runs = list(runs)
    if not runs:
        raise ReportError("no runs to report")
    data_labels = _labels(runs, "data")
    backbone_labels = _labels(runs, "backbone")
    method_labels = _labels(runs, "method")  # e.g. jigsaw (eval_features="tiles") beside plain jigsaw
    datasets: dict[str, list[RunRecord]] = {}
    for run in runs:
        datasets.setdefault(_canonical(run.section("data")), []).append(run)

    accuracy_columns = list(ACCURACY_COLUMNS)
    for column in (FINETUNE_COLUMN, *PROTOCOL_COLUMNS):
        if any(column[0] in metrics for run in runs for metrics in run.results.values()):
            accuracy_columns.append(column)
    multi_dataset = len(datasets) > 1
    headers = (["dataset"] if multi_dataset else []) + ["method", "backbone", "epochs", "seed"]
    headers += [h for _, h in accuracy_columns] + [h for _, h, _ in MONITOR_COLUMNS] + ["wall time", "command"]

    def accuracies(metrics: dict[str, Any]) -> dict[str, float | None]:
        return {header: _percent(metrics.get(key)) for key, header in accuracy_columns}

    rows: list[_Row] = []
    notes: list[str] = []
    for data_key, members in datasets.items():
        data_label = data_labels[data_key]
        encoder_rows: list[_Row] = []
        for run in members:
            cells = {
                "dataset": data_label,
                "method": method_labels[_canonical(run.section("method"))] if run.section("method") else run.method,
                "backbone": backbone_labels[_canonical(run.section("backbone"))],
                "epochs": _format_epochs(run.epochs),
                "seed": _format_seed(run.seed),
                **_monitor_cells(run.encoder),
                "wall time": _wall_time(run),
                "command": MISSING if run.command is None else _code(run.command),
            }
            encoder_rows.append(_Row(cells, accuracies(run.encoder)))

        baseline_rows: list[_Row] = []
        groups: dict[str, list[RunRecord]] = {}
        for run in members:
            groups.setdefault(_canonical(run.section("backbone")), []).append(run)
        shown: dict[str, list[dict[str, Any]]] = {}
        for backbone_key, group in groups.items():
            names: list[str] = []
            for run in group:
                names += [n for n in run.baselines if n not in names]
            for name in names:
                printers = [run for run in group if name in run.baselines]
                # The most complete row (a run may print only some protocols of a baseline, e.g.
                # only its fine-tuning with eval.baselines=false); ties: the first run.
                source = max(printers, key=lambda run: len(run.baselines[name]))
                metrics = source.baselines[name]
                if metrics not in shown.setdefault(name, []):
                    shown[name].append(metrics)
                    cells = {
                        "dataset": data_label,
                        "method": name,
                        "backbone": backbone_labels[backbone_key],
                        "epochs": MISSING,
                        "seed": _format_seed(source.seed),
                        **_monitor_cells(metrics),
                        "wall time": MISSING,
                        "command": f"printed by `{source.name}`",
                    }
                    baseline_rows.append(_Row(cells, accuracies(metrics)))
                notes += _spread_notes(name, backbone_labels[backbone_key], data_label, printers, accuracies)

        # Every baseline value any run printed for this dataset, shown or not: an encoder's
        # number is bold only above all of them.
        best: dict[str, float] = {}
        for run in members:
            for metrics in run.baselines.values():
                for header, value in accuracies(metrics).items():
                    if value is not None and not math.isnan(value):
                        best[header] = max(best.get(header, value), value)
        for row in encoder_rows:
            for header, value in row.accuracies.items():
                won = value is not None and header in best and value > best[header]
                row.cells[header] = f"**{_format_percent(value)}**" if won else _format_percent(value)
        for row in baseline_rows:
            row.cells.update({header: _format_percent(value) for header, value in row.accuracies.items()})
        rows += encoder_rows + baseline_rows

    align = {"dataset": "---", "method": "---", "backbone": "---", "wall time": "---", "command": "---"}
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align.get(h, "---:") for h in headers) + "|"]
    lines += ["| " + " | ".join(_cell(row.cells[h]) for h in headers) + " |" for row in rows]
    lines += ["", _caption(runs, list(datasets), data_labels)]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


def _spread_notes(
    name: str,
    backbone: str,
    dataset: str,
    printers: Sequence[RunRecord],
    accuracies: Callable[[dict[str, Any]], dict[str, float | None]],
) -> list[str]:
    """Notes for the accuracy columns in which the runs of one group printed different values
    for the baseline ``name`` (the table shows the first run's)."""
    if len(printers) < 2:
        return []
    values: dict[str, list[float]] = {}
    for run in printers:
        for header, value in accuracies(run.baselines[name]).items():
            if value is not None:
                values.setdefault(header, []).append(value)
    spread = [f"{header} {min(v):.2f}\u2013{max(v):.2f}" for header, v in values.items() if min(v) != max(v)]
    if not spread:
        return []
    return [
        f"{name} ({dataset}, {backbone}) differs between the {len(printers)} runs that printed it: {', '.join(spread)}."
    ]


#: What the final evaluation (or ``selfsup eval tokenizer``) adds to a tokenizer run's row.
TOKENIZER_METRICS = ("tokenizer_reconstruction", "codebook_usage", "codebook_perplexity", "codebook_size")


def is_tokenizer_run(run: RunRecord) -> bool:
    """Whether the run's own row holds every tokenizer metric."""
    return all(_number(run.encoder.get(key)) is not None for key in TOKENIZER_METRICS)


def tokenizer_table(runs: Iterable[RunRecord]) -> str:
    """A markdown table of tokenizer runs, measured on the test split.

    Columns: method (with the options that differ between runs of a method), reconstruction
    (each method's own objective, 4 decimals), codebook usage (% of codes used at least once),
    perplexity (``exp`` of the entropy of the code histogram), codes, epochs, wall time,
    command; a dataset column first when the runs span more than one dataset. One row per run,
    in the order given; a caption says what the numbers are.

    Raises:
        ReportError: no runs, or a run without the tokenizer metrics (naming the command that
            adds them).
    """
    runs = list(runs)
    if not runs:
        raise ReportError("no runs to report")
    for run in runs:
        if not is_tokenizer_run(run):
            raise ReportError(
                f"{run.path} has no tokenizer metrics in results.json (a tokenizer run gets them from "
                f"`selfsup eval tokenizer {run.path}`; other runs belong in the methods table: --table methods)"
            )
    data_labels = _labels(runs, "data")
    method_labels = _labels(runs, "method")
    data_keys: list[str] = []
    for run in runs:
        if _canonical(run.section("data")) not in data_keys:
            data_keys.append(_canonical(run.section("data")))
    headers = (["dataset"] if len(data_keys) > 1 else []) + ["method", "reconstruction", "codebook usage (%)"]
    headers += ["perplexity", "codes", "epochs", "wall time", "command"]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if h in ("dataset", "method", "wall time", "command") else "---:" for h in headers) + "|",
    ]
    for run in runs:
        metrics = {key: float(run.encoder[key]) for key in TOKENIZER_METRICS}
        cells = {
            "dataset": data_labels[_canonical(run.section("data"))],
            "method": method_labels[_canonical(run.section("method"))] if run.section("method") else run.method,
            "reconstruction": f"{metrics['tokenizer_reconstruction']:.4f}",
            "codebook usage (%)": f"{100 * metrics['codebook_usage']:.1f}",
            "perplexity": f"{metrics['codebook_perplexity']:.1f}",
            "codes": f"{metrics['codebook_size']:.0f}",
            "epochs": _format_epochs(run.epochs),
            "wall time": _wall_time(run),
            "command": MISSING if run.command is None else _code(run.command),
        }
        lines.append("| " + " | ".join(_cell(cells[h]) for h in headers) + " |")
    datasets = ", ".join(data_labels[k] for k in data_keys)
    lines += [
        "",
        f"Tokenizers on the test split of {datasets}. Reconstruction is each method's own objective, so it "
        "compares runs of one method only: vq_tokenizer, the mean squared error between the images decoded "
        "from their tokens and the inputs (normalised pixels); vqkd_tokenizer, the mean over patches of "
        "1 \u2212 cosine between the decoder's output and the frozen teacher's patch features. Codebook "
        "usage: codes used at least once over the split; perplexity: exp(entropy) of the split's code "
        f"histogram (at most the number of codes). Generated by `selfsup report` from {len(runs)} run "
        f"folder{'s' if len(runs) != 1 else ''}.{_measured_on(runs)}",
    ]
    return "\n".join(lines)


def _measured_on(runs: Sequence[RunRecord]) -> str:
    """`` Measured on <CPUs>, torch <versions>.`` from the runs' ``run_info.json`` (or ``""``)."""
    measured = []
    cpus = sorted({str(r.run_info["cpu"]) for r in runs if r.run_info.get("cpu")})
    torches = sorted({str(r.run_info["torch"]) for r in runs if r.run_info.get("torch")})
    if cpus:
        measured.append("; ".join(cpus))
    if torches:
        measured.append("torch " + ", ".join(torches))
    return f" Measured on {', '.join(measured)}." if measured else ""


def _caption(runs: Sequence[RunRecord], data_keys: Sequence[str], data_labels: dict[str, str]) -> str:
    datasets = ", ".join(data_labels[k] for k in data_keys)
    where = _measured_on(runs)
    return (
        f"Top-1 accuracy (%) on the test split of {datasets}; bold: above every baseline row printed for "
        f"the dataset. Feature std and eff. rank (RankMe) are collapse monitors of the encoder's test "
        f"features. Generated by `selfsup report` from {len(runs)} run folder{'s' if len(runs) != 1 else ''}."
        f"{where}"
    )


# ------------------------------------------------------------------------------ markdown
def markers(marker: str) -> tuple[str, str]:
    """The begin and end comments that delimit the generated block named ``marker``."""
    return f"<!-- results:{marker}:begin -->", f"<!-- results:{marker}:end -->"


def update_markdown(path: str | os.PathLike[str], marker: str, table: str) -> bool:
    """Replaces the text between ``<!-- results:<marker>:begin -->`` and
    ``<!-- results:<marker>:end -->`` in the markdown file ``path`` with ``table``; the markers
    stay. The file is rewritten through a temporary file and a rename.

    Returns:
        Whether the file's content changed.

    Raises:
        ReportError: the file is missing, or either marker is missing, repeated or out of order.
    """
    file = Path(path)
    if not file.is_file():
        raise ReportError(f"{str(file)!r} does not exist")
    text = file.read_text()
    begin, end = markers(marker)
    for comment in (begin, end):
        count = text.count(comment)
        if count != 1:
            problem = "is missing" if count == 0 else f"appears {count} times"
            raise ReportError(
                f"{file}: the marker {comment} {problem}; the generated block must sit between "
                f"exactly one {begin} and one {end} line"
            )
    start, stop = text.index(begin) + len(begin), text.index(end)
    if stop < start:
        raise ReportError(f"{file}: {end} comes before {begin}")
    updated = text[:start] + "\n" + table.strip("\n") + "\n" + text[stop:]
    if updated == text:
        return False
    tmp = file.with_name(f".{file.name}.report-tmp")
    tmp.write_text(updated)
    tmp.replace(file)
    return True


# ------------------------------------------------------------------------------ front end
def _run_paths(items: Sequence[str]) -> list[Path]:
    """The run folders among the arguments. Plain files other than ``results.json`` (a
    README.md matched by ``docs/runs/*``) are skipped with a note; duplicates are dropped."""
    paths: list[Path] = []
    seen: set[Path] = set()
    for item in items:
        path = Path(item)
        if path.is_file() and path.name != "results.json":
            print(f"report: skipping {item}: not a run folder", file=sys.stderr)
            continue
        key = (path.parent if path.name == "results.json" else path).resolve()
        if key not in seen:
            seen.add(key)
            paths.append(path)
    return paths


def _cmd_report(args: argparse.Namespace) -> int:
    if (args.update is None) != (args.marker is None):
        print("report: --update and --marker go together", file=sys.stderr)
        return 2
    try:
        runs = [load_run(path) for path in _run_paths(args.runs)]
        tokenizers = args.table == "tokenizers" or (
            args.table == "auto" and bool(runs) and all(map(is_tokenizer_run, runs))
        )
        table = tokenizer_table(runs) if tokenizers else method_table(runs)
        if args.update is None:
            print(table)
            return 0
        changed = update_markdown(args.update, args.marker, table)
    except ReportError as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    state = "updated" if changed else "already up to date"
    print(f"{args.update}: results:{args.marker} {state} ({len(runs)} runs)", file=sys.stderr)
    return 0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``report`` arguments to ``parser`` (``selfsup report``); the parsed arguments
    carry ``func`` returning the exit status."""
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders written by `selfsup pretrain` (plain files such as a README are skipped)",
    )
    parser.add_argument(
        "--update", metavar="FILE", default=None, help="write the table into this markdown file instead of printing it"
    )
    parser.add_argument(
        "--marker",
        metavar="NAME",
        default=None,
        help="with --update: replace the text between <!-- results:NAME:begin --> and <!-- results:NAME:end -->",
    )
    parser.add_argument(
        "--table",
        choices=["auto", "methods", "tokenizers"],
        default="auto",
        help="methods: kNN / linear accuracies with baselines; tokenizers: reconstruction error and codebook use "
        "(auto: tokenizers when every run has those metrics)",
    )
    parser.set_defaults(func=_cmd_report)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m selfsup.report RUN_DIR... [--update FILE --marker NAME]``."""
    parser = argparse.ArgumentParser(
        prog="selfsup report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    configure_parser(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
