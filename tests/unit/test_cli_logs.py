import json
import logging
import sys

from appliance.cli import main
from appliance.logs import JsonFormatter


def test_invalid_config_exits_2_naming_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nport = -1\n")
    assert main(["--config", str(cfg)]) == 2
    assert "server.port" in capsys.readouterr().err


def test_missing_model_file_exits_2(tmp_path, capsys):
    assert main(["serve", "--model", f"x={tmp_path / 'nope.gguf'}"]) == 2
    err = capsys.readouterr().err
    assert "models[0].path" in err and "no such file" in err


def test_non_gguf_model_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF" * 10)
    assert main(["-p", "1", "--model", f"x={bad}"]) == 2
    assert "bad magic" in capsys.readouterr().err


def test_json_log_lines_never_carry_exception_messages():
    secret = "SECRET-PROMPT-TEXT"
    try:
        raise ValueError(secret)
    except ValueError:
        record = logging.getLogger("t").makeRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    out = json.loads(line)
    assert out["exc_type"] == "ValueError" and out["msg"] == "failed"
    assert secret not in line
