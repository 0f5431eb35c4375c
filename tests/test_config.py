"""Config: typed validation with precise errors, and config.example.yaml kept in step with the defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO
from pydantic import BaseModel

from daemon.config import Config, LiteRtModelConfig, OnnxModelConfig, OpenVinoModelConfig, load_config, parse_config
from daemon.errors import ConfigError


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"servr": {}}, "servr: unknown key (did you mean 'server'?)"),
        ({"server": {"prot": 1}}, "server.prot: unknown key (did you mean 'port'?)"),
        ({"server": {"port": 70000}}, "server.port: 70000 is not valid: Input should be less than or equal to 65535"),
        ({"server": {"port": "eighty"}}, "server.port: 'eighty' is not valid"),
        ({"models": [{"name": "a", "runtime": "tensorrt"}]}, "models[0].runtime: 'tensorrt' is not a known runtime"),
        ({"models": [{"name": "a"}]}, "models[0].runtime: required key is missing"),
        ({"models": [{"name": "a", "runtime": "onnxruntime", "thread": 2}]}, "models[0].thread: unknown key (did you mean 'threads'?)"),
        ({"models": [{"name": "a/b", "runtime": "onnxruntime"}]}, "models[0].name: 'a/b' is not valid"),
        ({"models": [{"name": "a", "runtime": "onnxruntime", "device": "tpu"}]}, "models[0].device: 'tpu' is not valid"),
        ({"models": [{"runtime": "onnxruntime"}]}, "models[0].name: required key is missing"),
        ({"keys": {"kek": [{}]}}, "keys.kek[0]: dict is not valid: Value error, give exactly one of 'path' or 'credential'"),
        ([1, 2], "the top level must be a mapping"),
    ],
)
def test_bad_configs_name_the_key_and_value(doc: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"models": [{"name": "a", "runtime": "onnxruntime", "version": 2}]},
         'models[0].version: 2 is not valid: Input should be a valid string (YAML reads an unquoted 2 as a number: '
         'quote it, version: "2")'),
        ({"models": [{"name": "a", "runtime": "onnxruntime", "version": 1.1}]},
         'models[0].version: 1.1 is not valid: Input should be a valid string (YAML reads an unquoted 1.1 as a '
         'number: quote it, version: "...")'),
        ({"node_id": True},
         'node_id: True is not valid: Input should be a valid string (YAML reads unquoted true/false/yes/no/on/off '
         'as a boolean: quote the text, node_id: "...")'),
        ({"mqtt": {"reply_topic_prefixes": ["a/", 7]}},
         'mqtt.reply_topic_prefixes[1]: 7 is not valid: Input should be a valid string (YAML reads an unquoted 7 as '
         'a number: quote it, "7")'),
        ({"models": [{"name": "a", "runtime": "onnxruntime"}, {"name": "stats", "runtime": "openvino"}]},
         "models[1].name: 'stats' is reserved (GET /v2/models/stats): choose another model name"),
        ({"models": [{"name": "a", "runtime": "onnxruntime"}, {"name": "b", "runtime": "onnxruntime"},
                     {"name": "a", "runtime": "litert"}]},
         "models[2].name: model 'a' is listed twice (also models[0])"),
    ],
)
def test_config_errors_say_the_fix_at_the_key_path(doc: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert str(err.value) == f"config: {message}"


@pytest.mark.parametrize(
    ("state_dir", "keys", "message"),
    [
        ("keys", {"kek": [{"path": "keys/site.kek"}]},
         "state_dir: '/srv/inferd/keys' is the folder of keys.kek[0] (/srv/inferd/keys/site.kek): keep keys apart "
         "from the model store (a folder of their own, or systemd credentials)"),
        ("/srv/inferd/state", {"kek": [{"credential": "kek"}], "signers": [{"path": "state/trust/p.pub"}]},
         "state_dir: '/srv/inferd/state' contains the folder of keys.signers[0] (/srv/inferd/state/trust/p.pub): "
         "keep keys apart from the model store (a folder of their own, or systemd credentials)"),
        ("a/../keys/.", {"kek": [{"path": "/srv/inferd/keys/./site.kek"}]},
         "state_dir: '/srv/inferd/keys' is the folder of keys.kek[0] (/srv/inferd/keys/site.kek): keep keys apart "
         "from the model store (a folder of their own, or systemd credentials)"),
    ],
)
def test_state_dir_may_not_hold_the_keys(state_dir: str, keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"state_dir": state_dir, "keys": keys}, base_dir=Path("/srv/inferd"))
    assert str(err.value) == f"config: {message}"


@pytest.mark.parametrize(("state_dir", "keys"), [
    ("state", {"kek": [{"path": "keys/site.kek"}], "signers": [{"path": "keys/p.pub"}]}),  # side by side
    ("state", {"kek": [{"path": "site.kek"}]}),  # a flat folder: copying the store takes no key
    ("keys", {"kek": [{"credential": "site-kek"}]}),  # a credential is not a path
    ("keys-old", {"kek": [{"path": "keys/site.kek"}]}),  # a name that starts alike is another folder
])
def test_state_dir_beside_the_keys_is_fine(state_dir: str, keys: dict[str, Any]) -> None:
    parse_config({"state_dir": state_dir, "keys": keys}, base_dir=Path("/srv/inferd"))


def _model(**options: Any) -> dict[str, Any]:
    return {"models": [{"name": "a", "runtime": "onnxruntime", **options}]}


@pytest.mark.parametrize(
    ("warmup", "message"),
    [
        ({"input": [1, -5]}, "models[0].warmup.input: the shape must be a list of non-negative integers "
                             "(e.g. [1, 16000]), not [1, -5]"),
        ({"input": "1x16000"}, "models[0].warmup.input: the shape must be a list of non-negative integers "
                               "(e.g. [1, 16000]), not '1x16000'"),
        ({"input": [1, True]}, "models[0].warmup.input: the shape must be a list of non-negative integers "
                               "(e.g. [1, 16000]), not [1, True]"),
        ({}, "models[0].warmup: name at least one input and its shape"),
        ({1: [1]}, "models[0].warmup: input names are strings, not 1"),
        ("warmup.npy", "models[0].warmup: 'warmup.npy' is not a .npz file (numpy.savez writes one, arrays by input "
                       "name)"),
        (5, "models[0].warmup: give input shapes (e.g. {input: [1, 16000]}) or the path of a .npz file, not 5"),
    ],
)
def test_bad_warmup_inputs_name_the_problem(warmup: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_model(warmup=warmup))
    assert str(err.value) == f"config: {message}"


def test_warmup_takes_shapes_or_a_npz_path_relative_to_the_config(tmp_path: Path) -> None:
    shapes = parse_config(_model(warmup={"input": [1, 16000], "sr": []})).models[0].warmup
    assert shapes == {"input": (1, 16000), "sr": ()}
    (tmp_path / "c.yaml").write_text("models:\n  - {name: a, runtime: litert, warmup: w/a.npz}\n")
    assert load_config(tmp_path / "c.yaml").models[0].warmup == tmp_path / "w" / "a.npz"


def test_config_is_frozen() -> None:
    config = parse_config({})
    with pytest.raises(Exception, match="frozen"):
        config.server.port = 1  # type: ignore[misc]


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("state_dir: st\nkeys:\n  kek:\n    - path: k/a.kek\n")
    config = load_config(tmp_path / "c.yaml")
    assert config.state_dir == tmp_path / "st"
    assert config.keys.kek[0].path == tmp_path / "k" / "a.kek"


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("server:\n  port: [1,\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+"):
        load_config(tmp_path / "c.yaml")


def _defaults(model: type[BaseModel]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if field.is_required():
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            out[name] = _defaults(type(default))
        else:
            out[name] = default.as_posix() if isinstance(default, Path) else default
    return out


#: keys whose value in config.example.yaml is the demo's (marked "# demo" there), not the default
DEMO_KEYS = {"state_dir", "keys.kek", "keys.signers", "models"}


def _compare(defaults: dict[str, Any], example: dict[str, Any], prefix: str = "") -> list[str]:
    problems = []
    for key, value in defaults.items():
        path = f"{prefix}{key}"
        if path in DEMO_KEYS:
            assert key in example, f"{path} is missing from config.example.yaml"
            continue
        if key not in example:
            problems.append(f"{path} is missing from config.example.yaml")
        elif isinstance(value, dict) and value and isinstance(example[key], dict):
            problems += _compare(value, example[key], path + ".")
        elif example[key] != value:
            problems.append(f"{path}: example says {example[key]!r}, default is {value!r}")
    for key in example:
        if key not in defaults and f"{prefix}{key}" not in DEMO_KEYS:
            problems.append(f"{prefix}{key} in config.example.yaml is not a config key")
    return problems


def test_example_config_mirrors_the_defaults() -> None:
    example = yaml.safe_load((REPO / "config.example.yaml").read_text())
    assert _compare(_defaults(Config), example) == []
    # the example's model entry lists every per-model option with its default
    model = dict(example["models"][0])
    assert model.pop("name") == "demo"
    assert model.pop("runtime") == "onnxruntime"
    assert model == _defaults(OnnxModelConfig)
    load_config(REPO / "config.example.yaml")


def test_check_config_cli(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "daemon", "check-config", str(REPO / "config.example.yaml")],
        capture_output=True, text=True, cwd=REPO,
    )
    # the example serves the demo `make run` builds under var/demo; check-config reads its keys and store, so without
    # the demo it names what is missing (tests/test_check_config.py covers every check)
    if (REPO / "var" / "demo" / "state").is_dir():
        assert ok.returncode == 0, ok.stderr
        assert "OK (1 model(s))" in ok.stdout
    else:
        assert ok.returncode == 1 and "var/demo/keys/demo.kek: No such file or directory" in ok.stderr, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  prot: 80\n")
    res = subprocess.run(
        [sys.executable, "-m", "daemon", "check-config", str(bad)], capture_output=True, text=True, cwd=REPO
    )
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [f"inferd: error: {bad}: server.prot: unknown key (did you mean 'port'?)"]
    assert "Traceback" not in res.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "daemon", "check-config", str(tmp_path / "nope.yaml")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert missing.returncode == 1 and "cannot read config" in missing.stderr


def _commented_block(text: str, name: str) -> dict[str, Any]:
    lines = text.split(f"# BEGIN {name}\n", 1)[1].split(f"# END {name}", 1)[0].splitlines()
    return yaml.safe_load("\n".join(line[1:] for line in lines))[0]


@pytest.mark.parametrize(("block", "model"), [("openvino options", OpenVinoModelConfig),
                                               ("litert options", LiteRtModelConfig)])
def test_example_documents_each_runtimes_own_options(block: str, model: type[BaseModel]) -> None:
    entry = _commented_block((REPO / "config.example.yaml").read_text(), block)
    entry.pop("name")
    runtime = entry.pop("runtime")
    assert runtime == model.model_fields["runtime"].annotation.__args__[0]
    own = {k: v for k, v in _defaults(model).items() if k not in OnnxModelConfig.model_fields}
    assert entry == own
    parse_config({"models": [{"name": "x", "runtime": runtime, **entry}]})
