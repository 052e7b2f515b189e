"""Every cap on what a tenant may send, in one place, and the checks that need no schema.

The API refuses a body past these caps with a 4xx naming the field (a JSON Pointer) before
any work starts or anything is stored; docs/recipes.md ("Limits") lists them. Field caps
are declared on the pydantic models with these constants; what holds for any body whatever
its fields (nesting, string contents, number ranges) is checked here on the parsed document:

- :func:`load_json_document` / :func:`load_yaml_document` parse a request body. JSON must be
  UTF-8; its nesting is measured on the raw bytes (regular expressions and C loops, no
  recursion) before ``json.loads`` runs. YAML is read with a safe loader that refuses
  anchors, aliases (the "billion laughs" expansion) and explicit tags, and stops composing
  at :data:`MAX_NESTING_DEPTH`.
- :func:`check_document` walks a parsed document with an explicit stack: nesting, items per
  list or mapping, string length, NUL characters and lone surrogates (which no database
  column or UTF-8 response can hold), non-finite numbers and integers past 64 bits.

Nothing here does I/O.
"""

from __future__ import annotations

import json
import math
import re
from array import array
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, Event, MappingStartEvent, SequenceStartEvent
from yaml.nodes import Node
from yaml.resolver import Resolver

from merging.parameters import FLOAT32_MAX  # noqa: F401  (re-exported: the largest float32)

# ---- the caps ------------------------------------------------------------------------------

MAX_NESTING_DEPTH = 32
"""Lists and mappings inside one another, anywhere in a body (a recipe needs about 8)."""
MAX_ITEMS = 1000
"""Entries of any one list or mapping in a body (fields with a smaller cap say so)."""
MAX_STRING_CHARS = 4096
"""Characters of any string in a body (fields with a smaller cap say so)."""
MAX_KEY_CHARS = 256
"""Characters of a mapping key."""
MAX_RECIPE_BYTES = 256 * 1024
"""A recipe as stored: the bytes of its canonical JSON (sorted keys, no spaces, UTF-8)."""
MAX_MODELS_PER_RECIPE = 64
"""Entries of a merge recipe's ``models`` (the worker holds one tensor of each at a time)."""
MAX_CHAT_TEMPLATE_CHARS = 64 * 1024
"""Characters of a merge recipe's ``chat_template`` (real templates with tool calling run to
several thousand characters): the one string longer than MAX_STRING_CHARS."""
LONG_STRINGS = {"chat_template": MAX_CHAT_TEMPLATE_CHARS}
"""Mapping keys whose string value may be longer than MAX_STRING_CHARS, with their limit."""
MAX_SLICES = 256
"""Entries of a merge recipe's ``slices`` (each holds at most MAX_MODELS_PER_RECIPE sources)."""
MAX_SETTING_ITEMS = 256
"""Entries of one parameter's gradient or ``{filter, value}`` list."""
MAX_FILTER_CHARS = 256
"""Characters of a ``filter`` (a substring of tensor names)."""
MAX_REFERENCE_CHARS = 1024
"""Characters of a model reference or a covariance corpus path."""
MAX_URL_CHARS = 2048
"""Characters of a webhook or callback URL."""
MAX_NAME_CHARS = 200
"""Characters of a display name (``output.name``)."""
MAX_TOKEN_CHARS = 256
"""Characters of a token named in a recipe's ``tokenizer.tokens``."""
MAX_TOKENIZER_TOKENS = 1000
"""Entries of a recipe's ``tokenizer.tokens``."""
MAX_TEXT_CHARS = 2000
"""Characters of an edit request's prompt, subject, target or listed prompt."""
MAX_EDIT_REQUESTS = 1000
"""Facts in one edit recipe (``requests``; MEMIT edits them as one batch)."""
MAX_PROMPTS_PER_REQUEST = 64
"""Entries of each prompt list of an edit request (paraphrase, neighborhood, keep)."""
MAX_LAYERS = 256
"""Entries of ``hyperparameters.layers``."""
MAX_LAYER_INDEX = 1023
"""Largest layer index a recipe may name."""
MAX_TRACE_SAMPLES = 100
"""Noise draws per prompt of an edit's causal trace (``hyperparameters.trace_samples``)."""
MAX_CONTEXT_TEMPLATES = 16
"""Entries of ``hyperparameters.context_template_counts``."""
MAX_TEMPLATE_COUNT = 100
"""Prefixes per ``context_template_counts`` entry."""
MAX_TEMPLATE_TOKENS = 256
"""Tokens per sampled prefix."""
MAX_CORPUS_PATHS = 256
"""Entries of ``covariance.paths``."""
MAX_COVARIANCE_TOKENS = 10**9
"""``covariance.tokens``: the ROME paper's statistics take about 5·10⁷."""
MAX_SHARD_BYTES = 2**40
"""``output.shard_size``: 1 TiB."""
MAX_MERGE_PARALLELISM = 64
"""A merge recipe's ``parallelism`` (the operator may allow fewer:
``WEIGHTSMITH_MERGE_MAX_PARALLELISM``)."""
MAX_WEBHOOK_EVENTS = 16
"""Entries of a subscription's ``events`` (repeats collapse)."""
MAX_IDEMPOTENCY_KEY_CHARS = 255
"""Characters of an ``Idempotency-Key`` header (printable ASCII)."""
MAX_CURSOR_CHARS = 256
"""Characters of a list ``cursor``."""
MAX_INTEGER = 2**63
"""Integers in a body lie in (−2⁶³, 2⁶³): a 64-bit column or seed holds them."""

