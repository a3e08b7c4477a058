"""Request fields: one declaration per field validates every request and documents it in OpenAPI.

A route declares its fields (`F`); `parse` checks a body against them before anything is proposed (a
malformed request gets HTTP 400 and never reaches Raft), and `openapi_document` turns the same declarations
into the document served at /openapi.json, so the two cannot drift apart.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from raft.commands import (
    CHANNEL_PERSON,
    HF_NO_PERSIST,
    HF_RED_DOT,
    HF_SYNC_ONCE,
    MAX_ID_BYTES,
    MAX_UID_BYTES,
    MAX_UIDS_PER_OP,
    PERSON_SEPARATOR,
    UID_RULE,
    person_channel_id,
    valid_uid,
)

U32 = (1 << 32) - 1
I63 = (1 << 63) - 1
UID_PATTERN = f"^[^{PERSON_SEPARATOR}]*$"  # raft.commands.valid_uid, as JSON Schema says it

Json = dict[str, Any]
# WuKongIM's message `header` fields and the flag bit each sets (the fixed header's bits on the wire).
HEADER_FLAGS = {"no_persist": HF_NO_PERSIST, "red_dot": HF_RED_DOT, "sync_once": HF_SYNC_ONCE}


class HttpError(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


def bad(msg: str) -> HttpError:
    return HttpError(400, msg)


# -- request fields: one declaration validates and documents ---------------------------------------------
@dataclass(frozen=True)
class F:
    """One request field. kind: str, uid (str without `@`), int, flag (0/1), uids (list of uids), obj, json
    (any JSON value, at most max_bytes once encoded), b64,
    ints (list of u8), objs (list of objects, at most `high`), strs (list of strings, at most `high`),
    header (WuKongIM's message header object, parsed into the HF_* flag bits)."""

    name: str
    kind: str = "str"
    required: bool = False
    default: Any = None
    max_bytes: int = MAX_ID_BYTES
    low: int = 0
    high: int = I63
    description: str = ""

    def parse(self, body: Json) -> Any:
        value = body.get(self.name)
        if value is None:
            if self.required:
                raise bad(f"{self.name} is required")
            return self.default
        if self.kind in ("str", "uid", "b64"):
            if not isinstance(value, str):
                raise bad(f"{self.name} must be a string")
            if self.required and not value:
                raise bad(f"{self.name} must not be empty")
            try:
                size = len(value.encode())
            except UnicodeEncodeError:
                raise bad(f"{self.name} is not valid UTF-8 text") from None
            if size > self.max_bytes:
                raise bad(f"{self.name} longer than {self.max_bytes} bytes")
            if self.kind == "uid" and not valid_uid(value):
                raise bad(f"{self.name} {UID_RULE}")
            if self.kind == "b64":
                try:
                    return base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    raise bad(f"{self.name} must be base64") from None
            return value
        if self.kind in ("int", "flag"):
            high = 1 if self.kind == "flag" else self.high
            if not isinstance(value, int) or isinstance(value, bool) or not self.low <= value <= high:
                raise bad(f"{self.name} must be an integer in [{self.low}, {high}]")
            return value
        if self.kind == "uids":
            if not isinstance(value, list) or len(value) > MAX_UIDS_PER_OP:
                raise bad(f"{self.name} must be a list of at most {MAX_UIDS_PER_OP} uids")
            for uid in value:
                if not isinstance(uid, str) or not uid:
                    raise bad(f"every entry of {self.name} must be a non-empty string")
                F(self.name, "uid", max_bytes=MAX_UID_BYTES).parse({self.name: uid})
            if self.required and not value:
                raise bad(f"{self.name} must not be empty")
            return list(dict.fromkeys(value))
        if self.kind in ("ints32", "ints63"):
            top = U32 if self.kind == "ints32" else I63
            if (
                not isinstance(value, list)
                or len(value) > self.high
                or any(not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= top for v in value)
            ):
                raise bad(f"{self.name} must be a list of at most {self.high} integers in [0, {top}]")
            return value
        if self.kind == "ints":
            if (
                not isinstance(value, list)
                or len(value) > 256
                or any(not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 255 for v in value)
            ):
                raise bad(f"{self.name} must be a list of integers in [0, 255]")
            return value
        if self.kind == "json":
            try:
                size = len(json.dumps(value, ensure_ascii=False).encode())
            except UnicodeEncodeError:  # a lone surrogate (JSON can carry one): no UTF-8 text holds it
                raise bad(f"{self.name} holds text that is not valid UTF-8") from None
            if size > self.max_bytes:
                raise bad(f"{self.name} larger than {self.max_bytes} bytes")
            return value
        if self.kind == "obj":
            if not isinstance(value, dict):
                raise bad(f"{self.name} must be an object")
            return value
        if self.kind == "objs":
            if (
                not isinstance(value, list)
                or len(value) > self.high
                or any(not isinstance(v, dict) for v in value)
            ):
                raise bad(f"{self.name} must be a list of at most {self.high} objects")
            return value
        if self.kind == "strs":
            if (
                not isinstance(value, list)
                or len(value) > self.high
                or any(not isinstance(v, str) for v in value)
            ):
                raise bad(f"{self.name} must be a list of at most {self.high} strings")
            for v in value:
                F(self.name, max_bytes=self.max_bytes).parse({self.name: v})
            return value
        if self.kind == "header":
            if not isinstance(value, dict):
                raise bad(f"{self.name} must be an object")
            bits = 0
            for key, bit in HEADER_FLAGS.items():
                flag = value.get(key, 0)
                if flag is None:
                    continue
                if not isinstance(flag, int) or isinstance(flag, bool) or flag not in (0, 1):
                    raise bad(f"{self.name}.{key} must be 0 or 1")
                bits |= bit if flag else 0
            return bits
        raise AssertionError(self.kind)

    def schema(self) -> Json:
        # Lengths are limits in UTF-8 bytes (they keep LMDB keys in range); for ASCII that is maxLength.
        if self.kind in ("str", "uid", "b64"):
            out: Json = {"type": "string", "maxLength": self.max_bytes, "x-max-utf8-bytes": self.max_bytes}
            if self.kind == "uid":
                out["pattern"] = UID_PATTERN
            if self.required:
                out["minLength"] = 1
            if self.kind == "b64":
                out["format"] = "byte"
        elif self.kind in ("int", "flag"):
            out = {"type": "integer", "minimum": self.low, "maximum": 1 if self.kind == "flag" else self.high}
        elif self.kind == "uids":
            item = {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_UID_BYTES,
                "x-max-utf8-bytes": MAX_UID_BYTES,
                "pattern": UID_PATTERN,
            }
            out = {"type": "array", "maxItems": MAX_UIDS_PER_OP, "items": item}
            if self.required:
                out["minItems"] = 1
        elif self.kind in ("ints32", "ints63"):
            top = U32 if self.kind == "ints32" else I63
            out = {
                "type": "array",
                "maxItems": self.high,
                "items": {"type": "integer", "minimum": 0, "maximum": top},
            }
        elif self.kind == "objs":
            out = {"type": "array", "maxItems": self.high, "items": {"type": "object"}}
        elif self.kind == "strs":
            item = {"type": "string", "maxLength": self.max_bytes, "x-max-utf8-bytes": self.max_bytes}
            out = {"type": "array", "maxItems": self.high, "items": item}
        elif self.kind == "ints":
            out = {
                "type": "array",
                "maxItems": 256,
                "items": {"type": "integer", "minimum": 0, "maximum": 255},
            }
        elif self.kind == "json":
            out = {
                "x-max-utf8-bytes": self.max_bytes
            }  # any JSON value: OpenAPI 3.0 says so by giving no type
        elif self.kind == "header":
            flag = {"type": "integer", "minimum": 0, "maximum": 1, "default": 0}
            out = {"type": "object", "properties": {key: dict(flag) for key in HEADER_FLAGS}}
        else:
            out = {"type": "object"}
        if self.default is not None and self.kind != "header":
            out["default"] = self.default
        if self.description:
            out["description"] = self.description
        return out


def parse(fields: tuple[F, ...], body: Json) -> Json:
    return {f.name: f.parse(body) for f in fields}


UID = F("uid", "uid", required=True, max_bytes=MAX_UID_BYTES)
CHANNEL = (F("channel_id", required=True), F("channel_type", "int", required=True, low=1, high=255))
CHANNEL_INFO = (
    *CHANNEL,
    F("ban", "flag", default=0),
    F("disband", "flag", default=0),
    F("send_ban", "flag", default=0),
    F("large", "flag", default=0),
    F(
        "allow_stranger",
        "flag",
        default=0,
        description="person channel: senders outside its whitelist may write",
    ),
)


def stored_channel(login_uid: str, channel_id: str, channel_type: int) -> str:
    """The stored id of a channel a request names: a person channel is named by the other party (or
    already in its stored form, `a@b`) and stored under `person_channel_id`."""
    if channel_type == CHANNEL_PERSON and login_uid and "@" not in channel_id:
        return person_channel_id(login_uid, channel_id)
    return channel_id


Query = dict[str, list[str]]
Handler = Callable[[Any, Query], Awaitable[Any]]


@dataclass
class Route:
    """One path: its method, its handler `(parsed body, raw query) -> answer`, and its declared fields."""

    method: str
    fn: Handler
    fields: tuple[F, ...] = ()
    body: str = "object"  # "object", "uid_array" (WuKongIM takes a bare array in a few places), "none"
    admin: bool = False
    summary: str = ""
    query: tuple[F, ...] = field(default_factory=tuple)
    # Answered without the manager token: liveness, and the console's static files (no data in them).
    public: bool = False
    # Only the cluster's other nodes may call it (signed with the cluster secret; the token is not enough).
    peer: bool = False


def openapi_document(routes: Mapping[str, Route], manager_token_on: bool) -> Json:
    """OpenAPI 3.0 from the route table: the same field declarations that validate every request."""
    paths: Json = {}
    error = {
        "description": "bad request",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"msg": {"type": "string"}, "status": {"type": "integer"}},
                }
            }
        },
    }
    for path, route in sorted(routes.items()):
        if route.peer:
            continue  # the cluster's own node-to-node path: not part of the API anyone else may call
        operation: Json = {
            "summary": route.summary or path,
            "responses": {"200": {"description": "ok"}, "400": error},
        }
        if manager_token_on and not route.public:
            operation["security"] = [{"managerToken": []}]
        if route.query:
            operation["parameters"] = [
                {"name": f.name, "in": "query", "required": f.required, "schema": f.schema()}
                for f in route.query
            ]
        if route.body == "object" and route.method == "POST":
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {f.name: f.schema() for f in route.fields},
                            "required": [f.name for f in route.fields if f.required],
                        }
                    }
                },
            }
        elif route.body == "uid_array":
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "array",
                            "maxItems": MAX_UIDS_PER_OP,
                            "items": {"type": "string", "minLength": 1, "pattern": UID_PATTERN},
                        }
                    }
                },
            }
        paths[path] = {route.method.lower(): operation}
    return {
        "openapi": "3.0.3",
        "info": {"title": "imnode HTTP API (WuKongIM-compatible)", "version": "0.1.0"},
        "paths": paths,
        "components": {
            "securitySchemes": {"managerToken": {"type": "apiKey", "in": "header", "name": "token"}}
        },
    }
