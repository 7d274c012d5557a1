"""Opaque page tokens: the sort key of the last item of a page."""

import base64
import json
from collections.abc import Callable
from typing import Any

from mds_grpc.core.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_limit(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument(f"page_size must not be negative, got {page_size}")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(key: list) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


def decode_token(token: str, kinds: tuple[Callable[[Any], Any], ...]) -> tuple | None:
    """The key in `token` with each part converted by `kinds`; None for the first page."""
    if not token:
        return None
    try:
        parts = json.loads(base64.urlsafe_b64decode(token.encode()))
        if len(parts) != len(kinds):
            raise ValueError(token)
        return tuple(kind(part) for kind, part in zip(kinds, parts, strict=True))
    except Exception:
        raise InvalidArgument("malformed page_token: pass next_page_token from the previous page") from None
