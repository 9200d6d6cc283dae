"""`dq quantize` and `dq recipes` from the command line: atomic output, no silent overwrite."""

import pytest

from dq.cli import main
from tiny_pipelines import build


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli") / "pixart-fp"
    build("pixart")[0].save_pretrained(directory)
    return directory


def test_recipes_lists_each_with_description(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("w8a8", "w4a16", "w4a8", "w4a4"):
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert len(line.split(maxsplit=1)[1]) > 10


def test_quantize_writes_a_loadable_pipeline(fp_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(fp_dir), "--recipe", "w4a16", "--out", str(out)]) == 0
    assert "layers quantized" in capsys.readouterr().out
    config = (out / "transformer" / "config.json").read_text()
    assert '"quant_method": "dq"' in config
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directory left behind"


def test_quantize_refuses_existing_output(fp_dir, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["quantize", str(fp_dir), "--recipe", "w4a16", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_interrupted_stream_leaves_no_output_and_resumes(fp_dir, tmp_path, monkeypatch):
    from dq.pipelines.streaming import ShardWriter

    real = ShardWriter.finish

    def crash(self):
        (self.directory / "partial.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "finish", crash)
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        main(["quantize", str(fp_dir), "--recipe", "w4a16", "--out", str(out)])
    assert [p.name for p in tmp_path.iterdir()] == ["q.dq-partial"]  # the resumable state, not an output
    monkeypatch.setattr(ShardWriter, "finish", real)
    assert main(["quantize", str(fp_dir), "--recipe", "w4a16", "--out", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_interrupted_in_memory_save_leaves_nothing(fp_dir, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    def crash(self, directory, *args, **kwargs):
        (directory / "partial.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", crash)
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        main(["quantize", "ref-sd", "--recipe", "w4a16", "--out", str(out)])
    assert list(tmp_path.iterdir()) == []


def test_missing_model_path_is_a_clear_error(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "nope"), "--recipe", "w8a8", "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


def test_calibrated_recipe_on_a_pipeline_directory_runs_block_by_block(tmp_path, capsys):
    from dq import reference

    out = tmp_path / "q"
    args = ["quantize", str(reference.path("ref-pixart")), "--recipe", "w4a8-timestep", "--out", str(out),
            "--calib-samples", "2", "--calib-steps", "4", "--max-memory", "0"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "block transformer_blocks.0:" in printed and "capture:" in printed and "peak RSS" in printed
    assert '"quant_method": "dq"' in (out / "transformer" / "config.json").read_text()
    assert (out / "text_encoder").is_dir() and not (tmp_path / "q.dq-partial").exists()
