from django.urls import path

from tenancy import views

app_name = "tenancy"
urlpatterns = [
    path("", views.index, name="list"),
    path("new", views.create, name="create"),
    path("usage/", views.usage, name="usage"),
    path("usage.csv", views.usage_csv, name="usage-csv"),
    path("chargeback/", views.chargeback, name="chargeback"),
    path("chargeback.csv", views.chargeback_csv, name="chargeback-csv"),
    path("costs/", views.costs, name="costs"),
    path("costs.csv", views.costs_csv, name="costs-csv"),
    path("chargeback/prices", views.set_price, name="set-price"),
    path("chargeback/prices/<int:price_id>/delete", views.delete_price, name="delete-price"),
    path("<int:department_id>/", views.detail, name="detail"),
    path("<int:department_id>/quotas", views.update, name="update"),
    path("<int:department_id>/delete", views.delete_department, name="delete"),
    path("<int:department_id>/members", views.add_member, name="add-member"),
    path("<int:department_id>/members/<int:user_id>/remove", views.remove_member, name="remove-member"),
    path("<int:department_id>/keys/new", views.issue_key, name="issue-key"),
    path("<int:department_id>/keys/<int:key_id>/reveal", views.reveal, name="reveal"),
    path("<int:department_id>/keys/<int:key_id>/<slug:action>", views.key_action, name="key-action"),
]
