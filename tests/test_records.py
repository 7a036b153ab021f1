"""Output folders checked before any work, records that are never half-written, one loader for every folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, load
from conftest import hcc_cli as cli

import hcc.batch
import hcc.cli
import hcc.compare
import hcc.field
import hcc.spectrum
from hcc.checkpoint import Checkpoint
from hcc.records import SCHEMA_VERSION, HistoryStream, atomic_write, read_csv_rows, read_record, write_text
from hcc.registry import OptionError
from hcc.run import Result, load_results, run

QUICK = {
    "solve": ("solve", "bilinear", "-s", "eg", "--steps", "3", "-q"),
    "seeds": ("solve", "bilinear", "-s", "eg", "--seeds", "2", "--steps", "3", "-q"),
    "compare": ("compare", "bilinear", "--solvers", "eg", "--seeds", "1", "--steps", "3", "--no-pdf", "-q"),
    "sweep": ("sweep", "bilinear", "-s", "eg", "--lr", "0.1", "--seeds", "2", "--steps", "3", "-q"),
    "spectrum": ("spectrum", "bilinear", "-s", "gda"),
    "field": ("field", "bilinear", "--solvers", "eg", "--steps", "5"),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One finished folder of every kind, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("made")
    for kind, args in QUICK.items():
        assert cli(*args, "-o", root / kind).exit_code == 0, kind
    return {kind: root / kind for kind in QUICK}


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command reaches its work (a run, a batch, a spectrum, a portrait)."""
    def boom(*a, **k):
        raise AssertionError("the work started before the output folder was checked")

    for mod, name in [(hcc.cli, "run"), (hcc.batch, "_run_chunk"), (hcc.compare, "run"),
                      (hcc.spectrum, "spectrum"), (hcc.field, "field_portrait")]:
        monkeypatch.setattr(mod, name, boom)


# -- outputs checked first ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(QUICK))
def test_an_out_under_a_file_is_refused_before_any_work(kind: str, tmp_path: Path, no_work: None) -> None:
    (tmp_path / "some_file").write_text("x")
    assert_one_line_error(cli(*QUICK[kind], "-o", tmp_path / "some_file" / "sub"), "--out", "some_file",
                          "Not a directory")


@pytest.mark.parametrize("kind", ["solve", "compare", "spectrum"])
def test_an_empty_out_is_refused(kind: str, no_work: None) -> None:
    assert_one_line_error(cli(*QUICK[kind], "-o", ""), "--out", "expected a folder path")


def test_a_read_only_working_folder_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 no_work: None) -> None:
    """The default folder runs/… cannot be created (read-only cwd; simulated, so that it also holds as root)."""
    mkdir = Path.mkdir

    def read_only(self: Path, *a, **k) -> None:
        if tmp_path in self.absolute().parents:
            raise PermissionError(13, "Permission denied", str(self))
        return mkdir(self, *a, **k)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Path, "mkdir", read_only)
    for kind in ("solve", "compare", "sweep", "spectrum"):
        assert_one_line_error(cli(*QUICK[kind]), "--out", "runs/", "Permission denied", "pass --out")


