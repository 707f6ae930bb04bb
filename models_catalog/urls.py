from django.urls import path

from models_catalog import views

app_name = "models_catalog"
urlpatterns = [
    path("", views.index, name="list"),
]
