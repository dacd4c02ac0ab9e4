"""services/gateway/tools.py: checking tools, the grammars of forced tool choices, reading calls
back, the hermes and smollm2 parsers (whole and streamed) and the prompt with tools."""
from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.protocol import InvalidRequest
from services.gateway.tools import (
    TOOL_CALL_PARSERS, ContentDelta, ToolCall, ToolCallDelta, calls_from_constrained,
    check_tools, chatml_tools_template, get_tool_parser, new_call_id, render_tools_prompt,
    resolve_tool_choice, tool_chat_template, tool_choice_grammar)
from shared.grammar import check


def fn_tool(name, parameters=None, **extra):
    fn = {"name": name, **extra}
    if parameters is not None:
        fn["parameters"] = parameters
    return {"type": "function", "function": fn}


WEATHER = fn_tool("get_weather", {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"], "additionalProperties": False,
}, description="Current weather in a city")
NOW = fn_tool("now")
TOOLS = [WEATHER, NOW]


def named(name):
    return {"type": "function", "function": {"name": name}}


# --------------------------------------------------------------------------------------------
# check_tools


@pytest.mark.parametrize("tools, choice", [
    (TOOLS, "auto"), (TOOLS, None), (TOOLS, "none"), (TOOLS, "required"), (TOOLS, named("now")),
    ([], "auto"), (None, None), ([], "none"),
    ([fn_tool("a-b_C9", {"type": "object"}, strict=True)], "auto"),
])
def test_check_tools_accepts(tools, choice):
    check_tools(tools, choice)


@pytest.mark.parametrize("tools, match", [
    ([{"type": "retrieval"}], "type 'function'"),
    (["get_weather"], "type 'function'"),
    ([{"type": "function"}], "'function' object"),
    ([fn_tool("has space")], "1 to 64"),
    ([fn_tool("")], "1 to 64"),
    ([fn_tool("x" * 65)], "1 to 64"),
    ([fn_tool("é")], "1 to 64"),
    ([{"type": "function", "function": {"description": "no name"}}], "1 to 64"),
    ([fn_tool("f", description=3)], "description"),
    ([WEATHER, fn_tool("get_weather")], "declared twice"),
    ([fn_tool("f", [1])], "JSON Schema object"),
    ([fn_tool("f", {"type": "objekt"})], "'f'.*invalid JSON Schema"),
    ([fn_tool("f", {"type": "object", "properties": {"d": {"type": "string", "format": "weird"}}})],
     "'f'.*weird"),
    ([fn_tool("f", {"type": "object", "properties": {"s": {"type": "string", "pattern": "(?<=a)b"}}})],
     "(?s)'f'.*look-around"),
    ({"name": "f"}, "list"),
])
def test_check_tools_refuses_tools(tools, match):
    with pytest.raises(InvalidRequest, match=match) as e:
        check_tools(tools, "auto")
    assert e.value.param == "tools"


@pytest.mark.parametrize("tools, choice, match", [
    (TOOLS, "always", "tool_choice must be"),
    (TOOLS, {"type": "function"}, "tool_choice must be"),
    (TOOLS, {"type": "function", "function": {"name": 3}}, "tool_choice must be"),
    (TOOLS, {"type": "other", "function": {"name": "now"}}, "tool_choice must be"),
    (TOOLS, named("missing"), "'missing', which is not in tools"),
    ([], "required", "requires tools"),
    (None, "required", "requires tools"),
    (None, named("now"), "requires tools"),
])
def test_check_tools_refuses_tool_choice(tools, choice, match):
    with pytest.raises(InvalidRequest, match=match) as e:
        check_tools(tools, choice)
    assert e.value.param == "tool_choice"


def test_resolve_tool_choice_follows_openai_defaults():
    assert resolve_tool_choice(TOOLS, None) == "auto"
    assert resolve_tool_choice([], None) == "none"
    assert resolve_tool_choice(TOOLS, "required") == "required"


# --------------------------------------------------------------------------------------------
# grammars and reading constrained output


def schema_of(spec):
    assert spec.kind == "json_schema"
    check(spec)                                # llguidance compiles it
    return json.loads(spec.value)


def valid(schema, value) -> bool:
    return jsonschema.validators.validator_for(schema)(schema).is_valid(value)


def test_no_grammar_for_auto_and_none():
    assert tool_choice_grammar(TOOLS, "auto", True) is None
    assert tool_choice_grammar(TOOLS, "none", True) is None


