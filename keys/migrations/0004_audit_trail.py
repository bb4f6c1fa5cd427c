# The audit trail (keys/audit/), append-only down to the database (docs/decisions.md#audit).

import django.core.serializers.json
import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models

# PostgreSQL: no row of the trail can be changed or deleted, whoever asks (TRUNCATE, a table
# owner's act, stays possible for retention and the tests' flush).
POSTGRESQL = [
    """CREATE FUNCTION keys_auditentry_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN RAISE EXCEPTION 'audit entries are append-only: % refused', TG_OP; END $$""",
    """CREATE TRIGGER keys_auditentry_append_only BEFORE UPDATE OR DELETE ON keys_auditentry
       FOR EACH ROW EXECUTE FUNCTION keys_auditentry_append_only()""",
]
POSTGRESQL_REVERSE = [
    "DROP TRIGGER IF EXISTS keys_auditentry_append_only ON keys_auditentry",
    "DROP FUNCTION IF EXISTS keys_auditentry_append_only()",
]
# SQLite: no UPDATE. Its DELETE is how Django empties tables between transactional tests,
# so there the model, its queryset and the admin refuse deletion instead.
SQLITE = [
    """CREATE TRIGGER keys_auditentry_no_update BEFORE UPDATE ON keys_auditentry
       BEGIN SELECT RAISE(ABORT, 'audit entries are append-only: UPDATE refused'); END""",
]
SQLITE_REVERSE = ["DROP TRIGGER IF EXISTS keys_auditentry_no_update"]


def run(statements):
    def apply(apps, schema_editor):
        for statement in statements.get(schema_editor.connection.vendor, []):
            schema_editor.execute(statement, params=None)  # no placeholders: % is PL/pgSQL's
    return apply


class Migration(migrations.Migration):

    dependencies = [
        ('keys', '0003_teams_prices_spend'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name='AuditEntry',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('created_at', models.DateTimeField(db_index=True, default=django.utils.timezone.now)),
                ('origin', models.CharField(choices=[('admin', 'admin'), ('api', 'REST API'), ('console', 'console'), ('command', 'management command'), ('web', 'other web page'), ('system', 'the gateway itself')], max_length=8)),
                ('actor_label', models.CharField(blank=True, max_length=200, verbose_name='actor')),
                ('ip', models.GenericIPAddressField(blank=True, null=True, verbose_name='client IP')),
                ('request_id', models.CharField(blank=True, max_length=128)),
                ('where', models.CharField(blank=True, help_text='The request (method and path) or the command.', max_length=200)),
                ('action', models.CharField(choices=[('create', 'created'), ('update', 'changed'), ('delete', 'deleted')], max_length=6)),
                ('object_type', models.CharField(help_text='app_label.model', max_length=100)),
                ('object_id', models.CharField(max_length=64)),
                ('object_repr', models.CharField(max_length=200, verbose_name='object')),
                ('changes', models.JSONField(default=dict, encoder=django.core.serializers.json.DjangoJSONEncoder, help_text='field: [before, after]; secrets appear as [redacted].')),
                ('actor_key', models.ForeignKey(blank=True, db_constraint=False, null=True, on_delete=django.db.models.deletion.DO_NOTHING, related_name='+', to='keys.apikey', verbose_name='API key')),
                ('actor_user', models.ForeignKey(blank=True, db_constraint=False, null=True, on_delete=django.db.models.deletion.DO_NOTHING, related_name='+', to=settings.AUTH_USER_MODEL, verbose_name='user')),
            ],
            options={
                'verbose_name': 'audit entry',
                'verbose_name_plural': 'audit trail',
                'ordering': ['-created_at', '-id'],
                'default_permissions': ('view',),
                'indexes': [models.Index(fields=['object_type', 'object_id', 'created_at'], name='audit_object'), models.Index(fields=['actor_user', 'created_at'], name='audit_actor')],
            },
        ),
        migrations.RunPython(run({"postgresql": POSTGRESQL, "sqlite": SQLITE}),
                             run({"postgresql": POSTGRESQL_REVERSE, "sqlite": SQLITE_REVERSE})),
    ]
