"""A minimal OpenID provider for the tests, on a free local port (no external network).

It implements what a relying party's authorization-code flow needs: discovery, authorize (the
test chooses who "logs in" and their claims; consent is implied), token (an RS256 ID token
signed with a key made at start, bound to the code's client, redirect URI and nonce), JWKS
and userinfo. Codes and access tokens are single-use / bound like a real provider's.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

KID = "test-key-1"


class Provider:
    def __init__(self, client_id: str, client_secret: str) -> None:
        self.client_id, self.client_secret = client_id, client_secret
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.claims: dict = {}  # the user who logs in next, as userinfo claims (sub included)
        self.audience: str | None = None  # another audience, to test a token for another client
        self.codes: dict[str, dict] = {}
        self.tokens: dict[str, dict] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Provider:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def settings(self) -> dict:
        return {"OIDC_RP_CLIENT_ID": self.client_id, "OIDC_RP_CLIENT_SECRET": self.client_secret,
                "OIDC_RP_SIGN_ALGO": "RS256",
                "OIDC_OP_AUTHORIZATION_ENDPOINT": f"{self.url}/authorize",
                "OIDC_OP_TOKEN_ENDPOINT": f"{self.url}/token",
                "OIDC_OP_USER_ENDPOINT": f"{self.url}/userinfo",
                "OIDC_OP_JWKS_ENDPOINT": f"{self.url}/jwks"}

    def jwks(self) -> dict:
        jwk = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**jwk, "kid": KID, "alg": "RS256", "use": "sig"}]}

    def id_token(self, grant: dict) -> str:
        now = int(time.time())
        claims = {"iss": self.url, "sub": grant["claims"]["sub"], "aud": self.audience or self.client_id,
                  "iat": now, "exp": now + 300, "nonce": grant["nonce"]}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": KID})

    def handler(self):
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def reply(self, status: int, body: dict | None = None, headers: dict | None = None) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/.well-known/openid-configuration":
                    self.reply(200, {"issuer": provider.url, "authorization_endpoint": f"{provider.url}/authorize",
                                     "token_endpoint": f"{provider.url}/token", "jwks_uri": f"{provider.url}/jwks",
                                     "userinfo_endpoint": f"{provider.url}/userinfo",
                                     "id_token_signing_alg_values_supported": ["RS256"]})
                elif url.path == "/jwks":
                    self.reply(200, provider.jwks())
                elif url.path == "/authorize":
                    if query.get("client_id") != provider.client_id or query.get("response_type") != "code":
                        return self.reply(400, {"error": "invalid_request"})
                    code = secrets.token_urlsafe(16)
                    provider.codes[code] = {"redirect_uri": query["redirect_uri"], "nonce": query.get("nonce"),
                                            "claims": dict(provider.claims)}
                    target = f"{query['redirect_uri']}?{urlencode({'code': code, 'state': query['state']})}"
                    self.reply(302, headers={"Location": target})
                elif url.path == "/userinfo":
                    grant = provider.tokens.get(self.headers.get("Authorization", "").removeprefix("Bearer "))
                    self.reply(200, grant["claims"]) if grant else self.reply(401, {"error": "invalid_token"})
                else:
                    self.reply(404)

            def do_POST(self) -> None:
                if urlsplit(self.path).path != "/token":
                    return self.reply(404)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                form = {k: v[0] for k, v in parse_qs(body).items()}
                grant = provider.codes.pop(form.get("code", ""), None)  # single use
                if (grant is None or form.get("grant_type") != "authorization_code"
                        or form.get("client_id") != provider.client_id
                        or form.get("client_secret") != provider.client_secret
                        or form.get("redirect_uri") != grant["redirect_uri"]):
                    return self.reply(400, {"error": "invalid_grant"})
                access = secrets.token_urlsafe(16)
                provider.tokens[access] = grant
                self.reply(200, {"access_token": access, "token_type": "Bearer", "expires_in": 300,
                                 "id_token": provider.id_token(grant)})

        return Handler
