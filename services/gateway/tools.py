"""OpenAI tool calls (``tools``, ``tool_choice``, ``parallel_tool_calls``) for the gateway.

Three pieces, each independent of the request handlers:

* checking: ``check_tools`` refuses what cannot be served (a bad name, a schema llguidance
  cannot enforce) as a 400 naming the parameter, before anything is queued;
* constraining: for ``tool_choice`` "required" or a named function the output is forced by a
  JSON Schema grammar (``tool_choice_grammar``) and read back by ``calls_from_constrained``;
  for "auto" the model writes calls in its own format and a parser (``get_tool_parser``)
  finds them, in a whole text or in a stream of deltas;
* prompting: ``render_tools_prompt`` puts the tools, earlier calls and tool results into the
  prompt, through the model's chat template or, for a plain ChatML template, one written here.

``strict`` on a function is accepted and ignored: "required" and named choices are always
enforced by the grammar, "auto" never is.
"""
from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Optional, Union

from services.gateway.protocol import InvalidRequest
from shared.grammar import GrammarError, check, check_json_schema
from shared.messages import GrammarSpec

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOOL_CHOICE_MODES = ("none", "auto", "required")
_ANY_OBJECT = {"type": "object"}

ToolChoice = Union[str, dict, None]


# --------------------------------------------------------------------------------------------
# checking


def _function(tool) -> dict:
    """The ``function`` object of one tool, InvalidRequest unless the tool has OpenAI's shape."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise InvalidRequest("each tool must be an object with type 'function'", param="tools")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise InvalidRequest("each tool needs a 'function' object", param="tools")
    return fn


def tool_parameters(tool: dict) -> dict:
    """The JSON Schema of a tool's arguments (any object when the tool declares none)."""
    params = _function(tool).get("parameters")
    return _ANY_OBJECT if params is None else params


def _check_function(fn: dict) -> str:
    name = fn.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidRequest(f"tool name {name!r} must be 1 to 64 letters, digits, '_' or '-'",
                             param="tools")
    if "description" in fn and not isinstance(fn["description"], (str, type(None))):
        raise InvalidRequest(f"tool {name!r}: description must be a string", param="tools")
    params = fn.get("parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise InvalidRequest(f"tool {name!r}: parameters must be a JSON Schema object",
                                 param="tools")
        try:
            check_json_schema(params)
            check(GrammarSpec("json_schema", json.dumps(params)))
        except GrammarError as e:
            raise InvalidRequest(f"tool {name!r}: parameters: {e}", param="tools") from None
    return name


def chosen_name(tool_choice: ToolChoice) -> Optional[str]:
    """The function a named ``tool_choice`` forces, None for a mode string."""
    if isinstance(tool_choice, dict):
        return tool_choice["function"]["name"]
    return None


def _check_tool_choice(tool_choice: ToolChoice) -> None:
    if tool_choice is None or tool_choice in TOOL_CHOICE_MODES:
        return
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if (tool_choice.get("type") == "function" and isinstance(fn, dict)
                and isinstance(fn.get("name"), str)):
            return
    raise InvalidRequest("tool_choice must be 'none', 'auto', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")


def check_tools(tools: Optional[list], tool_choice: ToolChoice) -> None:
    """InvalidRequest (param "tools" or "tool_choice") unless ``tools`` and ``tool_choice`` can
    be served: OpenAI's shape, valid unique names, parameters that are a JSON Schema llguidance
    can enforce, and a choice that names a declared tool."""
    tools = [] if tools is None else tools
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list", param="tools")
    names: set[str] = set()
    for tool in tools:
        name = _check_function(_function(tool))
        if name in names:
            raise InvalidRequest(f"tool name {name!r} is declared twice", param="tools")
        names.add(name)
    _check_tool_choice(tool_choice)
    if (tool_choice == "required" or isinstance(tool_choice, dict)) and not tools:
        raise InvalidRequest("tool_choice requires tools", param="tool_choice")
    named = chosen_name(tool_choice)
    if named is not None and named not in names:
        raise InvalidRequest(f"tool_choice names {named!r}, which is not in tools",
                             param="tool_choice")
    if tool_choice == "required":                # each tool compiles; so should their union
        try:
            check(tool_choice_grammar(tools, "required", True))
        except GrammarError as e:
            raise InvalidRequest(f"tools cannot be combined into one grammar: {e}",
                                 param="tools") from None


