"""deploy/: the compose stack, Prometheus, the Grafana dashboard and the Kubernetes manifests, checked
without a container engine or a cluster (no sockets): Kubernetes objects against the API's JSON schemas
(kubernetes-validate, offline, strict), configurations with the appliance's own loader, Prometheus's
with promtool, the rendered manifests against a fresh `kubectl kustomize`, and the cross-references
between the files (paths, ports, names, digests) that nothing else would catch."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as k8s_schema

from appliance.cli import build_parser
from appliance.settings import ConfigError, Settings, load_settings
from appliance.trust.auth import METRICS_ROUTES, PUBLIC_ROUTES
from appliance.web.app import ROUTES
from attestation.measurements import model_event, replay
from tests.dashboard_metrics import DASHBOARD, DATASOURCE_UID, dashboard_metric_names, panels

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "confidential"
RENDERED = K8S / "rendered"
# The digest scripts/real-model.sh checks the fetched model against: the one every deploy config pins.
_GEMMA = re.search(r"^GEMMA_SHA256=([0-9a-f]{64})$", (ROOT / "scripts" / "real-model.sh").read_text(), re.M)
GEMMA_SHA256 = _GEMMA[1] if _GEMMA else "scripts/real-model.sh has no GEMMA_SHA256"

# The oldest release the manifests use features of (preStop `sleep`: 1.30) and the newest the schemas cover.
K8S_VERSIONS = ["1.30", k8s_schema.latest_version()]

# The families the design names for the dashboard (the lead's list for appliance/metrics.py).
DESIGNED_METRICS = {
    "appliance_requests_total", "appliance_request_errors_total", "appliance_request_duration_seconds",
    "appliance_time_to_first_token_seconds", "appliance_inter_token_latency_seconds",
    "appliance_request_queue_time_seconds", "appliance_e2e_request_latency_seconds",
    "appliance_prompt_tokens_total", "appliance_prompt_tokens_cached_total", "appliance_generation_tokens_total",
    "appliance_queue_depth", "appliance_busy_slots", "appliance_slots", "appliance_models_loaded",
    "appliance_worker_restarts_total", "appliance_worker_restarts_by_cause_total",
    "appliance_attestation_requests_total",
}


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def yaml_doc(path: Path) -> dict[str, Any]:
    (doc,) = yaml_docs(path)
    return doc


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything here is offline: a schema fetched over the network would fail the test, not pass it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a deploy manifest check tried to open a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------------------------------------
# Kubernetes: schemas


def k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in [*sorted(BASE.glob("*.yaml")), *sorted(RENDERED.glob("*.yaml"))]:
        if path.name == "kustomization.yaml":
            continue
        for i, doc in enumerate(yaml_docs(path)):
            out.append((f"{path.relative_to(K8S)}[{i}] {doc['kind']}/{doc['metadata']['name']}", doc))
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("where", "doc"), k8s_objects(), ids=[w for w, _ in k8s_objects()])
def test_kubernetes_objects_match_the_api_schemas(where: str, doc: dict[str, Any], version: str) -> None:
    # strict: an unknown field (a typo the API server would drop with a warning) fails too
    k8s_schema.validate(doc, version, strict=True)


def test_the_schemas_reject_what_the_api_server_would() -> None:
    """The validator is not a rubber stamp: a misspelt field and a wrong type are caught."""
    deployment = yaml_doc(BASE / "deployment.yaml")
    deployment["spec"]["template"]["spec"]["runtimeClassNam"] = "kata-qemu-tdx"
    with pytest.raises(k8s_schema.ValidationError, match="runtimeClassNam"):
        k8s_schema.validate(deployment, K8S_VERSIONS[-1], strict=True)
    deployment = yaml_doc(BASE / "deployment.yaml")
    deployment["spec"]["replicas"] = "3"
    with pytest.raises(k8s_schema.ValidationError):
        k8s_schema.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlay_patch_fields_match_the_schema(version: str) -> None:
    """A strategic-merge patch is a partial object: every field it sets must exist with the right type
    (strict), only the `required` rule does not apply to it."""
    kustomization = yaml_doc(OVERLAY / "kustomization.yaml")
    assert kustomization["patches"], "the overlay patches nothing"
    for patch in kustomization["patches"]:
        doc = yaml_doc(OVERLAY / patch["path"])
        schema_version = [v for v in k8s_schema.all_versions() if k8s_schema.major_minor(v) <= version][-1]
        errors = _schema_errors(doc, schema_version)
        assert [e for e in errors if e.validator != "required"] == []


def _schema_errors(doc: dict[str, Any], version: str) -> list[Any]:
    import jsonschema
    from referencing import Registry, Resource

    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = k8s_schema.schema_contents(f"{folder}/{doc['kind'].lower()}-{api}.json", version)
    definitions = k8s_schema.schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return list(jsonschema.Draft202012Validator(schema, registry=registry).iter_errors(doc))


# ---------------------------------------------------------------------------------------------
# Kubernetes: kustomize layout and the rendered output


@pytest.mark.parametrize("folder", [BASE, OVERLAY], ids=["base", "confidential"])
def test_kustomization_references_files_that_exist(folder: Path) -> None:
    k = yaml_doc(folder / "kustomization.yaml")
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    referenced = [*k.get("resources", []), *(p["path"] for p in k.get("patches", []))]
    referenced += [f for g in k.get("configMapGenerator", []) + k.get("secretGenerator", []) for f in g.get("files", [])]
    assert referenced
    for ref in referenced:
        assert (folder / ref).exists(), f"{folder.name}/kustomization.yaml names {ref}, which does not exist"
    # the example Secret is documentation: applying the base must never create a Secret
    assert "secret.example.yaml" not in k.get("resources", [])
    assert not k.get("secretGenerator")


@pytest.mark.parametrize("name", ["base", "confidential"])
def test_rendered_manifests_are_a_fresh_render(name: str) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (which carries kustomize) is not installed: `apt-get install kubectl`, or run "
                    "`python deploy/k8s/render.py --check` where it is")
    sys.path.insert(0, str(K8S))
    try:
        import render  # deploy/k8s/render.py
    finally:
        sys.path.remove(str(K8S))
    assert (RENDERED / f"{name}.yaml").read_text() == render.render(name), (
        f"deploy/k8s/rendered/{name}.yaml is stale: run `python deploy/k8s/render.py`")


def rendered(name: str) -> list[dict[str, Any]]:
    return yaml_docs(RENDERED / f"{name}.yaml")


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(spec: dict[str, Any], name: str = "appliance") -> dict[str, Any]:
    (c,) = [c for c in spec["containers"] if c["name"] == name]
    return c


def mounted(spec: dict[str, Any], c: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mounted at `path` in container `c` (with the mount's readOnly)."""
    (m,) = [m for m in c["volumeMounts"] if m["mountPath"] == path]
    (v,) = [v for v in spec["volumes"] if v["name"] == m["name"]]
    return {**v, "readOnly": m.get("readOnly", False)}


