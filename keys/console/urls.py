"""Routes of the console, mounted at /console/ (gateway_project/urls.py)."""
from __future__ import annotations

from django.urls import path

from keys.console import views

app_name = "console"
urlpatterns = [
    path("", views.home, name="home"),
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", views.LogoutView.as_view(), name="logout"),
    path("teams/<int:team_id>/", views.team_detail, name="team"),
    path("teams/<int:team_id>/keys/new/", views.key_create, name="key-create"),
    path("keys/<int:key_id>/", views.key_detail, name="key"),
    path("keys/<int:key_id>/revoke/", views.key_revoke, name="key-revoke"),
    path("keys/<int:key_id>/rotate/", views.key_rotate, name="key-rotate"),
]
