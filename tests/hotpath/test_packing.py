"""Commands are packed by hiredis (ledger/connection.py): the same bytes redis-py's own
asyncio packer sends, the same refusals, and a real server understands them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from ledger.connection import connect

_PY = Connection()  # redis-py's Python packer, the reference
_ARG = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
)


def _packed(*args: object) -> bytes:
    client = connect("redis://127.0.0.1:6379/0")
    conn = client.connection_pool.connection_class()
    return b"".join(conn.pack_command(*args))


@given(st.sampled_from(["SET", "CONFIG GET", b"EVALSHA", b"CLIENT SETNAME"]), st.lists(_ARG))
def test_same_bytes_as_redis_py(name: str | bytes, args: list[object]) -> None:
    assert _packed(name, *args) == b"".join(_PY.pack_command(name, *args))


@pytest.mark.parametrize("bad", [None, True, [1], {"a": 1}])
def test_refuses_what_redis_py_refuses(bad: object) -> None:
    with pytest.raises(DataError):
        _PY.pack_command("SET", "k", bad)
    with pytest.raises(DataError):
        _packed("SET", "k", bad)


async def test_a_real_server_understands_them() -> None:
    client = connect("redis://127.0.0.1:6379/0")
    try:
        assert client.connection_pool.connection_class is not Connection
        key = "test-packing:é k"
        pipe = client.pipeline(transaction=True)
        pipe.set(key, "é\x00")
        pipe.incrbyfloat(key + "n", 0.1)
        pipe.get(key)
        assert await pipe.execute() == [True, 0.1, "é\x00".encode()]
        assert await client.execute_command("CONFIG GET", "maxmemory")
        await client.delete(key, key + "n")
    finally:
        await client.aclose(close_connection_pool=True)
