"""Pipeline expressions (cmesh.expr): parsing, evaluation, errors with positions, safety."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from cmesh.expr import MAX_SOURCE, ExprError, evaluate, parse, truthy
from cmesh.expr_values import MAX_REGEX_TEXT


def env() -> dict:
    return {
        "request": {"text": "Where is my order 1234? It was 2 days ago."},
        "intent": {"label": "order_status", "score": np.float32(0.75)},
        "embed": {"embedding": np.ones((1, 4), dtype=np.float32)},
        "retrieve": {"passages": ["Reset it in settings.", "Call support."],
                     "ids": np.array([b"kb-password-reset", b"kb-contact"], dtype=object)},
        "orders": None,  # skipped: its `when` was false
        "a": 2, "b": 3, "c": "x",
    }


def ev(text: str, values: dict | None = None):
    return evaluate(parse(text), env() if values is None else values)


def error_of(text: str, values: dict | None = None) -> ExprError:
    with pytest.raises(ExprError) as info:
        ev(text, values)
    return info.value


@pytest.mark.parametrize("text, expected", [
    ("request.text", "Where is my order 1234? It was 2 days ago."),
    ("retrieve.passages[0]", "Reset it in settings."),
    ("retrieve.passages[-1]", "Call support."),
    ("retrieve.ids[0] == 'kb-password-reset'", True),  # BYTES elements read as str
    ("intent.label == 'order_status'", True),
    ("intent.label in ['order_status', 'cancel_order'] and first_int(request.text) != null", True),
    ("intent.label not in ['order_status']", False),
    ("not orders.rows", True),
    ("(a > 1 or b <= 2.5) and c != \"x\"", False),
    ("(a > 1 or b <= 2.5) and c != \"y\"", True),
    ("1 < a < b", True),  # chained, like Python
    ("1 < b < a", False),
    ("intent.score > 0.5", True),  # numpy scalar compares as a float
    ("'order' in request.text", True),
    ("'x' in {'x': 1}", True),
    ("a + b - 1", 4),
    ("-a + 1.5", -0.5),
    ("'a' + \"b\"", "ab"),
    ("[1] + [2, 3]", [1, 2, 3]),
    ("[1, 'two', null, true, false, True, False, None,]", [1, "two", None, True, False, True, False, None]),
    ("{'id': first_int(request.text), 'nested': {'k': [a]}}", {"id": 1234, "nested": {"k": [2]}}),
    ("{}", {}),
    ("[]", []),
    ("1e3", 1000.0),
    ("0 or 'fallback'", "fallback"),  # and/or return operands, like Python
    ("'' and 1", ""),
    ("a and b", 3),
    ("null == None", True),
    ("[1, 2] == [1, 2]", True),
])
def test_examples(text, expected) -> None:
    result = ev(text)
    assert result == expected and type(result) is type(expected)


def test_node_outputs() -> None:
    out = ev("embed.embedding")
    assert isinstance(out, np.ndarray) and out.shape == (1, 4)
    assert ev("embed.output") is not None and ev("embed.output").shape == (1, 4)  # first output
    assert ev("retrieve.output") == ["Reset it in settings.", "Call support."]
    # An output actually named 'output' wins.
    assert ev("n.output", {"n": {"first": 1, "output": 2}}) == 2
    # Only a node's own outputs have an implicit 'output'.
    assert ev("n.inner.output", {"n": {"inner": {"first": 1}}}) is None


def test_prompt_template() -> None:
    text = ("f'Customer question: {request.text}\\nKnowledge: {join(retrieve.passages, \" \")}"
            "\\nOrder: {default(orders.rows, \"none\")}\\nAgent:'")
    assert ev(text) == ("Customer question: Where is my order 1234? It was 2 days ago.\n"
                        "Knowledge: Reset it in settings. Call support.\nOrder: none\nAgent:")


@pytest.mark.parametrize("text, expected", [
    (r"f'tab\there\nline \\ \' \"'", "tab\there\nline \\ ' \""),
    (r"'a\nb'", "a\nb"),
    (r"'\d+'", "\\d+"),  # other backslashes stay, so regexes read naturally
    ("f'{{literal}} {a}'", "{literal} 2"),
    ("f\"}}{{\"", "}{"),
    ("f'{a}{b}'", "23"),
    ("f'{join([\"x\", \"y\"], '-')}'", "x-y"),  # the field may reuse the outer quote
    ("f'{ {\"k\": a} }'", "{'k': 2}"),
    ("f'[{orders.rows}]'", "[]"),  # null renders as nothing
    ("f'{f\"{a}\" + \"!\"}'", "2!"),
    ("f''", ""),
    ("F'{c}'", "x"),
])
def test_strings_and_f_strings(text, expected) -> None:
    assert ev(text) == expected


def test_references_and_roots() -> None:
    expr = parse("f'{request.text} {intent.label} {retrieve.passages[0]} {len(a.b[1].c)}' + x")
    assert expr.references() == {("request", "text"), ("intent", "label"), ("retrieve", "passages"),
                                 ("a", "b"), ("x",)}
    assert expr.roots() == {"request", "intent", "retrieve", "a", "x"}
    assert parse("first_int('12') + 1").references() == set()  # function names are not references
    expr.references().add(("mutated",))  # callers get copies; the cached Expr is unchanged
    assert ("mutated",) not in expr.references()


@pytest.mark.parametrize("text, message", [
    ("intent.label ) == 'x'", "unexpected ')' at 13"),
    ("(a > 1", "unclosed '(' at 0"),
    ("[1, 2", "unclosed '[' at 0"),
    ("f(1, 2]", "unknown function 'f' "),
    ("first_int(a ]", "expected ')', found ']' at 12"),
    ("eval('1')", "unknown function 'eval'"),
    ("'abc", "unterminated string at 0"),
    ("a = 1", "unexpected character '=' (use '==' to compare) at 2"),
    ("a && b", "use 'and'"),
    ("a * 2", "only '+' and '-' are supported"),
    ("a b", "unexpected 'b' at 2"),
    ("a not b", "unexpected 'b' at 6"),
    ("", "unexpected end of expression at 0"),
    ("a +", "unexpected end of expression at 3"),
    ("a.", "expected a name after '.', found end of expression at 2"),
    ("a.1", "expected a name after '.'"),
    ("in", "unexpected 'in' at 0"),
    ("lower(a, b)", "lower() takes 1 argument (2 given) at 0"),
    ("join()", "join() takes 1 to 2 arguments (0 given) at 0"),
    ("{a: 1}", "dict keys must be strings, found 'a' at 1"),
    ("{'a' 1}", "expected ':', found number at 5"),
    ("{'a': 1, 'a': 2}", "duplicate key 'a' at 9"),
    ("f'{a'", "unterminated string at 4"),
    ("f'{}'", "empty {} in f-string"),
    ("f'}'", "single '}' in f-string"),
    ("f'{a:>10}'", "format specs are not supported"),
    ("a.b(1)", "unexpected '(' (only built-in functions can be called) at 3"),
    ("re_find('(', a)", "re_find(): bad pattern"),
])
def test_parse_errors_have_positions(text, message) -> None:
    with pytest.raises(ExprError) as info:
        parse(text)
    assert message in str(info.value)
    assert info.value.expression is None and info.value.position is not None


def test_unknown_function_lists_the_known_ones() -> None:
    with pytest.raises(ExprError) as info:
        parse("eval('1')")
    assert info.value.position == 0 and "first_int" in info.value.message


@pytest.mark.parametrize("text", [
    "request.__class__", "().__class__", "__import__('os')", "_private", "request._cache",
    "a.__dict__", "f'{request.__class__}'", "[].__class__.__bases__",
])
def test_no_python_internals(text) -> None:
    with pytest.raises(ExprError):
        parse(text)


def test_values_never_expose_methods_or_internals() -> None:
    class Result:
        rows = ["r"]

        def secret(self):
            return "called"

    values = {"obj": Result(), "request": {"__class__": "just a key"}, "s": "text"}
    assert ev("obj.rows[0]", values) == "r"
    assert ev("obj.missing", values) is None
    assert "not a value" in str(error_of("obj.secret", values))
    assert "str has no attribute 'upper'" in str(error_of("s.upper", values))
    assert ev("request['__class__']", values) == "just a key"  # a key lookup, not getattr
    assert "cannot index" in str(error_of("obj['rows']", values))


def test_reading_through_null_yields_null() -> None:
    assert ev("orders.rows") is None
    assert ev("orders.rows[0].id") is None
    assert ev("default(orders.rows, 'none')") == "none"
    assert ev("retrieve.passages[5]") is None  # out of range
    assert ev("retrieve.passages[-3]") is None
    assert ev("request.missing") is None
    assert ev("'x' in orders.rows") is False and ev("'x' not in orders.rows") is True
    assert ev("len(orders.rows)") == 0 and ev("join(orders.rows, ',')") == ""
    assert ev("retrieve.passages[first_int('none here')]") is None
    obj = SimpleNamespace(rows=None)
    assert ev("o.rows.first", {"o": obj}) is None


def test_evaluation_errors_name_the_expression() -> None:
    err = error_of("'a' + 1")
    assert err.message == "cannot add str and int" and err.position == 4
    assert err.expression == "'a' + 1" and str(err) == "cannot add str and int at 4 in \"'a' + 1\""
    assert "cannot compare int < str at 2" in str(error_of("1 < 'a'"))
    assert "cannot compare null > int" in str(error_of("orders.rows > 1"))
    assert "unknown name 'nope' at 0" in str(error_of("nope"))
    assert "cannot negate str" in str(error_of("-c"))
    assert "cannot subtract str and str" in str(error_of("c - c"))
    assert "index must be an integer, not str" in str(error_of("retrieve.passages['x']"))
    assert "int(): invalid literal" in str(error_of("int('zz')"))
    assert "lower(): text must be a string, not int" in str(error_of("lower(a)"))
    assert "'in <string>' needs a string" in str(error_of("1 in c"))
    assert "cannot test membership in int" in str(error_of("1 in a"))


def test_arrays() -> None:
    values = {"x": {"empty": np.zeros((0,)), "v": np.array([1, 2, 3]), "s": np.array(["p", "q"])}}
    assert ev("len(x.v)", values) == 3 and ev("not x.empty", values) is True
    assert ev("x.v and 'yes'", values) == "yes"
    assert ev("x.v[1] + 1", values) == 3 and type(ev("x.v[1]", values)) is int
    assert ev("2 in x.v", values) is True and ev("'q' in x.s", values) is True
    assert ev("default(x.empty, 'none')", values) == "none"
    assert ev("first(x.s)", values) == "p" and ev("join(x.s, '+')", values) == "p+q"
    assert ev("json(x.v)", values) == "[1, 2, 3]"
    assert "cannot compare an array" in str(error_of("x.v == 1", values))
    assert truthy(np.array([0])) is True and truthy(np.zeros(0)) is False and truthy(None) is False


@pytest.mark.parametrize("text, expected", [
    ("first_int('order #42, then 7')", 42),
    ("first_int('no digits')", None),
    ("first_int(null)", None),
    ("first_int(17)", 17),
    ("re_find('order (\\d+)', request.text)", "1234"),
    ("re_find('[0-9]+ days', request.text)", "2 days"),
    ("re_find('zzz', request.text)", None),
    ("re_find('x', null)", None),
    ("join(['a', 1, null])", "a 1 "),
    ("join(['a', 'b'], ', ')", "a, b"),
    ("lower('AbC')", "abc"),
    ("upper('AbC')", "ABC"),
    ("lower(null)", None),
    ("len('abc') + len([1]) + len({'k': 1})", 5),
    ("str(12) + str(1.5) + str(null) + str(true)", "121.5True"),
    ("int(' 12 ') + int(2.9)", 14),
    ("float('1.5')", 1.5),
    ("int(null)", None),
    ("json({'id': 5, 'tags': ['a'], 'none': null})", '{"id": 5, "tags": ["a"], "none": null}'),
    ("json('é')", '"é"'),
    ("default(null, 1)", 1),
    ("default('', 'x')", "x"),
    ("default([], 'x')", "x"),
    ("default(0, 'x')", 0),  # 0 and false are values, not missing
    ("default(false, 'x')", False),
    ("first(['a', 'b'])", "a"),
    ("first([])", None),
    ("first(null)", None),
    ("truncate('abcdef', 3)", "abc"),
    ("truncate([1, 2, 3], 2)", [1, 2]),
    ("truncate(null, 3)", None),
])
def test_functions(text, expected) -> None:
    assert ev(text) == expected


def test_function_argument_errors() -> None:
    assert "truncate(): length must be a non-negative integer" in str(error_of("truncate('a', -1)"))
    assert "join(): expects a list, not str" in str(error_of("join('abc', ',')"))
    assert "len(): int has no length" in str(error_of("len(5)"))
    assert "json(): " in str(error_of("json(o)", {"o": object()}))
    assert "int(): " in str(error_of("int(1e400)"))  # OverflowError, reported, not raised raw


def test_regex_guard() -> None:
    # Nested variable repeats backtrack exponentially: refused when the config
    # loads for a literal pattern, and at evaluation for a computed one.
    for pattern in ["(a+)+b", "(a*)*", "(\\\\w+\\\\s?)+$", "(?:x|(y+))*z"]:
        with pytest.raises(ExprError, match="nests repeats"):
            parse(f"re_find('{pattern}', request.text)")
    assert "nests repeats" in str(error_of("re_find(p, 'aaa')", {"p": "(a+)+b"}))
    assert ev("re_find('(\\d{3}-)+', 'x 123-456-')") == "456-"  # fixed counts are fine
    with pytest.raises(ExprError, match="pattern longer than 200"):
        parse(f"re_find('{'a' * 201}', request.text)")
    # Only the first MAX_REGEX_TEXT characters are searched.
    values = {"t": "a" * MAX_REGEX_TEXT + " 99", "u": "x 7"}
    assert ev("re_find('[0-9]+', t)", values) is None and ev("first_int(t)", values) is None
    assert ev("re_find('[0-9]+', u)", values) == "7"


def test_limits() -> None:
    with pytest.raises(ExprError, match="nests too deeply"):
        parse("(" * 40 + "1" + ")" * 40)
    with pytest.raises(ExprError, match="nests too deeply"):
        parse("not " * 40 + "true")
    with pytest.raises(ExprError, match="too deep"):
        parse(" + ".join(["1"] * 150))  # a long flat chain is still a deep tree
    with pytest.raises(ExprError, match="longer than"):
        parse("'" + "a" * MAX_SOURCE + "'")
    with pytest.raises(ExprError, match="number too long"):
        parse("1" * 5000)
    assert ev(" + ".join(["1"] * 50)) == 50


def test_parsed_expressions_are_cached_and_immutable() -> None:
    expr = parse("intent.label == 'order_status'")
    assert parse("intent.label == 'order_status'") is expr
    with pytest.raises(dataclasses.FrozenInstanceError):
        expr.source = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        expr.root.pos = 3  # type: ignore[union-attr]
    assert expr.evaluate(env()) is True


def test_objects_with_attributes_as_values() -> None:
    values = {"request": SimpleNamespace(text="order 9"), "node": SimpleNamespace(label=b"yes")}
    assert ev("first_int(request.text)", values) == 9
    assert ev("node.label == 'yes'", values) is True
