"""The `faas` CLI's own logic, without a platform: manifest errors, the archive, init, argument errors,
and the gateway client's error translation (against httpx's MockTransport, not a server)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from faas.cli import commands
from faas.cli.archive import ArchiveError, HandlerModuleNotFound, build_archive
from faas.cli.client import GatewayClient, GatewayError, GatewayUnreachable
from faas.cli.main import main
from faas.cli.manifest import ManifestError, load_manifest
from faas.core.errors import InvalidRequest


def write(path: Path, text: str | bytes = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def manifest_error(tmp_path: Path, text: str) -> str:
    write(tmp_path / "faas.yaml", text)
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path)
    return str(info.value)


def project(tmp_path: Path, manifest: str = "name: hello\n") -> Path:
    write(tmp_path / "faas.yaml", manifest)
    write(tmp_path / "handler.py", "def handler(event, context):\n    return {'ok': True}\n")
    return tmp_path


def names_in(archive: bytes) -> list[str]:
    return zipfile.ZipFile(io.BytesIO(archive)).namelist()


# -- manifest ---------------------------------------------------------------------------------------


def test_an_app_manifest_names_its_entry_and_is_always_warm(tmp_path: Path) -> None:
    write(tmp_path / "faas.yaml", "name: shop\nkind: app\nentry: main:app\nreadiness_path: /healthz\n")
    config = load_manifest(tmp_path).config
    assert (config.kind, config.handler, config.handler_module) == ("app", "main:app", "main")
    assert (config.min_instances, config.concurrency, config.readiness_path) == (1, 32, "/healthz")
    assert "not both" in manifest_error(tmp_path, "name: shop\nkind: app\nentry: main:app\nhandler: h.h\n")
    assert "must look like 'module:app'" in manifest_error(tmp_path, "name: shop\nkind: app\nentry: main.app\n")
    assert "min_instances must be 1 or more" in manifest_error(
        tmp_path, "name: shop\nkind: app\nentry: main:app\nmin_instances: 0\n"
    )
    assert "kind" in manifest_error(tmp_path, "name: shop\nkind: website\nentry: main:app\n")


def test_manifest_maps_user_fields_onto_version_config(tmp_path: Path) -> None:
    write(
        tmp_path / "faas.yaml",
        "name: hello\nmemory: 512\ntimeout: 2.5\nconcurrency: 4\n"
        "environment:\n  GREETING: hi\n  PORT: 8080\n  DEBUG: true\n"
        "exclude: tests\n",
    )
    manifest = load_manifest(tmp_path)
    assert manifest.name == "hello"
    assert manifest.config.memory_mb == 512
    assert manifest.config.timeout_s == 2.5
    assert manifest.config.concurrency == 4
    # Environment values reach the function as strings.
    assert manifest.config.environment == {"GREETING": "hi", "PORT": "8080", "DEBUG": "true"}
    assert manifest.exclude == ("tests",)
    assert manifest.project_dir == tmp_path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: hello\nmemory: 10\n", "faas.yaml: field 'memory': must be >= 64 (got 10)"),
        ("runtime: python3.11\n", "faas.yaml: missing required field 'name'"),
        ("name: hello\nmemroy: 512\n", "faas.yaml: unknown field 'memroy' (did you mean 'memory'?)"),
        ("name: hello\nmemory: 128\n  timeout: 3\n", "faas.yaml: not valid YAML (line 3): "),
        ("- name\n- hello\n", "faas.yaml: the top level must be a mapping"),
        ("", "faas.yaml: the top level must be a mapping"),
        ("name: hello\ntimeout: 901\n", "faas.yaml: field 'timeout': must be <= 900 (got 901)"),
        ("name: hello\ntimeout: soon\n", "faas.yaml: field 'timeout': must be a duration like 2s, 500ms, 1m or 6h (got 'soon')"),
        (
            "name: hello\nruntime: python2\n",
            "faas.yaml: field 'runtime': must be 'python3.11' (got 'python2')",
        ),
        ("name: Hello\n", "faas.yaml: field 'name': invalid function name 'Hello'"),
        ("name: hello\nhandler: main\n", "faas.yaml: field 'handler': handler 'main' must look like"),
        (
            "name: hello\nenvironment:\n  FAAS_X: '1'\n",
            "faas.yaml: field 'environment': environment variable 'FAAS_X'",
        ),
        (
            "name: hello\nmin_instances: 20\n",
            "faas.yaml: field 'min_instances': must not exceed max_instances (got 20 > 10)",
        ),
        ("name: hello\nname: other\n", "faas.yaml: not valid YAML (line 2): key 'name' is given twice"),
    ],
)
def test_manifest_errors_name_the_file_the_field_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    # The project folder is the working directory, as for a plain `faas deploy`.
    monkeypatch.chdir(tmp_path)
    assert manifest_error(Path("."), text).startswith(message)


def test_manifest_reports_every_problem_at_once(tmp_path: Path) -> None:
    write(tmp_path / "faas.yaml", "memory: 10\ntimout: 5\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path)
    problems = info.value.problems
    assert any("unknown field 'timout'" in p for p in problems)
    assert any("missing required field 'name'" in p for p in problems)
    assert any("field 'memory': must be >= 64" in p for p in problems)
    assert all(p.startswith(str(tmp_path / "faas.yaml")) for p in problems)
    assert isinstance(info.value, InvalidRequest)


def test_missing_manifest_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="faas.yaml: not found .*faas init"):
        load_manifest(tmp_path)


# -- archive ----------------------------------------------------------------------------------------


def test_same_project_gives_the_same_archive_bytes(tmp_path: Path) -> None:
    root = project(tmp_path)
    write(root / "lib" / "util.py", "X = 1\n")
    manifest = load_manifest(root)
    first = build_archive(root, manifest)
    # Touching files (new mtimes) must not change the archive: the code store is content-addressed.
    for path in (root / "handler.py", root / "lib" / "util.py"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    second = build_archive(root, manifest)
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()
    assert names_in(first) == ["faas.yaml", "handler.py", "lib/util.py"]


def test_archive_leaves_out_vcs_caches_and_excluded_globs(tmp_path: Path) -> None:
    root = project(tmp_path, "name: hello\nexclude: ['tests', '*.md']\n")
    for junk in (".git/config", "__pycache__/handler.cpython-311.pyc", "lib/__pycache__/x.pyc", "old.pyc",
                 ".venv/lib/site.py", ".faas/run/x.pid", "tests/test_x.py", "docs/readme.md"):  # fmt: skip
        write(root / junk, "junk")
    write(root / "lib" / "util.py", "X = 1\n")
    names = names_in(build_archive(root, load_manifest(root)))
    assert names == ["faas.yaml", "handler.py", "lib/util.py"]


def test_archive_include_keeps_only_matching_files(tmp_path: Path) -> None:
    root = project(tmp_path, "name: hello\ninclude: ['*.py']\n")
    write(root / "data.csv", "a,b\n")
    write(root / "pkg" / "mod.py", "")
    assert names_in(build_archive(root, load_manifest(root))) == ["handler.py", "pkg/mod.py"]


def test_missing_handler_module_is_reported_before_upload(tmp_path: Path) -> None:
    root = project(tmp_path, "name: hello\nhandler: main.handler\n")
    with pytest.raises(HandlerModuleNotFound) as info:
        build_archive(root, load_manifest(root))
    assert str(info.value).startswith(f"handler module 'main' not found in {root} (handler 'main.handler')")


@pytest.mark.parametrize("module_file", ["pkg/mod.py", "pkg/mod/__init__.py"])
def test_dotted_handler_module_is_found_as_file_or_package(tmp_path: Path, module_file: str) -> None:
    root = project(tmp_path, "name: hello\nhandler: pkg.mod.run\n")
    write(root / module_file, "def run(event, context):\n    return 1\n")
    assert module_file in names_in(build_archive(root, load_manifest(root)))


def test_requirements_are_vendored_at_the_archive_root(tmp_path: Path) -> None:
    wheel = _tiny_wheel(tmp_path / "wheels")
    root = project(tmp_path / "proj")
    write(root / "requirements.txt", f"# what the function imports\n{wheel}\n")
    messages: list[str] = []
    archive = build_archive(root, load_manifest(root), progress=messages.append)
    names = names_in(archive)
    assert "tinypkg/__init__.py" in names
    assert not any(name.endswith(".pyc") for name in names)
    assert "vendoring requirements (pip)…" in messages


def test_requirements_with_only_comments_do_not_run_pip(tmp_path: Path) -> None:
    root = project(tmp_path)
    write(root / "requirements.txt", "# nothing yet\n\n")
    messages: list[str] = []
    build_archive(root, load_manifest(root), progress=messages.append)
    assert not any("pip" in message for message in messages)


def test_pip_failure_shows_pips_own_words(tmp_path: Path) -> None:
    root = project(tmp_path)
    write(root / "requirements.txt", "./no-such-package.whl\n")
    with pytest.raises(ArchiveError) as info:
        build_archive(root, load_manifest(root))
    assert "pip could not install" in str(info.value)
    assert "no-such-package.whl" in str(info.value)


def _tiny_wheel(folder: Path) -> Path:
    """A pure-Python wheel built by hand, so pip installs it without an index or a build backend."""
    files = {
        "tinypkg/__init__.py": b"VALUE = 42\n",
        "tinypkg-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n",
        "tinypkg-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for name, data in files.items()
    ]
    files["tinypkg-0.1.dist-info/RECORD"] = (
        "\n".join([*record, "tinypkg-0.1.dist-info/RECORD,,"]) + "\n"
    ).encode()
    folder.mkdir(parents=True)
    wheel = folder / "tinypkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


# -- init -------------------------------------------------------------------------------------------


def test_init_creates_a_project_that_deploys_as_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init", "hello"]) == 0
    root = tmp_path / "hello"
    assert sorted(p.name for p in root.iterdir()) == ["faas.yaml", "handler.py", "requirements.txt"]
    manifest = load_manifest(root)
    assert manifest.name == "hello"
    assert manifest.config.model_dump() == {
        "kind": "function",
        "runtime": "python3.11",
        "handler": "handler.handler",
        "memory_mb": 256,
        "timeout_s": 30.0,
        "concurrency": 1,
        "min_instances": 0,
        "max_instances": 10,
        "environment": {},
        "description": "",
        "max_retries": 2,
        "max_event_age_s": 21600.0,
        "on_success": None,
        "on_failure": None,
        "public": False,
        "readiness_path": "/",
    }
    assert manifest.events is None  # the template's events are commented out: deploy leaves them alone
    # The generated handler answers with a greeting built from event["name"].
    namespace: dict[str, object] = {}
    exec((root / "handler.py").read_text(), namespace)  # noqa: S102 - our own template
    handler = namespace["handler"]
    assert callable(handler)
    assert "Ada" in json.dumps(handler({"name": "Ada"}, None))
    # It packs (the handler module is there) and vendors nothing (requirements.txt is only comments).
    assert names_in(build_archive(root, manifest)) == ["faas.yaml", "handler.py", "requirements.txt"]
    assert "faas deploy hello" in capsys.readouterr().out


def test_init_with_dir_and_refusing_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "somewhere"
    assert main(["init", "api", "--dir", str(target)]) == 0
    assert load_manifest(target).name == "api"
    capsys.readouterr()
    assert main(["init", "api", "--dir", str(target)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (target / "faas.yaml").read_text().startswith("# faas.yaml")


def test_init_rejects_an_invalid_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init", "Bad_Name"]) == 2
    assert "invalid function name 'Bad_Name'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# -- invoke and the gateway client ------------------------------------------------------------------


def test_invoke_with_invalid_json_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 answers nothing: exit 2 (not 1) shows the payload was refused before any request.
    assert main(["--url", "http://127.0.0.1:9", "invoke", "hello", "-d", "{not json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the event from -d is not valid JSON")
    assert "Traceback" not in err


def test_unreachable_gateway_says_to_start_the_platform(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", "http://127.0.0.1:9", "ls"]) == 1
    assert capsys.readouterr().err == (
        "error: cannot reach the gateway at http://127.0.0.1:9: is the platform up? (run 'faas up')\n"
    )
    with GatewayClient("http://127.0.0.1:9") as client, pytest.raises(GatewayUnreachable):
        client.get("hello")


def gateway(handler: Callable[[httpx.Request], httpx.Response], monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the commands at a MockTransport instead of a live gateway."""

    def client(url: str, namespace: str | None, **options: object) -> GatewayClient:
        return GatewayClient(url, namespace, transport=httpx.MockTransport(handler))

    monkeypatch.setattr(commands, "GatewayClient", client)


