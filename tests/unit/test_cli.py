"""The ``ephemera`` command line: options on either side of the subcommand (the README's
examples as written and moved), one rule for a relative --config-dir in the CLI and in the
Serve app, and a deploy-config output that names no path of the machine it ran on."""

from __future__ import annotations

import itertools
import re
import shutil
from pathlib import Path

import pytest
import yaml

import pipeline.core.config as config_module
from pipeline.core.config import APP_ROOT, CONFIG_DIR, load_settings
from serve.app import build_from_args, serve_config
from serve.cli import COMMANDS, OPTIONS, Command, build_parser, main, parse_args

README = APP_ROOT / "README.md"
# What the README's placeholders stand for, to parse its examples.
PLACEHOLDERS = {"POOL": "face", "N": "4", "MS": "25", "S": "30", "URL": "redis://h:6379/0",
                "F": "out.yaml", "FILE": "out.yaml", "DIR": "configs/production", "H": "ab12",
                "LOCATION": "s3://bucket/model", "ADDR": "auto", "R": "2.5", "LIST": "8,16"}
# Mentions of a command by name in prose, not command lines (tune needs its POOL).
MENTIONS = {"ephemera tune", "ephemera eval"}


def readme_examples() -> list[str]:
    """Every `ephemera ...` in backquotes or on a line of its own in a code block."""
    text = README.read_text()
    inline = re.findall(r"`(ephemera [^`]+)`", text)
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)
    lines = [line for block in blocks for line in block.splitlines()
             if line.startswith("ephemera ")]
    return [" ".join(example.split()) for example in inline + lines]


def expand(example: str) -> list[list[str]]:
    """An example as concrete argument lists: [optional] parts kept, `a | b` alternatives
    each taken, placeholders filled in; without the leading `ephemera`."""
    tokens = example.replace("[", " ").replace("]", " ").split()[1:]
    groups: list[list[str]] = []
    for i, token in enumerate(tokens):
        if token == "|":
            continue
        if i and tokens[i - 1] == "|":
            groups[-1].append(token)
        else:
            groups.append([token])
    return [[PLACEHOLDERS.get(t, t) for t in choice] for choice in itertools.product(*groups)]


FLAGS = {option for option, keywords in OPTIONS.items() if keywords.get("action") == "store_true"}


def split(argv: list[str]) -> tuple[list[str], list[str], list[list[str]]]:
    """Command words, positionals, and options (each [--opt, VALUE], [--opt=VALUE] or a
    [--flag])."""
    words, positionals, options = [], [], []
    rest = iter(argv)
    tree: dict | None = COMMANDS
    for token in rest:
        if token.startswith("--"):
            options.append([token] if "=" in token or token in FLAGS else [token, next(rest)])
        elif tree is not None and token in tree:
            words.append(token)
            node = tree[token]
            tree = None if isinstance(node, Command) else node[1]
        else:
            positionals.append(token)
    return words, positionals, options


def placements(argv: list[str]) -> list[list[str]]:
    """``argv`` with all its options after the last command word, before the first, and
    between the two of a nested command, as ``--opt VALUE`` and as ``--opt=VALUE``."""
    words, positionals, options = split(argv)
    flat = [t for o in options for t in o]
    joined = ["=".join(o) for o in options]
    out = [words + positionals + flat, flat + words + positionals,
           joined + words + positionals, words + positionals + joined]
    if len(words) == 2:
        out.append(words[:1] + flat + words[1:] + positionals)
    return out


def expected_value(option: str, value: str | None = None):
    return True if option in FLAGS else OPTIONS[option].get("type", str)(value)


EXAMPLES = [(example, argv) for example in readme_examples() if example not in MENTIONS
            for argv in expand(example)]


def test_the_readme_has_examples_with_options():
    assert len(EXAMPLES) >= 20
    assert sum(bool(split(argv)[2]) for _, argv in EXAMPLES) >= 6
    assert any("--config-dir" in argv for _, argv in EXAMPLES)


