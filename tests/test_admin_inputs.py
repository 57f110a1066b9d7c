"""Bad primary keys reaching the admin (change URLs, action checkboxes) are "not found" or an
error message: never a 500, never an action on other rows."""

from __future__ import annotations

import pytest
from django.test import Client

from reproq.models import TaskRun
from tests.dashboard_helpers import make_run, staff_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff() -> Client:
    client = Client()
    client.force_login(staff_user())
    return client


@pytest.mark.parametrize("url", [
    "/admin/reproq/worker/a%00b/change/", "/admin/reproq/queuecontrol/%00/change/",
    "/admin/reproq/ratelimit/k%00/change/", "/admin/reproq/taskrun/%D9%A1/change/",
    "/admin/reproq/taskrun/99999999999999999999/change/",
    "/admin/reproq/periodictask/%C2%B2/change/", "/admin/reproq/worker/a%00b/delete/",
])
def test_a_bad_key_in_a_change_url_is_not_found(staff, url):
    response = staff.get(url)
    assert response.status_code == 302  # Django's "doesn't exist" redirect


@pytest.mark.parametrize("selected", [["᧚"], [""], ["1", "x"], ["1\x00"], [str(2**70)]])
def test_bad_selected_ids_in_an_admin_action_change_nothing(staff, selected):
    run = make_run("READY")
    response = staff.post("/admin/reproq/taskrun/", {
        "action": "cancel_runs", "_selected_action": [*selected, str(run.pk)], "index": "0"},
        follow=True)
    assert response.status_code == 200
    assert "not ids of" in response.content.decode()
    assert TaskRun.objects.get(pk=run.pk).status == "READY"


def test_good_selected_ids_still_act(staff):
    run = make_run("READY")
    response = staff.post("/admin/reproq/taskrun/", {
        "action": "cancel_runs", "_selected_action": [str(run.pk)], "index": "0"}, follow=True)
    assert response.status_code == 200
    assert TaskRun.objects.get(pk=run.pk).status == "CANCELLED"


def test_times_python_cannot_hold_show_as_unknown_in_the_admin_list_and_page(staff):
    from django.db import connection

    odd, beside = make_run("READY"), make_run("FAILED")
    with connection.cursor() as cur:
        cur.execute("UPDATE reproq_task_runs SET enqueued_at = '-infinity', "
                    "run_after = 'infinity', started_at = '20000-01-01', "
                    "finished_at = '4713-01-01 BC' WHERE id = %s", [odd.pk])
    listing = staff.get("/admin/reproq/taskrun/")
    assert listing.status_code == 200
    assert f">{beside.pk}<" in listing.content.decode()  # the row beside it is listed too
    page = staff.get(f"/admin/reproq/taskrun/{odd.pk}/change/")
    assert page.status_code == 200
    assert staff.get(f"/admin/reproq/taskrun/?o=7&q={odd.pk}").status_code == 200  # sorted
