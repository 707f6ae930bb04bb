from django.urls import path

from gpus import views

app_name = "gpus"
urlpatterns = [
    path("", views.index, name="list"),
    path("tiles", views.tiles, name="tiles"),
    path("<int:gpu_id>/", views.detail, name="detail"),
    path("chart", views.chart, name="chart"),
    path("alerts/<int:alert_id>/ack", views.alert_ack, name="alert-ack"),
    path("webhooks/new", views.webhook_create, name="webhook-create"),
    path("webhooks/<int:webhook_id>/delete", views.webhook_delete, name="webhook-delete"),
]
