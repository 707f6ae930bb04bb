from django.urls import path

from gpus import views

app_name = "gpus"
urlpatterns = [
    path("", views.index, name="list"),
]
