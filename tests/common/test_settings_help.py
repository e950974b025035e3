"""`python -m services.<name> --help`: every setting with its flag, type, default, env names and description."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.settings import ServerSettings, load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = {
    "registry": "services.registry.settings:RegistrySettings",
    "gateway": "services.gateway.settings:GatewaySettings",
    "inference": "services.inference.settings:InferenceSettings",
    "monitor": "services.monitor.settings:MonitorSettings",
}


def settings_class(service: str) -> type[ServerSettings]:
    module, name = SERVICES[service].split(":")
    cls: type[ServerSettings] = getattr(importlib.import_module(module), name)
    return cls


def squash(text: str) -> str:
    return " ".join(text.split())


def run_services(*argvs: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Each argv as `python -m services.<argv[0]> <argv[1:]>`, all at once, as real processes."""
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", f"services.{argv[0]}", *argv[1:]], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv in argvs]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


@pytest.fixture(scope="module")
def helps() -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    yield dict(zip(SERVICES, run_services(*([name, "--help"] for name in SERVICES)), strict=True))


def option_blocks(help_text: str) -> dict[str, str]:
    """First flag of each option -> its help, whitespace squashed (argparse wraps lines)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in help_text.splitlines():
        if line.startswith("  -"):
            current = blocks.setdefault(line.split()[0].rstrip(","), [])
            current.append(line)
        elif line.startswith("   ") and current is not None:
            current.append(line)
        else:
            current = None
    return {flag: squash(" ".join(lines)) for flag, lines in blocks.items()}


def comments_in_source(cls: type) -> dict[str, str]:
    """An oracle apart from the one under test: `ast` finds each annotated field, then the source
    lines right above it are read back while they are comments. The first class of the MRO wins."""
    found: dict[str, str] = {}
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        lines, _ = inspect.getsourcelines(klass)
        body = ast.parse(textwrap.dedent("".join(lines))).body[0]
        assert isinstance(body, ast.ClassDef)
        for node in body.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                above: list[str] = []
                row = node.lineno - 2
                while row >= 0 and lines[row].strip().startswith("#"):
                    above.insert(0, lines[row].strip().lstrip("#").strip())
                    row -= 1
                if above and node.target.id not in found:
                    found[node.target.id] = " ".join(above)
    return found


@pytest.mark.parametrize("service", list(SERVICES))
def test_help_lists_every_setting_with_its_env_names_default_and_comment(
        service: str, helps: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = helps[service]
    assert result.returncode == 0, result.stderr
    blocks = option_blocks(result.stdout)
    cls = settings_class(service)
    comments = comments_in_source(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        assert flag in blocks, f"{service} --help has no {flag}"
        block = blocks[flag]
        env = f"env AIAAS_{service.upper()}_{field.name.upper()} or AIAAS_{field.name.upper()}"
        assert env in block, f"{flag}: {block}"
        assert ", default " in block, f"{flag}: {block}"
        if field.name in comments:
            assert squash(comments[field.name]) in block, f"{flag}: {block}"
    # Inherited settings are described from ServerSettings' own comments.
    assert "When set, clients must present a certificate signed by this CA (mTLS)." in blocks["--tls-client-ca"]
    assert "str, default unset;" in blocks["--tls-client-ca"]
    assert "--log-json, --no-log-json" in result.stdout
    assert f"AIAAS_{service.upper()}_<NAME>, else AIAAS_<NAME>" in squash(result.stdout)


def test_help_shows_known_settings_as_written(helps: dict[str, subprocess.CompletedProcess[str]]) -> None:
    registry = option_blocks(helps["registry"].stdout)
    assert registry["--port"].startswith("--port INT gRPC port; each service sets its own default")
    assert "int, default 50051; env AIAAS_REGISTRY_PORT or AIAAS_PORT" in registry["--port"]
    assert ("How many change-feed events are kept for watchers that resume after a disconnect. "
            "int, default 10000; env AIAAS_REGISTRY_FEED_RETENTION or AIAAS_FEED_RETENTION") in registry["--feed-retention"]
    gateway = option_blocks(helps["gateway"].stdout)
    assert "Server-side secret mixed into every key hash" in gateway["--key-pepper"]
    assert "AIAAS_GATEWAY_KEY_PEPPER" in gateway["--key-pepper"]
    assert 'list of str, default "127.0.0.1:50052"' in gateway["--inference-targets"]
    inference = option_blocks(helps["inference"].stdout)
    assert '"process": one worker process per model instance' in inference["--worker-mode"]
    monitor = option_blocks(helps["monitor"].stdout)
    assert monitor["--canary-rollback"].startswith("--canary-rollback, --no-canary-rollback False: analyse and alert")
    assert "bool, default true; env AIAAS_MONITOR_CANARY_ROLLBACK" in monitor["--canary-rollback"]
    # A subclass's own comment wins over the inherited one.
    assert "The public door: one client connection" in gateway["--max-concurrent-streams"]
    assert "Per connection:" in registry["--max-concurrent-streams"]


def test_an_unknown_flag_is_refused_and_a_normal_start_reads_no_source() -> None:
    unknown = run_services(["registry", "--no-such-flag", "1"])[0]
    assert unknown.returncode == 2
    assert "error: unrecognized arguments: --no-such-flag 1" in unknown.stderr
    probe = ("import sys; from services.common.settings import load_settings; "
             "from services.monitor.settings import MonitorSettings; "
             "load_settings(MonitorSettings, ['--port', '1'], service='monitor', environ={}); "
             "print('services.common.settings_help' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                            check=True)
    assert loaded.stdout.strip() == "False"


@dataclasses.dataclass(frozen=True)
class ProbeSettings(ServerSettings):
    """A probe service."""

    port: int = 1234
    # Colour of the probe; 100% opaque.
    colour: str = "red"

    # A comment parted from the field by a blank line describes nothing.

    undescribed: float = 0.5
    noted: tuple[str, ...] = dataclasses.field(default=("a", "b"), metadata={"help": "From metadata."})
    # Metadata wins over this comment.
    both: int = dataclasses.field(default=3, metadata={"help": "Metadata text."})
    tail: str = ""  # Said on the field's own line.


def test_descriptions_come_from_metadata_comments_or_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        load_settings(ProbeSettings, ["--help"], service="probe", environ={})
    assert exited.value.code == 0
    out = capsys.readouterr().out
    blocks = option_blocks(out)
    assert out.startswith("usage: python -m services.probe")
    assert "A probe service." in out
    assert blocks["--colour"] == '--colour STR Colour of the probe; 100% opaque. str, default "red"; ' \
                                 "env AIAAS_PROBE_COLOUR or AIAAS_COLOUR"
    assert blocks["--undescribed"] == "--undescribed FLOAT float, default 0.5; env AIAAS_PROBE_UNDESCRIBED or " \
                                      "AIAAS_UNDESCRIBED"
    assert blocks["--noted"].startswith('--noted LIST From metadata. list of str, default "a,b";')
    assert blocks["--both"].startswith("--both INT Metadata text. int, default 3;")
    assert blocks["--tail"].startswith("--tail STR Said on the field's own line.")
    # `port` is redeclared without a comment: ServerSettings' comment describes it.
    assert blocks["--port"].startswith("--port INT gRPC port;")
    assert "int, default 1234; env AIAAS_PROBE_PORT or AIAAS_PORT" in blocks["--port"]
    assert out.index("probe settings:") < out.index("inherited from ServerSettings:")


def test_an_unknown_flag_names_itself(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        load_settings(ProbeSettings, ["--colour", "blue", "--shade", "dark"], service="probe", environ={})
    assert exited.value.code == 2
    assert "error: unrecognized arguments: --shade dark" in capsys.readouterr().err
