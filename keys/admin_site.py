"""The admin says what it is: the gateway's AdminSite, installed as Django's default site
(settings.INSTALLED_APPS names GatewayAdminConfig instead of django.contrib.admin).

Its index links the dashboard, the live view and upstream health; its login page offers
single sign-on when it is configured (keys/oidc.py) beside the local login, and asks staff for
a TOTP token when GATEWAY_ADMIN_OTP is on (django-otp; devices: `manage.py totp_device`).
"""
from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.apps import AdminConfig

SITE_HEADER = "FastChat gateway"


def otp_required() -> bool:
    return settings.GATEWAY_ADMIN_OTP


def otp_login_form():
    """The admin's login form with a token field: a user with one device need not choose it."""
    from django_otp import devices_for_user
    from django_otp.admin import OTPAdminAuthenticationForm  # needs the apps loaded

    class TokenLoginForm(OTPAdminAuthenticationForm):
        def _chosen_device(self, user):
            device = super()._chosen_device(user)
            if device is None:
                devices = list(devices_for_user(user, confirmed=True))
                device = devices[0] if len(devices) == 1 else None
            return device

    return TokenLoginForm


class ReadOnlyAdmin(admin.ModelAdmin):
    """A model admin that lists and shows rows and never adds, changes or deletes one, not even
    for superusers (usage rows, the audit trail, stored responses)."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class GatewayAdminSite(admin.AdminSite):
    site_header = SITE_HEADER
    site_title = SITE_HEADER
    index_title = "Administration"
    index_template = "admin/gateway_index.html"
    login_template = "admin/gateway_login.html"

    def has_permission(self, request) -> bool:
        """Staff, and with the second factor on, verified by a TOTP token in this session."""
        if not super().has_permission(request):
            return False
        return not otp_required() or request.user.is_verified()

    def login(self, request, extra_context=None):
        if otp_required():
            self.login_form = otp_login_form()
        else:
            self.login_form = None
        return super().login(request, extra_context)



def login_options(request) -> dict:
    """Context processor: what the login pages (the admin's and the console's) offer."""
    return {"sso_enabled": bool(settings.OIDC_RP_CLIENT_ID), "otp_required": otp_required()}


class GatewayAdminConfig(AdminConfig):
    default_site = "keys.admin_site.GatewayAdminSite"