# ---- refusing with a location --------------------------------------------------------------

Location = tuple[str | int, ...]


def json_pointer(loc: Sequence[str | int]) -> str:
    """RFC 6901: ``("models", 0, "model")`` → ``/models/0/model``."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in loc)


class DocumentRefused(ValueError):
    """A body that breaks a limit or is not a plain JSON document; ``pointer`` says where
    (RFC 6901; empty for the whole body or where the place has no pointer, e.g. a YAML
    anchor, whose line and column are in the message)."""

    def __init__(self, pointer: str, message: str) -> None:
        super().__init__(f"{pointer or '/'}: {message}")
        self.pointer = pointer
        self.message = message


def limit_error(model: str, loc: Location, message: str, value: Any = None) -> ValidationError:
    """A pydantic ValidationError at ``loc`` (relative to the model being validated), for
    validators that check a whole model but must point at one field: raised inside a nested
    model it keeps the outer location as its prefix, so the API names the exact field."""
    error = PydanticCustomError("limit", "{message}", {"message": message})
    return ValidationError.from_exception_data(
        model, [InitErrorDetails(type=error, loc=loc, input=value)]
    )


# ---- the walk ------------------------------------------------------------------------------


def check_string(value: str, max_chars: int = MAX_STRING_CHARS) -> str | None:
    """Why ``value`` cannot be accepted as a string anywhere, or None."""
    if len(value) > max_chars:
        return f"is {len(value)} characters long; at most {max_chars} are accepted"
    if "\x00" in value:
        return "contains a NUL character (U+0000), which no field accepts"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone surrogate (U+D800-U+DFFF), which is not a character"
    return None


def check_number(value: int | float) -> str | None:
    """Why a number cannot be accepted anywhere in a body, or None."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return f"{value} is not a finite number"
    elif not -MAX_INTEGER < value < MAX_INTEGER:
        return f"integers must lie within ±2^63 (64 bits); got one of {value.bit_length()} bits"
    return None


def check_document(document: Any, at: Location = ()) -> None:
    """Refuse what no body may hold, wherever it is; raises :class:`DocumentRefused` naming
    the first offending place. Iterative, so any nesting the parser built is walked safely."""
    stack: list[tuple[Any, Location, int]] = [(document, at, 0)]
    while stack:
        value, loc, depth = stack.pop()
        if isinstance(value, dict | list):
            depth += 1
            if depth > MAX_NESTING_DEPTH:
                raise DocumentRefused(
                    json_pointer(loc), f"nested deeper than {MAX_NESTING_DEPTH} levels"
                )
            if len(value) > MAX_ITEMS:
                raise DocumentRefused(
                    json_pointer(loc),
                    f"has {len(value)} entries; at most {MAX_ITEMS} are accepted",
                )
            if isinstance(value, list):
                stack.extend((item, (*loc, i), depth) for i, item in enumerate(value))
                continue
            for key, item in value.items():
                if not isinstance(key, str):
                    raise DocumentRefused(
                        json_pointer(loc), f"key {key!r} is not a string (write it in quotes)"
                    )
                problem = check_string(key, MAX_KEY_CHARS)
                if problem is not None:
                    raise DocumentRefused(json_pointer(loc), f"a key {problem}")
                stack.append((item, (*loc, key), depth))
        elif isinstance(value, str):
            key = loc[-1] if loc else None
            limit = LONG_STRINGS.get(key, MAX_STRING_CHARS) if isinstance(key, str) else None
            problem = check_string(value, limit or MAX_STRING_CHARS)
            if problem is not None:
                raise DocumentRefused(json_pointer(loc), problem)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int | float):
            problem = check_number(value)
            if problem is not None:
                raise DocumentRefused(json_pointer(loc), problem)
        else:  # a YAML date, set or binary: not a JSON value
            raise DocumentRefused(
                json_pointer(loc),
                f"a {type(value).__name__} is not a JSON value; write it as a string",
            )


# ---- JSON ----------------------------------------------------------------------------------

