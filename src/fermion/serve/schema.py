"""What /openapi.json says: each POST route's request body (the pydantic models the handlers validate with, so the
document and the server agree on every field and range), and the errors each route answers.

The handlers read their bodies themselves (to answer in OpenAI's error format, after the size and content-type
checks of guard.py), so FastAPI cannot see the models; they are added here. The served document is specific to the
server: `model` can only be the served model's name, and max_tokens at most the context length less one, which
keeps a generated request (schemathesis, a client generator) something the server can answer.
"""

from __future__ import annotations

from pydantic import BaseModel

from fermion.serve.protocol import ChatCompletionRequest, CompletionRequest

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
ERRORS = {
    "400": "a malformed body, a wrong type or value, an unsupported parameter, or a prompt beyond the context",
    "401": "a missing or wrong API key (when the server has one)",
    "404": "an unknown model",
    "413": "a body larger than the server accepts",
    "415": "a body not sent as application/json",
    "429": "too many requests waiting",
    "500": "generation failed",
}
# One server-sent event of a streamed answer: its data a JSON chunk (or an error), the last one "[DONE]".
EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}


def describe(document: dict, model_name: str, context: int) -> dict:
    """FastAPI's document of the app, with the request bodies and the error answers added (in place)."""
    components = document.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422, which this server never answers
        components.pop(name, None)
    components["Error"] = ERROR
    for operations in document["paths"].values():
        for operation in operations.values():
            operation["responses"].pop("422", None)
    for path, model in BODIES.items():
        components.update(_body_schema(model, model_name, context))
        operation = document["paths"][path]["post"]
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        answer = operation["responses"]["200"]
        answer["content"]["text/event-stream"] = {"schema": EVENT}  # stream: true
        operation["responses"].update(_errors(ERRORS))
    models = document["paths"]["/v1/models"]["get"]
    models["responses"].update(_errors({"401": ERRORS["401"]}))
    model = document["paths"]["/v1/models/{name}"]["get"]
    model["responses"].update(_errors({"401": ERRORS["401"], "404": "no model of that name"}))
    return document


def _body_schema(model: type[BaseModel], model_name: str, context: int) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    found = schema.pop("$defs", {})
    properties = schema["properties"]
    properties["model"] = {**properties["model"], "enum": [model_name]}
    for name in ("max_tokens", "max_completion_tokens"):
        for option in properties.get(name, {}).get("anyOf", []):
            if option.get("type") == "integer":
                option["maximum"] = context - 1
    return {**found, model.__name__: schema}


def _errors(described: dict[str, str]) -> dict:
    return {status: {"description": text, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for status, text in described.items()}
