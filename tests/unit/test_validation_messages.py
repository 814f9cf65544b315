"""One wording of a validation error everywhere (``repadapter.errors.describe_validation_error``): the location and
the message of each error, never the input value, which may be a secret."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError, field_validator

from repadapter.errors import describe_validation_error, validation_problems
from service.__main__ import main

SECRET = "abc123secret"


class _Config(BaseModel):
    max_batch: int
    admin_token: str

    @field_validator("admin_token")
    @classmethod
    def _long(cls, value: str) -> str:
        if len(value) < 16:
            raise ValueError(f"token too short ({len(value)} characters, at least 16)")
        return value


def _error() -> ValidationError:
    with pytest.raises(ValidationError) as info:
        _Config(max_batch="many", admin_token=SECRET)
    assert SECRET in str(info.value)  # pydantic's own text repeats the input: why this function exists
    return info.value


def test_locations_and_messages_without_input_values():
    e = _error()
    assert describe_validation_error(e) == ("max_batch: Input should be a valid integer, unable to parse string as "
                                            "an integer; admin_token: Value error, token too short (12 characters, "
                                            "at least 16)")
    assert validation_problems(e, flag_style=True)[1].startswith("--admin-token: Value error, token too short")
    assert not [p for p in validation_problems(e, flag_style=True) if SECRET in p or "many" in p]


def test_location_less_errors_are_named():
    class Pair(BaseModel):
        a: int

    with pytest.raises(ValidationError) as info:
        Pair.model_validate([1])
    assert describe_validation_error(info.value, empty="body").startswith("body: ")
    assert describe_validation_error(info.value, flag_style=True, empty="config").startswith("--config: ")


def test_check_config_never_prints_the_token(monkeypatch, capsys):
    monkeypatch.setenv("REPSERVE_ADMIN_TOKEN", SECRET)
    monkeypatch.setenv("REPSERVE_MAX_BATCH", "many")
    assert main(["--check-config"]) == 2
    out = capsys.readouterr()
    assert SECRET not in out.err + out.out
    assert "input_value" not in out.err
    assert out.err.splitlines() == [
        "invalid configuration:",
        "  --admin-token: Value error, token too short (12 characters, at least 16); make one with "
        "`openssl rand -hex 32`",
        "  --max-batch: Input should be a valid integer, unable to parse string as an integer",
    ]

