import os
import stat

import pytest

from kefu.shared import models
from kefu.shared.config import KefuSettings, admin_token, load_settings


def test_invalid_setting_exits_with_a_readable_message(monkeypatch, capsys):
    monkeypatch.setenv("KEFU_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit) as exc:
        load_settings(KefuSettings)
    assert exc.value.code == 2
    assert "KEFU_LOG_LEVEL" in capsys.readouterr().err


def test_settings_come_from_kefu_env(monkeypatch):
    monkeypatch.setenv("KEFU_NATS_URL", "nats://a:1, nats://b:2")
    assert load_settings(KefuSettings).nats_servers == ["nats://a:1", "nats://b:2"]


def test_admin_token_is_generated_once_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv("KEFU_ADMIN_TOKEN", raising=False)
    first = admin_token(tmp_path)
    assert len(first) >= 32 and admin_token(tmp_path) == first
    assert stat.S_IMODE(os.stat(tmp_path / "admin-token").st_mode) == 0o600
    monkeypatch.setenv("KEFU_ADMIN_TOKEN", "from-env")
    assert admin_token(tmp_path) == "from-env"


def test_pull_puts_checksummed_models_and_resolve_rejects_tampering(tmp_path, monkeypatch):
    monkeypatch.delenv("KEFU_MODELS_DIR", raising=False)
    directory = models.models_dir(tmp_path)
    manifest = models.pull(directory)
    assert set(manifest) == {models.DEFAULT_LLM.name, models.DEFAULT_EMBED.name}
    llm = models.resolve(models.DEFAULT_LLM, tmp_path)
    assert llm.read_bytes()[:4] == b"GGUF"
    assert (models.resolve(models.DEFAULT_EMBED, tmp_path) / "config.json").exists()
    # A changed file no longer matches its checksum: the service refuses it instead of loading it.
    victim = directory / models.DEFAULT_EMBED.name / "config.json"
    victim.unlink()  # a hard link to the package: replace, never write through it
    victim.write_text("{}")
    with pytest.raises(models.ModelError, match="checksum"):
        models.resolve(models.DEFAULT_EMBED, tmp_path)
    models.pull(directory)  # repairs it
    assert models.resolve(models.DEFAULT_EMBED, tmp_path)


def test_override_must_exist(tmp_path):
    with pytest.raises(models.ModelError, match="does not exist"):
        models.resolve(models.DEFAULT_LLM, tmp_path, str(tmp_path / "nope.gguf"))
    own = tmp_path / "own.gguf"
    own.write_bytes(b"GGUF")
    assert models.resolve(models.DEFAULT_LLM, tmp_path, str(own)) == own


def test_list_and_verify_catch_a_changed_model(tmp_path, monkeypatch):
    monkeypatch.delenv("KEFU_MODELS_DIR", raising=False)
    directory = models.models_dir(tmp_path)
    models.pull(directory)
    (directory / "mine.gguf").write_bytes(b"GGUF" + b"\0" * 16)
    listed = {e.name: e for e in models.inventory(directory)}
    assert listed[models.DEFAULT_LLM.name].kind == "llm" and listed[models.DEFAULT_LLM.name].size > 50 * 2**20
    assert listed["mine.gguf"].source == "local" and not listed["mine.gguf"].sha256
    assert models.verify(directory) == []
    victim = directory / models.DEFAULT_LLM.name
    data = victim.read_bytes()
    victim.unlink()  # a hard link to the package: replace, never write through it
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit
    assert models.verify(directory) == [(models.DEFAULT_LLM.name, "checksum does not match the manifest")]