def test_named_grammar_is_the_parameters_schema():
    schema = schema_of(tool_choice_grammar(TOOLS, named("get_weather"), True))
    assert schema == WEATHER["function"]["parameters"]
    assert schema_of(tool_choice_grammar(TOOLS, named("now"), False)) == {"type": "object"}


def test_required_grammar_accepts_calls_and_refuses_others():
    schema = schema_of(tool_choice_grammar(TOOLS, "required", True))
    weather = {"name": "get_weather", "arguments": {"city": "Paris"}}
    now = {"name": "now", "arguments": {}}
    assert valid(schema, [weather])
    assert valid(schema, [weather, now, weather])
    assert not valid(schema, [])                                               # minItems 1
    assert not valid(schema, [{"name": "get_wether", "arguments": {"city": "Paris"}}])
    assert not valid(schema, [{"name": "get_weather", "arguments": {"town": "Paris"}}])
    assert not valid(schema, [{"name": "get_weather"}])                        # arguments required
    assert not valid(schema, [{**now, "extra": 1}])                            # no other keys
    assert not valid(schema, weather)                                          # an array


def test_required_grammar_without_parallel_calls_allows_one():
    schema = schema_of(tool_choice_grammar(TOOLS, "required", False))
    now = {"name": "now", "arguments": {}}
    assert valid(schema, [now]) and not valid(schema, [now, now])


def test_required_grammar_keeps_refs_of_embedded_parameters():
    params = {"type": "object", "properties": {"p": {"$ref": "#/$defs/Point"}}, "required": ["p"],
              "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}},
                                  "required": ["x"]}}}
    tools = [fn_tool("draw", params), NOW]
    check_tools(tools, "required")
    schema = schema_of(tool_choice_grammar(tools, "required", True))
    assert valid(schema, [{"name": "draw", "arguments": {"p": {"x": 1}}}])
    assert not valid(schema, [{"name": "draw", "arguments": {"p": {"x": "one"}}}])


def test_calls_from_constrained_named():
    [call] = calls_from_constrained(' {"city": "Paris"} ', named("get_weather"))
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')
    assert call.id.startswith("call_")


def test_calls_from_constrained_required():
    text = '[{"name":"get_weather","arguments":{"city":"Zürich"}},{"name":"now","arguments":{}}]'
    calls = calls_from_constrained(text, "required")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Zürich"}), ("now", {})]
    assert "Zürich" in calls[0].arguments                # ensure_ascii off
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("text, choice", [
    ('{"city": "Par', named("get_weather")),            # cut by max_tokens
    ('[{"name":"now","arguments":{}', "required"),
    ('{"name":"now","arguments":{}}', "required"),       # not an array
    ('[{"name":"now"}]', "required"),
    ("[]", "auto"),
])
def test_calls_from_constrained_refuses_truncated_output(text, choice):
    with pytest.raises(ValueError):
        calls_from_constrained(text, choice)


def test_call_ids_look_like_openai_ones():
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 29 and i.startswith("call_") and i[5:].isalnum() for i in ids)


# --------------------------------------------------------------------------------------------
# parsers: recorded-looking outputs


