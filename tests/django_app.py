"""A tiny Django project in one file, served by Django's own HTTP server on the port given.

`python tests/django_app.py PORT` serves, with Django's real `CsrfViewMiddleware`:
- `GET /form`: a page whose body is the CSRF token (and the `csrftoken` cookie set);
- `POST /submit`: "accepted" if the CSRF check passed (Django answers 403 if not);
- `GET /host`: the Host Django read (`request.get_host()`).

ALLOWED_HOSTS is the upstream's own Host check: jitgate's public name and the loopback.
"""

from __future__ import annotations

import sys

import django
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import get_token
from django.urls import path

PUBLIC_HOST = "replay.test"


def form(request: HttpRequest) -> HttpResponse:
    return HttpResponse(get_token(request), content_type="text/plain")


def submit(request: HttpRequest) -> HttpResponse:
    return HttpResponse("accepted", content_type="text/plain")


def host(request: HttpRequest) -> HttpResponse:
    return HttpResponse(request.get_host(), content_type="text/plain")


urlpatterns = [path("form", form), path("submit", submit), path("host", host)]


def main(port: int) -> None:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="django-insecure-test-only-0123456789abcdefghijklmnop",
        ALLOWED_HOSTS=[PUBLIC_HOST, "127.0.0.1"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[
            "django.middleware.common.CommonMiddleware",
            "django.middleware.csrf.CsrfViewMiddleware",
        ],
        INSTALLED_APPS=[],
        DATABASES={},
        USE_TZ=True,
    )
    django.setup()
    from django.core.servers.basehttp import run
    from django.core.wsgi import get_wsgi_application

    run("127.0.0.1", port, get_wsgi_application(), threading=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
