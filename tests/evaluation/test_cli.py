"""`dq eval` / `dq demo` / `dq bench` from the command line: bad input fails before generation, with the flag to fix."""

from __future__ import annotations

import json

import pytest

from dq.cli import main
from dq.commands import bench, demo
from dq.evaluation import generation


@pytest.fixture
def no_generation(monkeypatch):
    """Fail the test if any variant pipeline is built (i.e. generation starts)."""

    def refuse(self, variant):
        raise AssertionError(f"generation started for {variant.name}")

    monkeypatch.setattr(generation.VariantBuilder, "build", refuse)


def _eval(capsys, *argv: str) -> tuple[int, str]:
    code = main(["eval", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--prompts": "EMPTY"}, "has no prompts"),
        ({"--prompts": "missing.txt"}, "missing.txt' does not exist"),
        ({"--variants": "fp,w3a3"}, "w3a3"),
        ({"--variants": "fp,w8a8+nocache"}, "nocache"),
        ({"--metrics": "psnr,sharpness"}, "unknown metric(s) sharpness"),
        ({"--model": "no/such/dir"}, "no/such/dir"),
        ({"--metrics": "fid"}, "--fid-weights PATH"),
        ({"--metrics": "lpips"}, "--lpips-weights PATH"),
        ({"--metrics": "clip"}, "--clip-model"),
        ({"--fid-weights": "nowhere.pth", "--metrics": None}, "--fid-weights nowhere.pth: no such file"),
    ],
)
def test_bad_input_fails_before_generation(tiny_sd, prompt_file, tmp_path, capsys, no_generation, change, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    args = {"--model": str(tiny_sd), "--variants": "fp,w8a8", "--prompts": str(prompt_file), "--n": "2",
            "--steps": "2", "--out": str(tmp_path / "run"), "--metrics": "psnr"}
    args.update({k: (str(empty) if v == "EMPTY" else str(tmp_path / v) if v == "missing.txt" else v) for k, v in change.items()})
    args = {k: v for k, v in args.items() if v is not None}  # None: leave the flag out (default metrics)
    code, err = _eval(capsys, *[x for kv in args.items() for x in kv])
    assert code == 2 and err.startswith("dq: error:")
    assert message in err
    assert not (tmp_path / "run" / "images").exists()


def test_eval_cli_prints_the_report_table(tiny_sd, prompt_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["eval", "--model", str(tiny_sd), "--variants", "w8a8", "--prompts", str(prompt_file), "--n", "2",
                 "--steps", "2", "--metrics", "psnr,ssim", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "| `w8a8` |" in printed and "| `fp` |" in printed
    assert json.loads((out / "config.json").read_text())["generation"]["steps"] == 2


def test_demo_picks_the_first_registered_recipe_of_each_precision(monkeypatch):
    import dq.recipes

    monkeypatch.setattr(dq.recipes, "bundled_recipe_names", lambda: ["w4a4", "w4a8-tfmq", "w4a8", "w8a8", "w8a8-ptq4dm"])
    assert demo.demo_variants() == ["fp", "w8a8", "w4a8-tfmq", "w4a4"]
    monkeypatch.setattr(dq.recipes, "bundled_recipe_names", lambda: ["svdquant-w4a4", "w4a4"])
    assert demo.demo_variants() == ["fp", "svdquant-w4a4"]


def test_demo_runs_the_loop_on_a_given_model(tiny_sd, tmp_path, capsys):
    code = main(["demo", "--model", str(tiny_sd), "--variants", "fp,w8a8", "--n", "2", "--steps", "2",
                 "--metrics", "psnr", "--out", str(tmp_path / "demo")])
    printed = capsys.readouterr().out
    assert code == 0 and "dq demo:" in printed and "| `w8a8` |" in printed
    assert (tmp_path / "demo" / "grid.png").is_file()


def test_bench_runs_the_repository_script_or_explains_why_not(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: tmp_path)
    assert main(["bench", "kernels"]) == 2
    assert "benchmarks ship with the source repository" in capsys.readouterr().err

    (tmp_path / "pipeline.py").write_text("def main(argv):\n    print('bench argv', argv)\n    return 0\n")
    assert main(["bench", "pipeline", "ref-sd", "--recipes", "w8a8"]) == 0
    assert "bench argv ['ref-sd', '--recipes', 'w8a8']" in capsys.readouterr().out
