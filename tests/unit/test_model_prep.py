"""`tandem model prepare` keeps stdout for the folder's path and, when the model is already
there, says so on stderr in one line."""

from tandem import model_prep


def test_a_prepared_model_is_reported_ready_in_one_stderr_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert model_prep.prepare_default_model(out=tmp_path) == tmp_path
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"[tandem] {model_prep.DEFAULT_MODEL_NAME} is ready: {tmp_path}\n"
