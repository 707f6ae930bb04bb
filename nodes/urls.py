from django.urls import path

from nodes import views

app_name = "nodes"
urlpatterns = [
    path("", views.index, name="list"),
    path("join-tokens/new", views.create_join_token, name="join-token"),
    path("join-tokens/<int:join_token_id>/", views.join_reveal, name="join-reveal"),
    path("<int:node_id>/<slug:action>", views.act, name="act"),
]