def calls_of(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


HERMES_CASES = {
    "plain": ("The capital of France is Paris.", "The capital of France is Paris.", []),
    "one call": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
                 None, [("get_weather", {"city": "Paris"})]),
    "content first": ("Let me check the weather.\n<tool_call>\n"
                      '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
                      "</tool_call>",
                      "Let me check the weather.",
                      [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    "parallel": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                 '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>',
                 None, [("get_weather", {"city": "Paris"}), ("now", {})]),
    "malformed": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>',
                  '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>', []),
    "no name": ('<tool_call>{"arguments": {}}</tool_call> ok',
                '<tool_call>{"arguments": {}}</tool_call> ok', []),
    "unclosed": ('Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
                 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', []),
    "tricky strings": ('<tool_call>{"name": "run", "arguments": {"code": "if a < b: x = {\\"k\\": [1, {}]}", '
                       '"html": "<tool_call> </b>"}}</tool_call>',
                       None, [("run", {"code": 'if a < b: x = {"k": [1, {}]}', "html": "<tool_call> </b>"})]),
    "nested args": ('<tool_call>{"name": "book", "arguments": {"trip": {"legs": [{"from": "A", "to": "B"}]}}}'
                    "</tool_call>\nDone.",
                    "Done.", [("book", {"trip": {"legs": [{"from": "A", "to": "B"}]}})]),
    "string arguments": ('<tool_call>{"name": "now", "arguments": "{}"}</tool_call>', None, [("now", {})]),
    "a < in content": ("Is 1 < 2? Yes. <tool_c is not a tag", "Is 1 < 2? Yes. <tool_c is not a tag", []),
    "one good one bad": ('<tool_call>{"name": "now", "arguments": {}}</tool_call><tool_call>oops</tool_call>',
                         "<tool_call>oops</tool_call>", [("now", {})]),
}

SMOLLM2_CASES = {
    "plain": ("Hello! How can I help?", "Hello! How can I help?", []),
    "one call": ('<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n]</tool_call>',
                 None, [("get_weather", {"city": "Paris"})]),
    "parallel": ('<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                 '{"name": "now", "arguments": {}}]</tool_call>',
                 None, [("get_weather", {"city": "Paris"}), ("now", {})]),
    "content first": ('I will look it up.\n<tool_call>[{"name": "now", "arguments": {}}]</tool_call>',
                      "I will look it up.", [("now", {})]),
    "no call needed": ("<tool_call>[]</tool_call>", None, []),
    "lone object": ('<tool_call>{"name": "now", "arguments": {}}</tool_call>', None, [("now", {})]),
    "malformed": ('<tool_call>[{"name": "now", "arguments": {]</tool_call>',
                  '<tool_call>[{"name": "now", "arguments": {]</tool_call>', []),
    "one bad item": ('<tool_call>[{"name": "now", "arguments": {}}, {"arguments": {}}]</tool_call>',
                     '<tool_call>[{"name": "now", "arguments": {}}, {"arguments": {}}]</tool_call>', []),
    "unclosed": ('<tool_call>[{"name": "now", "arguments": {}}',
                 '<tool_call>[{"name": "now", "arguments": {}}', []),
    "tricky strings": ('<tool_call>[{"name": "echo", "arguments": {"text": "]</tool_call"}}]</tool_call>',
                       None, [("echo", {"text": "]</tool_call"})]),
}

CASES = [("hermes", k, *v) for k, v in HERMES_CASES.items()] + [
    ("smollm2", k, *v) for k, v in SMOLLM2_CASES.items()]


@pytest.mark.parametrize("parser, case, text, content, calls", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_parse(parser, case, text, content, calls):
    got_content, got_calls = get_tool_parser(parser).parse(text)
    assert got_content == content
    assert calls_of(got_calls) == calls
    assert all(isinstance(c, ToolCall) and c.id.startswith("call_") for c in got_calls)


def stream_all(parser, deltas):
    """(content, calls) of a stream fed ``deltas``; the call indices must count from 0."""
    stream, events = get_tool_parser(parser).stream(), []
    for delta in deltas:
        events += stream.feed(delta)
    events += stream.finish()
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [c.index for c in calls] == list(range(len(calls)))
    assert all(isinstance(e, ContentDelta) and e.text for e in events if e not in calls)
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("parser, case, text, content, calls", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_stream_one_character_at_a_time(parser, case, text, content, calls):
    assert stream_all(parser, list(text)) == (content or "", calls)


def test_stream_holds_back_a_possible_tag():
    stream = get_tool_parser("hermes").stream()
    assert stream.feed("Checking <tool") == [ContentDelta("Checking")]   # " <tool" held
    assert stream.feed("_c") == []
    assert stream.feed("x") == [ContentDelta(" <tool_cx")]               # not a tag after all
    events = stream.feed('<tool_call>{"name": "now", "arguments": {}}</tool_call>')
    assert [(e.index, e.name, e.arguments) for e in events] == [(0, "now", "{}")]
    assert stream.finish() == []


def test_stream_finish_flushes_an_unclosed_block():
    stream = get_tool_parser("hermes").stream()
    assert stream.feed('<tool_call>{"name": "now"') == []
    assert stream.finish() == [ContentDelta('<tool_call>{"name": "now"')]


def test_stream_finish_flushes_a_partial_tag():
    stream = get_tool_parser("smollm2").stream()
    assert stream.feed("a <tool_ca") == [ContentDelta("a")]
    assert stream.finish() == [ContentDelta(" <tool_ca")]


def test_unknown_parser():
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("mistral")


# --------------------------------------------------------------------------------------------
# parsers: streaming equals parsing, for any split of the text


FRAGMENTS = [
    "Let me check. ", "Done.", "a < b", " ", "\n", "<", "<tool", "</tool_call>", "<tool_call>",
    '{"name": "now", "arguments": {}}', '{"name": "get_weather", "arguments": {"city": "Par<is"}}',
    '[{"name": "now", "arguments": {}}]', "[]", '{"name": ', '"x": "}"', "é", "<tool_call>\n",
    "\n</tool_call>", "[", "]", ",",
]
texts = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join),
    st.text(alphabet="<>/_toolcalne{}[]\":, \nx", max_size=60),
    st.sampled_from([c[2] for c in CASES]),
)


