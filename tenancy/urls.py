from django.urls import path

from tenancy import views

app_name = "tenancy"
urlpatterns = [
    path("", views.index, name="list"),
]
