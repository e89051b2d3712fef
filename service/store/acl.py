"""The Redis ACL user decoders read granted chunks with (read grants, ``direct.py``).

It may only GET and MGET the store's keys: no writes, no deletes, no key listing, no other
prefix. The store grants a decoder an entry's chunk key names after checking the caller's tenant;
the user's password reaches the decoder from a Secret (``StoreConfig.redis_read_url``) and never
over gRPC. The same rules go to the embedded redis-server (``embedded.py``, through its owner-only
config file, never its command line) and, as ``redis-server --user ...`` arguments, to the
Kubernetes StatefulSet (``k8s/base/redis.yaml``, checked against this module by
``tests/test_direct_read.py``).
"""

from __future__ import annotations

READER = "kvc-reader"


def reader_rules(password: str, key_prefix: str = "kvc") -> list[str]:
    """``ACL SETUSER``/``--user`` arguments after the user name."""
    if not password:
        raise ValueError("the Redis reader user needs a password")
    # + a Redis Cluster client's discovery: the slot map (CLUSTER SLOTS, or SHARDS on Redis 7) and
    # the commands' key positions (COMMAND); both read metadata only
    return ["on", f">{password}", "resetkeys", f"~{key_prefix}:*", "resetchannels", "-@all", "+get", "+mget",
            "+ping", "+cluster|slots", "+cluster|shards", "+command"]


def reader_url(redis_url: str, password: str, user: str = READER) -> str:
    """``redis_url`` (the store's, maybe with other credentials) with the reader's credentials."""
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(redis_url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"))


def redacted(redis_url: str) -> str:
    """``redis_url`` without its password, for logs and messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(redis_url)
    if parts.password is None:
        return redis_url
    user, host = parts.netloc.rpartition("@")[0].partition(":")[0], parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
