"""The loader under generated broken configs: `check` and `run` both exit 2 with a message that
names the key, the line or the file, and never show a traceback.

Each example breaks one key of the model with a value its kind can't take (a wrong type, a
number out of its bounds, an unknown choice, an empty path, a bad URL), or adds an unknown
key, or breaks the TOML itself. ``run`` is replaced by a function that fails the test, so a
config that slipped through could never start the pipeline (nor hang the test).
"""

from __future__ import annotations

import contextlib
import io
import math
import types
import typing
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from forwarder import cli
from forwarder.config import (
    _DURATION_RE,
    _SIZE_RE,
    Bounds,
    Config,
    ServerConfig,
    parse_duration,
    parse_server_url,
    parse_size,
)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- TOML values --------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def _toml_char(char: str) -> str:
    if char in '"\\':
        return "\\" + char
    if ord(char) < 0x20 or ord(char) == 0x7F:
        return f"\\u{ord(char):04x}"
    return char


scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
anything = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), scalars, max_size=2),
)
not_a_string = anything.filter(lambda v: not isinstance(v, str))
not_a_bool = anything.filter(lambda v: not isinstance(v, bool))


def _refused(parse: Any, value: Any) -> bool:
    try:
        parse(value)
    except ValueError:
        return True
    return False


def out_of_bounds(bounds: Bounds, parse: Any) -> st.SearchStrategy[Any]:
    """Numbers and strings that parse, but fall outside ``bounds`` (and aren't its "off")."""
    low, high = parse(bounds.low), parse(bounds.high)

    def as_number(value: Any) -> Any:
        return value.total_seconds() if isinstance(value, timedelta) else value

    unit = "s" if isinstance(low, timedelta) else "B"
    lo, hi = as_number(low), as_number(high)
    off = as_number(parse(bounds.off)) if bounds.off is not None else None
    below = st.floats(min_value=0, max_value=lo, exclude_max=True) if lo > 0 else st.nothing()
    if unit == "B":
        below = st.integers(min_value=0, max_value=int(lo) - 1) if lo > 0 else st.nothing()
    above = st.integers(min_value=int(hi) + 1, max_value=10**40)
    numbers = st.one_of(below, above).filter(lambda n: n != off)
    return st.one_of(numbers, numbers.map(lambda n: f"{n}{unit}" if n < 1e15 else str(n)))


def bad_values(field: Any) -> st.SearchStrategy[Any]:
    """Values the field must refuse."""
    annotation = field.annotation
    bounds = next(
        (m.func for m in field.metadata if isinstance(getattr(m, "func", None), Bounds)), None
    )
    if bounds is not None:
        duration = annotation is timedelta
        parse, pattern = (parse_duration, _DURATION_RE) if duration else (parse_size, _SIZE_RE)
        garbage = st.text(max_size=20).filter(lambda s: not pattern.match(s))
        wrong = anything.filter(lambda v: _refused(parse, v))
        return st.one_of(out_of_bounds(bounds, parse), garbage, wrong)
    if annotation is bool:
        return not_a_bool
    if annotation is int:  # a weight, 0-10000
        return st.one_of(
            anything.filter(lambda v: not isinstance(v, int) or isinstance(v, bool)),
            st.integers(max_value=-1),
            st.integers(min_value=10001),
        )
    if typing.get_origin(annotation) is list:  # include/exclude, labels, env, multiline...
        return anything.filter(lambda v: not isinstance(v, list))
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return anything.filter(lambda v: v not in choices)
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    if annotation is Path or Path in args:
        return st.one_of(not_a_string, st.sampled_from(["", " ", "\t"]))
    if annotation is str or str in args:
        return not_a_string
    raise AssertionError(f"no bad values for {annotation}")


def bad_urls() -> st.SearchStrategy[str]:
    ports = st.one_of(st.just(0), st.integers(min_value=65536, max_value=10**9))
    return st.one_of(
        ports.map(lambda p: f"tcp://agg:{p}"),
        ports.map(lambda p: f"tls://[::1]:{p}"),
        st.sampled_from(["tcp://agg", "http://agg:1", "unix://rel/path", "tcp://:1", ""]),
        st.text(max_size=30).filter(lambda s: _refused(parse_server_url, s)),
    )


def _leaf_fields(model: type[BaseModel], prefix: str) -> list[tuple[str, str, Any]]:
    """(section, key, field) for every key that isn't a table of its own."""
    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += _leaf_fields(annotation, f"{prefix}.{name}" if prefix else name)
        else:
            out.append((prefix, name, field))
    return out


LEAVES = [leaf for leaf in _leaf_fields(Config, "") if leaf[1] != "servers"]
SERVER_FIELDS = [(k, f) for k, f in ServerConfig.model_fields.items() if k != "url"]