@pytest.mark.parametrize("name", ["base", "confidential"])
def test_rendered_deployment_is_hardened_and_wired(name: str) -> None:
    docs = rendered(name)
    deployment = by_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    spec = pod_spec(docs)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 65532
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], c["name"]
        assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]

    app = container(spec)
    assert app["image"] == "appliance:cpu"
    args = app["args"]
    config_path = args[args.index("--config") + 1]
    config_dir = mounted(spec, app, str(Path(config_path).parent))
    assert config_dir["readOnly"] and config_dir["emptyDir"]["medium"] == "Memory"

    # /tmp: memory-backed (the unpacked binary lives in guest memory, not on the host's disk)
    tmp = mounted(spec, app, "/tmp")
    assert tmp["emptyDir"]["medium"] == "Memory" and tmp["emptyDir"]["sizeLimit"]
    assert {"name": "TMPDIR", "value": "/tmp"} in app["env"]

    # the probes ask the routes that exist and need no credentials (the kubelet has none)
    routes = {path for path, _, _ in ROUTES}
    assert app["readinessProbe"]["httpGet"]["path"] == "/readiness"
    assert app["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        path = app[probe]["httpGet"]["path"]
        assert path in routes and path in PUBLIC_ROUTES, (probe, path)
    assert "/metrics" in METRICS_ROUTES  # hence the Bearer token Prometheus needs (deploy/README.md)

    # the configuration the init container assembles matches the pod it runs in
    settings = assembled_settings(name)
    (port,) = [p["containerPort"] for p in app["ports"] if p["name"] == "http"]
    assert settings.server.port == port
    assert by_kind(docs, "Service")["spec"]["ports"][0]["targetPort"] == "http"
    models = mounted(spec, app, "/models")
    assert models["readOnly"] and models["persistentVolumeClaim"]["readOnly"] is True
    for m in settings.models:
        assert m.path.is_relative_to("/models"), m.path
        assert m.sha256 is not None, f"model {m.name} is not pinned by sha256"
    assert app["resources"]["limits"]["cpu"] == app["resources"]["requests"]["cpu"]
    assert settings.model_defaults.n_threads == int(app["resources"]["limits"]["cpu"])

    # the Secret: referenced by the name and key the example documents, never rendered
    assert not [d for d in docs if d["kind"] == "Secret"]
    example = yaml_doc(BASE / "secret.example.yaml")
    (init,) = spec["initContainers"]
    keys = mounted(spec, init, "/keys")
    assert keys["secret"]["secretName"] == example["metadata"]["name"]
    assert [i["key"] for i in keys["secret"]["items"]] == list(example["stringData"])

    pdb = by_kind(docs, "PodDisruptionBudget")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert by_kind(docs, "Service")["spec"]["selector"] == selector


def test_confidential_overlay_runs_in_a_tee_and_requires_its_evidence() -> None:
    base, conf = pod_spec(rendered("base")), pod_spec(rendered("confidential"))
    assert "runtimeClassName" not in base
    assert conf["runtimeClassName"] == "kata-qemu-tdx"
    assert assembled_settings("base").attestation.provider == "auto"
    assert assembled_settings("confidential").attestation.provider == "configfs-tsm"
    # everything else is the base: the overlay changes the runtime class and the provider only
    b, c = assembled_settings("base").model_dump(), assembled_settings("confidential").model_dump()
    b["attestation"].pop("provider")
    c["attestation"].pop("provider")
    assert b == c
    conf.pop("runtimeClassName")
    for spec in (base, conf):  # the ConfigMap name carries a content hash
        for v in spec["volumes"]:
            if "configMap" in v:
                v["configMap"]["name"] = "appliance-config"
    assert base == conf


# ---------------------------------------------------------------------------------------------
# The appliance's configurations, with its own loader


def rendered_config_text(name: str) -> str:
    text: str = by_kind(rendered(name), "ConfigMap")["data"]["appliance.toml"]
    return text


def assemble(workdir: Path, config_text: str, auth_text: str) -> Path:
    """Run the init container's own command (deploy/k8s/base/deployment.yaml) with /bin/sh, its three
    paths moved under `workdir`: the file the appliance will read."""
    spec = pod_spec(rendered("base"))
    (init,) = spec["initContainers"]
    assert init["command"][:2] == ["sh", "-ec"]
    script = init["command"][2]
    for sub in ("config", "keys", "etc/appliance"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "appliance.toml").write_text(config_text)
    (workdir / "keys" / "auth.toml").write_text(auth_text)
    for path, sub in (("/etc/appliance/", "etc/appliance/"), ("/config/", "config/"), ("/keys/", "keys/")):
        assert path in script
        script = script.replace(path, f"{workdir}/{sub}")
    subprocess.run(["/bin/sh", "-ec", script], check=True, timeout=30)
    return workdir / "etc" / "appliance" / "appliance.toml"


def example_auth() -> str:
    text: str = yaml_doc(BASE / "secret.example.yaml")["stringData"]["auth.toml"]
    return text


_ASSEMBLED: dict[str, Settings] = {}


def assembled_settings(name: str) -> Settings:
    if name not in _ASSEMBLED:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            _ASSEMBLED[name] = load_settings(assemble(Path(d), rendered_config_text(name), example_auth()))
    return _ASSEMBLED[name]


@pytest.mark.parametrize("name,source", [("base", BASE), ("confidential", OVERLAY)])
def test_kubernetes_configuration_is_accepted_once_the_keys_are_appended(name: str, source: Path, tmp_path: Path) -> None:
    assert rendered_config_text(name) == (source / "appliance.toml").read_text()
    settings = load_settings(assemble(tmp_path, rendered_config_text(name), example_auth()))
    assert [k.name for k in settings.auth.api_keys] == ["client", "prometheus"]
    assert {k.name: k.scopes for k in settings.auth.api_keys} == {"client": ["inference"], "prometheus": ["metrics"]}
    assert not settings.server.loopback
    assert [(m.name, m.sha256) for m in settings.models] == [("gemma3-270m", GEMMA_SHA256)]


def test_kubernetes_configuration_alone_is_refused_off_loopback(tmp_path: Path) -> None:
    """Why the Secret is not optional: without keys, bound to 0.0.0.0, the appliance does not start."""
    cfg = tmp_path / "appliance.toml"
    cfg.write_text((BASE / "appliance.toml").read_text())
    with pytest.raises(ConfigError, match="auth: bound to 0.0.0.0, off loopback, with no keys"):
        load_settings(cfg)


def test_the_example_secret_holds_digests_no_key_hashes_to() -> None:
    for key in tomllib.loads(example_auth())["auth"]["api_keys"]:
        assert len(set(key["sha256"])) == 1, "secret.example.yaml must hold placeholders, never a real key's digest"


def test_compose_configuration_is_accepted_and_its_keys_match_the_example_tokens() -> None:
    settings = load_settings(DEPLOY / "appliance.toml")
    assert settings.server.host == "0.0.0.0" and settings.server.port == 3000
    digests = {k.name: k.sha256 for k in settings.auth.api_keys}
    for name, file in (("client", "api-key.example"), ("prometheus", "metrics-token.example")):
        token = (DEPLOY / "secrets" / file).read_text().strip()  # the appliance strips the Bearer token too
        assert digests[name] == hashlib.sha256(token.encode()).hexdigest(), name
    assert {k.name: k.scopes for k in settings.auth.api_keys}["prometheus"] == ["metrics"]
    assert [(m.name, m.sha256) for m in settings.models] == [("gemma3-270m", GEMMA_SHA256)]


BAD_KEY_CASES = [
    ("compose", lambda tmp: (DEPLOY / "appliance.toml").read_text()),
    ("base", lambda tmp: assemble(tmp, rendered_config_text("base"), example_auth()).read_text()),
    ("confidential", lambda tmp: assemble(tmp, rendered_config_text("confidential"), example_auth()).read_text()),
]


@pytest.mark.parametrize(("name", "text_of"), BAD_KEY_CASES, ids=[c[0] for c in BAD_KEY_CASES])
def test_a_wrong_key_in_a_deploy_configuration_is_refused_naming_it(name: str, text_of: Any, tmp_path: Path) -> None:
    text = text_of(tmp_path / "assemble")
    assert "\n[server]\n" in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("\n[server]\n", "\n[server]\nworkers = 4\n", 1))
    with pytest.raises(ConfigError, match=r"server\.workers: Extra inputs are not permitted"):
        load_settings(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text(text.replace("\n[attestation]\n", "\n[attestaton]\n", 1))
    with pytest.raises(ConfigError, match=r"attestaton: Extra inputs are not permitted"):
        load_settings(typo)


# ---------------------------------------------------------------------------------------------
# Compose


def compose() -> dict[str, Any]:
    return yaml_doc(DEPLOY / "compose.yaml")


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}`, with every variable unset (the committed defaults)."""
    assert "${" not in re.sub(r"\$\{\w+:-([^}]*)\}", "", value) or ":?" in value, value
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_compose_parses_and_references_files_that_exist() -> None:
    c = compose()
    assert set(c["services"]) == {"appliance", "prometheus", "grafana"}
    declared_volumes = set(c.get("volumes", {}))
    for name, service in c["services"].items():
        for v in service.get("volumes", []):
            if isinstance(v, str):
                source, target = v.split(":")[:2]
                kind = "bind" if source.startswith((".", "/")) else "volume"
            else:
                kind, source, target = v["type"], v["source"], v["target"]
            if kind == "bind":
                assert (DEPLOY / source).exists(), f"{name}: bind source {source} does not exist"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
            assert target.startswith("/")
        for secret in service.get("secrets", []):
            assert secret in c["secrets"]
    for name, secret in c["secrets"].items():
        assert (DEPLOY / interpolate(secret["file"])).is_file(), name


def test_compose_appliance_service_is_locked_down() -> None:
    app = compose()["services"]["appliance"]
    assert app["image"] == "appliance:cpu"
    assert app["read_only"] is True
    assert app["user"] == "65532:65532"
    assert app["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in app["security_opt"]
    (tmp,) = app["tmpfs"]
    path, _, options = tmp.partition(":")
    assert path == "/tmp" and "exec" in options.split(",") and "noexec" not in options.split(",")
    assert app["environment"]["TMPDIR"] == "/tmp"
    assert app["ports"] == ["127.0.0.1:3000:3000"]
    # a rejected configuration exits 2: a bounded number of restarts, never a restart loop
    policy, _, tries = app["restart"].partition(":")
    assert policy == "on-failure" and 1 <= int(tries) <= 5
    # the configuration the appliance reads is the one this test module loads
    args = app["command"]
    config_target = args[args.index("--config") + 1]
    (bind,) = [v for v in app["volumes"] if v.get("target") == config_target]
    assert bind["type"] == "bind" and bind["read_only"] is True and (DEPLOY / bind["source"]).resolve() == DEPLOY / "appliance.toml"
    (models,) = [v for v in app["volumes"] if v.get("target") == "/models"]
    assert models["type"] == "volume" and models["read_only"] is True
    for m in load_settings(DEPLOY / "appliance.toml").models:
        assert m.path.is_relative_to("/models")
    # the appliance's own parser accepts the command line
    build_parser().parse_args(args)


def test_compose_healthcheck_asks_health_with_a_command_the_appliance_has() -> None:
    test = compose()["services"]["appliance"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "/usr/local/bin/appliance"
    assert test[-1].endswith(":3000/health")
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # argparse's subparsers
    assert test[2] in commands, "the image has no shell, curl or wget: the healthcheck needs the appliance's own command"
    parser.parse_args(test[2:])


def test_compose_images_are_pinned() -> None:
    services = compose()["services"]
    assert re.fullmatch(r"prom/prometheus:v[\d.]+@sha256:[0-9a-f]{64}", services["prometheus"]["image"])
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", services["grafana"]["image"])


# ---------------------------------------------------------------------------------------------
# Prometheus


def test_prometheus_scrapes_the_appliance_every_5s_with_its_token() -> None:
    cfg = yaml_doc(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "appliance"]
    assert job["scrape_interval"] == "5s" and job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["appliance:3000"]}]
    assert job["authorization"]["type"] == "Bearer"
    # compose mounts the secret metrics_token where the job reads it
    assert job["authorization"]["credentials_file"] == "/run/secrets/metrics_token"
    assert "metrics_token" in compose()["services"]["prometheus"]["secrets"]
    (bind,) = [v for v in compose()["services"]["prometheus"]["volumes"]
               if isinstance(v, dict) and v["target"] == "/etc/prometheus/prometheus.yml"]
    assert (DEPLOY / bind["source"]).resolve() == DEPLOY / "prometheus" / "prometheus.yml"


def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    src = DEPLOY / "prometheus" / "prometheus.yml"
    syntax = subprocess.run([promtool, "check", "config", "--syntax-only", str(src)], capture_output=True, text=True,
                            timeout=60)
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr
    # the full check also opens the credentials file: point it at the example token compose would mount
    copy = tmp_path / "prometheus.yml"
    token = (DEPLOY / "secrets" / "metrics-token.example").resolve()
    copy.write_text(src.read_text().replace("/run/secrets/metrics_token", str(token)))
    full = subprocess.run([promtool, "check", "config", str(copy)], capture_output=True, text=True, timeout=60)
    assert full.returncode == 0, full.stdout + full.stderr
    # and it does refuse a broken one
    broken = tmp_path / "broken.yml"
    broken.write_text(copy.read_text().replace("scrape_interval: 5s", "scrape_interval: 5 seconds"))
    assert subprocess.run([promtool, "check", "config", str(broken)], capture_output=True, timeout=60).returncode != 0


# ---------------------------------------------------------------------------------------------
# Grafana


def test_grafana_provisioning_points_at_the_dashboard_and_the_datasource() -> None:
    ds = yaml_doc(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    (prom,) = ds["datasources"]
    assert prom["uid"] == DATASOURCE_UID and prom["type"] == "prometheus"
    assert prom["url"] == "http://prometheus:9090"
    assert prom["jsonData"]["timeInterval"] == "5s"  # the scrape interval, for $__rate_interval
    providers = yaml_doc(DEPLOY / "grafana" / "provisioning" / "dashboards" / "appliance.yaml")["providers"]
    (provider,) = providers
    grafana = compose()["services"]["grafana"]
    (mount,) = [v for v in grafana["volumes"] if isinstance(v, dict) and v["target"] == provider["options"]["path"]]
    assert (DEPLOY / mount["source"]).resolve() == DASHBOARD.parent
    (prov_mount,) = [v for v in grafana["volumes"] if isinstance(v, dict) and v["target"] == "/etc/grafana/provisioning"]
    assert (DEPLOY / prov_mount["source"]).resolve() == DEPLOY / "grafana" / "provisioning"


def test_dashboard_is_valid_and_every_query_uses_the_provisioned_datasource() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] == "appliance-overview" and d["schemaVersion"] >= 36 and d["title"]
    ids = [p["id"] for p in d["panels"]] + [p["id"] for r in d["panels"] for p in r.get("panels", [])]
    assert len(ids) == len(set(ids))
    ps = list(panels(d))
    assert len(ps) >= 11
    for p in ps:
        assert p["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DATASOURCE_UID, p["title"]
            assert t["expr"].count("(") == t["expr"].count(")"), (p["title"], t["expr"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
    for var in d["templating"]["list"]:
        assert var["datasource"]["uid"] == DATASOURCE_UID
    titles = {p["title"] for p in ps}
    for wanted in ("Requests by route", "Errors by route and status", "Time to first token", "Inter-token latency",
                   "Queue time", "End-to-end request latency", "Tokens per second", "Queue depth", "Busy slots",
                   "Models loaded", "Worker restarts", "Attestation requests"):
        assert wanted in titles


def test_dashboard_queries_exactly_the_designed_metric_families() -> None:
    assert dashboard_metric_names() == DESIGNED_METRICS


def test_latency_panels_take_p50_and_p95_from_histogram_buckets() -> None:
    d = json.loads(DASHBOARD.read_text())
    for p in panels(d):
        exprs = [t["expr"] for t in p["targets"]]
        if any("histogram_quantile" in e for e in exprs):
            assert any(e.startswith("histogram_quantile(0.5,") for e in exprs), p["title"]
            assert any(e.startswith("histogram_quantile(0.95,") for e in exprs), p["title"]
            for e in exprs:
                assert "_bucket{" in e and "sum by (le," in e, (p["title"], e)


# ---------------------------------------------------------------------------------------------
# The README's expected measurements


def test_readme_runtime_register_is_the_replay_of_the_configured_models() -> None:
    """deploy/README.md gives the RTMR3 value a TDX verifier expects after the configured model loads
    (--no-default-model: nothing else is measured); it must follow the configuration."""
    settings = assembled_settings("confidential")
    expected = replay([model_event(m.name, m.sha256 or "") for m in settings.models]).hex()
    readme = (DEPLOY / "README.md").read_text()
    assert expected in readme
    for m in settings.models:
        assert m.sha256 and m.sha256 in readme
