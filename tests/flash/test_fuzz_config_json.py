"""config.json, fuzzed: malformed JSON, huge files, wrong types for known keys, a top level
that is not an object, bad UTF-8, deep nesting, NaN, keys given twice. Each case runs
`hil image configure IMAGE --config FILE -o OUT` on a real image: exit 2 with the file named
(and the line or key where one applies), the image and the file unchanged, no output made."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from hil.cli import main
from hil.flash.configjson import _OS, _TOP, MAX_SIZE, _type_name

from ..fuzzing import FUZZ, digest
from .test_configure import make_gpt

GOOD = {"uuid": "0123456789abcdef", "deviceType": "raspberrypi3", "apiKey": "SECRET-KEY-123",
        "developmentMode": True, "os": {"sshKeys": ["ssh-ed25519 AAAA test"]}}


@dataclass
class Bench:
    folder: Path
    image: Path


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    folder = tmp_path_factory.mktemp("fuzz-config-json")
    image = folder / "disk.img"
    make_gpt(image)
    with pytest.MonkeyPatch.context() as mp:  # an accepted file configures into this cache
        mp.setenv("HIL_CACHE_DIR", str(folder / "cache"))
        yield Bench(folder, image)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3), max_leaves=6)
KNOWN = [("", k, t) for k, t in _TOP.items()] + [("os.", k, t) for k, t in _OS.items()]


@st.composite
def wrong_type(draw: st.DrawFn) -> bytes:
    prefix, key, want = draw(st.sampled_from(KNOWN))
    value = draw(json_values.filter(lambda v: _type_name(v) != want))
    cfg = json.loads(json.dumps(GOOD))
    (cfg["os"] if prefix else cfg)[key] = value
    return json.dumps(cfg).encode()


good_text = json.dumps(GOOD, indent=2)
bad_files = st.one_of(
    # malformed: cut short, or trailing garbage, or any text at all
    st.integers(0, len(good_text) - 2).map(lambda n: good_text[:n].encode()),
    st.text(st.characters(categories=["L", "N", "P"]), min_size=1, max_size=8).map(
        lambda t: (good_text + t).encode()),
    st.text(max_size=40).map(str.encode),
    st.binary(max_size=40),
    wrong_type(),
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
    # bad UTF-8 inside a string value
    st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe2\x82", b"\x80"]).map(
        lambda b: good_text.encode().replace(b"0123", b"01" + b, 1)),
    # huge: padding past the limit inside a valid object
    st.integers(1, 4096).map(lambda n: json.dumps({**GOOD, "pad": "a" * (MAX_SIZE + n)}
                                                  ).encode()),
    # deep, NaN, a key twice
    st.integers(33, 50000).map(lambda n: b'{"x": ' + b"[" * n + b"]" * n + b"}"),
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]).map(
        lambda c: good_text.replace("true", c.decode(), 1).encode()),
    st.sampled_from(sorted(GOOD)).map(lambda k: good_text.replace(
        "{", "{" + json.dumps(k) + ": null,", 1).encode()),
)


ACCEPTED: list[bytes] = []


def configure(bench: Bench, config: Path, out: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["image", "configure", str(bench.image), "--config", str(config),
                     "-o", str(out)])
    return code, err.getvalue()


@FUZZ
@given(content=bad_files)
# each used to escape as a Python exception (AttributeError, RecursionError) or pass unnoticed
@example(content=b"[]")  # the session called .setdefault on it
@example(content=b'{"os": []}')
@example(content=b'{"os": {"sshKeys": "ssh-ed25519 AAAA"}}')  # appended to a string
@example(content=b'{"x": ' + b"[" * 100000 + b"]" * 100000 + b"}")
@example(content=b'{"x": ' + b"[" * 600 + b"]" * 600 + b"}")  # parsed, then redact() recursed
@example(content=b'{"developmentMode": NaN}')  # written into the image as invalid JSON
@example(content=b'{"apiKey": "a", "apiKey": "b"}')  # the first one silently lost
@example(content=b'{"hostname": "\xff"}')
def test_bad_config_json_is_refused_naming_the_file(bench: Bench, content: bytes) -> None:
    config = bench.folder / "config.json"
    config.write_bytes(content)
    out = bench.folder / "out.img"
    out.unlink(missing_ok=True)
    before = digest(bench.image), digest(config)
    code, err = configure(bench, config, out)
    assert (digest(bench.image), digest(config)) == before
    if code == 0:  # some damage leaves valid JSON of the right shape: then it is configured
        ACCEPTED.append(content)
        assert out.is_file()
        return
    assert code == 2, err
    assert f"hil: config error: {config}" in err, err
    assert "Traceback" not in err and "SECRET-KEY-123" not in err, err
    assert not out.exists()