@pytest.mark.parametrize(("example", "argv"), EXAMPLES, ids=[" ".join(a) for _, a in EXAMPLES])
def test_readme_example_parses_with_options_on_either_side(example, argv):
    expected = vars(parse_args(argv))
    for moved in placements(argv):
        assert vars(parse_args(moved)) == expected, moved
    for option, *value in (o[0].split("=", 1) if len(o) == 1 else o for o in split(argv)[2]):
        assert expected[option.lstrip("-").replace("-", "_")] == expected_value(option, *value)


def leaves():
    for name, node in COMMANDS.items():
        if isinstance(node, Command):
            yield [name], node
        else:
            for action, leaf in node[1].items():
                yield [name, action], leaf


@pytest.mark.parametrize(("words", "command"), list(leaves()),
                         ids=[" ".join(w) for w, _ in leaves()])
def test_every_option_of_every_command_works_on_either_side(words, command):
    values = {"--max-batch-cost": "3", "--max-wait-ms": "7.5", "--max-concurrent-batches": "2",
              "--max-attempts": "5", "--stage-timeout-s": "9", "--interval-s": "2.5",
              "--rounds": "3", "--offered-rps": "1.5", "--jobs": "4", "--p95-target-s": "20"}
    positionals = ["face" if p == "pool" else f"{p}-value" for p in command.positionals]
    argv = words + positionals
    for option in command.options:
        argv += [option] if option in FLAGS else [option, values.get(option, f"value-of{option}")]
    expected = vars(parse_args(argv))
    for moved in placements(argv):
        assert vars(parse_args(moved)) == expected, moved
    for option in command.options:
        assert expected[option.lstrip("-").replace("-", "_")] == expected_value(
            option, values.get(option, f"value-of{option}"))


def test_a_flag_is_false_unless_given_anywhere_on_the_line():
    assert parse_args(["tune", "face", "--max-wait-ms", "5"]).dry_run is False
    assert parse_args(["--dry-run", "tune", "face", "--write", "f.yaml"]).dry_run is True
    assert parse_args(["tune", "face", "--write", "f.yaml", "--file-only"]).file_only is True


def test_address_before_or_after_status_is_the_same():
    """`ephemera --address auto status` used to exit 2."""
    assert vars(parse_args(["--address", "auto", "status"])) == \
        vars(parse_args(["status", "--address", "auto"]))
    assert parse_args(["--address", "ray://head:10001", "status"]).address == "ray://head:10001"


def test_defaults_and_the_later_value_win():
    args = parse_args(["status"])
    assert (args.address, args.config_dir, args.redis_url) == ("auto", "configs", None)
    assert parse_args(["--address", "a", "status", "--address", "b"]).address == "b"
    assert parse_args(["retention", "--redis-url", "r", "sweep"]).redis_url == "r"
    assert parse_args(["--workdir", "w", "serve"]).workdir == "w"