def test_invoke_prints_the_result_as_indented_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"message": "Hello, Ada!"}, headers={"X-Faas-Request-Id": "r-1"})

    gateway(handler, monkeypatch)
    assert main(["-n", "dev", "invoke", "hello", "-d", '{"name": "Ada"}', "--qualifier", "prod", "-v"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"message": "Hello, Ada!"}
    assert out.startswith('{\n  "message"')
    assert "request-id: r-1" in err
    assert seen[0].url.path == "/v1/functions/hello/invoke"
    assert dict(seen[0].url.params) == {"namespace": "dev", "qualifier": "prod"}
    assert json.loads(seen[0].content) == {"name": "Ada"}


def test_invoke_function_error_exits_1_with_kind_type_and_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {"error": {"kind": "function_error", "type": "ZeroDivisionError", "message": "division by zero"}}
    gateway(lambda request: httpx.Response(500, json=body), monkeypatch)
    assert main(["invoke", "hello", "-d", "{}"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: function_error: ZeroDivisionError: division by zero\n"


def test_rm_of_a_missing_function(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {"error": {"kind": "not_found", "type": "NotFound", "message": "no such function"}}
    gateway(lambda request: httpx.Response(404, json=body), monkeypatch)
    assert main(["rm", "ghost"]) == 1
    assert capsys.readouterr().err == "error: function 'ghost' not found\n"


def test_deploy_uploads_config_and_zip_and_prints_the_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = project(tmp_path, "name: hello\nmemory: 128\n")
    uploads: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        uploads.append(request)
        view = {"name": "hello", "latest_version": 3, "config": {"version": 3}, "url": "http://gw/fn/hello/"}
        return httpx.Response(201, json=view)

    gateway(handler, monkeypatch)
    assert main(["--url", "http://gw", "deploy", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "deployed hello version 3",
        "url: http://gw/fn/hello/",
        "invoke: faas invoke hello -d '{}'",
    ]
    request = uploads[0]
    assert (request.method, request.url.path) == ("PUT", "/v1/functions/hello")
    body = request.read()
    assert b'name="config"' in body and b'"memory_mb": 128' in body
    assert b'name="code"; filename="code.zip"' in body and b"Content-Type: application/zip" in body


def test_client_turns_error_bodies_into_exceptions() -> None:
    body = {"error": {"kind": "invalid_request", "type": "InvalidRequest", "message": "bad config"}}
    transport = httpx.MockTransport(lambda request: httpx.Response(400, json=body))
    with GatewayClient("http://gw", transport=transport) as client, pytest.raises(GatewayError) as info:
        client.get("hello")
    error = info.value
    assert (error.kind, error.error_type, error.message, error.status) == (
        "invalid_request", "InvalidRequest", "bad config", 400,
    )  # fmt: skip

    transport = httpx.MockTransport(lambda request: httpx.Response(502, text="<html>Bad Gateway</html>"))
    with GatewayClient("http://gw", transport=transport) as client, pytest.raises(GatewayError) as info:
        client.list()
    assert info.value.status == 502
    assert "Bad Gateway" in info.value.message


def test_manifest_durations_accept_units(tmp_path: Path) -> None:
    (tmp_path / "faas.yaml").write_text("name: hello\ntimeout: 90s\nmax_event_age: 6h\n")
    config = load_manifest(tmp_path).config
    assert (config.timeout_s, config.max_event_age_s) == (90.0, 21600.0)
    (tmp_path / "faas.yaml").write_text("name: hello\nmax_event_age: 6 days\n")
    with pytest.raises(ManifestError, match="max_event_age.*6h"):
        load_manifest(tmp_path)


def test_the_local_admin_key_goes_only_to_the_local_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from faas.cli.credentials import find_api_key, save_api_key

    for name in ("FAAS_GATEWAY_HOST", "FAAS_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FAAS_HOME", str(tmp_path))
    monkeypatch.setenv("FAAS_GATEWAY_PORT", "18080")
    monkeypatch.setenv("FAAS_CONFIG_DIR", str(tmp_path / "config"))
    (tmp_path / "admin.key").write_text("local-admin-key\n")
    assert find_api_key("http://127.0.0.1:18080") == "local-admin-key"
    assert find_api_key("http://gateway.example:18080") is None  # never sent elsewhere
    assert find_api_key("http://gateway.example:18080", "explicit") == "explicit"
    save_api_key("http://gateway.example:18080/", "saved-key")
    assert find_api_key("http://gateway.example:18080") == "saved-key"
    assert (tmp_path / "config" / "credentials.json").stat().st_mode & 0o077 == 0
