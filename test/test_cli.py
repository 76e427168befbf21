"""Every command answers bad input the same way: one `error: ...` line naming what is wrong, no traceback, exit
code 2 returned by its main(); argparse's own errors exit 2 as well."""
import pytest
from bench_runs import bench_main

import data
import evaluate
import export
import retrieve
import train
import visualize


def commands(missing, out):
    """(name, main, argv) of each command with a path that does not exist."""
    return [
        ("data.py check", data.main, ["check", missing, "--dataset", "market1501"]),
        ("evaluate.py baseline", evaluate.main, ["baseline", missing]),
        ("evaluate.py", evaluate.main, ["--MODEL.PRETRAIN_PATH", missing, "--DATASETS.ROOT_DIR", missing]),
        ("train.py", train.main, ["--DATASETS.ROOT_DIR", missing, "--OUTPUT_DIR", out, "--MODEL.DEVICE", "cpu"]),
        ("retrieve.py index", retrieve.main, ["index", missing, "-o", out]),
        ("export.py", export.main, [missing, out, "--no-check"]),
        ("visualize.py curves", visualize.main, ["curves", missing]),
        ("bench.py", bench_main, ["--device", "tpu"]),
    ]


NAMES = [name for name, _, _ in commands("", "")]


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_one_error_line_and_exit_code_2(name, tmp_path, capsys):
    _, main, argv = commands(str(tmp_path / "nowhere"), str(tmp_path / "out"))[NAMES.index(name)]
    assert main(argv) == 2, name
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
    assert "nowhere" in lines[0] or "tpu" in lines[0], (name, err)  # it names what the user gave


def test_argparse_errors_exit_2_too(capsys):
    with pytest.raises(SystemExit) as stop:
        retrieve.main(["embed"])
    assert stop.value.code == 2 and "usage:" in capsys.readouterr().err