@pytest.mark.parametrize("argv", [
    ["--max-wait-ms", "5", "status"], ["status", "--max-wait-ms", "5"],
    ["--workdir", "w", "config", "check"], ["usage", "aggregate"],
    ["--redis-url", "r", "models", "stage", "a", "b"], ["--address", "auto"],
])
def test_an_option_the_command_does_not_take_is_refused_wherever_it_stands(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert "ephemera" in capsys.readouterr().err


def test_required_option_given_before_the_command():
    assert parse_args(["--out", "u.parquet", "usage", "aggregate"]).out == "u.parquet"


def test_help_states_the_rules():
    parser = build_parser()
    assert "before the first command" in parser.description
    help_text = " ".join(parser.format_help().split())
    assert "relative to the app root" in help_text


def no_absolute_path(value) -> bool:
    """No string in a Serve config is an absolute path (route_prefix is a URL path)."""
    if isinstance(value, dict):
        return all(no_absolute_path(v) for k, v in value.items() if k != "route_prefix")
    if isinstance(value, list):
        return all(no_absolute_path(v) for v in value)
    return not (isinstance(value, str) and (value.startswith("/") or str(APP_ROOT) in value))


@pytest.mark.parametrize("config_dir", ["configs", "configs/production",
                                        str(CONFIG_DIR / "production"), CONFIG_DIR])
def test_serve_config_names_no_absolute_path(config_dir):
    config = serve_config(load_settings(config_dir, require_pins=False),
                          args={"config_dir": config_dir})
    assert no_absolute_path(config)
    assert config["applications"][0]["args"]["config_dir"] in ("configs", "configs/production")


def test_deploy_config_is_the_same_from_anywhere(tmp_path, monkeypatch, capsys):
    """Run from another folder, with the config dir relative or absolute and before or
    after the subcommand: the committed Serve configs come out, relative paths only."""
    monkeypatch.chdir(tmp_path)
    committed = yaml.safe_load((CONFIG_DIR / "production" / "serve.yaml").read_text())
    for i, argv in enumerate((
            ["deploy-config", "--config-dir", "configs/production"],
            ["--config-dir", str(CONFIG_DIR / "production"), "deploy-config"],
            ["--config-dir=configs/production", "deploy-config"])):
        out = tmp_path / f"serve{i}.yaml"
        assert main([*argv, "--out", str(out)]) == 0
        assert yaml.safe_load(out.read_text()) == committed
    assert "warning" not in capsys.readouterr().err
    assert main(["--redis-url", "redis://127.0.0.1:6379/0", "deploy-config"]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out) == yaml.safe_load((CONFIG_DIR / "serve.yaml").read_text())
    assert str(APP_ROOT) not in captured.out and not captured.err


def test_deploy_config_outside_the_app_root_warns(tmp_path, capsys):
    outside = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, outside, ignore=shutil.ignore_patterns("production", "deploy"))
    assert main(["deploy-config", "--config-dir", str(outside)]) == 0
    captured = capsys.readouterr()
    args = yaml.safe_load(captured.out)["applications"][0]["args"]
    assert args["config_dir"] == str(outside.resolve())
    assert "not portable" in captured.err


def test_a_relative_config_dir_resolves_alike_in_the_cli_and_the_app(tmp_path, monkeypatch,
                                                                    capsys):
    """Against the app root, not the current folder, in `ephemera` and in build_from_args."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "production").mkdir(parents=True)  # a decoy in the cwd
    read: list[Path] = []

    def spy(path: Path, model):
        read.append(path.parent)
        raise ValueError("spied")

    monkeypatch.setattr(config_module, "load_yaml", spy)
    assert main(["--config-dir", "configs/production", "config", "check"]) == 2
    with pytest.raises(ValueError, match="spied"):
        build_from_args({"config_dir": "configs/production"})
    assert read == [CONFIG_DIR / "production"] * 2
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    # The shipped production set, not the empty decoy: refused for its unpinned models.
    assert main(["config", "check", "--config-dir", "configs/production"]) == 2
    err = capsys.readouterr().err
    assert "unpinned" in err and "s3://ephemera-models-us/" in err and "missing" not in err


TOKEN = "a-ray-cluster-token-0123456789"


@pytest.mark.parametrize(("environ", "token_file", "mode"), [
    ({}, None, "disabled"),  # the local launcher's mode
    ({"RAY_AUTH_TOKEN": TOKEN}, None, "token"),  # the head node: the token, no mode
    ({"RAY_AUTH_TOKEN_PATH": "{path}"}, TOKEN, "token"),
    ({}, TOKEN, "token"),  # ~/.ray/auth_token, where Ray looks last
    ({"RAY_AUTH_TOKEN_PATH": "{path}"}, "  \n", "disabled"),  # an empty file is no token
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}, None, "token"),
    ({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": TOKEN}, None, "disabled"),  # said: kept
])
def test_status_and_tune_join_with_token_auth_when_they_find_a_token(
        tmp_path, environ, token_file, mode):
    from serve.launcher import client_auth_mode

    home = tmp_path / "home"
    path = home / ".ray" / "auth_token"
    if token_file is not None:
        path.parent.mkdir(parents=True)
        path.write_text(token_file)
    environ = {k: v.format(path=path) for k, v in environ.items()}
    assert client_auth_mode(environ, home) == mode


def test_token_mode_without_a_token_is_refused_naming_where_to_put_it(tmp_path):
    from serve.launcher import client_auth_mode

    with pytest.raises(ValueError, match="RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH"):
        client_auth_mode({"RAY_AUTH_MODE": "token"}, tmp_path)
    with pytest.raises(ValueError, match="no cluster token"):
        client_auth_mode({"RAY_AUTH_MODE": "token",
                          "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, tmp_path)
