from django.urls import path

from gateway import views

app_name = "gateway"
urlpatterns = [
    path("", views.page, name="playground"),
    path("chat", views.chat, name="playground-chat"),
]
