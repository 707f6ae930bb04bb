from django.urls import path

from dashboard import views

app_name = "dashboard"
urlpatterns = [
    path("", views.overview, name="overview"),
    path("overview/health", views.health_panel, name="health-panel"),
    path("usage/set-aside", views.set_aside, name="set-aside"),
]