def resolve_tool_choice(tools: Optional[list], tool_choice: ToolChoice) -> Union[str, dict]:
    """OpenAI's default: "auto" when tools are given, "none" otherwise."""
    if tool_choice is None:
        return "auto" if tools else "none"
    return tool_choice


# --------------------------------------------------------------------------------------------
# constraining


def _rewrite_refs(schema, prefix: str):
    """``schema`` with every local ``$ref`` ("#...") moved under ``prefix``: a tool's parameters
    are embedded in a larger schema, where their own "#/$defs/X" would point elsewhere."""
    if isinstance(schema, dict):
        out = {}
        for key, value in schema.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#"):
                out[key] = prefix + value[1:]
            else:
                out[key] = _rewrite_refs(value, prefix)
        return out
    if isinstance(schema, list):
        return [_rewrite_refs(item, prefix) for item in schema]
    return schema


def _has_ref(schema) -> bool:
    return '"$ref"' in json.dumps(schema)


def _required_schema(tools: list, parallel_tool_calls: bool) -> dict:
    """An array of ``{"name", "arguments"}`` objects, one alternative per tool."""
    alternatives, defs = [], {}
    for tool in tools:
        name, params = _function(tool)["name"], tool_parameters(tool)
        if _has_ref(params):
            key = f"tool_{name}"
            defs[key] = _rewrite_refs(params, f"#/$defs/{key}")
            params = {"$ref": f"#/$defs/{key}"}
        alternatives.append({
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": alternatives}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def tool_choice_grammar(tools: list, tool_choice: ToolChoice,
                        parallel_tool_calls: bool = True) -> Optional[GrammarSpec]:
    """The constraint forcing ``tool_choice`` (after ``check_tools``), None for "auto"/"none".

    Named: the whole output is that function's arguments object. "required": a JSON array of
    calls (at most one unless ``parallel_tool_calls``)."""
    named = chosen_name(tool_choice)
    if named is not None:
        tool = next(t for t in tools if _function(t)["name"] == named)
        return GrammarSpec("json_schema", json.dumps(tool_parameters(tool)))
    if tool_choice == "required":
        return GrammarSpec("json_schema", json.dumps(_required_schema(tools, parallel_tool_calls)))
    return None


_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """A tool call id in OpenAI's style: "call_" and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str       # the arguments object as JSON text


def _dump(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def calls_from_constrained(text: str, tool_choice: ToolChoice) -> list[ToolCall]:
    """The calls in an output generated under ``tool_choice_grammar``; ValueError when it does
    not parse (the output was cut short, by max_tokens or a stop string)."""
    named = chosen_name(tool_choice)
    if named is not None:
        json.loads(text)                       # ValueError (JSONDecodeError) when truncated
        return [ToolCall(new_call_id(), named, text.strip())]
    if tool_choice != "required":
        raise ValueError(f"tool_choice {tool_choice!r} is not constrained")
    items = json.loads(text)
    if not isinstance(items, list) or not all(
            isinstance(i, dict) and isinstance(i.get("name"), str) and "arguments" in i
            for i in items):
        raise ValueError("not a JSON array of {name, arguments} objects")
    return [ToolCall(new_call_id(), i["name"], _dump(i["arguments"])) for i in items]


class ConstrainedCalls:
    """Reads the replies of tool_choice "required" or a named tool, generated under
    ``tool_choice_grammar``, with a parser's face (``parse``, ``stream``). An output that does
    not parse (cut short by max_tokens) stays content."""

    def __init__(self, tool_choice: ToolChoice):
        self.tool_choice = tool_choice

    def parse(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        try:
            return None, calls_from_constrained(text, self.tool_choice)
        except ValueError:
            return text or None, []

    def stream(self) -> "_WholeReply":
        return _WholeReply(self)


class _WholeReply:
    """The stream of a constrained reply: nothing until it ends, then its calls (or content)."""

    def __init__(self, reader: ConstrainedCalls):
        self.reader, self.text = reader, []

    def feed(self, delta: str) -> list:
        self.text.append(delta)
        return []

    def finish(self) -> list:
        content, calls = self.reader.parse("".join(self.text))
        events = [ContentDelta(content)] if content else []
        return events + [ToolCallDelta(i, c.id, c.name, c.arguments) for i, c in enumerate(calls)]


# --------------------------------------------------------------------------------------------
# parsing tool_choice "auto" output


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallDelta:
    """A complete call, emitted once its block has closed."""

    index: int           # position among this output's calls, from 0
    id: str
    name: str
    arguments: str


StreamEvent = Union[ContentDelta, ToolCallDelta]

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"


def _call_from_object(obj) -> Optional[tuple[str, str]]:
    """(name, arguments JSON) of one ``{"name", "arguments"}`` object; None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):             # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return obj["name"], _dump(arguments)


