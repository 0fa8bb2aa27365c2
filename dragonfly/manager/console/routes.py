"""The console's routes (mounted by dragonfly/manager/app.py before the API's)."""

from __future__ import annotations

from starlette.routing import Route

from dragonfly.manager.console import pages_admin, pages_clusters, pages_jobs, pages_main

GET, POST, BOTH = ["GET"], ["POST"], ["GET", "POST"]

ROUTES = [
    Route("/", pages_main.home, methods=GET),
    Route("/signin", pages_main.signin_page, methods=BOTH),
    Route("/signout", pages_main.signout, methods=POST),
    Route("/static/console.css", pages_main.stylesheet, methods=GET),
    Route("/clusters", pages_clusters.clusters, methods=GET),
    Route("/clusters/new", pages_clusters.cluster_form, methods=BOTH),
    Route("/clusters/{id}", pages_clusters.cluster, methods=GET),
    Route("/clusters/{id}/edit", pages_clusters.cluster_form, methods=BOTH),
    Route("/clusters/{id}/delete", pages_clusters.cluster_delete, methods=POST),
    Route("/clusters/{id}/sync", pages_clusters.cluster_sync, methods=POST),
    Route("/jobs", pages_jobs.jobs, methods=GET),
    Route("/jobs/new", pages_jobs.job_new, methods=BOTH),
    Route("/jobs/{id}", pages_jobs.job, methods=GET),
    Route("/tasks", pages_jobs.tasks, methods=BOTH),
    Route("/tasks/delete", pages_jobs.task_delete, methods=POST),
    Route("/traffic", pages_admin.traffic, methods=GET),
    Route("/users", pages_admin.users, methods=BOTH),
    Route("/users/{id}", pages_admin.user_change, methods=POST),
    Route("/tokens", pages_admin.tokens, methods=BOTH),
    Route("/tokens/{id}", pages_admin.token_change, methods=POST),
    Route("/audits", pages_admin.audits, methods=GET),
]
