"""docs/api.md is the Python SDK's whole reference: it names every public
name and documents every parameter of the entry points, and the README
sends readers there rather than into the source."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import squire

ROOT = Path(__file__).resolve().parent.parent
API = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(heading: str) -> str:
    """The text under a heading such as "### `Client`", up to the next
    heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = API.splitlines()
    start = lines.index(heading)
    end = next(
        (i for i in range(start + 1, len(lines))
         if re.match(rf"#{{1,{level}}} ", lines[i])),
        len(lines),
    )
    return "\n".join(lines[start + 1:end])


def parameters(fn: Callable[..., Any]) -> list[str]:
    return [name for name in inspect.signature(fn).parameters if name != "self"]


@pytest.mark.parametrize("name", squire.__all__)
def test_every_public_name_is_in_the_reference(name: str) -> None:
    headings = set(re.findall(r"^#+ `([^`]+)`", API, flags=re.MULTILINE))
    assert name in headings or f"`{name}`" in API, f"docs/api.md does not name {name}"


def test_every_public_name_has_a_heading_or_a_row() -> None:
    # Each gets its own heading except the RpcError subclasses, which share
    # the table of codes under RpcError.
    headings = set(re.findall(r"^#+ `([^`]+)`", API, flags=re.MULTILINE))
    codes = section("### `RpcError`")
    without = [n for n in squire.__all__ if n not in headings and f"| `{n}` |" not in codes]
    assert without == []


@pytest.mark.parametrize("heading,fn", [
    ("### `Client`", squire.Client.__init__),
    ("### `AsyncClient`", squire.AsyncClient.__init__),
    ("#### `run`", squire.IndexedStream.run),
    ("#### `run`", squire.IndexedStream.run_async),
    ("#### `iter`", squire.IndexedStream.iter),
    ("#### `iter`", squire.IndexedStream.aiter),
    ("#### `events`", squire.IndexedStream.events),
    ("### `IndexedStream`", squire.IndexedStream.__init__),
    ("### `embedded`", squire.embedded),
    ("### `embedded`", squire.async_embedded),
])
def test_every_parameter_is_documented(heading: str, fn: Callable[..., Any]) -> None:
    text = section(heading)
    missing = [p for p in parameters(fn) if not re.search(rf"`{p}[`=:(]", text)]
    assert missing == [], f"{heading} in docs/api.md does not document {missing}"


@pytest.mark.parametrize("name", [
    "AccessDenied", "AlreadyExists", "Cancelled", "DirectiveFailed", "FailedPrecondition",
    "InvalidArgument", "NotFound", "ResourceExhausted", "Unavailable",
])
def test_each_error_class_has_its_code(name: str) -> None:
    row = next(line for line in section("### `RpcError`").splitlines()
               if line.startswith(f"| `{name}` |"))
    codes = [c for c, cls in squire._errors._ERROR_BY_CODE.items() if cls.__name__ == name]
    assert codes and all(f"`{c}`" in row for c in codes), (name, codes, row)


def test_the_progress_fields_are_all_there() -> None:
    text = section("### `Progress`")
    fields = list(squire.Progress.__dataclass_fields__)
    assert {"leased", "waiting"} <= set(fields)
    assert [f for f in fields if f"| `{f}` |" not in text] == []


def test_the_retry_examples_hold() -> None:
    policy = squire.Exponential(0.1, 5.0)
    delays = []
    while (d := policy.delay(len(delays) + 1)) is not None:
        delays.append(round(d, 3))
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
    assert "waits 0.1, 0.2, 0.4, 0.8, 1.6 and 3.2 s (six\nretries)" in API
    assert squire.TransientError("x").retry == squire.Immediate(3)
    assert "(default `Immediate(3)`)" in API


def test_the_readme_points_to_the_reference_not_the_source() -> None:
    assert "(docs/api.md)" in README
    assert not re.search(r"squire/_\w+\.py", README), "the README points into the SDK's source"
    # serializer= is a keyword of the terminals, shown where it goes.
    assert 'run(client, serializer="msgpack")' in README


def test_the_first_screen_install_lines_paste_as_they_are() -> None:
    first_screen = README[:README.index("## Concepts")]
    blocks = re.findall(r"```bash\n(.*?)```", first_screen, re.S)
    installs = [b.strip() for b in blocks if "apt-get install" in b]
    assert len(installs) == 2, installs  # a nodejs of 20+, and NodeSource's for 18
    for line in installs:
        assert "\n" not in line and line.startswith("apt-get update && "), line
        assert all("install -y " in part for part in line.split("&&") if "install" in part), line
    # NodeSource's nodejs includes npm and conflicts with the distribution's npm
    assert "setup_20.x" in installs[1] and not installs[1].endswith("npm")
    # the test command of the first screen is what .ci/run runs
    ci = (ROOT / ".ci" / "run").read_text()
    command_2 = next(line for b in blocks for line in b.splitlines() if "pytest" in line)
    assert command_2 in ci


def test_the_reference_s_operations_module_runs() -> None:
    """The "Writing operations" example: it imports, its operation behaves as
    described, and its monoid's empty() survives JSON (an empty input folds to it)."""
    from squire_kernel.serde import Serializer, decode, encode

    section = API[API.index("## Writing operations"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    quotes = {"AAPL": 1.5}
    namespace: dict[str, object] = {"lookup": lambda symbol, currency: quotes[symbol]}
    exec(compile(code, "docs/api.md", "exec"), namespace)  # our own docs
    registry = squire.Registry()
    for item in namespace.values():
        if isinstance(item, squire.Operation | squire.Monoid):
            registry.add(item)
    never = type("Never", (), {"is_set": lambda self: False})()
    assert registry.operations["fetch_price"]("AAPL", abort=never) == 1.5
    with pytest.raises(squire.FatalError):
        registry.operations["fetch_price"]("XXX", abort=never)
    for monoid in registry.monoids.values():
        empty = monoid.empty_value()
        assert decode(encode(empty, Serializer.JSON)) == empty
    assert registry.monoids["longest"].combine_all(["ab", "cde", "fgh"]) == "cde"
