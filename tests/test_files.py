from gptsmith.files import write_dir


def test_write_dir_swaps_model_files_and_keeps_what_lives_beside_them(tmp_path):
    out = tmp_path / "model"

    def save(shards):
        def write(tmp):
            tmp.mkdir()
            for name in shards:
                (tmp / name).write_text("new")
            (tmp / "config.json").write_text("{}")
        return write

    write_dir(out, save(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]))
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "state.pt").write_text("resume me")
    (out / "loss.png").write_text("png")
    write_dir(out, save(["model.safetensors"]))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "loss.png", "model.safetensors"]
    assert (out / "checkpoints" / "state.pt").read_text() == "resume me"
    assert not list(tmp_path.glob(".model.tmp-*"))