@pytest.mark.parametrize("kind", ["solve", "compare", "field"])
def test_an_earlier_run_is_kept_unless_overwrite(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli(*QUICK[kind], "-o", out).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    assert_one_line_error(cli(*QUICK[kind], "-o", out), "--out", "new or empty", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == before
    stale = out / "samples.png"  # left by an earlier run of another game
    stale.write_bytes(b"old")
    assert cli(*QUICK[kind], "-o", out, "--overwrite").exit_code == 0
    assert not stale.exists() and sorted(p.name for p in out.iterdir()) == before


def test_overwrite_refuses_a_folder_hcc_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert_one_line_error(cli(*QUICK["solve"], "-o", tmp_path, "--overwrite"), "--overwrite", "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert_one_line_error(cli(*QUICK["solve"], "-o", tmp_path, "--overwrite", "--resume"), "got both")


def test_resume_of_a_finished_run_and_of_another_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli(*QUICK["solve"], "-o", out).exit_code == 0
    res = cli(*QUICK["solve"], "-o", out, "--resume")
    assert res.exit_code == 0 and "already finished" in res.stdout
    assert_one_line_error(cli(*QUICK["solve"], "--lr", "0.2", "-o", out, "--resume"), "--resume", "lr")
    assert_one_line_error(cli(*QUICK["compare"], "-o", out, "--resume"), "--resume", "solve run")
    fresh = tmp_path / "fresh"  # --resume on a new folder starts the run
    assert cli(*QUICK["solve"], "-o", fresh, "--resume").exit_code == 0 and load(fresh)["status"] == "max_steps"


# -- records never half-written ----------------------------------------------------------------------------


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    path = write_text(tmp_path / "result.json", "old")

    def half(tmp: Path) -> None:
        tmp.write_text("half a rec")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_compare_that_fails_while_saving_lists_no_missing_file(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """compare.json is written last: a failure while writing the PDF leaves no record claiming it."""
    real = hcc.compare.save_figure

    def no_pdf(fig, path, **kw):
        if Path(path).suffix == ".pdf":
            raise OSError(28, "No space left on device")
        return real(fig, path, **kw)

    monkeypatch.setattr(hcc.compare, "save_figure", no_pdf)
    res = cli("compare", "bilinear", "--solvers", "eg", "--seeds", "1", "--steps", "3", "-q", "-o", tmp_path)
    assert res.exit_code != 0 and (tmp_path / "compare.png").is_file()
    assert not (tmp_path / "compare.json").exists() and not (tmp_path / "compare.pdf").exists()


def test_history_is_streamed_while_the_run_goes(tmp_path: Path) -> None:
    seen = []

    def look(step: int, row: dict) -> None:  # the file, read while the run is at `step`
        seen.append((step, [r["step"] for r in read_csv_rows(tmp_path / "history.csv")]))

    res = run("rps", "eg", steps=6, log_every=2, tol=1e-30, history_csv=tmp_path / "history.csv",
                      progress=look, game_options={"width": 4})
    assert seen == [(t, list(range(0, t + 1, 2))) for t in (2, 4, 6)]
    assert read_csv_rows(tmp_path / "history.csv") == [{k: v for k, v in r.items()} for r in res.history]


def test_history_stream_rewrites_when_a_column_appears(tmp_path: Path) -> None:
    s = HistoryStream(tmp_path / "h.csv")
    s.append({"step": 0, "V": 1.0})
    s.append({"step": 1, "V": 0.5, "cg_iters": 3.0})
    s.append({"step": 2, "V": float("nan"), "cg_iters": 4.0})
    (tmp_path / "h.csv").open("a").write("3,0.1")  # a process killed mid-line
    s.close()
    assert read_csv_rows(tmp_path / "h.csv") == [{"step": 0.0, "V": 1.0}, {"step": 1.0, "V": 0.5, "cg_iters": 3.0},
                                                 {"step": 2.0, "cg_iters": 4.0}]


@pytest.mark.parametrize("kind", ["solve", "seeds", "compare", "sweep", "spectrum"])
def test_every_json_record_carries_its_schema(kind: str, made: dict[str, Path]) -> None:
    files = list(made[kind].rglob("*.json"))
    assert len(files) >= (1 if kind == "spectrum" else 2)  # the record and .checkpoint/run.json
    for p in files:
        data = json.loads(p.read_text())
        assert data["schema_version"] == SCHEMA_VERSION and data["kind"], p
    assert read_record(made[kind]).kind == kind and read_record(made[kind]).finished


def test_payoff_contents_are_recorded(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    digests = []
    for text in ("1,-1\n-1,1\n", "2,-1\n-1,1\n"):  # the same path, edited
        path.write_text(text)
        out = tmp_path / f"run{len(digests)}"
        assert cli("solve", "matrix", "-s", "eg", "--payoff", path, "--steps", "2", "-q", "-o", out).exit_code == 0
        info = load(out)["game_info"]
        assert info["payoff_matrix"] == [[float(x) for x in r.split(",")] for r in text.split()]
        digests.append(info["payoff_sha256"])
    assert digests[0] != digests[1]


def test_resolved_defaults_are_recorded() -> None:
    res = run("rps", "eg", steps=2)
    assert res.settings == {"steps": 2, "log_every": 1, "stop_at_tol": True,
                            "guard": {"diverge_at": 1e12, "stall_window": 20, "stall_rtol": 1e-10}}


# -- one loader ------------------------------------------------------------------------------------------------


def test_one_loader_reads_every_folder_kind(made: dict[str, Path], tmp_path: Path) -> None:
    assert [len(load_results(made[k])) for k in ("solve", "seeds", "compare", "sweep")] == [1, 2, 1, 2]
    assert Result.load(made["solve"]).status == "max_steps"
    assert Result.load(made["compare"] / "runs" / "eg-seed0").steps_run == 3
    with pytest.raises(OptionError, match="seeds folder holding 2 runs; read it with hcc.load_results"):
        Result.load(made["seeds"])
    res = cli("plot", made["solve"], made["seeds"], made["compare"], "-o", tmp_path / "p.svg")
    assert res.exit_code == 0, res.output
    assert_one_line_error(cli("plot", made["sweep"], "-o", tmp_path / "p.png"), "sweep folder")
    assert_one_line_error(cli("plot", made["spectrum"], "-o", tmp_path / "p.png"), "spectrum folder")
    with pytest.raises(OptionError, match="no runs"):
        load_results(made["spectrum"])


def test_legacy_records_without_schema_are_read(made: dict[str, Path], tmp_path: Path) -> None:
    data = load(made["solve"])
    del data["schema_version"], data["kind"]
    (tmp_path / "result.json").write_text(json.dumps(data))
    assert Result.load(tmp_path).history == Result.load(made["solve"]).history


@pytest.mark.parametrize("content, needle", [
    (None, "truncated"), (b"", "empty file"), (b"\xff\xfe\x00binary", "binary"), (b"[1, 2]", "JSON list"),
    (b'{"a": 1}', "keys a"), (b'{"schema_version": 99, "kind": "solve"}', "schema version"),
    (b'{"schema_version": 1, "kind": "solve", "game": "rps"}', "without 'solver'"),
])
def test_bad_records_are_one_line_errors(content: bytes | None, needle: str, made: dict[str, Path],
                                        tmp_path: Path) -> None:
    good = made["solve"]
    bad = tmp_path / "bad"
    bad.mkdir()
    text = (good / "result.json").read_bytes()
    (bad / "result.json").write_bytes(text[: len(text) // 2] if content is None else content)
    assert_one_line_error(cli("plot", bad, "-o", tmp_path / "x.png"), "result.json", needle)
    with pytest.raises(OptionError, match=needle):
        Result.load(bad)


def test_plot_rejects_an_unknown_image_format(made: dict[str, Path], tmp_path: Path) -> None:
    assert_one_line_error(cli("plot", made["solve"], "-o", tmp_path / "x.xyz"), "--out", ".png", "x.xyz")
    assert not (tmp_path / "x.xyz").exists()


def test_an_interrupted_compare_says_what_it_is(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path)
    ckpt.write_spec("compare", {"game": "rps"})
    assert_one_line_error(cli("plot", tmp_path, "-o", tmp_path / "x.png"), "unfinished hcc compare",
                          f"hcc resume {tmp_path}")
    torch.save({"schema_version": SCHEMA_VERSION, "state": {}}, tmp_path / ".checkpoint" / "state.pt")
    assert read_record(tmp_path).finished is False
