"""manage.py totp_device USER: enrol a TOTP device for a staff user (GATEWAY_ADMIN_OTP).

Prints the otpauth:// URI once, for an authenticator app (most accept it pasted, or as a QR
code made locally, e.g. `qrencode -t ansiutf8 'otpauth://...'`); the secret is not shown again.
"""
from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError, CommandParser
from django_otp.plugins.otp_totp.models import TOTPDevice

from keys.audit.commands import AuditedCommand


class Command(AuditedCommand):
    help = "Enrol a TOTP device (authenticator app) for a user and print its otpauth:// URI once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="authenticator", help="The device's name in the admin.")
        parser.add_argument("--replace", action="store_true", help="Delete the user's other TOTP devices first.")

    def handle(self, *args, **options) -> None:
        try:
            user = get_user_model().objects.get(username=options["username"])
        except get_user_model().DoesNotExist:
            raise CommandError(f"No user named {options['username']!r}.") from None
        if options["replace"]:
            TOTPDevice.objects.filter(user=user).delete()
        device = TOTPDevice.objects.create(user=user, name=options["name"][:64], confirmed=True)
        self.stdout.write(f"TOTP device {device.name!r} for {user.username}. Add it to an authenticator app "
                          f"(shown once):\n{device.config_url}\n")