def _hermes_block(body: str) -> Optional[list[tuple[str, str]]]:
    """Hermes / Qwen2.5: one JSON object per block."""
    try:
        call = _call_from_object(json.loads(body))
    except ValueError:
        return None
    return None if call is None else [call]


def _smollm2_block(body: str) -> Optional[list[tuple[str, str]]]:
    """SmolLM2-Instruct: a JSON list of objects per block ("[]" when no call is needed); a lone
    object is accepted too."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_call_from_object(item) for item in items]
    return None if any(c is None for c in calls) else calls


class _Stripped:
    """Passes content through with leading and trailing whitespace removed, as it streams: the
    leading run is dropped, a trailing run is held until non-whitespace follows it."""

    def __init__(self):
        self.started, self.pending = False, ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        if not body:
            self.pending += text
            return ""
        out = self.pending + body
        self.pending = text[len(body):]
        return out


class TaggedToolStream:
    """Incremental ``TaggedToolParser.parse``: ``feed`` each delta, then ``finish`` once.

    Text that could be the start of ``<tool_call>`` is held back until the next delta tells;
    a block is held until its closing tag, then becomes calls (or, if its JSON is not a call,
    content again). The content deltas concatenate to exactly ``parse``'s content ("" for
    None), whatever the split: leading and trailing whitespace of the whole content are
    dropped as they stream (trailing whitespace is held until more text follows it)."""

    def __init__(self, parser: "TaggedToolParser"):
        self.parser = parser
        self.buf = ""            # text not yet emitted: a possible tag prefix, or an open block
        self.inside = False      # buf starts with OPEN_TAG
        self.scanned = 0         # in a block, where the search for CLOSE_TAG resumes
        self.count = 0
        self.strip = _Stripped()

    def _content(self, text: str, events: list) -> None:
        text = self.strip.feed(text)
        if text:
            events.append(ContentDelta(text))

    def _close_block(self, end: int, events: list) -> None:
        block, self.buf = self.buf[:end + len(CLOSE_TAG)], self.buf[end + len(CLOSE_TAG):]
        calls = self.parser.read_block(block[len(OPEN_TAG):end])
        if calls is None:
            self._content(block, events)
        for name, arguments in calls or ():
            events.append(ToolCallDelta(self.count, new_call_id(), name, arguments))
            self.count += 1
        self.inside, self.scanned = False, 0

    def feed(self, delta: str) -> list[StreamEvent]:
        self.buf += delta
        events: list[StreamEvent] = []
        while True:
            if self.inside:
                start = max(len(OPEN_TAG), self.scanned)
                end = self.buf.find(CLOSE_TAG, start)
                if end < 0:
                    self.scanned = max(start, len(self.buf) - len(CLOSE_TAG) + 1)
                    return events
                self._close_block(end, events)
                continue
            start = self.buf.find(OPEN_TAG)
            if start >= 0:
                self._content(self.buf[:start], events)
                self.buf, self.inside = self.buf[start:], True
                continue
            keep = _partial_tag_suffix(self.buf, OPEN_TAG)
            self._content(self.buf[:len(self.buf) - keep], events)
            self.buf = self.buf[len(self.buf) - keep:]
            return events

    def finish(self) -> list[StreamEvent]:
        """Everything not yet emitted, as content (an unclosed block included)."""
        events: list[StreamEvent] = []
        self._content(self.buf, events)
        self.buf, self.inside = "", False
        return events


def _partial_tag_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class TaggedToolParser:
    """Calls written in ``<tool_call>...</tool_call>`` blocks; ``read_block`` reads one body
    into (name, arguments) pairs, or None when it holds no valid call (the block stays in the
    content)."""

    def __init__(self, name: str, read_block):
        self.name, self.read_block = name, read_block

    def parse(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        """(content, calls) of a whole output: the content is the text outside the blocks that
        held calls, stripped, None if empty. An unclosed block is content. Never raises."""
        pieces, calls, pos = [], [], 0
        while True:
            start = text.find(OPEN_TAG, pos)
            if start < 0:
                break
            end = text.find(CLOSE_TAG, start + len(OPEN_TAG))
            if end < 0:
                break
            block = self.read_block(text[start + len(OPEN_TAG):end])
            if block is None:
                pieces.append(text[pos:end + len(CLOSE_TAG)])
            else:
                pieces.append(text[pos:start])
                calls += [ToolCall(new_call_id(), n, a) for n, a in block]
            pos = end + len(CLOSE_TAG)
        pieces.append(text[pos:])
        content = "".join(pieces).strip()
        return content or None, calls

    def stream(self) -> TaggedToolStream:
        return TaggedToolStream(self)


_PARSERS = {
    "hermes": TaggedToolParser("hermes", _hermes_block),
    "smollm2": TaggedToolParser("smollm2", _smollm2_block),
}
TOOL_CALL_PARSERS = tuple(_PARSERS)


def resolve_parser_name(name: str, tokenizer) -> str:
    """``--tool-call-parser``: "auto" is the default model's own format for SmolLM2 (its chat
    template names it), hermes for any other model."""
    if name != "auto":
        get_tool_parser(name)
        return name
    return "smollm2" if "SmolLM" in _template_source(tokenizer) else "hermes"


def get_tool_parser(name: str) -> TaggedToolParser:
    """The parser for a model's tool-call format (one of ``TOOL_CALL_PARSERS``)."""
    try:
        return _PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; "
                         f"choose one of {', '.join(TOOL_CALL_PARSERS)}") from None