# A JSON string, or an unterminated one running to the end: the match never fails once it
# starts at a quote, so substituting it is linear (a pattern that can fail would rescan the
# rest of the body from every later quote).
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.DOTALL)
_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS)
_STEP = bytes.maketrans(_BRACKETS, b"\x01\xff\x01\xff")  # open +1, close −1 as signed bytes


def json_nesting(body: bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside strings in a UTF-8 JSON text, counted with
    C loops only (the text need not be valid JSON; the parser judges that afterwards).
    UTF-8 never encodes other characters with ASCII bytes, so the bytes can be scanned."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    return max(accumulate(array("b", brackets.translate(_STEP))), default=0)


def _no_constant(name: str) -> Any:
    raise DocumentRefused("", f"{name} is not a JSON number; numbers must be finite")


def load_json_document(body: bytes) -> Any:
    """A JSON body (UTF-8, RFC 8259) as Python values, within every limit of this module;
    raises :class:`DocumentRefused`."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocumentRefused("", f"the body is not UTF-8 text: {e}") from None
    if json_nesting(body) > MAX_NESTING_DEPTH:
        raise DocumentRefused("", f"the body is nested deeper than {MAX_NESTING_DEPTH} levels")
    try:
        document = json.loads(text, parse_constant=_no_constant)
    except RecursionError:  # not reached after the scan above; a parser error all the same
        raise DocumentRefused(
            "", f"the body is nested deeper than {MAX_NESTING_DEPTH} levels"
        ) from None
    except ValueError as e:
        if isinstance(e, DocumentRefused):
            raise
        raise DocumentRefused("", f"the body is not valid JSON: {e}") from None
    check_document(document)
    return document


# ---- YAML ----------------------------------------------------------------------------------


class _PlainComposer(Composer):
    """Composes only what JSON can say: no anchors, aliases or tags, at most
    :data:`MAX_NESTING_DEPTH` levels (the composer recurses once per level)."""

    _depth = 0
    peek_event: Callable[[], Event]  # the parser's, mixed in with this class

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()
        mark = event.start_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "in the body"
        anchor: str | None = getattr(event, "anchor", None)
        if isinstance(event, AliasEvent):
            raise DocumentRefused(
                "",
                f"YAML aliases are not accepted (*{anchor} at {where}): write the "
                "value out; a body is expanded by nothing",
            )
        if anchor is not None:
            raise DocumentRefused("", f"YAML anchors are not accepted (&{anchor} at {where})")
        tag: str | None = getattr(event, "tag", None)
        if tag is not None and tag != "!":
            raise DocumentRefused(
                "", f"YAML tags are not accepted ({tag} at {where}): write plain values"
            )
        nested = isinstance(event, MappingStartEvent | SequenceStartEvent)
        if nested:
            self._depth += 1
            if self._depth > MAX_NESTING_DEPTH:
                raise DocumentRefused(
                    "", f"the body is nested deeper than {MAX_NESTING_DEPTH} levels ({where})"
                )
        try:
            return super().compose_node(parent, index)
        finally:
            if nested:
                self._depth -= 1


class _PlainResolver(Resolver):
    """YAML 1.1's implicit types, less timestamps: a date stays a string, as in JSON."""


_PlainResolver.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if not tag.endswith(":timestamp")]
    for first, resolvers in Resolver.yaml_implicit_resolvers.items()
}

try:  # libyaml parses events in C; composing stays in Python, where the checks are
    from yaml._yaml import CParser

    class _PlainLoader(_PlainComposer, CParser, SafeConstructor, _PlainResolver):
        def __init__(self, stream: bytes) -> None:
            CParser.__init__(self, stream)
            _PlainComposer.__init__(self)
            SafeConstructor.__init__(self)
            _PlainResolver.__init__(self)

except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _PlainLoader(  # type: ignore[no-redef]
        Reader, Scanner, Parser, _PlainComposer, SafeConstructor, _PlainResolver
    ):
        def __init__(self, stream: bytes) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)
            _PlainComposer.__init__(self)
            SafeConstructor.__init__(self)
            _PlainResolver.__init__(self)


def load_yaml_document(body: bytes) -> Any:
    """A YAML body as Python values, within every limit of this module (one document; no
    anchors, aliases or tags); raises :class:`DocumentRefused`."""
    loader = _PlainLoader(body)
    try:
        document = loader.get_single_data()
    except DocumentRefused:
        raise
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer of > 4300 digits
        if "maximum nesting depth" in str(e):  # libyaml's own cap, met scanning ahead
            raise DocumentRefused(
                "", f"the body is nested deeper than {MAX_NESTING_DEPTH} levels"
            ) from None
        raise DocumentRefused("", f"the body is not valid YAML: {e}") from None
    except RecursionError:  # not reached: composing stops at MAX_NESTING_DEPTH
        raise DocumentRefused(
            "", f"the body is nested deeper than {MAX_NESTING_DEPTH} levels"
        ) from None
    finally:
        loader.dispose()
    check_document(document)
    return document
