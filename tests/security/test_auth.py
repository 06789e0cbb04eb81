"""User authentication at a real gateway: SimpleJWT HS256, RS256/ES256 from a JWKS URL.

The gateway under test accepts HS256 (the shared secret) and RS256/ES256 with keys
served by a local JWKS endpoint. Every refused token is answered 401 before anything
is read, is in the audit stream with the cause and what the token claimed, and
nothing reaches the connected edge.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, RSAKey
from websockets.exceptions import InvalidStatus

from dispatch.tokens import edge_claims, user_claims
from gateway.jwks import JwksSource

from .conftest import EDGE, NO_LIMITS, Site, enroll, recv_for, start_gateway
from support import SECRET, Processes, command, edge_token, http, wait_until

MINT = Path(__file__).with_name("simplejwt_mint.py")
RSA_1 = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
RSA_2 = RSAKey.generate_key(2048, parameters={"kid": "rsa-2"})  # published later: rotation
EC_1 = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
ATTACKER = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})  # same kid, other key
EC_ATTACKER = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})


class JwksServer:
    """A local JWKS endpoint whose key set the tests change; counts fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = [
            RSA_1.as_dict(private=False),
            EC_1.as_dict(private=False),
        ]
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def site_env(jwks_server: JwksServer) -> dict[str, str]:
    return {
        "DISPATCH_JWT_ALGORITHMS": "HS256,RS256,ES256",
        "DISPATCH_JWKS_URL": jwks_server.url,
        "DISPATCH_JWKS_MIN_REFRESH_S": "2",
    }


