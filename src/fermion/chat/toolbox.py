"""Tools a model can call while it is being trained (RL rollouts, train/rollout.py): a name, the definition shown to
the model (chat/tools.py renders it into the prompt) and the Python function that answers a call.

A tool's function takes the call's arguments and returns the text of the `tool` message the model reads next; a
call it cannot answer returns the reason as that text ("error: ..."), as a real tool would, rather than raising.

    calculator  {"expression": "17 * (3 + 4)"}: + - * / and parentheses over numbers, evaluated from the parsed
                syntax tree (never eval): anything else is an error the model reads
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from dataclasses import dataclass

from fermion.config import RecipeError

MAX_EXPRESSION = 200  # characters of a calculator expression
MAX_MAGNITUDE = 1e15  # results and intermediate values beyond this are refused (no runaway products)
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


@dataclass(frozen=True)
class Tool:
    definition: dict  # {"name", "description", "parameters": JSON Schema}, as function-calling APIs describe one
    run: Callable[[dict], str]

    @property
    def name(self) -> str:
        return self.definition["name"]


class CalculatorError(ValueError):
    pass


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand) * (-1 if isinstance(node.op, ast.USub) else 1)
    elif isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise CalculatorError("division by zero")
        value = _OPERATORS[type(node.op)](left, right)
    else:
        raise CalculatorError("only numbers, + - * / and parentheses are allowed")
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("the number is too large")
    return value


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text: an integer when it is one, else up to 6 decimals."""
    if len(expression) > MAX_EXPRESSION:
        raise CalculatorError(f"the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CalculatorError("not an arithmetic expression") from None
    value = _evaluate(tree)
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _calculator(arguments: dict) -> str:
    expression = arguments.get("expression")
    if not isinstance(expression, str):
        return "error: give the expression as a string, e.g. {\"expression\": \"17 * 3\"}"
    try:
        return calculate(expression)
    except CalculatorError as err:
        return f"error: {err}"


CALCULATOR = Tool({"name": "calculator", "description": "evaluates + - * / and parentheses",
                   "parameters": {"type": "object",
                                  "properties": {"expression": {"type": "string", "description": "e.g. 17 * 3"}},
                                  "required": ["expression"], "additionalProperties": False}},
                  _calculator)
TOOLS: dict[str, Tool] = {tool.name: tool for tool in (CALCULATOR,)}


def get(names: list[str], field: str = "rl.tools") -> list[Tool]:
    """The registered tools `names` names; an unknown one is a RecipeError naming the field and the known tools."""
    unknown = [name for name in names if name not in TOOLS]
    if unknown:
        raise RecipeError(f"{field}: unknown tool {unknown[0]!r}; registered tools: {', '.join(TOOLS)}")
    return [TOOLS[name] for name in names]
