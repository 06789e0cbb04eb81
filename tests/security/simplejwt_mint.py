"""Mint a token with the real djangorestframework-simplejwt (run as a subprocess).

    python simplejwt_mint.py ALG KEY USER [access|refresh]

KEY is the HS256 secret, or for RS256/ES256 the path of a PEM private key. Django is
configured in this process only, so the test process stays free of Django settings.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

from django.conf import settings


def main(alg: str, key: str, user: str, kind: str = "access") -> str:
    signing_key = key if alg == "HS256" else Path(key).read_text()
    settings.configure(
        SECRET_KEY="django-insecure-" + "x" * 40,
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "rest_framework_simplejwt",
        ],
        SIMPLE_JWT={"ALGORITHM": alg, "SIGNING_KEY": signing_key},
        USE_TZ=True,
    )
    import django  # noqa: PLC0415

    django.setup()
    from rest_framework_simplejwt.tokens import AccessToken, RefreshToken  # noqa: PLC0415

    token_class = AccessToken if kind == "access" else RefreshToken
    person = SimpleNamespace(id=user, pk=user, is_active=True)
    return str(token_class.for_user(person))


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
