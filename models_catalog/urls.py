from django.urls import path

from models_catalog import views

app_name = "models_catalog"
urlpatterns = [
    path("", views.index, name="list"),
    path("add", views.add, name="add"),
    path("download", views.download, name="download"),
    path("import", views.import_directory, name="import"),
    path("sources/", views.endpoints, name="endpoints"),
    path("sources/new", views.endpoint_save, name="endpoint-create"),
    path("sources/<int:endpoint_id>", views.endpoint_save, name="endpoint-update"),
    path("sources/<int:endpoint_id>/delete", views.endpoint_delete, name="endpoint-delete"),
    path("jobs/<int:job_id>/progress", views.job_progress, name="job-progress"),
    path("jobs/<int:job_id>/cancel", views.cancel_job, name="job-cancel"),
    path("<int:model_id>/", views.detail, name="detail"),
    path("<int:model_id>/estimate", views.estimate_panel, name="estimate"),
    path("<int:model_id>/<slug:action>", views.act, name="act"),
]
