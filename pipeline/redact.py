"""Secrets never go into the lineage: URIs as they may be recorded, shown and logged.

A tracking URI may carry a password (``postgresql://user:pw@host/db``, ``https://user:pw@mlflow…``), a
store or data URI keys (pyarrow reads ``s3://KEY:SECRET@bucket/…`` and ``?access_key=…&secret_key=…``).
Everything mergeflow records in MLflow (params, tags, the spec as ``workflow.json`` and
``workflow.yaml``, provenance) and everything it prints goes through :func:`redact_uri` or
:func:`redact_text` first: a password or key becomes ``***``; the rest (scheme, user of a database or
server login, host, path, non-secret options such as ``endpoint_override``) stays, so the record still
says where things are. Steps keep using the real URIs; only what is written down is redacted.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# a user name is a login, not a secret, on these; on storage (s3://KEY:SECRET@) the whole user part is a key
_LOGIN_SCHEMES = ("postgresql", "postgres", "mysql", "mssql", "oracle", "http", "https", "databricks")
# query parameters whose values are secrets (pyarrow's S3/GCS/Azure options, SAS tokens, signed URLs, ...)
_SECRET_PARAM = re.compile(r"(?i)^(?:.*(?:secret|passw|pwd|token|credential|signature|api_?key)"
                           r".*|access_key|key|sig|x-amz-security-token)$")
# scheme://userinfo@ ... inside any text: the user info is what carries a password or key
_URI = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<userinfo>[^\s/@'\"]+)@")
_QUERY_PARAM = re.compile(r"(?P<sep>[?&])(?P<key>[A-Za-z0-9_.-]+)=(?P<value>[^&\s'\"#]*)")


def _userinfo(scheme: str, userinfo: str) -> str:
    base = scheme.lower().split("+", 1)[0]
    if base in _LOGIN_SCHEMES and ":" in userinfo:
        return f"{userinfo.split(':', 1)[0]}:{MASK}"  # the login stays, its password does not
    return MASK


def redact_text(text: str) -> str:
    """``text`` with the password or key of every URI in it (user info, secret query parameters) masked."""
    text = _URI.sub(lambda m: f"{m['scheme']}://{_userinfo(m['scheme'], m['userinfo'])}@", text)
    return _QUERY_PARAM.sub(lambda m: f"{m['sep']}{m['key']}={MASK if _SECRET_PARAM.match(m['key']) and m['value'] else m['value']}", text)


def redact_uri(uri: str) -> str:
    """A URI as it may be recorded or shown (see the module's docstring); anything else is left as it is."""
    return redact_text(uri) if isinstance(uri, str) else uri


def redact_values(value: Any) -> Any:
    """Every string in a (nested) dict or list redacted, e.g. a workflow spec as it is recorded."""
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_values(v) for v in value)
    return redact_text(value) if isinstance(value, str) else value


def redacted_fields(value: Any, path: str = "") -> list[str]:
    """The dotted paths of the strings :func:`redact_values` masks (what a recorded spec lost)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in redacted_fields(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in redacted_fields(v, f"{path}[{i}]")]
    return [path] if isinstance(value, str) and redact_text(value) != value else []
