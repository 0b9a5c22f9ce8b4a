import pytest

from appliance.settings import ConfigError, Settings, load_settings


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_are_valid():
    s = load_settings()
    assert s.server.host == "127.0.0.1" and s.server.port == 3000
    assert s.models == []


def test_flags_override_file(tmp_path):
    p = write(tmp_path, '[server]\nport = 4000\nhost = "0.0.0.0"\n[auth]\nopen_inference = true\n')
    s = load_settings(p, port=5000)
    assert s.server.port == 5000 and s.server.host == "0.0.0.0"


def test_models_from_file_and_flags_merge_with_defaults(tmp_path):
    p = write(tmp_path, '[model_defaults]\nparallel = 2\n[[models]]\nname = "a"\npath = "/a.gguf"\nparallel = 3\n')
    s = load_settings(p, models=[("b", "/b.gguf")])
    assert [(m.name, m.parallel) for m in s.models] == [("a", 3), ("b", 2)]


@pytest.mark.parametrize(
    "text, key",
    [
        ('[server]\nport = "x"\n', "server.port"),
        ("[server]\nport = 70000\n", "server.port"),
        ('[[models]]\nname = "a"\npath = "/a"\nparallel = 0\n', "models[0].parallel"),
        ('[[models]]\nname = "a"\n', "models[0].path"),
        ("[limits]\nmax_tokens = 10\ndefault_max_tokens = 20\n", "limits"),
        ("[serverr]\nport = 1\n", "serverr"),
        ('[[models]]\nname="a"\npath="/a"\n[[models]]\nname="a"\npath="/b"\n', "models"),
    ],
)
def test_invalid_config_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, text))
    assert str(e.value).startswith(key), str(e.value)


def test_off_loopback_without_keys_is_refused_unless_opened(tmp_path):
    with pytest.raises(ConfigError, match="off loopback"):
        load_settings(host="0.0.0.0")
    assert load_settings(write(tmp_path, "[auth]\nopen_inference = true\n"), host="0.0.0.0").auth.open_inference
    key = "[[auth.api_keys]]\nname = 'a'\nsha256 = '" + "0" * 64 + "'\n"
    assert load_settings(write(tmp_path, key), host="10.1.2.3").auth.keys_configured


@pytest.mark.parametrize(
    "text, key",
    [
        ("[[auth.api_keys]]\nname = 'a'\nsha256 = 'xyz'\n", "auth.api_keys[0].sha256"),
        ("[[auth.client_keys]]\nkeyid = 'c'\npublic_key = 'AAAA'\n", "auth.client_keys[0].public_key"),
        ("[auth]\nrequire_signed_requests = true\n", "auth"),
        ("[[auth.api_keys]]\nname = 'a'\nsha256 = '" + "0" * 64 + "'\nscopes = ['root']\n", "auth.api_keys[0].scopes"),
    ],
)
def test_invalid_auth_config_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, text))
    assert str(e.value).startswith(key), str(e.value)


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[server\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "missing.toml")


def test_runtime_model_settings_take_defaults():
    s = Settings.model_validate({"model_defaults": {"n_ctx": 1024}})
    m = s.model_settings("x", "/x.gguf", parallel=8)
    assert (m.n_ctx, m.parallel, m.name) == (1024, 8, "x")


def test_cpu_backend_auto_or_a_build_that_exists(tmp_path):
    from appliance.settings import cpu_backends

    builds = cpu_backends()
    assert "haswell" in builds and len(builds) > 1, builds  # the wheel has runtime CPU dispatch
    assert Settings().server.cpu_backend == "auto"
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\ncpu_backend = "haswell"\n')
    assert load_settings(cfg).server.cpu_backend == "haswell"
    for bad in ('"pentium4"', '"../../evil"', '"Haswell"', "1"):
        cfg.write_text(f"[server]\ncpu_backend = {bad}\n")
        with pytest.raises(ConfigError, match="server.cpu_backend"):
            load_settings(cfg)
