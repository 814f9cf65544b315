"""Settings from the environment, CLI overrides, and the README's configuration table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.__main__ import build_parser, main, settings_from_args
from service.settings import ENV_PREFIX, Settings, settings_table, unknown_variables

README = Path(__file__).resolve().parents[2] / "README.md"


def test_environment_with_prefix(monkeypatch):
    monkeypatch.setenv("REPSERVE_MAX_BATCH", "32")
    monkeypatch.setenv("REPSERVE_POLICY", "mixed")
    monkeypatch.setenv("REPSERVE_BACKBONE_OPTIONS", '{"img_size": 64, "depth": 3}')
    monkeypatch.setenv("REPSERVE_ADMIN_TOKEN", "s3cret-0f9a1c2e7b44")
    monkeypatch.setenv("REPSERVE_DTYPE", "bfloat16")
    s = Settings()
    assert (s.max_batch, s.policy, s.backbone_options) == (32, "mixed", {"img_size": 64, "depth": 3})
    assert s.admin_token.get_secret_value() == "s3cret-0f9a1c2e7b44"
    assert s.torch_dtype is torch.bfloat16
    assert "s3cret" not in repr(s)


def test_empty_token_means_unset(monkeypatch):
    monkeypatch.setenv("REPSERVE_CLASSIFY_TOKEN", "")
    assert Settings().classify_token is None


@pytest.mark.parametrize(("token", "problem"), [("s3cret", "too short"), ("change-me-please-now", "placeholder"),
                                                ("our-example-token-1234", "placeholder")])
def test_short_or_placeholder_tokens_are_refused(monkeypatch, token, problem):
    monkeypatch.setenv("REPSERVE_ADMIN_TOKEN", token)
    with pytest.raises(ValueError, match=problem):
        Settings()
    assert main(["--check-config"]) == 2


def test_unknown_variables_are_reported(monkeypatch, capsys):
    monkeypatch.setenv("REPSERVE_MAX_BATH", "3")  # a typo: max_batch stays 16
    monkeypatch.setenv("REPSERVE_MAX_BATCH", "8")
    monkeypatch.setenv("REPSERVE_URL", "http://localhost:8000")  # the repserve client's: no warning
    monkeypatch.setenv("REPSERVE_TOKEN", "client-side-token-0123")
    assert unknown_variables(os.environ) == ["REPSERVE_MAX_BATH"]
    assert main(["--check-config"]) == 0
    out = capsys.readouterr()
    assert "REPSERVE_MAX_BATH is not a RepServe setting" in out.err
    assert "configuration valid" in out.out


def test_invalid_values_are_refused(monkeypatch):
    monkeypatch.setenv("REPSERVE_POLICY", "fastest")
    with pytest.raises(ValueError, match="policy"):
        Settings()


def test_cli_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("REPSERVE_MAX_BATCH", "32")
    monkeypatch.setenv("REPSERVE_PORT", "9000")
    args = vars(build_parser().parse_args(["--max-batch", "8", "--no-warmup", "--backbone-options", '{"depth": 2}',
                                           "--store", "/tmp/x"]))
    s = settings_from_args(args)
    assert (s.max_batch, s.port, s.warmup, s.backbone_options, s.store) == (8, 9000, False, {"depth": 2}, "/tmp/x")


def test_every_setting_has_a_flag_and_a_description():
    help_text = build_parser().format_help()
    for name, field in Settings.model_fields.items():
        assert f"--{name.replace('_', '-')}" in help_text
        assert f"{ENV_PREFIX}{name.upper()}" in help_text.replace("\n", "").replace(" ", "")
        assert field.description


def test_bad_configuration_exits_2(capsys):
    assert main(["--max-batch", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "invalid configuration:\n  --max-batch: Input should be greater than or equal to 1\n"


def test_readme_table_matches_settings():
    text = README.read_text()
    table = re.search(r"<!-- config-table:start -->\n(.*?)<!-- config-table:end -->", text, re.S).group(1)
    assert table == settings_table()
    documented = re.findall(rf"\| `{ENV_PREFIX}([A-Z0-9_]+)` \|", table)
    assert [d.lower() for d in documented] == list(Settings.model_fields)


def test_print_config_table_and_help_run_as_a_module():
    out = subprocess.run([sys.executable, "-m", "service", "--print-config-table"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert out == settings_table()