@st.composite
def broken_key(draw: st.DrawFn) -> tuple[str, str]:
    """A file with one key broken, and the key the message must name."""
    kind = draw(st.sampled_from(["leaf", "url", "server", "unknown"]))
    if kind == "leaf":
        section, key, field = draw(st.sampled_from(LEAVES))
        value = draw(bad_values(field))
        if not section:  # a top-level key ([[multiline]])
            return f"{key} = {toml_value(value)}\n", key
        return f"[{section}]\n{key} = {toml_value(value)}\n", f"{section}.{key}"
    if kind == "url":
        url = draw(bad_urls())
        return f"[output]\nservers = [{toml_value(url)}]\n", "output.servers.0.url"
    if kind == "server":
        key, field = draw(st.sampled_from(SERVER_FIELDS))
        table = {"url": "tcp://agg:24224", key: draw(bad_values(field))}
        return f"[output]\nservers = [{toml_value(table)}]\n", f"output.servers.0.{key}"
    sections = sorted({section for section, _, _ in LEAVES if section})
    section = draw(st.sampled_from(sections))
    key = draw(st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True))
    known = {k for s, k, _ in LEAVES if s == section} | {"tls"}
    key = key if key not in known else key + "_x"
    return f"[{section}]\n{key} = {toml_value(draw(scalars))}\n", f"{section}.{key}: unknown key"


@st.composite
def broken_syntax(draw: st.DrawFn) -> str:
    """A file that is not TOML: the message names the line."""
    good = '[output]\nchunk_limit = "1MiB"\n'
    breakage = draw(
        st.sampled_from(
            [
                "[output\n",
                "chunk_limit = \n",
                "x = [1, 2\n",
                "= 3\n",
                "[output]\n",  # the same table twice
                'chunk_limit = "2MiB"\n',  # the same key twice
                "a = 'unterminated\n",
                "b = 1 2\n",
                "[[output]]\n",
            ]
        )
    )
    return good + breakage


def forwarder(command: str, path: Path) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([command, "--config", str(path)])
    return code, stderr.getvalue()


def _never_run(_config: Config) -> int:
    raise AssertionError("the pipeline started on a broken config")


@pytest.fixture
def no_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "run", _never_run)


@pytest.mark.usefixtures("no_pipeline")
@pytest.mark.parametrize("command", ["check", "run"])
@FUZZ
@given(case=broken_key())
def test_a_broken_key_is_named(tmp_path: Path, command: str, case: tuple[str, str]) -> None:
    text, expected = case
    path = tmp_path / "forwarder.toml"
    path.write_text(text, encoding="utf-8")
    code, stderr = forwarder(command, path)
    assert code == 2, (text, stderr)
    assert stderr.startswith("forwarder: config error:\n"), stderr
    assert f"{path}: {expected}" in stderr, (text, stderr)
    assert "Traceback" not in stderr


@pytest.mark.usefixtures("no_pipeline")
@pytest.mark.parametrize("command", ["check", "run"])
@FUZZ
@given(text=broken_syntax(), junk=st.text(max_size=10))
def test_a_broken_file_names_the_line(tmp_path: Path, command: str, text: str, junk: str) -> None:
    path = tmp_path / "forwarder.toml"
    path.write_text(text + "# " + junk.replace("\n", " ").replace("\r", " ") + "\n")
    code, stderr = forwarder(command, path)
    assert code == 2, (text, stderr)
    assert f"{path}: TOML syntax error: " in stderr, stderr
    assert "(at line " in stderr or "(at end of document)" in stderr, stderr
    assert "Traceback" not in stderr


@pytest.mark.usefixtures("no_pipeline")
@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe[output]\n",
        b"[output]\nservers = " + b"[" * 5000 + b"]" * 5000 + b"\n",
        b"x = " + b"{a = " * 3000 + b"1" + b"}" * 3000 + b"\n",
        b'[output]\nchunk_limit = "1MiB"\x00\n',
    ],
)
def test_an_unreadable_file_names_the_file(tmp_path: Path, command: str, content: bytes) -> None:
    path = tmp_path / "forwarder.toml"
    path.write_bytes(content)
    code, stderr = forwarder(command, path)
    assert code == 2, stderr
    assert f"{path}: " in stderr
    assert "Traceback" not in stderr


@pytest.mark.usefixtures("no_pipeline")
@pytest.mark.parametrize("command", ["check", "run"])
def test_a_missing_file_is_named(tmp_path: Path, command: str) -> None:
    path = tmp_path / "nope.toml"
    code, stderr = forwarder(command, path)
    assert code == 2
    assert f"{path}: can't read the config: No such file or directory" in stderr