# --------------------------------------------------------------------------------------------
# prompting

# The tools section of the system turn, per output format. Both show the exact block the
# parser of that name reads; the tools are their OpenAI definitions as JSON.
_HERMES_TOOLS = """
{{- 'You can call the functions below; each is described by a JSON object inside '
    '<tools></tools>:\\n<tools>\\n' }}
{%- for tool in tools %}{{- tool | tojson ~ '\\n' }}{%- endfor %}
{{- '</tools>\\n\\nTo call a function, write one block per call, holding a JSON object with the '
    'name of the function and its arguments:\\n<tool_call>\\n'
    '{"name": "function_name", "arguments": {"argument": "value"}}\\n</tool_call>\\n'
    'If no function fits, answer in plain text.' }}"""
_SMOLLM2_TOOLS = """
{{- 'You can call the functions below; they are described by a JSON list inside <tools></tools>:\\n<tools>' }}
{{- tools | tojson }}
{{- '</tools>\\n\\nTo call functions, write one block holding a JSON list with one object per '
    'call, each with the name of the function and its arguments:\\n<tool_call>[\\n'
    '{"name": "function_name", "arguments": {"argument": "value"}},\\n'
    '... (more calls if needed)\\n]</tool_call>\\n'
    'If no function fits, answer in plain text.' }}"""

# How an assistant turn's earlier calls are written back, in the same format.
_HERMES_CALLS = """
    {%- for call in message.tool_calls %}
        {%- if content or not loop.first %}{{- '\\n' }}{%- endif %}
        {{- '<tool_call>\\n' }}{{- call_json(call) }}{{- '\\n</tool_call>' }}
    {%- endfor %}"""
_SMOLLM2_CALLS = """
    {%- if content %}{{- '\\n' }}{%- endif %}
    {{- '<tool_call>[\\n' }}
    {%- for call in message.tool_calls %}
        {{- call_json(call) }}{%- if not loop.last %}{{- ',' }}{%- endif %}{{- '\\n' }}
    {%- endfor %}
    {{- ']</tool_call>' }}"""

