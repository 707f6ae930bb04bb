"""Top-level URLs. Each app owns its own ``urls.py``."""

from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path

from appliance import views
from appliance.api import api
from appliance.forms import LoginForm
from appliance.passwords import PasswordChangeView
from models_catalog import mirror

LOGIN = views.LoginView.as_view(redirect_authenticated_user=True, authentication_form=LoginForm)

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("metrics", views.metrics, name="metrics"),
    path("login/", LOGIN, name="login"),
    path("login/oidc/", views.oidc_login, name="oidc-login"),
    path("login/oidc/callback", views.oidc_callback, name="oidc-callback"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("settings/password/", PasswordChangeView.as_view(), name="password-change"),
    path("i18n/", include("django.conf.urls.i18n")),
    path("api/v1/", api.urls),
    re_path(r"^hf/(?P<rest>.*)$", mirror.hub, name="hf-mirror"),
    path("audit/", views.audit_log, name="audit"),
    path("settings/users/", views.user_list, name="users"),
    path("settings/directory/", views.directory_settings, name="directory"),
    path("settings/directory/test", views.directory_test, name="directory-test"),
    path("settings/directory/oidc-test", views.oidc_test, name="directory-oidc-test"),
    path("settings/users/new", views.user_create, name="user-create"),
    path("settings/users/<int:user_id>/role", views.user_set_role, name="user-set-role"),
    path("settings/users/<int:user_id>/active", views.user_toggle_active, name="user-toggle-active"),
    path("settings/tokens/", views.token_list, name="tokens"),
    path("settings/tokens/new", views.token_create, name="token-create"),
    path("settings/tokens/<int:token_id>/revoke", views.token_revoke, name="token-revoke"),
    path("models/", include("models_catalog.urls")),
    path("deployments/", include("provisioning.urls")),
    path("gpus/", include("gpus.urls")),
    path("departments/", include("tenancy.urls")),
    path("nodes/", include("nodes.urls")),
    path("playground/", include("gateway.urls")),
    path("", include("dashboard.urls")),
]

handler403 = "appliance.views.permission_denied"
handler404 = "appliance.views.page_not_found"
handler500 = "appliance.views.server_error"
