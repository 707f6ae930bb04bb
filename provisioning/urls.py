from django.urls import path

from provisioning import views

app_name = "provisioning"
urlpatterns = [
    path("", views.index, name="list"),
    path("new", views.deploy, name="deploy"),
    path("new/memory", views.deploy_memory, name="deploy-memory"),
    path("engines/install", views.install_runtime, name="install-runtime"),
    path("<slug:name>/", views.detail, name="detail"),
    path("<slug:name>/engine-chart", views.engine_chart, name="engine-chart"),
    path("<slug:name>/<slug:action>", views.act, name="act"),
]