_CHATML_TOOLS_TEMPLATE = """
{%- macro call_json(call) -%}
    {%- set fn = call.function if call.function is defined else call -%}
    {{- '{"name": ' }}{{- fn.name | tojson }}{{- ', "arguments": ' }}
    {%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}{%- endif %}
    {{- '}' }}
{%- endmacro -%}
{%- if messages and messages[0].role in ('system', 'developer') %}
    {%- set system = messages[0].content or '' %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system = '' %}
    {%- set turns = messages %}
{%- endif %}
{%- if system or tools %}
    {{- '<|im_start|>system\\n' ~ system }}
    {%- if tools %}
        {%- if system %}{{- '\\n\\n' }}{%- endif %}@TOOLS@
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endif %}
{%- for message in turns %}
    {%- set content = message.content or '' %}
    {%- if message.role == 'tool' %}
        {%- if loop.first or turns[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' ~ content ~ '\\n</tool_response>' }}
        {%- if loop.last or turns[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant\\n' ~ content }}@CALLS@
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {%- set role = 'system' if message.role == 'developer' else message.role %}
        {{- '<|im_start|>' ~ role ~ '\\n' ~ content ~ '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

_FORMATS = {"hermes": (_HERMES_TOOLS, _HERMES_CALLS), "smollm2": (_SMOLLM2_TOOLS, _SMOLLM2_CALLS)}


def chatml_tools_template(parser_name: str) -> str:
    """A ChatML chat template rendering tools, calls and tool results in ``parser_name``'s
    format: the tools in the system turn (after the conversation's own system message), earlier
    calls in the assistant turns, tool results as a user turn of <tool_response> blocks."""
    get_tool_parser(parser_name)
    tools_text, calls = _FORMATS[parser_name]
    return (_CHATML_TOOLS_TEMPLATE.replace("@TOOLS@", tools_text).replace("@CALLS@", calls)
            .strip())


def _template_source(tokenizer) -> str:
    source = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(source, dict):               # named templates: the tool one if there is one
        source = source.get("tool_use") or source.get("default") or ""
    return source


def tool_chat_template(tokenizer, parser_name: str) -> Optional[str]:
    """The template to render a request with tools: None when the model's own template handles
    tools (pass ``tools=`` to it), ours for a ChatML template without tools; InvalidRequest for
    any other template."""
    source = _template_source(tokenizer)
    if "tools" in source:
        return None
    if "<|im_start|>" in source:
        return chatml_tools_template(parser_name)
    raise InvalidRequest("the model's chat template cannot render tools (it is not ChatML and "
                         "does not mention tools)", param="tools")


def _text(content) -> str:
    """A message's content as text: None is empty, a list of parts is its text parts joined."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content


def _parsed_arguments(call: dict) -> dict:
    """``call`` with ``function.arguments`` as an object, the way chat templates expect it (the
    OpenAI API carries it as JSON text); text that is not JSON is left as it is."""
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        arguments = json.loads(fn["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**fn, "arguments": arguments}}


def prepare_messages(messages: list[dict]) -> list[dict]:
    """OpenAI-shaped messages as chat templates take them: text content, parsed arguments."""
    out = []
    for message in messages:
        message = {**message, "content": _text(message.get("content"))}
        if message.get("tool_calls"):
            message["tool_calls"] = [_parsed_arguments(c) for c in message["tool_calls"]]
        out.append(message)
    return out


def render_prompt(tokenizer, messages: list[dict], tools: list[dict], parser_name: str,
                  add_generation_prompt: bool = True, **kwargs) -> str:
    """A chat request's prompt: through the tools path when it has tools, earlier calls or tool
    results, else the model's template as it is."""
    if tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
        return render_tools_prompt(tokenizer, messages, tools, parser_name, add_generation_prompt, **kwargs)
    return tokenizer.apply_chat_template(prepare_messages(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


def render_tools_prompt(tokenizer, messages: list[dict], tools: list[dict], parser_name: str,
                        add_generation_prompt: bool = True, **kwargs) -> str:
    """The prompt text of a chat request with tools (``messages`` in OpenAI's shape; assistant
    ``tool_calls`` arguments may be JSON text or objects)."""
    return tokenizer.apply_chat_template(
        prepare_messages(messages), tokenize=False, tools=tools,
        chat_template=tool_chat_template(tokenizer, parser_name),
        add_generation_prompt=add_generation_prompt, **kwargs)
