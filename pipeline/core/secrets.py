"""Credentials never leave the environment: the one place that strips them from anything written.

A URI may carry a password (`https://user:pass@host`, `postgresql://u:p@db/x`, percent-encoded or
not) or a secret query parameter (`?password=...`, `&X-Amz-Signature=...`). `redact` removes both
from a string; `redact_tree` from every string in a params mapping. Everything that turns config
into a written form (MLflow params and artifacts, the model card, tune outputs, printed config, error
lines) goes through them.
"""

from __future__ import annotations

import re
from typing import Any

SECRET_NAME = re.compile(r"(secret|password|passwd|pwd|token|credential|access_key|key_id|signature|auth)", re.I)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]*)@")
_QUERY_SECRET = re.compile(r"(?P<key>[?&;][^=&#\s]*?)=(?P<value>[^&#\s]*)")
MASK = "***"


def redact(text: str) -> str:
    """`text` with every URI's user:password@ and every secret-named query value replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _QUERY_SECRET.sub(
        lambda m: f"{m['key']}={MASK}" if SECRET_NAME.search(m["key"]) else m.group(0),
        text,
    )


def redact_tree(value: Any, key: str = "") -> Any:
    """A copy of a params mapping (or list, or scalar) with credentials removed: strings redacted,
    values under secret-named keys masked."""
    if isinstance(value, dict):
        return {k: redact_tree(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v, key) for v in value]
    if key and SECRET_NAME.search(key.rsplit(".", 1)[-1]) and value is not None:
        return MASK
    return redact(value) if isinstance(value, str) else value