@st.composite
def text_and_split(draw):
    text = draw(texts)
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=max(1, len(text)))))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("parser", TOOL_CALL_PARSERS)
@settings(max_examples=300, deadline=None)
@given(case=text_and_split())
def test_stream_equals_parse_for_any_split(parser, case):
    text, deltas = case
    content, calls = get_tool_parser(parser).parse(text)
    assert stream_all(parser, deltas) == (content or "", calls_of(calls))


# --------------------------------------------------------------------------------------------
# the prompt


@pytest.fixture(scope="module")
def tokenizer():
    from shared.tokenizer import load_tokenizer
    try:
        return load_tokenizer("")
    except FileNotFoundError as e:
        pytest.skip(str(e))


CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the weather in Paris, and what time is it?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_b", "content": "12:05"},
]


class _Tok:
    def __init__(self, chat_template):
        self.chat_template = chat_template


def test_tool_chat_template_choice(tokenizer):
    assert tool_chat_template(tokenizer, "smollm2") == chatml_tools_template("smollm2")
    assert tool_chat_template(_Tok("{% if tools %}{{ tools }}{% endif %}<|im_start|>"), "hermes") is None
    assert tool_chat_template(_Tok({"default": "<|im_start|>", "tool_use": "{{ tools }}"}), "hermes") is None
    with pytest.raises(InvalidRequest, match="cannot render tools") as e:
        tool_chat_template(_Tok("[INST] {{ messages }} [/INST]"), "hermes")
    assert e.value.param == "tools"


@pytest.mark.parametrize("parser", TOOL_CALL_PARSERS)
def test_prompt_with_tools(tokenizer, parser):
    prompt = render_tools_prompt(tokenizer, CONVERSATION, TOOLS, parser)
    assert prompt.startswith("<|im_start|>system\nAnswer briefly.\n\n")
    assert "You are a helpful AI assistant named SmolLM" not in prompt
    assert json.dumps(WEATHER) in prompt and json.dumps(NOW) in prompt
    assert "<|im_start|>user\nWhat is the weather in Paris, and what time is it?<|im_end|>\n" in prompt
    assert ("<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response>\n"
            "<tool_response>\n12:05\n</tool_response><|im_end|>\n") in prompt
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.count("<|im_start|>") == prompt.count("<|im_end|>") + 1


@pytest.mark.parametrize("parser", TOOL_CALL_PARSERS)
def test_prompt_writes_earlier_calls_in_the_parsers_format(tokenizer, parser):
    """The assistant turn of earlier calls is what the parser would read back as those calls."""
    prompt = render_tools_prompt(tokenizer, CONVERSATION, TOOLS, parser)
    turn = prompt.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    content, calls = get_tool_parser(parser).parse(turn)
    assert content is None
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("now", {})]


@pytest.mark.parametrize("parser", TOOL_CALL_PARSERS)
def test_prompt_instruction_example_parses(tokenizer, parser):
    """The format shown in the system turn is one the parser reads."""
    prompt = render_tools_prompt(tokenizer, CONVERSATION[1:2], TOOLS, parser)
    assert prompt.startswith("<|im_start|>system\nYou can call the functions below")
    system = prompt.split("<|im_end|>")[0].replace(",\n... (more calls if needed)", "")
    example = system[system.index("<tool_call>"):system.index("</tool_call>") + len("</tool_call>")]
    assert calls_of(get_tool_parser(parser).parse(example)[1]) == [
        ("function_name", {"argument": "value"})]


