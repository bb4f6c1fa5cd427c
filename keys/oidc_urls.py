"""Single sign-on routes (keys/oidc.py), 404 while SSO is not configured."""
from __future__ import annotations

from django.urls import path

from keys import oidc

urlpatterns = [
    path("callback/", oidc.CallbackView.as_view(), name="oidc_authentication_callback"),
    path("authenticate/", oidc.AuthenticationRequestView.as_view(), name="oidc_authentication_init"),
]
