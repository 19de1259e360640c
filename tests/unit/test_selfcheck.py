"""Startup self-test (T80(b)): library floors, aiohttp's C parser, algorithm allow-lists, and
the real ``sandbox`` command refusing to start with exit 2 and one clear line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from gateway.config import GatewayConfig, load_config
from gateway.devenv import prepare_dev_environment
from gateway.selfcheck import (
    FLOORS,
    Runtime,
    SelfCheckError,
    below_floor,
    config_problems,
    run_selfcheck,
    runtime_problems,
)

SAFE = {"aiohttp": "3.14.3", "PyJWT": "2.13.0", "cryptography": "48.0.1"}


def runtime(**changes: Any) -> Runtime:
    versions = {**SAFE, **changes.pop("versions", {})}
    fields: dict[str, Any] = {
        "versions": versions,
        "c_parser_loaded": True,
        "no_extensions_env": False,
    }
    fields.update(changes)
    return Runtime(**fields)


def test_this_environment_passes() -> None:
    assert runtime_problems(Runtime.current()) == []
    run_selfcheck()


def test_the_floors_themselves_pass() -> None:
    assert runtime_problems(runtime()) == []


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("aiohttp", "3.14.2"),
        ("aiohttp", "3.9.5"),
        ("aiohttp", "3.14.3rc1"),
        ("PyJWT", "2.12.1"),
        ("PyJWT", "1.7.1"),
        ("cryptography", "48.0.0"),
        ("cryptography", "46.0.5"),
    ],
)
def test_each_library_below_its_floor_is_named(name: str, version: str) -> None:
    problems = runtime_problems(runtime(versions={name: version}))
    assert problems == [
        f"{name} {version} is below the safe floor {'.'.join(map(str, FLOORS[name]))}: upgrade it"
    ]


def test_missing_library_is_a_problem() -> None:
    assert runtime_problems(runtime(versions={"PyJWT": None})) == [
        "PyJWT is not installed (need >= 2.13.0)"
    ]


@pytest.mark.parametrize(
    ("version", "floor", "below"),
    [
        ("3.14.3", (3, 14, 3), False),
        ("3.14.3.post1", (3, 14, 3), False),
        ("3.14.3+local", (3, 14, 3), False),
        ("3.15", (3, 14, 3), False),
        ("4.0.0", (3, 14, 3), False),
        ("50.0.2", (48, 0, 1), False),
        ("3.14", (3, 14, 3), True),
        ("3.14.3.dev0", (3, 14, 3), True),
        ("3.14.3b2", (3, 14, 3), True),
        ("48.0.1rc1", (48, 0, 1), True),
        ("not-a-version", (3, 14, 3), True),
        ("", (3, 14, 3), True),
    ],
)
def test_version_comparison(version: str, floor: tuple[int, ...], below: bool) -> None:
    assert below_floor(version, floor) is below


def test_pure_python_parser_is_refused() -> None:
    assert runtime_problems(runtime(c_parser_loaded=False)) == [
        "aiohttp's C HTTP parser is not loaded (no compiled extension for this platform):"
        " install an aiohttp wheel with its C extensions"
    ]


def test_no_extensions_variable_is_refused() -> None:
    problems = runtime_problems(runtime(no_extensions_env=True, c_parser_loaded=False))
    assert problems == ["AIOHTTP_NO_EXTENSIONS is set: unset it, the C HTTP parser is required"]


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(SelfCheckError) as caught:
        run_selfcheck(
            runtime=lambda: runtime(
                versions={"aiohttp": "3.8.0", "cryptography": "41.0.0"}, c_parser_loaded=False
            )
        )
    assert len(caught.value.problems) == 3
    assert str(caught.value).startswith("startup self-test failed: aiohttp 3.8.0 is below")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> GatewayConfig:
    return load_config(prepare_dev_environment(tmp_path_factory.mktemp("selfcheck")))


def test_dev_configuration_passes(config: GatewayConfig) -> None:
    assert config_problems(config) == []
    run_selfcheck(config)


def test_hs256_in_the_api_allow_list_is_refused(config: GatewayConfig) -> None:
    # load_config already refuses HS*; this is the second line should a config be built
    # another way.
    api_auth = dataclasses.replace(config.api_auth, algorithms=cast(Any, ("EdDSA", "HS256")))
    bad = dataclasses.replace(config, api_auth=api_auth)
    assert config_problems(bad) == [
        f"{config.source}: api_auth.algorithms allows 'HS256': only EdDSA and ES256 may appear"
    ]


def test_hs_key_of_a_partner_or_ours_is_refused(config: GatewayConfig) -> None:
    partner_id, partner = sorted(config.partners.items())[0]
    partner_key = dataclasses.replace(partner.keys[0], alg=cast(Any, "HS512"))
    our_key = dataclasses.replace(config.signing_keys[0], alg=cast(Any, "none"))
    bad = dataclasses.replace(
        config,
        signing_keys=(our_key,),
        partners={**config.partners, partner_id: dataclasses.replace(partner, keys=(partner_key,))},
    )
    with pytest.raises(SelfCheckError) as caught:
        run_selfcheck(bad)
    assert caught.value.problems == (
        f"{config.source}: signing_keys[0].alg allows 'none': only EdDSA and ES256 may appear",
        f"{partner.directory / 'partner.toml'}: keys[0].alg allows 'HS512':"
        " only EdDSA and ES256 may appear",
    )


def test_sandbox_refuses_to_start_without_the_c_parser(tmp_path: Path) -> None:
    cli = Path(sys.executable).with_name("c2c-gateway")
    environ = {**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"}
    done = subprocess.run(
        [str(cli), "sandbox", "--dir", str(tmp_path / "sb"), "--port", "0", "--api-port", "0"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == (
        "error: startup self-test failed: AIOHTTP_NO_EXTENSIONS is set: unset it, the C HTTP"
        " parser is required"
    )
    assert "Traceback" not in done.stderr