def test_prompt_assistant_content_and_calls(tokenizer):
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "now", "arguments": {}}}]},
                {"role": "tool", "tool_call_id": "c", "content": "12:05"},
                {"role": "assistant", "content": [{"type": "text", "text": "It is 12:05."}]},
                {"role": "user", "content": "thanks"}]
    prompt = render_tools_prompt(tokenizer, messages, TOOLS, "hermes", add_generation_prompt=False)
    assert ('<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "now", "arguments": {}}\n'
            "</tool_call><|im_end|>\n") in prompt
    assert "<|im_start|>assistant\nIt is 12:05.<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>user\nthanks<|im_end|>\n")


def test_prompt_of_a_template_that_handles_tools():
    class Recorder(_Tok):
        def apply_chat_template(self, messages, **kw):
            self.messages, self.kw = messages, kw
            return "rendered"

    tok = Recorder("{% for t in tools %}{{ t }}{% endfor %}")
    assert render_tools_prompt(tok, CONVERSATION, TOOLS, "hermes") == "rendered"
    assert tok.kw["chat_template"] is None and tok.kw["tools"] is TOOLS
    assert tok.kw["tokenize"] is False and tok.kw["add_generation_prompt"] is True
    assert tok.messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert CONVERSATION[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'


@pytest.mark.parametrize("tools", [[], None])
def test_prompt_without_tools_still_renders_earlier_calls(tokenizer, tools):
    """A conversation that used tools, continued without them (tool_choice "none", say)."""
    prompt = render_tools_prompt(tokenizer, CONVERSATION[1:], tools, "smollm2")
    assert prompt.startswith("<|im_start|>user\n") and "<tools>" not in prompt
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\n12:05\n</tool_response>" in prompt


def test_prompt_developer_message_is_a_system_message(tokenizer):
    messages = [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "hi"},
                {"role": "developer", "content": "Still terse."}]
    prompt = render_tools_prompt(tokenizer, messages, [NOW], "hermes")
    assert prompt.startswith("<|im_start|>system\nBe terse.\n\nYou can call")
    assert "<|im_start|>system\nStill terse.<|im_end|>\n" in prompt and "developer" not in prompt


# --------------------------------------------------------------------------------------------
# the grammars under llguidance, token by token (what the scheduler will enforce)


@pytest.fixture(scope="module")
def ll_tokenizer(tokenizer):
    import llguidance.hf
    return llguidance.hf.from_tokenizer(tokenizer)


def matches(ll_tokenizer, spec, text) -> bool:
    """Whether llguidance lets the model write ``text`` in full under ``spec`` and stop there."""
    from llguidance import LLMatcher
    from shared.grammar import to_llguidance

    matcher = LLMatcher(ll_tokenizer, to_llguidance(spec), log_level=0)
    return matcher.consume_tokens(ll_tokenizer.tokenize_str(text)) and matcher.is_accepting()


def test_llguidance_enforces_required_calls(ll_tokenizer):
    one = tool_choice_grammar(TOOLS, "required", False)
    many = tool_choice_grammar(TOOLS, "required", True)
    weather = '{"name":"get_weather","arguments":{"city":"Paris"}}'
    now = '{"name":"now","arguments":{}}'
    assert matches(ll_tokenizer, one, f"[{weather}]")
    assert not matches(ll_tokenizer, one, f"[{weather},{now}]")
    assert matches(ll_tokenizer, many, f"[{weather},{now}]")
    assert not matches(ll_tokenizer, many, '[{"name":"nope","arguments":{}}]')
    assert not matches(ll_tokenizer, many, '[{"name":"get_weather","arguments":{"town":"Paris"}}]')
    assert not matches(ll_tokenizer, many, "[]")
    calls = calls_from_constrained(f"[{weather},{now}]", "required")
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("now", {})]


def test_llguidance_enforces_named_arguments(ll_tokenizer):
    spec = tool_choice_grammar(TOOLS, named("get_weather"), True)
    assert matches(ll_tokenizer, spec, '{"city":"Paris","unit":"celsius"}')
    assert not matches(ll_tokenizer, spec, '{"unit":"celsius"}')
    assert not matches(ll_tokenizer, spec, '{"city":"Paris"} and more')


def test_the_tool_call_parser_flag_offers_every_parser():
    from shared.config import TOOL_CALL_PARSERS as FLAG_CHOICES

    assert FLAG_CHOICES == ("auto", *TOOL_CALL_PARSERS)
