"""The console (/console/): a small site where team members see their teams' keys, spend and
usage, and owners create, revoke, rotate and limit keys. Rights: keys/permissions.py."""
