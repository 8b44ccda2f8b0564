"""Strip credentials from anything that is logged, printed or used as a name.

Pure string code (no MLflow, no torch), so every package can use it: ``tracking`` for params,
tags, artifacts and metric names, ``evaluation`` for names derived from user-given paths, the
CLI for what it prints.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

# "hf_token", "api_key", "db_password" hide their value; counts like "ppl.tokens" stay visible.
SECRET_KEY = re.compile(r"(token(?![a-z])|passw|secret|api[_-]?key|credential|auth(?![a-z]))", re.I)
_URI_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.\-]*://)(?P<userinfo>[^/@\s]+)@")
_TOKEN_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9\-_]{16,}|ghp_[A-Za-z0-9]{16,}|AKIA[0-9A-Z]{16})\b")
# A query argument that carries a secret: *token*, *password*, *secret*, *signature*, *credential*,
# sig, and key / api_key / apikey / x-api-key / access_key (a "key" after a separator or alone,
# not any name ending in "key": MLflow's viewStateShareKey is a view id, not a credential).
_QUERY_SECRET = re.compile(
    r"([?&](?:[\w\-]*(?:token|password|secret|signature|credential)|(?:[\w\-]*[_\-])?(?:api)?key|sig)=)[^&\s]+",
    re.I)


def redact(text: Any) -> str:
    """Strip credentials from a string: URI user-info, known token shapes, secret query args."""
    s = str(text)
    s = _URI_USERINFO.sub(lambda m: m.group("scheme") + "***@", s)
    s = _TOKEN_VALUE.sub("***", s)
    return _QUERY_SECRET.sub(r"\1***", s)


def clean_mapping(values: Mapping[str, Any], limit: int) -> dict[str, str]:
    """Stringify, redact and truncate; keys that name a secret get their value hidden."""
    out = {}
    for key, value in values.items():
        if value is None:
            value = ""
        s = "***" if SECRET_KEY.search(key) and value not in ("", None) else redact(value)
        out[key] = s[:limit]
    return out