# -- token makers ----------------------------------------------------------------------
def claims(**changes: Any) -> dict[str, Any]:
    base = user_claims("alice", [EDGE], [], 600)
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], payload: Any, signature: bytes = b"") -> str:
    """A token assembled by hand: anything at all in header and payload."""
    head = b64(json.dumps(header).encode())
    body = b64(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    return f"{head}.{body}.{b64(signature)}"


def hs256_raw(header: dict[str, Any], payload: dict[str, Any], secret: str = SECRET) -> str:
    """HS256 over any header at all (joserfc itself refuses to sign some of them)."""
    import hashlib  # noqa: PLC0415
    import hmac  # noqa: PLC0415

    unsigned = raw_token(header, payload).rsplit(".", 1)[0]
    sig = hmac.new(secret.encode(), unsigned.encode(), hashlib.sha256).digest()
    return f"{unsigned}.{b64(sig)}"


def hs256_text(header: str, payload: str) -> str:
    """HS256 over header and payload given as JSON text (e.g. with a repeated member)."""
    import hashlib  # noqa: PLC0415
    import hmac  # noqa: PLC0415

    unsigned = f"{b64(header.encode())}.{b64(payload.encode())}"
    sig = hmac.new(SECRET.encode(), unsigned.encode(), hashlib.sha256).digest()
    return f"{unsigned}.{b64(sig)}"


def repeated_payload_member() -> str:
    """`user_id` twice: a last-wins parser sees alice, a first-wins one mallory."""
    body = json.dumps(claims())[:-1] + ', "user_id": "mallory"}'
    body = body.replace('"user_id": "alice"', '"user_id": "mallory"', 1)
    body = body[: body.rindex('"mallory"')] + '"alice"}'
    return hs256_text('{"alg": "HS256", "typ": "JWT"}', body)


def repeated_header_member() -> str:
    return hs256_text('{"alg": "none", "alg": "HS256", "typ": "JWT"}', json.dumps(claims()))


def oversized() -> str:
    pad = 5800
    while len(token := hs256(claims(pad="p" * pad))) <= 8000:
        pad += 50
    assert len(token) < 8150  # still inside the protocol layer's header line limit
    return token


def hs256(payload: dict[str, Any], secret: str = SECRET, **header: Any) -> str:
    return jwt.encode({"alg": "HS256", **header}, payload, OctKey.import_key(secret))


def signed(key: RSAKey | ECKey, alg: str, payload: dict[str, Any], **header: Any) -> str:
    return jwt.encode({"alg": alg, "kid": key.kid, **header}, payload, key)


def hmac_with_public_pem(payload: dict[str, Any]) -> str:
    """Key confusion: HS256 'signed' with the RSA public key the gateway trusts."""
    import hashlib  # noqa: PLC0415
    import hmac  # noqa: PLC0415

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    pem = RSA_1.as_pem(private=False)
    sig = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def now() -> int:
    return int(time.time())


# (name, token factory, what the refusal says)
BAD_TOKENS: list[tuple[str, Callable[[], str], str]] = [
    ("alg_none", lambda: raw_token({"alg": "none", "typ": "JWT"}, claims()), "not accepted"),
    ("alg_None_spelling", lambda: raw_token({"alg": "None"}, claims()), "not accepted"),
    ("alg_hs512", lambda: raw_token({"alg": "HS512"}, claims(), b"x" * 64), "not accepted"),
    ("alg_missing", lambda: raw_token({"typ": "JWT"}, claims(), b"x" * 32), "refused"),
    ("hs_rs_key_confusion", lambda: hmac_with_public_pem(claims()), "bad_signature"),
    ("wrong_hmac_secret", lambda: hs256(claims(), "another-secret-" + "z" * 40), "bad_signature"),
    ("rs256_forged_same_kid", lambda: signed(ATTACKER, "RS256", claims()), "bad_signature"),
    (
        "rs256_unknown_kid",
        lambda: signed(RSAKey.generate_key(2048, parameters={"kid": "nope"}), "RS256", claims()),
        "no RS256 key",
    ),
    (
        "es256_with_rsa_kid",
        lambda: jwt.encode({"alg": "ES256", "kid": "rsa-1"}, claims(), EC_1),
        "no ES256 key",
    ),
    (
        "jku_header",
        lambda: signed(RSA_1, "RS256", claims(), jku="https://evil.example/jwks.json"),
        "jku",
    ),
    (
        "x5u_header",
        lambda: signed(RSA_1, "RS256", claims(), x5u="https://evil.example/cert.pem"),
        "x5u",
    ),
    (
        "embedded_jwk_header",
        lambda: signed(EC_ATTACKER, "ES256", claims(), jwk=EC_ATTACKER.as_dict(private=False)),
        "jwk",
    ),
    (
        "unknown_crit_header",
        lambda: hs256_raw({"alg": "HS256", "crit": ["exp-ext"], "exp-ext": 1}, claims()),
        "exp-ext",
    ),
    ("expired", lambda: hs256(claims(exp=now() - 120, iat=now() - 700)), "expired"),
    ("not_yet_valid", lambda: hs256(claims(nbf=now() + 3600)), "not yet valid"),
    ("issued_in_future", lambda: hs256(claims(iat=now() + 3600)), "future"),
    ("missing_exp", lambda: hs256(claims(exp=None)), "exp"),
    ("exp_string", lambda: hs256(claims(exp=str(now() + 600))), "exp"),
    ("exp_bool", lambda: hs256(claims(exp=True)), "exp"),
    ("exp_absurd", lambda: hs256(claims(exp=now() + 20 * 365 * 86400)), "not within"),
    ("exp_huge_float", lambda: hs256(claims(exp=1e308)), "not within"),
    ("iat_negative", lambda: hs256(claims(iat=-5)), "not within"),
    ("refresh_token_type", lambda: hs256(claims(token_type="refresh")), "token_type"),
    ("missing_token_type", lambda: hs256(claims(token_type=None)), "token_type"),
    ("edge_credential_as_user", lambda: edge_token(EDGE), "token_type"),
    ("missing_jti", lambda: hs256(claims(jti=None)), "jti"),
    ("jti_not_string", lambda: hs256(claims(jti=12345)), "jti"),
    ("missing_user_id", lambda: hs256(claims(user_id=None)), "user_id"),
    ("user_id_json_injection", lambda: hs256(claims(user_id='x","actor":"admin')), "user_id"),
    ("user_id_too_long", lambda: hs256(claims(user_id="u" * 500)), "user_id"),
    ("user_id_trailing_newline", lambda: hs256(claims(user_id="alice\n")), "user_id"),
    ("hs256_unknown_kid", lambda: hs256(claims(), kid="rotated-key-2"), "unknown kid"),
    ("repeated_payload_member", repeated_payload_member, "twice"),
    ("repeated_header_member", repeated_header_member, "twice"),
    ("can_control_not_a_list", lambda: hs256(claims(can_control="*")), "can_control"),
    ("payload_not_an_object", lambda: raw_token({"alg": "HS256"}, [1, 2]), "refused"),
    ("garbage", lambda: "not.a.token", "refused"),
    ("two_segments", lambda: "eyJhbGciOiJIUzI1NiJ9.e30", "refused"),
    ("five_segments_jwe", lambda: "a.b.c.d.e", "refused"),
    ("oversized_token", oversized, "longer than"),
]


def test_there_are_many_distinct_bad_tokens() -> None:
    assert len({name for name, _, _ in BAD_TOKENS}) == len(BAD_TOKENS) >= 30


@pytest.mark.parametrize(
    ("make", "says"), [(m, s) for _, m, s in BAD_TOKENS], ids=[n for n, _, _ in BAD_TOKENS]
)
def test_bad_token_is_refused_at_the_handshake(
    site: Site, make: Callable[[], str], says: str
) -> None:
    token = make()
    with pytest.raises(InvalidStatus) as refused:
        site.dashboard(token)
    response = refused.value.response
    assert response.status_code == 401
    body = json.loads(response.body or b"{}")
    assert body["error"]["code"] == "unauthenticated"
    assert says in body["error"]["message"], body
    record = site.audit_for(code="unauthenticated", error=says)
    assert record["actor"].startswith("anonymous@127.0.0.1:")
    assert "/ws/dashboard" in record["input_excerpt"]
    # The same token is refused by the HTTP API too.
    status, _, reply = http("POST", f"{site.gw.http}/api/commands", token, command(edge_id=EDGE))
    assert status == 401 and reply["error"]["code"] == "unauthenticated"
    site.assert_edge_got_nothing()


def test_refusal_names_what_the_token_claimed(site: Site) -> None:
    token = hs256(claims(user_id="mallory", exp=now() - 500, iat=now() - 900))
    with pytest.raises(InvalidStatus):
        site.dashboard(token)
    record = site.audit_for(code="unauthenticated", input_excerpt="mallory")
    assert (
        "user_id='mallory'" in record["input_excerpt"] and "alg='HS256'" in record["input_excerpt"]
    )


def mint(alg: str, key: str, user: str, kind: str = "access") -> str:
    out = subprocess.run(
        [sys.executable, str(MINT), alg, key, user, kind],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


def test_plain_simplejwt_token_with_stored_grants_commands_an_edge(site: Site) -> None:
    """A token minted by the real djangorestframework-simplejwt, no custom claims."""
    token = mint("HS256", SECRET, "7")
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert (
        set(payload) == {"token_type", "exp", "iat", "jti", "user_id"} and payload["user_id"] == "7"
    )
    proc = site.processes.dispatch("grant", "grant", "7", EDGE, "can_control")
    assert proc.popen.wait(20) == 0
    wait_until(lambda: _admitted(site, token), 5, what="the grant to reach the gateway")


def _admitted(site: Site, token: str) -> bool:
    with site.dashboard(token) as dash:
        body = command(edge_id=EDGE)
        dash.send(json.dumps(body))
        reply = recv_for(dash, body["command_id"])
        if reply["status"] == "issued":
            assert reply["edge_id"] == EDGE
            wait_until(lambda: body["command_id"] in site.edge.ids(), 10, what="delivery")
            return True
        assert reply["error"]["code"] == "forbidden", reply
        return False


def test_simplejwt_refresh_token_is_refused(site: Site) -> None:
    with pytest.raises(InvalidStatus) as refused:
        site.dashboard(mint("HS256", SECRET, "7", "refresh"))
    assert refused.value.response.status_code == 401
    assert b"token_type" in (refused.value.response.body or b"")


def test_simplejwt_rs256_token_verified_with_the_jwks(site: Site, tmp_path: Path) -> None:
    """SimpleJWT signs RS256 without a `kid`: the one RSA key in the set verifies it."""
    pem = tmp_path / "rsa1.pem"
    pem.write_bytes(RSA_1.as_pem(private=True))
    token = mint("RS256", str(pem), "rs_user")
    site.processes.dispatch("grant", "grant", "rs_user", EDGE, "can_control").popen.wait(20)
    wait_until(lambda: _admitted(site, token), 5, what="an RS256 SimpleJWT token to be admitted")


def test_es256_token_with_kid_is_accepted(site: Site) -> None:
    token = signed(EC_1, "ES256", claims(user_id="es_user"))
    assert _admitted(site, token)


def test_rotated_key_is_fetched_on_unknown_kid_without_hammering(
    site: Site, jwks_server: JwksServer
) -> None:
    token = signed(RSA_2, "RS256", claims(user_id="rotated"))
    with pytest.raises(InvalidStatus):
        site.dashboard(token)  # not published yet
    jwks_server.keys = [*jwks_server.keys, RSA_2.as_dict(private=False)]
    # Made-up key ids do not turn into a fetch each: at most one per 2 s window.
    before, started = jwks_server.fetches, time.monotonic()
    for _ in range(15):
        bogus = signed(
            RSAKey.generate_key(2048, parameters={"kid": uuid.uuid4().hex}), "RS256", claims()
        )
        with pytest.raises(InvalidStatus):
            site.dashboard(bogus)
    windows = (time.monotonic() - started) / 2 + 1
    assert jwks_server.fetches - before <= windows + 1
    # The new key is picked up by the next refresh the unknown kid allows.
    wait_until(lambda: _handshake_ok(site, token), 10, what="the rotated key to be accepted")


def _handshake_ok(site: Site, token: str) -> bool:
    try:
        site.dashboard(token).close()
        return True
    except InvalidStatus:
        return False


async def test_jwks_file_source_reads_public_keys_only(tmp_path: Path) -> None:
    secret = OctKey.generate_key(256, parameters={"kid": "oct-1"}).as_dict(private=True)
    doc = {"keys": [RSA_1.as_dict(private=True), EC_1.as_dict(private=False), secret]}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(doc))
    source = JwksSource(file=str(path))
    assert await source.key("rsa-1", "RS256") is not None
    assert await source.key("ec-1", "ES256") is not None
    assert await source.key("oct-1", "RS256") is None  # symmetric keys never come from a set
    assert await source.key("rsa-1", "ES256") is None  # the algorithm picks the key type
    rsa = await source.key("rsa-1", "RS256")
    assert rsa is not None and not rsa.is_private


def test_issuer_audience_and_hs256_key_id_when_configured(processes: Processes) -> None:
    enroll(processes, EDGE)
    gw = start_gateway(
        processes,
        {
            **NO_LIMITS,
            "DISPATCH_JWT_ISSUER": "https://auth.example",
            "DISPATCH_JWT_AUDIENCE": "dispatch",
            "DISPATCH_JWT_KEY_ID": "django-2026",
        },
    )
    url = f"{gw.http}/api/commands"
    good = claims(iss="https://auth.example", aud="dispatch")
    for bad in (
        claims(),
        claims(iss="https://evil.example", aud="dispatch"),
        claims(iss="https://auth.example", aud="other"),
    ):
        status, _, reply = http("POST", url, hs256(bad), command(edge_id=EDGE))
        assert status == 401 and reply["error"]["code"] == "unauthenticated", reply
    status, _, reply = http("POST", url, hs256(good), command(edge_id=EDGE))
    assert status == 202, reply
    # The configured key id is accepted; any other is not.
    status, _, reply = http("POST", url, hs256(good, kid="django-2026"), command(edge_id=EDGE))
    assert status == 202, reply
    status, _, reply = http("POST", url, hs256(good, kid="django-2025"), command(edge_id=EDGE))
    assert status == 401 and "unknown kid" in reply["error"]["message"], reply


def test_edge_credentials_cannot_be_forged_with_the_user_key_when_separated(
    processes: Processes,
) -> None:
    """With DISPATCH_EDGE_JWT_SECRET set, the users' signing key cannot mint edges."""
    edge_secret = "edge-only-secret-" + "e" * 40
    enroll(processes, EDGE)
    gw = start_gateway(processes, {**NO_LIMITS, "DISPATCH_EDGE_JWT_SECRET": edge_secret})
    forged = hs256(edge_claims(EDGE, 600))  # right claims, signed with the user secret
    good = hs256(edge_claims(EDGE, 600), edge_secret)
    from .conftest import ws_connect  # noqa: PLC0415

    ws_connect(f"{gw.ws}/ws/edge/{EDGE}", good).close()
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(f"{gw.ws}/ws/edge/{EDGE}", forged)
    assert refused.value.response.status_code == 401
