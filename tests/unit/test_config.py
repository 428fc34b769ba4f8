"""Policy schema: the example validates, and each bad fixture fails with its own message."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.policy.config import ConfigError, load_config, parse_listen

ROOT = Path(__file__).resolve().parents[2]
BAD = sorted((Path(__file__).parents[1] / "policies" / "bad").glob("*.yaml"))


def expected_message(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} lacks its '# expect:' line"
    return first[len("# expect: "):]


def test_example_policy_is_valid():
    cfg = load_config(ROOT / "policies" / "example.yaml")
    assert {"standard", "research", "vetted"} <= set(cfg.tiers)
    assert any(m.reasoning for m in cfg.models.values())
    assert any(not m.reasoning for m in cfg.models.values())
    moe = [m for m in cfg.models.values() if m.total_params and m.total_params > 5 * m.active_params]
    assert moe, "the example needs a mixture-of-experts model with active far below total parameters"
    assert len(cfg.version) == 64


def test_packaged_example_matches_policies_folder():
    assert filecmp.cmp(ROOT / "policies" / "example.yaml", ROOT / "gateway" / "data" / "example.yaml",
                       shallow=False), "gateway/data/example.yaml must be a copy of policies/example.yaml"


def test_policy_check_cli_passes_example(capsys):
    assert main(["policy", "check", str(ROOT / "policies" / "example.yaml")]) == 0


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_fixture_fails_with_its_message(path: Path):
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.errors)
    assert str(path) in text, "every error names the file"
    assert expected_message(path) in text


def test_bad_fixture_messages_are_distinct():
    messages = [expected_message(p) for p in BAD]
    assert len(set(messages)) == len(messages)


def test_policy_check_cli_reports_each_error(capsys):
    files = [str(p) for p in BAD[:3]]
    assert main(["policy", "check", *files]) == 1
    out = capsys.readouterr().out.splitlines()
    for f in files:
        assert any(line.startswith(f) for line in out)


def test_several_files_merge(tmp_path: Path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("upstreams: {sim: {base_url: simulator}}\nmodels: {m: {upstream: sim, active_params: 1e9}}\n")
    b.write_text("tiers: {t: {models: [m]}}\n")
    cfg = load_config([a, b])
    assert cfg.tiers["t"].models == ["m"]


def test_missing_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("value,expected", [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:9", ("::1", 9)),
                                            ("localhost:0", ("localhost", 0))])
def test_parse_listen(value, expected):
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["8080", "host:", ":80", "h:99999", "a:b:c"])
def test_parse_listen_rejects(value):
    with pytest.raises(ValueError):
        parse_listen(value)
