"""Run by Django's own test runner: ``python manage.py test demo``."""

import os
import tempfile
from io import StringIO
from unittest import mock

from django.apps import apps
from django.core import checks
from django.core.management import call_command
from django.test import SimpleTestCase, override_settings

import coordlock
from coordlock.integrations.django import autodiscover, get_scheduler
from coordlock.integrations.django.registry import add


def _ids(messages):
    return sorted(m.id for m in messages if m.id and m.id.startswith("coordlock."))


class SettingsTests(SimpleTestCase):
    def test_configured_at_ready_from_settings(self):
        coordinator = coordlock.get_coordinator()
        scheme = os.environ["COORDLOCK_URL"].split(":", 1)[0]
        self.assertIn(scheme[:5], type(coordinator).__name__.lower())
        self.assertIsNone(apps.get_app_config("coordlock").configure_error)

    def test_check_passes_with_a_good_url(self):
        self.assertEqual(_ids(checks.run_checks(tags=["coordlock"])), [])

    def test_check_reports_a_missing_url(self):
        with override_settings(COORDLOCK_URL=None), mock.patch.dict(os.environ):
            os.environ.pop("COORDLOCK_URL", None)
            self.assertEqual(_ids(checks.run_checks(tags=["coordlock"])), ["coordlock.W001"])

    def test_check_reports_a_bad_url(self):
        with override_settings(COORDLOCK_URL="nosuch://host"):
            found = checks.run_checks(tags=["coordlock"])
        self.assertEqual(_ids(found), ["coordlock.E001"])
        self.assertIn("redis", found[0].msg)  # the message lists the known schemes

    def test_check_reports_bad_options(self):
        with override_settings(COORDLOCK_OPTIONS=["x"], COORDLOCK_SCHEDULER={"max_workers": 0}):
            self.assertEqual(
                _ids(checks.run_checks(tags=["coordlock"])), ["coordlock.E002", "coordlock.E002"]
            )

    def test_deploy_check_warns_about_single_host_urls(self):
        url = f"sqlite:///{tempfile.mkdtemp()}/locks.db"  # absolute: sqlite:////tmp/...
        with override_settings(COORDLOCK_URL=url):
            found = checks.run_checks(tags=["coordlock"], include_deployment_checks=True)
        self.assertEqual(_ids(found), ["coordlock.W002"])


class JobsTests(SimpleTestCase):
    def test_jobs_py_is_autodiscovered(self):
        self.assertIn("demo-tick", autodiscover())
        self.assertIs(get_scheduler(), get_scheduler())

    def test_process_isolation_is_refused_at_registration(self):
        with self.assertRaisesMessage(ValueError, "isolation='process'"):
            add(print, 60, name="nope", isolation="process")

    def test_scheduler_command_lists_the_jobs(self):
        out = StringIO()
        call_command("coordlock_scheduler", "--list", stdout=out)
        self.assertIn("demo-tick", out.getvalue())


class LockedCommandTests(SimpleTestCase):
    def test_locked_handle_runs_when_free_and_skips_when_held(self):
        out = StringIO()
        call_command("nightly_report", stdout=out)
        self.assertIn("report written", out.getvalue())
        out = StringIO()
        with coordlock.lock("nightly-report", ttl=30):
            call_command("nightly_report", stdout=out)
        self.assertEqual(out.getvalue(), "")
